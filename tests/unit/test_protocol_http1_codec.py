"""pooled_proxy.protocol.http1's connection objects against h11, the oracle (hypothesis).

Both sides, without sockets: generated requests and responses, whole or cut into pieces
(which decides between the direct path and h11 inside the codec), must give the events h11
gives for the same bytes, and the bytes the codec writes must be the bytes h11 writes; the
keep-alive verdict must be h11's too.
"""

from __future__ import annotations

import itertools
from typing import Any

import h11
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pooled_proxy.protocol.http1 import (
    CLOSED,
    END,
    NEED_DATA,
    ClientConnection,
    Request,
    ResponseHead,
    ServerConnection,
    Violation,
)

_TOKEN = st.text("abcdefghijklmnopqrstuvwxyz0123456789-!#$%&'*+.^_`|~", min_size=1, max_size=8)
_VALUE = st.binary(max_size=12).map(
    lambda raw: bytes(b if 0x20 <= b < 0x7F or b >= 0x80 or b == 0x09 else 0x61 for b in raw)
)
_REQUEST_FIELDS = st.one_of(
    st.tuples(_TOKEN.map(str.encode), _VALUE),
    st.sampled_from(
        [
            (b"Connection", b"close"),
            (b"Connection", b"keep-alive"),
            (b"Connection", b"TE, close"),
            (b"Content-Length", b"0"),
            (b"Content-Length", b"3"),
            (b"Transfer-Encoding", b"chunked"),
            (b"Expect", b"100-continue"),
            (b"Upgrade", b"websocket"),
            (b"Host", b"other"),
            (b"X-Obs", b"caf\xc3\xa9"),
        ]
    ),
)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    """Requests a client might send, most of them valid, on and off the direct path."""
    method = draw(st.sampled_from([b"GET", b"HEAD", b"DELETE", b"POST", b"PUT", b"PROPFIND"]))
    target = draw(st.sampled_from([b"/", b"/a?b=c", b"http://a/ok", b"*", b"/%20x"]))
    version = draw(st.sampled_from([b"1.1", b"1.1", b"1.1", b"1.0"]))
    fields = [(b"Host", b"a")] if draw(st.booleans()) or version == b"1.0" else []
    fields += draw(st.lists(_REQUEST_FIELDS, max_size=5))
    head = b"%s %s HTTP/%s\r\n" % (method, target, version)
    head += b"".join(name + b": " + value + b"\r\n" for name, value in fields)
    body = b""
    if (b"Content-Length", b"3") in fields:
        body = b"abc"
    elif (b"Transfer-Encoding", b"chunked") in fields:
        body = b"3\r\nabc\r\n0\r\n\r\n"
    return head + b"\r\n" + body


def cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if a < b]


def h11_request_events(pieces: list[bytes]) -> tuple[list[Any], Any] | None:
    """What h11 reads from ``pieces``: the request's events, and the connection; None if it
    refuses them."""
    oracle = h11.Connection(h11.SERVER, max_incomplete_event_size=4096)
    events: list[Any] = []
    try:
        for piece in pieces:
            oracle.receive_data(piece)
        while True:
            event = oracle.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                break
            if isinstance(event, h11.Request):
                headers = [(n, v) for n, v in event.headers if n != b"host"]
                host = [v for n, v in event.headers if n == b"host"]
                events.append(
                    ("request", event.method, event.target, host[0] if host else None, headers)
                )
            elif isinstance(event, h11.Data):
                events.append(("data", bytes(event.data)))
            elif isinstance(event, h11.EndOfMessage):
                events.append(("end",))
                break
    except h11.RemoteProtocolError:
        return None
    return events, oracle


def codec_request_events(pieces: list[bytes], codec: ServerConnection) -> list[Any] | None:
    events: list[Any] = []
    try:
        for piece in pieces:
            codec.receive_data(piece)
        while True:
            event = codec.next_event()
            if event is NEED_DATA or event is CLOSED:
                break
            if isinstance(event, Request):
                events.append(
                    ("request", event.method, event.target, event.authority, event.headers)
                )
                if event.whole_body is not None:
                    events.append(("data", event.whole_body))
                if event.whole_body is not None or not event.has_body:
                    events.append(("end",))
                    break
            elif event is END:
                events.append(("end",))
                break
            else:
                assert type(event) is bytes
                events.append(("data", event))
    except Violation:
        return None
    return _merged(events)


