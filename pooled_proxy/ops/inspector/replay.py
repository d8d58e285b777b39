"""Replay: an exchange the inspector kept, sent again through the proxy, maybe edited.

The request goes to the running forwarder as a new exchange (routing, pools, rewriting and
the inspector's tap included), from inside the process: it does not depend on where or how
the proxy listens. Its response is read and dropped; the inspector records it like any
other, with ``replay_of`` naming the original. The edits pass the checks every client
request passes (protocol/request_checks.py). Replays stop when the proxy starts draining.
"""

from __future__ import annotations

import json
import time
from typing import Any

import trio

from ...errors import ClientError
from ...exchange import NO_BODY, Exchange, ExchangeRecord, RequestHead
from ...headers import Headers
from ...protocol.request_checks import check_request
from ...proxy import Proxy
from .recorder import Inspector, PendingReplay
from .views import MASK

# Framing the replay sets itself from the body it sends.
_FRAMING = frozenset({b"content-length", b"transfer-encoding"})
REPLAY_CLIENT_IP = b"127.0.0.1"  # the admin listener's side of the machine
OPEN_TIMEOUT = 5.0  # for the replay to reach the forwarder (it does at its first step)


class ReplayError(Exception):
    """A replay that cannot be sent: ``status`` and a one-line reason for the admin's answer."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class _Discard:
    """The replay's client: it reads the response and drops it (the inspector keeps it),
    counting its body as a front end counts what it sent."""

    __slots__ = ("head_sent", "record")

    def __init__(self, record: ExchangeRecord) -> None:
        self.head_sent = False
        self.record = record

    async def send_informational(self, status: int, headers: Headers) -> None:
        pass

    async def send_head(
        self, status: int, headers: Headers, *, body: bytes = b"", end: bool = False
    ) -> None:
        self.head_sent = True
        self.record.bytes_out += len(body)

    async def send_data(self, data: bytes) -> None:
        self.record.bytes_out += len(data)

    async def end(self, trailers: Headers | None = None) -> None:
        pass

    async def reset(self, error_code: int = 0x2) -> None:
        pass


def _edits(data: bytes) -> dict[str, Any]:
    if not data.strip():
        return {}
    try:
        edits = json.loads(data)
    except ValueError as exc:
        raise ReplayError(400, f"the edits are not JSON: {exc}") from None
    if not isinstance(edits, dict):
        raise ReplayError(400, "the edits must be a JSON object")
    unknown = set(edits) - {"method", "target", "headers", "body"}
    if unknown:
        raise ReplayError(400, f"unknown edit(s): {', '.join(sorted(unknown))}")
    for key in ("method", "target", "body"):
        if key in edits and not isinstance(edits[key], str):
            raise ReplayError(400, f"{key}: expected a string")
    headers = edits.get("headers")
    if headers is not None and not (
        isinstance(headers, list)
        and all(
            isinstance(h, list) and len(h) == 2 and all(isinstance(p, str) for p in h)
            for h in headers
        )
    ):
        raise ReplayError(400, 'headers: expected [["name", "value"], ...]')
    return edits


def _latin1(text: str, what: str) -> bytes:
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        raise ReplayError(400, f"{what}: only Latin-1 characters can go in a head") from None


def _edited_headers(
    original: Headers, edited: list[list[str]], masked: frozenset[bytes]
) -> Headers:
    """The edited headers; a masked value left as shown is the original's value."""
    originals: dict[bytes, list[bytes]] = {}
    for name, value in original:
        originals.setdefault(name, []).append(value)
    out: Headers = []
    for name_text, value_text in edited:
        name = _latin1(name_text, "header name").lower()
        value = _latin1(value_text, f"header {name_text}")
        if value_text == MASK and name in masked:
            kept = originals.get(name)
            if not kept:
                raise ReplayError(400, f"header {name_text}: no original value to unmask")
            value = kept.pop(0)
        out.append((name, value))
    return out


def replay_request(entry_head: RequestHead, body: bytes | None, data: bytes,
                   masked: frozenset[bytes]) -> tuple[RequestHead, bytes]:  # fmt: skip
    """The head and body to send for a replay of ``entry_head`` (``body``: the original's, or
    None if only its start was kept) with the edits in ``data`` (JSON, maybe empty)."""
    edits = _edits(data)
    method = _latin1(edits["method"], "method") if "method" in edits else entry_head.method
    target = _latin1(edits["target"], "target") if "target" in edits else entry_head.target
    authority = entry_head.authority
    if "headers" in edits:
        headers = _edited_headers(entry_head.headers, edits["headers"], masked)
    else:
        headers = list(entry_head.headers)
    if "body" in edits:
        body = edits["body"].encode("utf-8")
    elif body is None:
        raise ReplayError(
            409, "only the start of the request body was kept ([inspect] max_body_bytes): "
            "send it with an edited body"
        )  # fmt: skip
    fields: Headers = []
    for name, value in headers:
        if name == b"host":
            authority = value
        elif name not in _FRAMING:
            fields.append((name, value))
    if body:
        fields.append((b"content-length", b"%d" % len(body)))
    try:
        check_request(
            method, target, authority, scheme=entry_head.scheme, version=b"1.1", fields=fields
        )
    except ClientError as exc:
        raise ReplayError(400, exc.detail) from None
    head = RequestHead(
        method=method,
        target=target,
        authority=authority,
        scheme=entry_head.scheme,
        headers=fields,
        http_version=b"1.1",
        client_ip=REPLAY_CLIENT_IP,
        has_body=bool(body),
        content_length=len(body) if body else None,
        validated=True,
    )
    return head, body


class Replayer:
    """Sends replays through ``proxy``; its ``run`` is a service of the admin's nursery."""

    def __init__(self, proxy: Proxy, inspector: Inspector) -> None:
        self.proxy = proxy
        self.inspector = inspector
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the replays in flight until the proxy starts draining, then cut them."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await self.proxy.drain_started.wait()
            self._nursery = None
            nursery.cancel_scope.cancel()

    async def replay(self, ident: int, edits: bytes) -> int:
        """Send exchange ``ident`` again, with ``edits``; the new exchange's id once it is
        under way (its response comes in later, as any other)."""
        entry = self.inspector.get(ident)
        if entry is None:
            raise ReplayError(404, f"no exchange {ident} (only the last ones are kept)")
        nursery = self._nursery
        if nursery is None or self.proxy.draining:
            raise ReplayError(503, "the proxy is draining")
        copy = entry.request_body
        body = None if copy.truncated else copy.data()
        head, body = replay_request(entry.client_head, body, edits, self.inspector.masked)
        record = ExchangeRecord(
            start=trio.current_time(),
            wall_start=time.time(),
            method=head.method,
            target=head.target,
            protocol=b"HTTP/1.1",
            client_ip=head.client_ip,
        )
        record.extra["replay_of"] = str(ident)
        exchange = Exchange(
            head=head, body=NO_BODY, sink=_Discard(record), record=record, whole_body=body or None
        )
        pending = PendingReplay(ident)
        self.inspector.replays[id(record)] = pending
        nursery.start_soon(self._forward, exchange)
        with trio.move_on_after(OPEN_TIMEOUT):
            await pending.opened.wait()
        self.inspector.replays.pop(id(record), None)
        if pending.entry_id is None:
            raise ReplayError(500, "the replay did not start")
        return pending.entry_id

    async def _forward(self, exchange: Exchange) -> None:
        # Observed as a front end's exchange is (the inspector lists it from its record),
        # but not counted in flight: a drain does not wait for a replay.
        try:
            await self.proxy.forwarder.forward(exchange)
        finally:
            self.proxy.observe(exchange.record)
