"""The inspector's entries as JSON: a row of the list, one exchange in full, and HAR 1.2.

Made when the admin asks, from the references the recorder kept. Header values named in
``[inspect] mask_headers`` are shown as ``[masked]`` everywhere, the HAR export included.
"""

from __future__ import annotations

import base64
import http
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl

from ... import __version__
from ...exchange import ExchangeRecord
from .recorder import BodyCopy, Entry, Inspector

MASK = "[masked]"

JsonObject = dict[str, Any]


def _text(value: bytes) -> str:
    return value.decode("latin-1")


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds")


def _headers(headers: Iterable[tuple[bytes, bytes]], masked: frozenset[bytes]) -> list[list[str]]:
    return [
        [_text(name), MASK if name.lower() in masked else _text(value)] for name, value in headers
    ]


def _content_type(headers: Iterable[tuple[bytes, bytes]] | None) -> str:
    for name, value in headers or ():
        if name.lower() == b"content-type":
            return _text(value)
    return ""


def _connection(record: ExchangeRecord) -> str | None:
    if record.upstream_reused is None:
        return None
    return "reused" if record.upstream_reused else "new"


def summary(entry: Entry) -> JsonObject:
    """One row of the list."""
    record, head = entry.record, entry.client_head
    status = record.status or (entry.client_response[0] if entry.client_response else 0)
    return {
        "id": entry.id,
        "time": _iso(record.wall_start),
        "method": _text(head.method),
        "target": _text(head.target),
        "host": _text(head.authority),
        "status": status or None,
        "duration_ms": _ms(record.duration) if entry.finished else None,
        "bytes_in": record.bytes_in,
        "bytes_out": record.bytes_out,
        "upstream": record.route_upstream or None,
        "server": record.upstream_server or None,
        "protocol": _text(record.protocol),
        "connection": _connection(record),
        "retried": record.retried,
        "error": record.error or None,
        "in_progress": not entry.finished,
        "event_stream": record.event_stream,
        "replay_of": entry.replay_of,
    }


def matches(row: JsonObject, *, path: str = "", status: str = "", method: str = "") -> bool:
    """The list's filters: ``path`` is a part of the target, ``status`` a code (``404``) or a
    class (``4xx``), ``method`` a method in any case."""
    if path and path not in row["target"]:
        return False
    if method and row["method"] != method.upper():
        return False
    if status:
        code = str(row["status"] or "")
        wanted = status.lower()
        if wanted.endswith("xx") and len(wanted) == 3:
            return code[:1] == wanted[0]
        return code == wanted
    return True


def rows(inspector: Inspector, query: str = "") -> JsonObject:
    """The list, newest first, filtered by the query string's ``path``, ``status``, ``method``."""
    filters = {k: v for k, v in parse_qsl(query) if k in ("path", "status", "method")}
    out = [summary(entry) for entry in inspector.entries()]
    out = [row for row in reversed(out) if matches(row, **filters)]
    return {"keep": inspector.config.keep, "exchanges": out}


def _decoded(data: bytes, truncated: bool) -> str | None:
    """The body as UTF-8 text, or None if it is not text (a character cut by the limit at the
    end does not count)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if truncated and exc.start >= len(data) - 3 and exc.reason == "unexpected end of data":
            return data[: exc.start].decode("utf-8")
        return None


def _body(copy: BodyCopy, content_type: str) -> JsonObject:
    data = copy.data()
    return {
        "size": copy.size,
        "kept": copy.kept,
        "truncated": copy.truncated,
        "content_type": content_type,
        "text": _decoded(data, copy.truncated),
        "base64": base64.b64encode(data).decode("ascii"),
    }


def _events(copy: BodyCopy, start: float) -> list[JsonObject]:
    """A Server-Sent Events body, one item per event, each with the time it was complete."""
    events: list[JsonObject] = []
    pending = b""
    for at, part in copy.parts:
        pending += part
        while True:
            cut = min(
                (i for i in (pending.find(b"\n\n"), pending.find(b"\r\n\r\n")) if i >= 0),
                default=-1,
            )
            if cut < 0:
                break
            end = cut + (4 if pending.startswith(b"\r\n\r\n", cut) else 2)
            text = pending[:cut].decode("utf-8", "replace")
            events.append({"at_ms": _ms(at - start), "text": text})
            pending = pending[end:]
    if pending.strip():
        events.append({"at_ms": None, "text": pending.decode("utf-8", "replace")})
    return events


def _client_request(entry: Entry, masked: frozenset[bytes]) -> JsonObject:
    head = entry.client_head
    if head.http_version == b"2":
        pseudo = [
            (b":method", head.method),
            (b":scheme", head.scheme),
            (b":authority", head.authority),
            (b":path", head.target),
        ]
        headers = _headers([*pseudo, *head.headers], masked)
    else:
        headers = _headers([(b"host", head.authority), *head.headers], masked)
    return {
        "version": "HTTP/" + _text(head.http_version),
        "method": _text(head.method),
        "target": _text(head.target),
        "headers": headers,
    }


def timings(entry: Entry) -> JsonObject:
    """Milliseconds from the request head: waiting for a pooled connection (the queue),
    opening a new one, the upstream's response head, the whole exchange."""
    record = entry.record
    connect = record.connect_time if record.upstream_reused is False else None
    queue = None
    if entry.acquired_at is not None:
        queue = max(0.0, entry.acquired_at - record.start - (connect or 0.0))
    return {
        "queue_ms": _ms(queue),
        "connect_ms": _ms(connect),
        "upstream_header_ms": _ms(record.upstream_header_time),
        "ttfb_ms": _ms(record.ttfb),
        "total_ms": _ms(record.duration) if entry.finished else None,
    }