def _merged(events: list[Any]) -> list[Any]:
    """Body data as one event (where a body is cut into events differs, and does not matter)."""
    out: list[Any] = []
    for event in events:
        if event[0] == "data" and out and out[-1][0] == "data":
            out[-1] = ("data", out[-1][1] + event[1])
        elif event[0] != "data" or event[1]:
            out.append(event)
    return out


_RESPONSES = st.tuples(
    st.sampled_from([200, 200, 204, 304, 404, 503]),
    # (The forwarder takes hop-by-hop fields out of the responses it writes.)
    st.lists(st.tuples(_TOKEN.map(str.encode), _VALUE.map(lambda v: v.strip(b" \t"))), max_size=3),
    st.sampled_from([b"", b"x", b"hello world"]),
    st.booleans(),  # framed by Content-Length
    st.booleans(),  # the connection closes after it
    st.lists(st.sampled_from([b"", b"ab", b"cde"]), max_size=2),  # more data after the head
)


@settings(max_examples=300, deadline=None)
@given(
    data=requests(),
    # No cuts (the direct path, when the request is one it takes) as often as some.
    cuts=st.one_of(st.just([]), st.lists(st.integers(0, 400), min_size=1, max_size=3)),
    response=_RESPONSES,
)
@example(
    data=b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", cuts=[], response=(200, [], b"x", True, False, [])
)
@example(
    data=b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n", cuts=[], response=(200, [], b"", False, False, [])
)
@example(
    data=b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", cuts=[], response=(304, [], b"", False, False, [])
)
@example(
    data=b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, TE, Close\r\n\r\n",
    cuts=[],
    response=(200, [], b"x", False, False, []),
)
@example(
    data=b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    cuts=[],
    response=(200, [(b"x-a", b"b")], b"x", False, False, [b"ab"]),
)
def test_server_side_reads_and_writes_as_h11(
    data: bytes, cuts: list[int], response: tuple[Any, ...]
) -> None:
    pieces = cut(data, cuts)
    codec = ServerConnection(max_head_bytes=4096, max_header_count=20)
    got = codec_request_events(pieces, codec)
    oracle = h11_request_events(pieces)
    if got is None:
        return  # the strict parser refuses more than h11 does, never less (below)
    assert oracle is not None, "the codec read what h11 refuses"
    expected, h11_server = oracle
    assert got == _merged(expected)
    if not got or got[-1] != ("end",):
        return  # the request is not complete in these bytes
    method = got[0][1]

    status, headers, body, with_length, close, more = response
    headers = list(headers)
    if status in (204, 304) or method == b"HEAD":
        body, more = b"", []
    if with_length:
        headers.append((b"content-length", b"%d" % (len(body) + sum(map(len, more)))))
    written = codec.send_response(status, headers, body, end=not more, close=close)
    for piece in more:
        written += codec.send_data(piece)
    if more:
        written += codec.send_end()

    h11_headers = [*headers, (b"connection", b"close")] if close else headers
    reason = {200: b"OK", 204: b"No Content", 304: b"Not Modified"}.get(status)
    reason = reason or {404: b"Not Found", 503: b"Service Unavailable"}[status]
    expected_bytes = h11_server.send(
        h11.Response(status_code=status, headers=h11_headers, reason=reason)
    )
    if body:
        expected_bytes += h11_server.send(h11.Data(data=body))
    for piece in more:
        expected_bytes += h11_server.send(h11.Data(data=piece))
    expected_bytes += h11_server.send(h11.EndOfMessage())
    if close:
        # Where "Connection: close" goes (and its case) depends on who asked for the close,
        # in h11 too: the message must be the same, not the bytes.
        assert as_read(method, written) == as_read(method, expected_bytes)
        assert b"\r\nconnection: close\r\n" in written.lower()
    else:
        assert written == expected_bytes
    assert codec.response_complete
    h11_reusable = h11_server.our_state is h11.DONE and h11_server.their_state is h11.DONE
    assert codec.reusable() is h11_reusable


def as_read(method: bytes, response: bytes) -> tuple[Any, ...]:
    """A response as a client reads it: status, headers (names in any case, in any order),
    body."""
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method=method, target=b"/", headers=[(b"host", b"a")]))
    client.send(h11.EndOfMessage())
    client.receive_data(response)
    client.receive_data(b"")  # (a body framed by the close ends here)
    head = client.next_event()
    body = b""
    while not isinstance(event := client.next_event(), h11.EndOfMessage):
        body += event.data
    return head.status_code, sorted(head.headers), body


