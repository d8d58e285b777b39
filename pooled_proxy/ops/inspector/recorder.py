"""The inspector's tap: what the last exchanges looked like on both sides of the proxy.

:class:`Inspector` is the forwarder's :class:`~pooled_proxy.exchange.ExchangeTap`. For each
exchange it keeps one :class:`Entry`: references to the heads as they went by (the client's
request, the request sent upstream, the upstream's response head, the client's), the times,
and the first ``max_body_bytes`` of each body. Bodies are copied from what passes through
the exchange's body and sink, chunk by chunk, after which each chunk goes on at once: nothing
waits for the inspector, and a chunk that fits whole is kept by reference, not copied. The
last ``keep`` entries are kept; older ones are dropped, finished or not.

Views of the entries (JSON, HAR, the page) are made when asked (views.py), never per request.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator

import trio

from ...config import InspectConfig
from ...exchange import NO_BODY, Exchange, ExchangeRecord, RequestHead, ResponseSink
from ...headers import Headers


class BodyCopy:
    """The first ``limit`` bytes of a body as they passed, with the time each part came."""

    __slots__ = ("kept", "limit", "parts", "size")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[tuple[float, bytes]] = []
        self.kept = 0
        self.size = 0  # every byte that passed, kept or not

    def add(self, data: bytes, at: float) -> None:
        self.size += len(data)
        room = self.limit - self.kept
        if room <= 0 or not data:
            return
        if len(data) > room:
            data = bytes(data[:room])
        self.parts.append((at, data))
        self.kept += len(data)

    @property
    def truncated(self) -> bool:
        return self.size > self.kept

    def data(self) -> bytes:
        return b"".join(part for _, part in self.parts)


class Entry:
    """One exchange as the inspector saw it; filled in while it goes on."""

    __slots__ = (
        "acquired_at",
        "attempts",
        "client_head",
        "client_response",
        "finished",
        "id",
        "informational",
        "record",
        "replay_of",
        "request_body",
        "reset",
        "response_body",
        "trailers",
        "upstream_request",
        "upstream_response",
        "version",
    )

    def __init__(
        self, ident: int, head: RequestHead, record: ExchangeRecord, body_limit: int
    ) -> None:
        self.id = ident
        self.client_head = head
        self.record = record
        self.request_body = BodyCopy(body_limit)
        self.response_body = BodyCopy(body_limit)
        # target, headers, the upstream connection's HTTP version (b"1.1", b"2")
        self.upstream_request: tuple[bytes, Headers, bytes] | None = None
        self.upstream_response: tuple[int, Headers] | None = None
        self.client_response: tuple[int, Headers] | None = None
        self.informational: list[tuple[int, Headers]] = []
        self.trailers: Headers | None = None
        self.acquired_at: float | None = None  # an upstream connection was in hand
        self.attempts = 0
        self.reset = False  # the response was cut after its head
        self.finished = False
        self.replay_of: int | None = None
        self.version = 0


class _TappedBody:
    """The client's request body, passed on chunk by chunk as the upload asks for it."""

    __slots__ = ("_body", "_copy")

    def __init__(self, body: AsyncIterator[bytes], copy: BodyCopy) -> None:
        self._body = body
        self._copy = copy

    def __aiter__(self) -> _TappedBody:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._body.__anext__()
        self._copy.add(chunk, trio.current_time())
        return chunk