def detail(entry: Entry, masked: frozenset[bytes]) -> JsonObject:
    """One exchange: both sides' heads, the timings, the start of each body."""
    record = entry.record
    upstream_request = None
    if entry.upstream_request is not None:
        target, headers, version = entry.upstream_request
        upstream_request = {
            "version": "HTTP/" + version.decode("ascii"),
            "method": _text(entry.client_head.method),
            "target": _text(target),
            "headers": _headers(headers, masked),
        }
    upstream_response = client_response = None
    if entry.upstream_response is not None:
        status, headers = entry.upstream_response
        upstream_response = {"status": status, "headers": _headers(headers, masked)}
    if entry.client_response is not None:
        status, headers = entry.client_response
        client_response = {"status": status, "headers": _headers(headers, masked)}
    response_type = _content_type(entry.client_response[1] if entry.client_response else None)
    return {
        **summary(entry),
        "route": record.route or None,
        "attempts": entry.attempts,
        "timings": timings(entry),
        "request": {
            "client": _client_request(entry, masked),
            "upstream": upstream_request,
            "body": _body(entry.request_body, _content_type(entry.client_head.headers)),
        },
        "response": {
            "informational": [
                {"status": status, "headers": _headers(headers, masked)}
                for status, headers in entry.informational
            ],
            "upstream": upstream_response,
            "client": client_response,
            "trailers": _headers(entry.trailers, masked) if entry.trailers else None,
            "reset": entry.reset,
            "body": _body(entry.response_body, response_type),
            "events": (_events(entry.response_body, record.start) if record.event_stream else None),
        },
    }


# ------------------------------------------------------------------------------------- HAR


def _har_headers(headers: Iterable[Sequence[str]]) -> list[JsonObject]:
    return [{"name": name, "value": value} for name, value in headers]


def _har_content(body: JsonObject) -> JsonObject:
    content: JsonObject = {"size": body["size"], "mimeType": body["content_type"]}
    if body["text"] is not None:
        content["text"] = body["text"]
    else:
        content["text"] = body["base64"]
        content["encoding"] = "base64"
    if body["truncated"]:
        content["comment"] = f"only the first {body['kept']} bytes were kept"
    return content


def _reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return ""


def _har_entry(entry: Entry, masked: frozenset[bytes]) -> JsonObject:
    view = detail(entry, masked)
    request, response = view["request"], view["response"]
    head = entry.client_head
    client = request["client"]
    target = client["target"]
    url = f"{_text(head.scheme)}://{_text(head.authority)}{target}"
    query = target.split("?", 1)[1] if "?" in target else ""
    har_request: JsonObject = {
        "method": client["method"],
        "url": url,
        "httpVersion": client["version"],
        "cookies": [],
        "headers": _har_headers(h for h in client["headers"] if not h[0].startswith(":")),
        "queryString": [
            {"name": k, "value": v} for k, v in parse_qsl(query, keep_blank_values=True)
        ],
        "headersSize": -1,
        "bodySize": request["body"]["size"],
    }
    if request["body"]["size"]:
        body = request["body"]
        har_request["postData"] = {
            "mimeType": body["content_type"],
            "text": body["text"] if body["text"] is not None else body["base64"],
        }
    sent = response["client"] or {"status": 0, "headers": []}
    t = view["timings"]
    blocked = t["queue_ms"] if t["queue_ms"] is not None else -1
    connect = t["connect_ms"] if t["connect_ms"] is not None else -1
    ttfb = t["ttfb_ms"] or 0.0
    total = t["total_ms"] if t["total_ms"] is not None else ttfb
    wait = max(0.0, ttfb - max(blocked, 0) - max(connect, 0))
    har: JsonObject = {
        "startedDateTime": view["time"],
        "time": total,
        "request": har_request,
        "response": {
            "status": sent["status"],
            "statusText": _reason(sent["status"]),
            "httpVersion": client["version"],
            "cookies": [],
            "headers": _har_headers(sent["headers"]),
            "content": _har_content(response["body"]),
            "redirectURL": "",
            "headersSize": -1,
            "bodySize": response["body"]["size"],
        },
        "cache": {},
        "timings": {
            "blocked": blocked,
            "dns": -1,
            "connect": connect,
            "send": 0,
            "wait": wait,
            "receive": max(0.0, total - ttfb),
        },
        "_id": entry.id,
        "_upstream": view["upstream"],
        "_upstreamServer": view["server"],
        "_error": view["error"],
    }
    if view["server"]:
        har["serverIPAddress"] = view["server"].rsplit(":", 1)[0].strip("[]")
    return har


def har(inspector: Inspector) -> JsonObject:
    """Every kept exchange as a HAR 1.2 log, oldest first (as browsers export it)."""
    return {
        "log": {
            "version": "1.2",
            "creator": {"name": "pooled-proxy", "version": __version__},
            "pages": [],
            "entries": [_har_entry(entry, inspector.masked) for entry in inspector.entries()],
        }
    }
