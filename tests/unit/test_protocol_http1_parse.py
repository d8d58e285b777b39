"""pooled_proxy.protocol.http1.parse without sockets: exact verdicts on raw bytes, plus
hypothesis properties (any split of the bytes gives the same verdict; whatever the checker
accepts, h11 frames into the same messages)."""

from __future__ import annotations

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pooled_proxy.protocol.http1.parse import RequestChecker, ResponseChecker, Violation, check_head

GOOD_GET = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
GOOD_POST = b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
GOOD_CHUNKED = (
    b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5;name=value\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
)

# (name, bytes, status): each is refused before h11 would see it.
BAD_REQUESTS = [
    (
        "cl_and_te",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        400,
    ),
    (
        "te_and_cl",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
        400,
    ),
    (
        "two_equal_cl",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        400,
    ),
    (
        "two_differing_cl",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        400,
    ),
    ("cl_list", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\nhello", 400),
    ("cl_plus_sign", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\nhello", 400),
    ("cl_hex", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x5\r\n\r\nhello", 400),
    ("obs_fold", b"GET / HTTP/1.1\r\nHost: a\r\nX-Long: one\r\n two\r\n\r\n", 400),
    ("obs_fold_tab", b"GET / HTTP/1.1\r\nHost: a\r\nX-Long: one\r\n\ttwo\r\n\r\n", 400),
    (
        "obs_fold_te",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    ("space_before_colon", b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length : 0\r\n\r\n", 400),
    ("tab_before_colon", b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding\t: chunked\r\n\r\n", 400),
    ("nul_in_value", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\x00c\r\n\r\n", 400),
    ("bare_cr_in_value", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\rc\r\n\r\n", 400),
    (
        "bare_lf_in_value",
        b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\nTransfer-Encoding: chunked\r\n\r\n",
        400,
    ),
    ("lf_only_head", b"GET / HTTP/1.1\nHost: a\n\n", 400),
    ("control_char_in_value", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\x01c\r\n\r\n", 400),
    ("no_colon", b"GET / HTTP/1.1\r\nHost: a\r\nJustAName\r\n\r\n", 400),
    ("two_hosts", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    (
        "connection_names_cl",
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nConnection: close, Content-Length\r\n"
            b"Content-Length: 5\r\n\r\nhello"
        ),
        400,
    ),
    ("connection_names_host", b"GET / HTTP/1.1\r\nHost: a\r\nConnection: HOST\r\n\r\n", 400),
    ("method_not_token", b"G(T / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("obs_text_in_target", b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("te_in_http10", b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    (
        "two_te",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
        400,
    ),
    ("unknown_te", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    ("te_list", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
    ("te_identity", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\n\r\n", 501),
    (
        "te_chunked_twice",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
        501,
    ),
    (
        "chunk_size_not_hex",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        400,
    ),
    (
        "chunk_size_0x",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n",
        400,
    ),
    (
        "chunk_size_overflow",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1" + b"0" * 16 + b"5\r\n",
        400,
    ),
    (
        "chunk_size_leading_space",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n 5\r\nhello\r\n0\r\n\r\n",
        400,
    ),
    (
        "chunk_size_negative",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\n",
        400,
    ),
    (
        "chunk_size_empty",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\r\n",
        400,
    ),
    (
        "chunk_ext_bare_lf",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;a\nb\r\nhello\r\n0\r\n\r\n",
        400,
    ),
    (
        "chunk_line_lf_only",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n",
        400,
    ),
    (
        "chunk_data_too_long",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX\r\n0\r\n\r\n",
        400,
    ),
    (
        "trailer_obs_fold",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX: a\r\n b\r\n\r\n",
        400,
    ),
    ("second_request_bad", GOOD_GET + b"GET / HTTP/1.1\r\nHost: a\r\nX: \x00\r\n\r\n", 400),
    (
        "smuggled_after_cl_body",
        GOOD_POST + b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\nX-B: 2\r\n\r\n",
        400,
    ),
    ("empty_line_first", b"\r\n" + GOOD_GET, 400),
]


@pytest.mark.parametrize("name,data,status", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_are_violations(name: str, data: bytes, status: int) -> None:
    checker = RequestChecker(max_head_bytes=65536, max_header_count=100)
    with pytest.raises(Violation) as info:
        checker.feed(data)
    assert info.value.status == status, info.value


@pytest.mark.parametrize("name,data,status", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_are_caught_byte_by_byte(name: str, data: bytes, status: int) -> None:
    checker = RequestChecker(max_head_bytes=65536, max_header_count=100)
    with pytest.raises(Violation) as info:
        for i in range(len(data)):
            checker.feed(data[i : i + 1])
    assert info.value.status == status


@pytest.mark.parametrize(
    "data",
    [
        GOOD_GET,
        GOOD_POST,
        GOOD_CHUNKED,
        GOOD_GET + GOOD_POST + GOOD_CHUNKED + GOOD_GET,  # pipelined
        b"GET / HTTP/1.0\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Empty:\r\nX-Ows: \t v \t\r\nX-Latin: caf\xe9\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n5 \t\r\nhello\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 00005\r\n\r\nhello",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n\r\n",  # body that looks like CRLF
    ],
)
def test_good_requests_pass(data: bytes) -> None:
    checker = RequestChecker(max_head_bytes=65536, max_header_count=100)
    checker.feed(data)
    by_byte = RequestChecker(max_head_bytes=65536, max_header_count=100)
    for i in range(len(data)):
        by_byte.feed(data[i : i + 1])
    assert checker.heads == by_byte.heads == data.count(b" HTTP/1.")


def test_violation_says_how_much_came_before_the_bad_block() -> None:
    bad = b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n"
    checker = RequestChecker(max_head_bytes=65536)
    with pytest.raises(Violation) as info:
        checker.feed(GOOD_GET + GOOD_POST + bad)
    assert info.value.clean_bytes == len(GOOD_GET + GOOD_POST)
    # The bad block began in an earlier feed: nothing of this one is clean.
    checker = RequestChecker(max_head_bytes=65536)
    checker.feed(GOOD_GET + bad[:10])
    with pytest.raises(Violation) as info:
        checker.feed(bad[10:])
    assert info.value.clean_bytes == 0
    # A bad chunk line: the body bytes before it are clean.
    chunked = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
    checker = RequestChecker(max_head_bytes=65536)
    with pytest.raises(Violation) as info:
        checker.feed(chunked + b"zz\r\n")
    assert info.value.clean_bytes == len(chunked)


def test_body_bytes_are_not_parsed_as_headers() -> None:
    checker = RequestChecker(max_head_bytes=65536)
    # NULs and bare LFs are fine inside a body, counted or chunked.
    checker.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\n\x00\n\r\x00")
    checker.feed(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n\n\x00\r\r\n0\r\n\r\n"
    )
    assert checker.heads == 2


def test_head_size_and_header_count_limits_are_431() -> None:
    with pytest.raises(Violation) as info:
        RequestChecker(max_head_bytes=100).feed(b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"a" * 200)
    assert info.value.status == 431
    # A complete head over the limit arriving in one piece (h11 lets that through).
    with pytest.raises(Violation) as info:
        RequestChecker(max_head_bytes=100).feed(b"GET / HTTP/1.1\r\nX: " + b"a" * 200 + b"\r\n\r\n")
    assert info.value.status == 431
    headers = b"".join(b"X-%d: v\r\n" % i for i in range(11))
    with pytest.raises(Violation) as info:
        RequestChecker(max_head_bytes=65536, max_header_count=10).feed(
            b"GET / HTTP/1.1\r\nHost: a\r\n" + headers + b"\r\n"
        )
    assert info.value.status == 431
    # Exactly at the count is fine.
    RequestChecker(max_head_bytes=65536, max_header_count=10).feed(
        b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(10)) + b"\r\n"
    )


def test_bytes_behind_an_upgrade_request_are_checked_as_the_next_request() -> None:
    upgrade = b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
    checker = RequestChecker(max_head_bytes=65536)
    checker.feed(upgrade + GOOD_GET)  # the switch was declined: a pipelined request follows
    assert checker.heads == 2
    with pytest.raises(Violation):
        RequestChecker(max_head_bytes=65536).feed(upgrade + b"GET / HTTP/1.1\nHost: a\n\n")


def test_check_head_reports_framing() -> None:
    head = check_head(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\n\r\n", request=True)
    assert (head.content_length, head.chunked, head.version) == (12, False, b"1.1")
    head = check_head(b"HTTP/1.1 200 OK\r\ntransfer-encoding: CHUNKED\r\n\r\n", request=False)
    assert head.chunked and head.status == 200


# -- responses --------------------------------------------------------------------------------

BAD_RESPONSES = [
    ("cl_and_te", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"),
    ("two_equal_cl", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello"),
    ("obs_fold", b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\nContent-Length: 0\r\n\r\n"),
    ("space_before_colon", b"HTTP/1.1 200 OK\r\nContent-Length : 0\r\n\r\n"),
    ("bare_lf", b"HTTP/1.1 200 OK\nContent-Length: 0\n\n"),
    ("nul", b"HTTP/1.1 200 OK\r\nX: \x00\r\nContent-Length: 0\r\n\r\n"),
    ("garbage_status_line", b"SSH-2.0-OpenSSH_9.6\r\n\r\n"),
    ("bad_chunk_size", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nxyz\r\n"),
    ("unknown_te", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n"),
    ("te_in_http10", b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
]


@pytest.mark.parametrize("name,data", BAD_RESPONSES, ids=[c[0] for c in BAD_RESPONSES])
def test_bad_responses_are_violations(name: str, data: bytes) -> None:
    checker = ResponseChecker(max_head_bytes=65536)
    checker.expect(b"GET")
    with pytest.raises(Violation):
        checker.feed(data)


def test_garbage_instead_of_a_status_line_is_refused_before_a_line_end() -> None:
    checker = ResponseChecker(max_head_bytes=65536)
    checker.expect(b"GET")
    checker.feed(b"HTT")  # so far so good
    with pytest.raises(Violation):
        checker.feed(b"X")
    checker.expect(b"GET")
    with pytest.raises(Violation):
        checker.feed(b"SSH-2.0-OpenSSH")


def test_response_framing_follows_rfc9112() -> None:
    checker = ResponseChecker(max_head_bytes=65536)
    # 100 Continue then the real response; 204/304 and HEAD responses end at the head.
    checker.expect(b"POST")
    checker.feed(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    checker.expect(b"HEAD")
    checker.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
    checker.expect(b"GET")
    checker.feed(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 1000\r\n\r\n")
    checker.expect(b"GET")
    checker.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")
    checker.expect(b"GET")
    checker.feed(b"HTTP/1.1 200 OK\r\n\r\nuntil close \x00\n anything")
    assert checker.heads == 6
    # After a 101 the bytes belong to another protocol.
    checker.expect(b"GET")
    checker.feed(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x00\n\x00")


# -- properties -------------------------------------------------------------------------------

HEADER_LINES = st.sampled_from(
    [
        b"Host: a",
        b"Host: b",
        b"Content-Length: 3",
        b"Content-Length: 0",
        b"Content-Length: 3, 3",
        b"Content-Length : 3",
        b"Transfer-Encoding: chunked",
        b"Transfer-Encoding: gzip",
        b"Transfer-Encoding : chunked",
        b" chunked",
        b"X-A: 1",
        b"X-A: 1\nContent-Length: 3",
        b"X-B: \x00",
        b"X-C: \r",
        b"Connection: upgrade",
        b"Upgrade: websocket",
        b"Expect: 100-continue",
    ]
)
BODIES = st.sampled_from(
    [
        b"",
        b"abc",
        b"3\r\nabc\r\n0\r\n\r\n",
        b"0\r\n\r\n",
        b"3\nabc\n0\n\n",
        b"ffffffffffffffffff\r\n",
    ]
)


@st.composite
def request_streams(draw: st.DrawFn) -> bytes:
    parts = []
    for _ in range(draw(st.integers(1, 3))):
        method = draw(st.sampled_from([b"GET", b"POST"]))
        version = draw(st.sampled_from([b"1.1", b"1.1", b"1.0"]))
        lines = draw(st.lists(HEADER_LINES, max_size=5))
        ending = draw(st.sampled_from([b"\r\n", b"\r\n", b"\n"]))
        parts.append(
            method + b" / HTTP/" + version + ending + b"".join(l + ending for l in lines) + ending
        )
        parts.append(draw(BODIES))
    return b"".join(parts)


def _h11_head_offsets(data: bytes) -> list[int]:
    """Fed byte by byte, after which byte h11 produced each request head (stops where h11
    refuses the bytes or waits for a close)."""
    conn = h11.Connection(h11.SERVER)
    offsets: list[int] = []
    for i in range(len(data)):
        conn.receive_data(data[i : i + 1])
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                return offsets
            if isinstance(event, h11.Request):
                offsets.append(i + 1)
            elif event is h11.NEED_DATA:
                break
            elif event is h11.PAUSED or isinstance(event, h11.EndOfMessage):
                if conn.our_state is h11.SEND_RESPONSE:
                    conn.send(h11.Response(status_code=200, headers=[("content-length", "0")]))
                    conn.send(h11.EndOfMessage())
                if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                    conn.start_next_cycle()
                elif event is h11.PAUSED:
                    return offsets  # a protocol switch proposal, or HTTP/1.0's close
    return offsets


def _checker_head_offsets(data: bytes) -> list[int]:
    """The same for the checker; it stops at its first violation, as the front end does."""
    checker = RequestChecker(max_head_bytes=65536, max_header_count=100)
    offsets: list[int] = []
    for i in range(len(data)):
        try:
            checker.feed(data[i : i + 1])
        except Violation:
            return offsets
        if checker.heads > len(offsets):
            offsets.append(i + 1)
    return offsets


@settings(max_examples=300, deadline=None)
@given(request_streams(), st.data())
def test_h11_never_sees_a_head_the_checker_did_not(data: bytes, draw: st.DataObject) -> None:
    """The differential property that makes the checker a smuggling guard: over the bytes the
    checker accepts, every request head h11 finds ends at the same byte as one the checker
    found (h11 may stop earlier: it refuses a few things we leave to it, like a missing Host).
    And feeding the bytes in any split gives the same verdict as feeding them at once."""
    checker_offsets = _checker_head_offsets(data)
    accepted = data
    try:
        RequestChecker(max_head_bytes=65536, max_header_count=100).feed(data)
        verdict: int | None = None
    except Violation as exc:
        verdict = exc.status
        # the bytes up to the violation: byte-by-byte feeding pins where it is
        probe = RequestChecker(max_head_bytes=65536, max_header_count=100)
        for i in range(len(data)):
            try:
                probe.feed(data[i : i + 1])
            except Violation:
                accepted = data[:i]
                break
    h11_offsets = _h11_head_offsets(accepted)
    assert h11_offsets == checker_offsets[: len(h11_offsets)]

    cuts = sorted(draw.draw(st.lists(st.integers(0, len(data)), max_size=6)))
    split = RequestChecker(max_head_bytes=65536, max_header_count=100)
    try:
        for a, b in zip([0, *cuts], [*cuts, len(data)]):
            split.feed(data[a:b])
        split_verdict: int | None = None
    except Violation as exc:
        split_verdict = exc.status
    assert split_verdict == verdict
