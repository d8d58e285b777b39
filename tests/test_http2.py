"""The HTTP/2 front end end to end: real sockets, the demo upstream, httpx and a hand-driven h2
client (tests/h2client.py) for what httpx cannot do (resets, closed windows, floods)."""

from __future__ import annotations

import gc
import os
import tracemalloc

import h2.errors
import h2.settings
import httpx
import pytest
import trio
from hyperframe.frame import (
    ContinuationFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
)

from pooled_proxy.protocol.h2_server import PREFACE
from tests.h2client import H2Client
from tests.helpers import H11Client, make_config, start_proxy

ErrorCodes = h2.errors.ErrorCodes


def h2c_client(url: str, **kwargs: object) -> httpx.AsyncClient:
    """httpx speaking HTTP/2 with prior knowledge (no TLS, no Upgrade) on one connection."""
    return httpx.AsyncClient(
        base_url=url, http1=False, http2=True, limits=httpx.Limits(max_connections=1), **kwargs
    )


async def test_h2c_and_http11_share_the_cleartext_port(nursery, demo_upstream):
    upstream, port = demo_upstream
    proxy = await start_proxy(nursery, make_config(port))
    with trio.fail_after(5):
        async with h2c_client(proxy.url) as client:
            response = await client.get("/echo?x=1", headers={"x-forwarded-for": "10.0.0.1"})
        async with await H11Client.connect(proxy.port) as h11_client:
            reply = await h11_client.request("GET", "/echo")
    assert response.http_version == "HTTP/2"
    assert response.status_code == 200
    seen = dict(response.json()["headers"])
    assert seen["host"] == f"127.0.0.1:{proxy.port}"  # :authority became Host
    assert seen["x-forwarded-for"] == "10.0.0.1, 127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    assert seen["via"] == "2 pooled-proxy"
    assert response.headers["via"] == "1.1 pooled-proxy"
    assert reply.status == 200 and reply.json()["headers"]
    assert upstream.stats.requests == 2


async def test_h2_request_translation_on_the_wire(nursery, demo_upstream):
    _, port = demo_upstream
    proxy = await start_proxy(nursery, make_config(port))
    with trio.fail_after(5):
        async with await H2Client.connect(proxy.port) as client:
            reply = await client.get(
                "/echo",
                headers=[("cookie", "a=1"), ("cookie", "b=2"), ("x-Mixed", "v")],
            )
    assert reply.status == 200
    seen = dict(httpx.Response(200, content=bytes(reply.body)).json()["headers"])
    assert seen["cookie"] == "a=1; b=2"  # crumbs joined for the HTTP/1.1 upstream
    assert seen["host"] == "test.local"
    names = [name for name, _ in reply.headers]
    assert names[0] == b":status"
    assert all(name == name.lower() for name in names)
    assert b"connection" not in names and b"keep-alive" not in names


async def test_post_bodies_stream_both_ways(nursery, demo_upstream):
    _, port = demo_upstream
    proxy = await start_proxy(nursery, make_config(port))
    body = bytes(range(256)) * 4096  # 1 MiB: many windows' worth each way

    async def chunks():
        for i in range(0, len(body), 50_000):
            yield body[i : i + 50_000]

    with trio.fail_after(10):
        async with h2c_client(proxy.url) as client:
            sized = await client.post("/echo", content=body)
            unsized = await client.post("/echo", content=chunks())  # no content-length
    assert sized.status_code == 200 and sized.content == body
    assert unsized.status_code == 200 and unsized.content == body