class _TappedSink:
    """The front end's sink, with each part of the response seen on its way to the client."""

    __slots__ = ("_entry", "_inspector", "_sink")

    def __init__(self, sink: ResponseSink, entry: Entry, inspector: Inspector) -> None:
        self._sink = sink
        self._entry = entry
        self._inspector = inspector

    @property
    def head_sent(self) -> bool:
        return self._sink.head_sent

    async def send_informational(self, status: int, headers: Headers) -> None:
        self._entry.informational.append((status, headers))
        await self._sink.send_informational(status, headers)

    async def send_head(
        self, status: int, headers: Headers, *, body: bytes = b"", end: bool = False
    ) -> None:
        entry = self._entry
        entry.client_response = (status, headers)
        if body:
            entry.response_body.add(body, trio.current_time())
        self._inspector.touch(entry)
        await self._sink.send_head(status, headers, body=body, end=end)

    async def send_data(self, data: bytes) -> None:
        self._entry.response_body.add(data, trio.current_time())
        self._inspector.touch(self._entry)
        await self._sink.send_data(data)

    async def end(self, trailers: Headers | None = None) -> None:
        self._entry.trailers = trailers
        await self._sink.end(trailers)

    async def reset(self, error_code: int = 0x2) -> None:
        self._entry.reset = True
        await self._sink.reset(error_code)


class PendingReplay:
    """A replay about to reach the forwarder: its entry says which exchange it replays."""

    __slots__ = ("entry_id", "of", "opened")

    def __init__(self, of: int) -> None:
        self.of = of
        self.opened = trio.Event()
        self.entry_id: int | None = None


class Inspector:
    """Records the last ``config.keep`` exchanges; see the module docstring."""

    def __init__(self, config: InspectConfig) -> None:
        self.config = config
        self.masked = frozenset(name.encode("ascii") for name in config.mask_headers)
        self._entries: OrderedDict[int, Entry] = OrderedDict()  # by id, oldest first
        self._open: dict[int, Entry] = {}  # by id() of the record, while in progress
        self._next_id = 1
        self.version = 0  # counts changes; each entry has the number of its last one
        self._changed: trio.Event | None = None  # made only while a viewer waits
        self.replays: dict[int, PendingReplay] = {}  # by id() of the replay's record

    # -- the tap ---------------------------------------------------------------------------

    def started(self, exchange: Exchange) -> Exchange:
        record = exchange.record
        entry = Entry(self._next_id, exchange.head, record, self.config.max_body_bytes)
        self._next_id += 1
        entries = self._entries
        entries[entry.id] = entry
        if len(entries) > self.config.keep:
            entries.popitem(last=False)
        self._open[id(record)] = entry
        if exchange.whole_body:
            entry.request_body.add(exchange.whole_body, record.start)
        if exchange.body is not NO_BODY:
            exchange.body = _TappedBody(exchange.body, entry.request_body)
        # Changed in place: the front end made this exchange for this one call.
        exchange.sink = _TappedSink(exchange.sink, entry, self)
        if self.replays:
            replay = self.replays.pop(id(record), None)
            if replay is not None:
                entry.replay_of = replay.of
                replay.entry_id = entry.id
                replay.opened.set()
        self.touch(entry)
        return exchange

    def upstream_request(
        self, record: ExchangeRecord, target: bytes, headers: Headers, version: bytes
    ) -> None:
        entry = self._open.get(id(record))
        if entry is not None:
            entry.upstream_request = (target, headers, version)
            entry.acquired_at = trio.current_time()
            entry.attempts += 1

    def upstream_response(self, record: ExchangeRecord, status: int, headers: Headers) -> None:
        entry = self._open.get(id(record))
        if entry is not None:
            entry.upstream_response = (status, headers)

    def finished(self, record: ExchangeRecord) -> None:
        entry = self._open.pop(id(record), None)
        if entry is not None:
            entry.finished = True
            self.touch(entry)

    # -- reading ---------------------------------------------------------------------------

    def touch(self, entry: Entry) -> None:
        self.version += 1
        entry.version = self.version
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def wait_for_change(self, seen: int) -> None:
        """Return once something changed after version ``seen``."""
        while self.version == seen:
            if self._changed is None:
                self._changed = trio.Event()
            await self._changed.wait()

    def entries(self) -> Iterator[Entry]:
        """Oldest first."""
        return iter(list(self._entries.values()))

    def changed_since(self, seen: int) -> list[Entry]:
        return sorted((e for e in self._entries.values() if e.version > seen), key=_version)

    def get(self, ident: int) -> Entry | None:
        return self._entries.get(ident)


def _version(entry: Entry) -> int:
    return entry.version