def test_server_side_takes_the_direct_path_for_a_whole_head() -> None:
    # The hypothesis test above compares both paths only if each is taken: a whole ordinary
    # head takes the direct path (h11 never sees it), the same head in pieces goes to h11.
    codec = ServerConnection(max_head_bytes=4096, max_header_count=20)
    codec.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert codec._next_direct is not None and codec._h11.trailing_data[0] == b""
    codec = ServerConnection(max_head_bytes=4096, max_header_count=20)
    codec.receive_data(b"GET / HTTP/1.1\r\nHo")
    codec.receive_data(b"st: a\r\n\r\n")
    assert codec._next_direct is None


def test_pipelined_requests_are_read_in_order_across_both_paths() -> None:
    codec = ServerConnection(max_head_bytes=4096, max_header_count=20)
    first = b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"
    second = b"POST /2 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n"
    codec.receive_data(first + second + b"GET /3 HTTP/1.1\r\nHost: a\r\n\r\n")
    targets = []
    for _ in range(3):
        event = codec.next_event()
        assert isinstance(event, Request)
        targets.append(event.target)
        while event is not END and (event.has_body if isinstance(event, Request) else True):
            event = codec.next_event()
        codec.send_response(200, [(b"content-length", b"0")], end=True)
        assert codec.reusable()
        codec.start_next_cycle()
    assert targets == [b"/1", b"/2", b"/3"]
    assert codec.next_event() is NEED_DATA


def test_a_violation_is_raised_after_the_requests_before_it() -> None:
    codec = ServerConnection(max_head_bytes=4096, max_header_count=20)
    codec.receive_data(
        b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\nX: y\r\n\r\n"
    )
    event = codec.next_event()
    assert isinstance(event, Request) and event.target == b"/1"
    codec.send_response(204, [], end=True)
    codec.start_next_cycle()
    with pytest.raises(Violation, match="bare LF"):
        codec.next_event()


