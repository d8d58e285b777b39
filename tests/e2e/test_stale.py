"""The keep-alive race: an upstream that closes an idle connection we are about to reuse."""

from __future__ import annotations

import trio
import trio.testing

from tests.support.helpers import H11Client, make_config, start_proxy
from tests.support.one_shot_upstream import OneShotUpstream


async def test_stale_reuse_of_idempotent_request_is_retried_not_502(nursery):
    upstream = OneShotUpstream()
    port = await nursery.start(upstream.serve)
    proxy = await start_proxy(nursery, make_config(port))
    with trio.fail_after(5):
        async with await H11Client.connect(proxy.port) as client:
            for _ in range(5):
                reply = await client.request("GET", "/")
                assert (reply.status, reply.body) == (200, b"ok")
    # Every reuse hit a dead connection and was retried once on a fresh one, until the pool
    # took the closes, at about the same idle age, for the server's idle timeout: from
    # then on it retires the connection before reusing it instead.
    await trio.testing.wait_all_tasks_blocked()
    stats = proxy.pool().statistics()
    retries = proxy.proxy.forwarder.stale_retries
    assert retries == stats.reused >= 2, stats  # each reuse met the race and was retried
    assert upstream.connections == stats.opened == 5
    assert stats.in_use == 0


async def test_stale_reuse_of_post_with_body_is_not_replayed(nursery):
    upstream = OneShotUpstream()
    port = await nursery.start(upstream.serve)
    proxy = await start_proxy(nursery, make_config(port))
    with trio.fail_after(5):
        async with await H11Client.connect(proxy.port) as client:
            assert (await client.request("GET", "/")).status == 200
            reply = await client.request("POST", "/orders", body=b"x" * 10)
    # The body may have reached the upstream: replaying a POST could do it twice.
    assert reply.status == 502
    assert b"error=http_response_incomplete" in reply.headers[b"proxy-status"]
    assert upstream.requests == [b"GET /"]


async def test_stale_reuse_of_put_and_delete_with_a_held_body_is_replayed(nursery):
    """A body that came whole with its head (one read of at most 64 KiB) is still at hand:
    an idempotent request carrying it is sent again, body and all, on a fresh connection."""
    upstream = OneShotUpstream()
    port = await nursery.start(upstream.serve)
    proxy = await start_proxy(nursery, make_config(port))
    with trio.fail_after(5):
        async with await H11Client.connect(proxy.port) as client:
            assert (await client.request("GET", "/")).status == 200
            put = await client.request("PUT", "/doc", body=b"x" * 4_000)
            delete = await client.request("DELETE", "/doc", body=b'{"why": "gone"}')
    assert (put.status, delete.status) == (200, 200)
    assert upstream.requests == [b"GET /", b"PUT /doc", b"DELETE /doc"]
    assert proxy.proxy.forwarder.stale_retries == 2


async def test_stale_reuse_of_a_streamed_put_is_not_replayed(nursery):
    """A body that did not come whole with its head streams up as it arrives: once a byte
    of it went up it cannot be sent again, whatever the method."""
    upstream = OneShotUpstream()
    port = await nursery.start(upstream.serve)
    proxy = await start_proxy(nursery, make_config(port))
    with trio.fail_after(5):
        async with await H11Client.connect(proxy.port) as client:
            assert (await client.request("GET", "/")).status == 200
            await client.stream.send_all(
                b"PUT /doc HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
            )
            reply = b""
            while b"\r\n\r\n" not in reply:
                reply += await client.stream.receive_some(65536)
    assert reply.startswith(b"HTTP/1.1 502 "), reply
    assert proxy.proxy.forwarder.stale_retries == 0


async def test_idle_connection_closed_by_upstream_is_never_handed_out(nursery):
    upstream = OneShotUpstream(close_idle_after=0.05)
    port = await nursery.start(upstream.serve)
    proxy = await start_proxy(nursery, make_config(port))
    with trio.fail_after(5):
        async with await H11Client.connect(proxy.port) as client:
            assert (await client.request("GET", "/")).status == 200
            await trio.sleep(0.2)  # the upstream has closed the idle connection by now
            assert (await client.request("GET", "/")).status == 200
    stats = proxy.pool().statistics()
    assert stats.closed.get("stale") == 1
    assert proxy.proxy.forwarder.stale_retries == 0


async def test_connect_timeout_is_504(nursery):
    # A listener whose accept queue is full: further SYNs are dropped and connect() hangs.
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            filler = trio.socket.socket()
            with trio.move_on_after(0.2):
                await filler.connect(("127.0.0.1", port))
            fillers.append(filler)
        proxy = await start_proxy(nursery, make_config(port, connect_timeout=0.3))
        with trio.fail_after(5):
            async with await H11Client.connect(proxy.port) as client:
                reply = await client.request("GET", "/")
        assert reply.status == 504
        assert b"error=connection_timeout" in reply.headers[b"proxy-status"]
        assert proxy.pool().statistics().connecting == 0
    finally:
        for filler in fillers:
            filler.close()
        listener.close()
