"""Request IDs on real sockets: every request gets one (the client's when it is a sane token),
the upstream sees exactly one, the client gets it back, the access log and the warnings about
the request carry it; W3C trace context passes untouched. Both front ends."""

from __future__ import annotations

import io
import json
import logging
import re
from dataclasses import replace

import pytest
import trio

from pooled_proxy.ops.accesslog import AccessLog
from tests.support.faulty_upstream import FaultyUpstream, refused_port
from tests.support.h2client import H2Client
from tests.support.helpers import H11Client, make_config, raw_exchange, start_proxy

NEW_ID = re.compile(rb"[0-9a-f]{24}")
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
TRACESTATE = "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"


def ids_seen(upstream: FaultyUpstream, name: bytes = b"x-request-id") -> list[list[bytes]]:
    return [[v for k, v in request.headers if k == name] for request in upstream.requests]


def head_field(reply: bytes, name: bytes) -> list[bytes]:
    head = reply.split(b"\r\n\r\n", 1)[0]
    return re.findall(rb"\r\n" + name + rb": ([^\r]*)", head, re.IGNORECASE)


@pytest.fixture
async def upstream(nursery: trio.Nursery) -> tuple[FaultyUpstream, int]:
    server = FaultyUpstream()
    port = await nursery.start(server.serve)
    return server, port


# Through the fast path (a plain GET), and through h11 (a chunked upload, HTTP/1.0).
H1_REQUESTS = [
    pytest.param(b"GET /ok HTTP/1.1\r\nHost: a\r\n%s\r\n", id="fast-path"),
    pytest.param(
        b"POST /ok HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n%s\r\n2\r\nhi\r\n0\r\n\r\n",
        id="h11-chunked-upload",
    ),
    pytest.param(b"GET /ok HTTP/1.0\r\nHost: a\r\n%s\r\n", id="h11-http10"),
]


@pytest.mark.parametrize("request_bytes", H1_REQUESTS)
async def test_a_request_without_an_id_gets_a_new_one(nursery, upstream, request_bytes):
    server, port = upstream
    log = io.StringIO()
    proxy = await start_proxy(nursery, make_config(port), observers=(AccessLog(log),))
    with trio.fail_after(5):
        replies = [
            await raw_exchange(proxy.port, request_bytes % b"Connection: close\r\n")
            for _ in range(2)
        ]
        await trio.testing.wait_all_tasks_blocked()
    sent = [head_field(reply, b"x-request-id") for reply in replies]
    assert all(len(ids) == 1 and NEW_ID.fullmatch(ids[0]) for ids in sent), sent
    assert sent[0] != sent[1]
    assert ids_seen(server) == sent  # the upstream got the same one, once
    logged = [json.loads(line)["request_id"].encode() for line in log.getvalue().splitlines()]
    assert logged == [ids[0] for ids in sent]


@pytest.mark.parametrize("request_bytes", H1_REQUESTS)
async def test_a_sane_client_id_is_kept_and_only_that_one_goes_up(nursery, upstream, request_bytes):
    server, port = upstream
    proxy = await start_proxy(nursery, make_config(port))
    fields = b"X-Request-ID: req-42/abc==\r\nx-request-id: second\r\nConnection: close\r\n"
    with trio.fail_after(5):
        reply = await raw_exchange(proxy.port, request_bytes % fields)
    assert head_field(reply, b"x-request-id") == [b"req-42/abc=="]
    assert ids_seen(server) == [[b"req-42/abc=="]]


@pytest.mark.parametrize(
    "value",
    [b"a" * 201, b"has space", b'quote"d', b"semi;colon", b"caf\xc3\xa9", b"tab\there"],
    ids=["too-long", "space", "quote", "semicolon", "non-ascii", "tab"],
)
async def test_an_insane_client_id_is_replaced(nursery, upstream, value):
    server, port = upstream
    proxy = await start_proxy(nursery, make_config(port))
    request = b"GET /ok HTTP/1.1\r\nHost: a\r\nX-Request-ID: %s\r\nConnection: close\r\n\r\n"
    with trio.fail_after(5):
        reply = await raw_exchange(proxy.port, request % value)
    [sent] = head_field(reply, b"x-request-id")
    assert NEW_ID.fullmatch(sent), sent
    assert ids_seen(server) == [[sent]]


async def test_the_longest_sane_id_is_kept(nursery, upstream):
    server, port = upstream
    proxy = await start_proxy(nursery, make_config(port))
    async with await H11Client.connect(proxy.port) as client:
        with trio.fail_after(5):
            reply = await client.request("GET", "/ok", headers=[("x-request-id", "b" * 200)])
    assert reply.headers[b"x-request-id"] == b"b" * 200
    assert ids_seen(server) == [[b"b" * 200]]


