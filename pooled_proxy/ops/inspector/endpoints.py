"""The inspector on the admin listener (never on the proxy's own ports).

- ``GET /inspect``: the page (page.html, self-contained, as the status page is);
- ``GET /inspect/exchanges`` (filters: ``?path=``, ``status=404`` or ``4xx``, ``method=``) and
  ``GET /inspect/exchanges/ID``: JSON;
- ``GET /inspect/har``: every kept exchange as HAR 1.2, for a browser's network panel;
- ``GET /inspect/events``: Server-Sent Events: the list, then the rows that changed;
- ``POST /inspect/exchanges/ID/replay`` (JSON edits, maybe ``{}``): send it again.

The POST takes ``application/json`` only and, from a browser, only from the admin's own
origin: a web page elsewhere cannot make the proxy send requests (a cross-site form can
send neither that type nor that origin).
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from functools import cache
from importlib import resources

import trio

from ..admin import EVENTS_HEADERS, EVENTS_RETRY_MS, JSON, PAGE_HEADERS, TEXT, Answer
from ..status import json_body
from .recorder import Inspector
from .replay import Replayer, ReplayError
from .views import detail, har, rows, summary

PREFIX = "/inspect"
PAGE = PREFIX
EXCHANGES = PREFIX + "/exchanges"
HAR = PREFIX + "/har"
EVENTS = PREFIX + "/events"
REPLAY_SUFFIX = "/replay"
# A burst of changes (a page load's dozens of requests) goes to the page as one event.
EVENTS_COALESCE = 0.1


@cache
def inspect_page() -> bytes:
    return resources.files(__package__).joinpath("page.html").read_bytes()


def _text(status: int, message: str, extra: tuple[tuple[bytes, bytes], ...] = ()) -> Answer:
    return status, [(b"content-type", TEXT), *extra], message.encode() + b"\n"


def _json(value: object, status: int = 200) -> Answer:
    return status, [(b"content-type", JSON)], json_body(value)


def _event(kind: str, value: object) -> bytes:
    data = json.dumps(value, separators=(",", ":"))
    return f"event: {kind}\ndata: {data}\n\n".encode()


class InspectorEndpoints:
    """The admin's routes under ``/inspect``; see the module docstring."""

    def __init__(self, inspector: Inspector, replayer: Replayer) -> None:
        self.inspector = inspector
        self.replayer = replayer

    def handles(self, path: str) -> bool:
        return path == PREFIX or path.startswith(PREFIX + "/")

    async def answer(
        self, method: bytes, target: bytes, headers: dict[bytes, bytes], body: bytes
    ) -> Answer:
        path, _, query = target.decode("latin-1").partition("?")
        if path.startswith(EXCHANGES + "/") and path.endswith(REPLAY_SUFFIX):
            if method != b"POST":
                return _text(405, "method not allowed", ((b"allow", b"POST"),))
            ident = path[len(EXCHANGES) + 1 : -len(REPLAY_SUFFIX)]
            return await self._replay(ident, headers, body)
        if method not in (b"GET", b"HEAD"):
            return _text(405, "method not allowed", ((b"allow", b"GET, HEAD"),))
        inspector = self.inspector
        if path == PAGE:
            return 200, list(PAGE_HEADERS), inspect_page()
        if path == EXCHANGES:
            return _json(rows(inspector, query))
        if path == HAR:
            status, response_headers, har_body = _json(har(inspector))
            disposition = (b"content-disposition", b'attachment; filename="pooled-proxy.har"')
            return status, [*response_headers, disposition], har_body
        if path == EVENTS:
            return 200, list(EVENTS_HEADERS), self._events
        if path.startswith(EXCHANGES + "/"):
            ident = path[len(EXCHANGES) + 1 :]
            entry = inspector.get(int(ident)) if ident.isascii() and ident.isdigit() else None
            if entry is None:
                return _text(404, f"no exchange {ident} (only the last ones are kept)")
            return _json(detail(entry, inspector.masked))
        return _text(404, "not found")

    async def _replay(self, ident: str, headers: dict[bytes, bytes], body: bytes) -> Answer:
        content_type = headers.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
        if content_type != b"application/json":
            return _text(415, "a replay takes application/json (edits, or {})")
        origin = headers.get(b"origin")
        if origin is not None and origin not in (
            b"http://" + headers.get(b"host", b""),
            b"https://" + headers.get(b"host", b""),
        ):
            return _text(403, "a replay is only taken from the inspector's own page")
        if not (ident.isascii() and ident.isdigit()):
            return _text(404, f"no exchange {ident}")
        try:
            new = await self.replayer.replay(int(ident), body)
        except ReplayError as exc:
            return _text(exc.status, exc.reason)
        return _json({"id": new, "replay_of": int(ident)})

    async def _events(self) -> AsyncGenerator[bytes, None]:
        inspector = self.inspector
        seen = inspector.version
        listing = rows(inspector)
        yield b"retry: %d\n\n" % EVENTS_RETRY_MS + _event("reset", listing)
        while True:
            await inspector.wait_for_change(seen)
            await trio.sleep(EVENTS_COALESCE)
            now = inspector.version
            changed = [summary(entry) for entry in inspector.changed_since(seen)]
            seen = now
            if changed:
                yield _event("rows", changed)