def test_a_refusal_before_any_request_is_hand_built_and_has_no_body_on_head() -> None:
    codec = ServerConnection(max_head_bytes=4096, max_header_count=20)
    assert codec.send_refusal(408, [(b"connection", b"close")], b"late") == (
        b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\n\r\nlate"
    )
    codec = ServerConnection(max_head_bytes=4096, max_header_count=20)
    codec.receive_data(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert isinstance(codec.next_event(), Request)
    assert codec.send_refusal(400, [], b"bad") == b"HTTP/1.1 400 Bad Request\r\n\r\n"


# -- the client side -----------------------------------------------------------------------------

_NAMES = st.one_of(
    st.sampled_from([b"accept", b"x-a", b"connection", b"content-length", b"expect", b"te"]),
    _TOKEN.map(str.encode),
)


@st.composite
def responses(draw: st.DrawFn, method: bytes) -> bytes:
    """Responses a server might send to ``method``: framed every way HTTP/1.1 allows."""
    parts = []
    if draw(st.integers(0, 4)) == 0:
        parts.append(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n")
    status = draw(st.sampled_from([200, 200, 201, 204, 304, 404]))
    version = draw(st.sampled_from([b"1.1", b"1.1", b"1.0"]))
    fields = draw(st.lists(st.tuples(_TOKEN.map(str.encode), _VALUE.map(bytes.strip)), max_size=3))
    if draw(st.booleans()):
        fields.append((b"Connection", draw(st.sampled_from([b"close", b"keep-alive"]))))
    body = draw(st.sampled_from([b"", b"ok", b"0123456789" * 30]))
    framing = draw(st.sampled_from(["length", "length", "chunked", "close"]))
    if framing == "length":
        fields.append((b"Content-Length", b"%d" % len(body)))
    elif framing == "chunked" and version == b"1.1":
        fields.append((b"Transfer-Encoding", b"chunked"))
    head = b"HTTP/%s %d X\r\n" % (version, status)
    head += b"".join(n + b": " + v + b"\r\n" for n, v in fields) + b"\r\n"
    if status in (204, 304) or method == b"HEAD":
        return b"".join(parts) + head
    if framing == "chunked" and version == b"1.1":
        chunks = b"%x\r\n%b\r\n" % (len(body), body) if body else b""
        trailer = draw(st.sampled_from([b"", b"x-t: 1\r\n"]))
        body = chunks + b"0\r\n" + trailer + b"\r\n"
    return b"".join(parts) + head + body + draw(st.sampled_from([b"", b"", b"HTTP/1.1 200"]))


def read_response(codec: ClientConnection, pieces: list[bytes]) -> list[Any] | None:
    events: list[Any] = []
    try:
        for piece in [*pieces, b""]:
            codec.receive_data(piece)
            while True:
                event = codec.next_event()
                if event is NEED_DATA or event is CLOSED:
                    break
                if isinstance(event, ResponseHead):
                    events.append(("head", event.status_code, event.headers))
                    if not event.informational:
                        body, ended = codec.buffered_body()
                        events.append(("data", body))
                        if ended:
                            events.append(("end", codec.trailers))
                            return _merged(events)
                elif event is END:
                    events.append(("end", codec.trailers))
                    return _merged(events)
                else:
                    assert type(event) is bytes
                    events.append(("data", event))
    except Violation:
        return None
    return _merged(events)


def h11_response(
    oracle: h11.Connection, pieces: list[bytes]
) -> tuple[list[Any] | None, h11.Connection]:
    events: list[Any] = []
    try:
        for piece in [*pieces, b""]:
            oracle.receive_data(piece)
            while True:
                event = oracle.next_event()
                if event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
                    break
                if isinstance(event, (h11.Response, h11.InformationalResponse)):
                    events.append(("head", event.status_code, list(event.headers)))
                elif isinstance(event, h11.Data):
                    events.append(("data", bytes(event.data)))
                elif isinstance(event, h11.EndOfMessage):
                    events.append(("end", list(event.headers)))
                    return _merged(events), oracle
    except h11.RemoteProtocolError:
        return None, oracle
    return _merged(events), oracle


@settings(max_examples=300, deadline=None)
@given(
    method=st.sampled_from([b"GET", b"HEAD", b"POST"]),
    headers=st.lists(st.tuples(_NAMES, _VALUE), max_size=3),
    body=st.sampled_from([b"", b"abc"]),
    data=st.data(),
    cuts=st.one_of(st.just([]), st.lists(st.integers(0, 600), min_size=1, max_size=3)),
)
def test_client_side_writes_and_reads_as_h11(
    method: bytes,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    data: st.DataObject,
    cuts: list[int],
) -> None:
    all_headers = [(b"host", b"example.test"), *headers]
    if body:
        all_headers.append((b"content-length", b"%d" % len(body)))
    oracle = h11.Connection(h11.CLIENT)
    try:
        expected = oracle.send(h11.Request(method=method, target=b"/x", headers=all_headers))
        if body:
            expected += oracle.send(h11.Data(data=body))
        expected += oracle.send(h11.EndOfMessage())
    except h11.LocalProtocolError:
        return  # the request validation refuses such requests before they get here
    codec = ClientConnection(max_head_bytes=4096)
    assert codec.send_request(method, b"/x", all_headers, body=body, end=True) == expected

    response = data.draw(responses(method))
    pieces = cut(response, cuts)
    got = read_response(codec, pieces)
    want, oracle = h11_response(oracle, pieces)
    assert want is not None and got is not None  # (every response generated is valid)
    assert got == want
    if got and got[-1][0] == "end":
        h11_reusable = (
            oracle.our_state is h11.DONE
            and oracle.their_state is h11.DONE
            and not oracle.trailing_data[0]
        )
        assert codec.reusable() is h11_reusable


def test_client_side_reads_a_plain_response_directly_and_a_1xx_through_h11() -> None:
    codec = ClientConnection(max_head_bytes=4096)
    codec.send_request(b"GET", b"/", [(b"host", b"a")], end=True)
    assert codec._direct
    codec.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    head = codec.next_event()
    assert isinstance(head, ResponseHead) and codec._direct
    assert codec.buffered_body() == (b"ok", True) and codec.reusable()
    codec.start_next_cycle()
    codec.send_request(b"GET", b"/", [(b"host", b"a")], end=True)
    codec.receive_data(
        b"HTTP/1.1 103 Early Hints\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    )
    head = codec.next_event()
    assert isinstance(head, ResponseHead) and head.informational and not codec._direct
    head = codec.next_event()
    assert isinstance(head, ResponseHead) and head.status_code == 200
    assert codec.buffered_body() == (b"ok", True) and codec.reusable()


def test_client_side_direct_body_cut_by_a_close_is_a_violation() -> None:
    codec = ClientConnection(max_head_bytes=4096)
    codec.send_request(b"GET", b"/", [(b"host", b"a")], end=True)
    codec.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab")
    assert isinstance(codec.next_event(), ResponseHead)
    assert codec.next_event() == b"ab"
    codec.receive_data(b"")
    with pytest.raises(Violation, match="3 bytes missing"):
        codec.next_event()
    assert codec.in_body and not codec.reusable()