async def test_100_concurrent_streams_on_one_connection_stay_within_the_pool(nursery, demo_upstream):
    upstream, port = demo_upstream
    proxy = await start_proxy(nursery, make_config(port, max_connections=4))
    statuses: list[int] = []
    with trio.fail_after(20):
        async with h2c_client(proxy.url) as client:

            async def one(i: int) -> None:
                response = await client.get(f"/slow?delay=0.05&i={i}")
                statuses.append(response.status_code)

            async with trio.open_nursery() as streams:
                for i in range(100):
                    streams.start_soon(one, i)
    assert statuses == [200] * 100
    assert upstream.stats.requests == 100
    assert upstream.stats.max_concurrent_connections <= 4
    assert proxy.proxy.client_connections <= 1
    stats = proxy.pool().statistics()
    assert stats.in_use == 0 and stats.waiting == 0 and stats.opened <= 4


async def test_concurrent_streams_over_the_limit_are_refused(nursery, demo_upstream):
    _, port = demo_upstream
    proxy = await start_proxy(nursery, make_config(port, server={"max_concurrent_streams": 3}))
    with trio.fail_after(5):
        async with await H2Client.connect(proxy.port) as client:
            # Sent before the server's SETTINGS arrive, so the client does not hold back.
            ids = [await client.start("GET", "/slow?delay=0.3") for _ in range(5)]
            replies = [await client.response(i) for i in ids]
            advertised = client.conn.remote_settings.max_concurrent_streams
            again = await client.get("/echo")
    assert advertised == 3
    assert [r.status for r in replies[:3]] == [200, 200, 200]
    assert [r.reset_code for r in replies[3:]] == [ErrorCodes.REFUSED_STREAM] * 2
    assert again.status == 200  # refusing a stream does not end the connection


async def test_reset_mid_body_cancels_only_that_stream_and_closes_its_upstream_connection(
    nursery, demo_upstream
):
    upstream, port = demo_upstream
    proxy = await start_proxy(nursery, make_config(port))
    with trio.fail_after(10):
        async with await H2Client.connect(proxy.port) as client:
            slow = await client.start("GET", "/slow?delay=0.3")
            big = await client.start("GET", "/bytes/100000000")
            await client.until(lambda: len(client.replies[big].body) > 200_000)
            client.conn.reset_stream(big, ErrorCodes.CANCEL)
            await client.flush()
            slow_reply = await client.response(slow)
            # The reset stream's upstream connection was closed, not pooled.
            while proxy.pool().statistics().in_use:
                await trio.sleep(0.01)
            after = await client.get("/echo")
    assert slow_reply.status == 200 and slow_reply.body == b"slow done\n"
    assert after.status == 200
    stats = proxy.pool().statistics()
    assert stats.closed.get("error") == 1
    assert stats.in_use == 0
    assert len(client.replies[big].body) < 100_000_000


async def test_a_reader_that_never_opens_its_window_does_not_grow_the_proxy(nursery, demo_upstream):
    upstream, port = demo_upstream
    proxy = await start_proxy(nursery, make_config(port))
    with trio.fail_after(20):
        async with await H2Client.connect(proxy.port, auto_ack=False) as client:
            gc.collect()
            rss_before = _rss_kib()
            tracemalloc.start()
            try:
                baseline = tracemalloc.get_traced_memory()[0]
                stream_id = await client.start("GET", "/bytes/200000000")
                await client.until(lambda: client.data_bytes >= 65535)
                # The proxy is now blocked on flow control; give a fast upstream every chance
                # to make it buffer.
                with trio.move_on_after(1.5):
                    await client.read_until_closed()
                current, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            rss_after = _rss_kib()
            received = client.data_bytes
            assert client.replies[stream_id].status == 200
    growth = peak - baseline
    print(
        f"\nnever-reading h2 client, /bytes/200000000: client got {received} bytes; "
        f"python heap peak +{growth / 1024:.0f} KiB (now +{(current - baseline) / 1024:.0f} KiB); "
        f"VmRSS {rss_before} -> {rss_after} KiB"
    )
    assert received == 65535  # exactly one initial window, not a byte more
    assert growth < 2 * 1024 * 1024  # the upstream pushed as fast as it could; we held ~1 window


def _rss_kib() -> int:
    with open(f"/proc/{os.getpid()}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0
