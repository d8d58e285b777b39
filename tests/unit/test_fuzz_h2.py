"""Random HTTP/2 frame sequences thrown at the HTTP/2 front end (hypothesis).

Each example runs the real connection task (``HTTP2Connection.serve``) over an in-memory
stream on trio's MockClock, in front of an in-memory upstream. The client sends the preface,
then frames drawn at random (requests with valid or broken HPACK, DATA, CONTINUATION,
RST_STREAM, SETTINGS, PING, WINDOW_UPDATE, PRIORITY, GOAWAY, PUSH_PROMISE, unknown types,
raw garbage), on stream ids legal and not. Checked: the connection task never raises and
logs no error, the proxy writes only well-formed frames and always closes the connection
(within the timeouts), and no upstream connection is left in use or open.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import hpack
import trio
import trio.testing
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    PushPromiseFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pooled_proxy.proxy import Proxy
from pooled_proxy.server.http2 import HTTP2Connection
from tests.support.faulty_upstream import FaultyUpstream, read_until_close
from tests.support.helpers import make_config

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SERVER = {
    "header_timeout": 10.0,
    "keepalive_timeout": 20.0,
    "body_timeout": 15.0,
    "write_timeout": 10.0,
    "max_header_bytes": 4096,
    "max_header_count": 20,
    "max_body_bytes": 4096,
    "max_concurrent_streams": 4,
}
CLOSE_WITHIN = 300.0
STREAM_IDS = st.sampled_from([1, 1, 3, 3, 5, 7, 9, 2, 0, 2**31 - 1])

REQUESTS = [
    [(b":method", b"GET"), (b":path", b"/ok"), (b":scheme", b"http"), (b":authority", b"a")],
    [(b":method", b"POST"), (b":path", b"/ok"), (b":scheme", b"http"), (b":authority", b"a"),
     (b"content-length", b"5")],
    [(b":method", b"GET"), (b":path", b"/ok?size=40000"), (b":scheme", b"http"), (b":authority", b"a")],
    [(b":method", b"GET"), (b":path", b"/ok"), (b":scheme", b"http")],  # no authority
    [(b":method", b"GET"), (b":path", b"/ok"), (b":scheme", b"http"), (b":authority", b"a"),
     (b"connection", b"keep-alive")],  # connection-specific: malformed in h2
    [(b":path", b"/ok"), (b":method", b"GET"), (b"Upper", b"case"), (b":scheme", b"http")],
    [(b":method", b"CONNECT"), (b":authority", b"a:443")],
    [(b":method", b"GET"), (b":path", b"/ok"), (b":scheme", b"http"), (b":authority", b"a"),
     (b"te", b"trailers"), (b"cookie", b"a=1"), (b"cookie", b"b=2")],
]  # fmt: skip


def _on_stream(frame: Frame, stream_id: int) -> bytes:
    """Serialize ``frame`` with any stream id, including ones hyperframe would refuse (0)."""
    data = bytearray(frame.serialize())
    data[5:9] = stream_id.to_bytes(4, "big")
    return bytes(data)


@st.composite
def frames(draw: st.DrawFn, encoder: hpack.Encoder) -> bytes:
    kind = draw(
        st.sampled_from(
            ["headers", "headers", "headers", "data", "data", "continuation", "rst", "settings",
             "ping", "window", "priority", "goaway", "push", "unknown", "garbage"]
        )
    )  # fmt: skip
    sid = draw(STREAM_IDS)
    if kind == "headers":
        if draw(st.booleans()):
            block = encoder.encode(draw(st.sampled_from(REQUESTS)))
        else:
            block = draw(st.binary(max_size=40))
        frame: Frame = HeadersFrame(1, data=block)
        if draw(st.booleans()):
            frame.flags.add("END_STREAM")
        if draw(st.integers(0, 3)):
            frame.flags.add("END_HEADERS")
        if draw(st.integers(0, 5)) == 0:
            frame.flags.add("PRIORITY")
            frame.depends_on = draw(STREAM_IDS)
            frame.stream_weight = draw(st.integers(0, 255))
            frame.exclusive = draw(st.booleans())
        return _on_stream(frame, sid)
    if kind == "data":
        frame = DataFrame(1, data=draw(st.binary(max_size=200)))
        if draw(st.booleans()):
            frame.flags.add("END_STREAM")
        if draw(st.integers(0, 4)) == 0:
            frame.flags.add("PADDED")
            frame.pad_length = draw(st.integers(0, 255))
        return _on_stream(frame, sid)
    if kind == "continuation":
        frame = ContinuationFrame(1, data=draw(st.binary(max_size=40)))
        if draw(st.booleans()):
            frame.flags.add("END_HEADERS")
        return _on_stream(frame, sid)
    if kind == "rst":
        return _on_stream(RstStreamFrame(1, error_code=draw(st.integers(0, 14))), sid)
    if kind == "settings":
        if draw(st.integers(0, 3)) == 0:
            return SettingsFrame(0, flags=["ACK"]).serialize()
        values = draw(
            st.dictionaries(
                st.sampled_from([1, 2, 3, 4, 5, 6, 8, 99]),
                st.sampled_from([0, 1, 100, 16384, 65535, 2**24, 2**31 - 1, 2**31, 2**32 - 1]),
                max_size=3,
            )
        )
        return SettingsFrame(0, settings=values).serialize()
    if kind == "ping":
        frame = PingFrame(0, opaque_data=b"12345678")
        if draw(st.booleans()):
            frame.flags.add("ACK")
        return frame.serialize()
    if kind == "window":
        increment = draw(st.sampled_from([0, 1, 65535, 2**31 - 1]))
        return _on_stream(
            WindowUpdateFrame(0, window_increment=increment), draw(st.sampled_from([0, sid]))
        )
    if kind == "priority":
        return _on_stream(PriorityFrame(1, depends_on=draw(STREAM_IDS), stream_weight=16), sid)
    if kind == "goaway":
        return GoAwayFrame(
            0, last_stream_id=draw(STREAM_IDS), error_code=draw(st.integers(0, 14))
        ).serialize()
    if kind == "push":
        frame = PushPromiseFrame(1, promised_stream_id=2, data=encoder.encode(REQUESTS[0]))
        return _on_stream(frame, sid)
    if kind == "unknown":  # frame type 0xFA: must be ignored
        payload = draw(st.binary(max_size=20))
        return len(payload).to_bytes(3, "big") + b"\xfa\x00" + sid.to_bytes(4, "big") + payload
    return draw(st.binary(min_size=1, max_size=30))


@st.composite
def plausible_frames(draw: st.DrawFn, encoder: hpack.Encoder) -> list[bytes]:
    """A mostly well-behaved client (new streams on rising odd ids, DATA and resets on open
    ones, legal SETTINGS), with an occasional random frame: this reaches the forwarder and
    the upstream, where wholly random frames mostly end at the first GOAWAY."""
    out: list[bytes] = []
    opened: list[int] = []
    next_id = 1
    for _ in range(draw(st.integers(1, 10))):
        action = draw(
            st.sampled_from(
                ["open", "open", "data", "data", "rst", "settings", "window", "ping", "nasty"]
            )
        )
        if action == "open" or not opened and action in ("data", "rst"):
            frame = HeadersFrame(next_id, data=encoder.encode(draw(st.sampled_from(REQUESTS[:3]))))
            frame.flags.add("END_HEADERS")
            if draw(st.booleans()):
                frame.flags.add("END_STREAM")
            out.append(frame.serialize())
            opened.append(next_id)
            next_id += 2
        elif action == "data":
            frame = DataFrame(draw(st.sampled_from(opened)), data=draw(st.binary(max_size=100)))
            if draw(st.booleans()):
                frame.flags.add("END_STREAM")
            out.append(frame.serialize())
        elif action == "rst":
            out.append(RstStreamFrame(draw(st.sampled_from(opened)), error_code=8).serialize())
        elif action == "settings":
            window = draw(st.sampled_from([0, 1, 1000, 65535, 2**31 - 1]))
            out.append(SettingsFrame(0, settings={4: window}).serialize())
        elif action == "window":
            sid = draw(st.sampled_from([0, *opened]))
            out.append(
                WindowUpdateFrame(
                    sid, window_increment=draw(st.sampled_from([1, 65535, 10**6]))
                ).serialize()
            )
        elif action == "ping":
            out.append(PingFrame(0, opaque_data=b"abcdefgh").serialize())
        else:
            out.append(draw(frames(encoder)))
    return out


@st.composite
def connections(draw: st.DrawFn) -> tuple[list[bytes], bool]:
    encoder = hpack.Encoder()
    start = [PREFACE + SettingsFrame(0).serialize()] if draw(st.integers(0, 19)) else [PREFACE[:10]]
    if draw(st.integers(0, 2)):
        body = draw(plausible_frames(encoder))
    else:
        body = draw(st.lists(frames(encoder), max_size=12))
    return start + body, draw(st.booleans())


@dataclass
class Outcome:
    output: bytes
    errors: list[str]
    in_use: int
    idle: int
    upstream_open: int
    upstream_requests: int


class _ErrorLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def exchange(chunks: list[bytes], half_close: bool) -> Outcome:
    errors = _ErrorLog()
    logger = logging.getLogger("pooled_proxy")
    logger.addHandler(errors)

    async def main() -> Outcome:
        upstream = FaultyUpstream(mode="ok")
        async with trio.open_nursery() as nursery:
            proxy = Proxy(
                make_config(1, response_header_timeout=5.0, read_timeout=5.0, server=SERVER),
                connect=upstream.connector(nursery),
            )
            client, server = trio.testing.memory_stream_pair()
            connection = HTTP2Connection(server, proxy, client_ip=b"203.0.113.7", scheme=b"http")
            served = trio.Event()

            async def serve() -> None:
                await connection.serve()  # anything it raises fails the example
                served.set()

            nursery.start_soon(serve)
            with trio.fail_after(CLOSE_WITHIN):
                try:
                    for chunk in chunks:
                        await client.send_all(chunk)
                        await trio.testing.wait_all_tasks_blocked()
                    if half_close:
                        await client.send_eof()
                except trio.BrokenResourceError:
                    pass
                output = await read_until_close(client)
                await served.wait()
            await client.aclose()
            await trio.testing.wait_all_tasks_blocked()
            stats = proxy.forwarder.upstreams["app"].pools[0].statistics()
            outcome = Outcome(
                output,
                errors.messages,
                stats.in_use,
                stats.idle,
                upstream.connections_open,
                len(upstream.requests),
            )
            proxy.forwarder.close()
            nursery.cancel_scope.cancel()
        return outcome

    try:
        return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    finally:
        logger.removeHandler(errors)


def _frame_types(output: bytes) -> list[str]:
    """Split the proxy's output into frames; fails on anything that is not a whole frame."""
    types = []
    view = memoryview(output)
    while view:
        assert len(view) >= 9, f"truncated frame header: {bytes(view)!r}"
        frame, length = Frame.parse_frame_header(view[:9])
        assert len(view) >= 9 + length, f"truncated {type(frame).__name__}"
        frame.parse_body(view[9 : 9 + length])
        types.append(type(frame).__name__)
        view = view[9 + length :]
    return types


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(connections())
@example(
    (
        [
            PREFACE + SettingsFrame(0).serialize(),
            HeadersFrame(
                1, data=hpack.Encoder().encode(REQUESTS[1]), flags=["END_HEADERS"]
            ).serialize(),
            DataFrame(1, data=b"hel").serialize(),
            RstStreamFrame(1, error_code=8).serialize(),
        ],
        False,
    )
)
@example(
    (
        [
            PREFACE + SettingsFrame(0).serialize(),
            HeadersFrame(
                1, data=hpack.Encoder().encode(REQUESTS[0]), flags=["END_HEADERS", "END_STREAM"]
            ).serialize(),
            SettingsFrame(0, settings={4: 0}).serialize(),  # window 0: the response cannot move
        ],
        False,
    )
)
def test_front_end_survives_any_frames(connection: tuple[list[bytes], bool]) -> None:
    chunks, half_close = connection
    outcome = exchange(chunks, half_close)
    assert outcome.errors == []
    if outcome.output:
        types = _frame_types(outcome.output)
        assert types[0] == "SettingsFrame"  # the server preface comes first
    assert outcome.in_use == 0
    assert outcome.upstream_open == outcome.idle