async def test_trace_context_passes_untouched_and_upstream_ids_are_replaced(nursery, upstream):
    server, port = upstream
    proxy = await start_proxy(nursery, make_config(port))
    trace = [("traceparent", TRACEPARENT), ("tracestate", TRACESTATE)]
    async with await H11Client.connect(proxy.port) as client:
        with trio.fail_after(5):
            # The upstream answers with an X-Request-ID of its own: the client gets the
            # proxy's, the one the upstream was sent and the log has.
            reply = await client.request("GET", "/ok?rid=upstream-made", headers=trace)
    [seen] = server.requests
    assert [(k, v) for k, v in seen.headers if k.startswith(b"trace")] == [
        (b"traceparent", TRACEPARENT.encode()),
        (b"tracestate", TRACESTATE.encode()),
    ]
    assert [v for k, v in reply.header_list if k == b"x-request-id"] == ids_seen(server)[0]
    assert NEW_ID.fullmatch(reply.headers[b"x-request-id"])


async def test_http2_front_end(nursery, upstream):
    server, port = upstream
    proxy = await start_proxy(nursery, make_config(port))
    async with await H2Client.connect(proxy.port) as client:
        with trio.fail_after(5):
            fresh = await client.get("/ok")
            kept = await client.get(
                "/ok", headers=[("x-request-id", "h2-id-1"), ("traceparent", TRACEPARENT)]
            )
            bad = await client.get("/ok", headers=[("x-request-id", "x" * 300)])
            upload = await client.response(await client.start("POST", "/ok", body=b"hello"))
    ids = [reply.header(b"x-request-id") for reply in (fresh, kept, bad, upload)]
    assert ids[1] == b"h2-id-1"
    assert all(NEW_ID.fullmatch(ids[i] or b"") for i in (0, 2, 3)), ids
    assert len(set(ids)) == 4
    assert ids_seen(server) == [[i] for i in ids]
    assert (b"traceparent", TRACEPARENT.encode()) in server.requests[1].headers


async def test_error_answers_and_warnings_carry_the_id(nursery, caplog):
    # Two dead servers: warnings are limited to one per server and error kind a second.
    dead = {await refused_port()}
    while len(dead) < 2:
        dead.add(await refused_port())
    first, second = [await start_proxy(nursery, make_config(port)) for port in sorted(dead)]
    caplog.set_level(logging.WARNING, logger="pooled_proxy.forward")
    with trio.fail_after(5):
        async with await H11Client.connect(first.port) as client:
            kept = await client.request("GET", "/x", headers=[("x-request-id", "client-7")])
        async with await H11Client.connect(second.port) as client:
            fresh = await client.request("GET", "/y")
    assert (kept.status, kept.headers[b"x-request-id"]) == (502, b"client-7")
    assert fresh.status == 502 and NEW_ID.fullmatch(fresh.headers[b"x-request-id"])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "GET /x (request client-7): " in warnings[0]
    assert f"GET /y (request {fresh.headers[b'x-request-id'].decode()}): " in warnings[1]


async def test_no_route_answer_carries_the_id(nursery, upstream):
    _, port = upstream
    config = make_config(port)
    config = replace(config, routes=(replace(config.routes[0], host="only.example"),))
    proxy = await start_proxy(nursery, config)
    async with await H11Client.connect(proxy.port) as client:
        with trio.fail_after(5):
            reply = await client.request("GET", "/", headers=[("x-request-id", "r-404")])
    assert (reply.status, reply.headers[b"x-request-id"]) == (404, b"r-404")


async def test_turned_off_or_renamed(nursery, upstream):
    server, port = upstream
    off = await start_proxy(nursery, make_config(port, server={"request_id": False}))
    renamed = await start_proxy(
        nursery, make_config(port, server={"request_id_header": "x-correlation-id"})
    )
    with trio.fail_after(5):
        async with await H11Client.connect(off.port) as client:
            plain = await client.request("GET", "/ok")
            # Off: the client's field is an ordinary header, passed on as it is.
            passed = await client.request("GET", "/ok", headers=[("x-request-id", "a b")])
        async with await H11Client.connect(renamed.port) as client:
            other = await client.request("GET", "/ok", headers=[("x-request-id", "kept-as-is")])
    assert b"x-request-id" not in plain.headers and b"x-request-id" not in passed.headers
    assert ids_seen(server)[:2] == [[], [b"a b"]]
    assert NEW_ID.fullmatch(other.headers[b"x-correlation-id"])
    assert ids_seen(server, b"x-correlation-id")[2] == [other.headers[b"x-correlation-id"]]
    assert ids_seen(server)[2] == [b"kept-as-is"]


def test_forked_workers_do_not_share_ids() -> None:
    import os

    from pooled_proxy.request_ids import choose_request_id

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its first ID, then out
        os.write(write, choose_request_id(None))
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 100)
    os.close(read)
    os.close(write)
    parent = choose_request_id(None)
    assert NEW_ID.fullmatch(child) and NEW_ID.fullmatch(parent)
    assert child[:16] != parent[:16]  # another prefix, not just another counter value
