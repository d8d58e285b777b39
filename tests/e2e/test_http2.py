"""The HTTP/2 front end end to end: real sockets, the demo upstream, httpx and a hand-driven h2
client (tests/support/h2client.py) for what httpx cannot do (resets, closed windows, floods)."""

from __future__ import annotations

import gc
import os
import tracemalloc

import h2.errors
import h2.events
import h2.settings
import hpack
import httpx
import pytest
import trio
from hyperframe.frame import (
    ContinuationFrame,
    HeadersFrame,
    PingFrame,
    SettingsFrame,
)

from pooled_proxy.server.http2 import IDLE_WORKERS, H2Stream
from tests.support.h2client import H2Client, H2Reply
from tests.support.helpers import H11Client, make_config, start_proxy
from tests.support.scripted_upstream import run as run_scripted

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


async def test_100_concurrent_streams_on_one_connection_stay_within_the_pool(
    nursery, demo_upstream
):
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
    assert [r.status for r in replies[:3]] == [200, 200, 200], [
        (i, r.status, r.reset_code) for i, r in zip(ids, replies)
    ]
    assert [r.reset_code for r in replies[3:]] == [ErrorCodes.REFUSED_STREAM] * 2
    assert again.status == 200  # refusing a stream does not end the connection


async def test_reset_mid_body_cancels_only_that_stream_and_closes_its_upstream_connection(
    nursery, demo_upstream
):
    _upstream, port = demo_upstream
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


async def test_the_streams_after_a_reset_one_are_served_on_the_same_connection(
    nursery, demo_upstream
):
    # Streams one at a time: the connection serves them all with the same worker task, whose
    # cancel scope a reset uses up.
    upstream, port = demo_upstream
    proxy = await start_proxy(nursery, make_config(port))
    with trio.fail_after(10):
        async with await H2Client.connect(proxy.port) as client:
            first = await client.get("/echo")
            slow = await client.start("GET", "/slow?delay=5")
            while not proxy.pool().statistics().in_use:
                await trio.sleep(0.01)
            client.conn.reset_stream(slow, ErrorCodes.CANCEL)
            await client.flush()
            while proxy.pool().statistics().in_use:
                await trio.sleep(0.01)
            # Reset in the same write as its HEADERS: stopped before it reaches the upstream.
            at_once = client.conn.get_next_available_stream_id()
            client.replies[at_once] = H2Reply()
            client.conn.send_headers(
                at_once, client.request_headers("GET", "/echo?at-once"), end_stream=True
            )
            client.conn.reset_stream(at_once, ErrorCodes.CANCEL)
            await client.flush()
            after = [await client.get(f"/echo?after={i}") for i in range(3)]
    assert first.status == 200
    assert [reply.status for reply in after] == [200, 200, 200]
    assert not client.replies[at_once].status
    assert upstream.stats.requests == 5  # first, slow and the three after
    assert proxy.pool().statistics().closed.get("error") == 1  # slow's, closed mid-wait


async def test_request_ids_stay_out_of_the_clients_hpack_table(nursery, demo_upstream):
    # New in every response, so indexing them would push out the fields that repeat; the
    # first one is indexed, so that the field's name is in the table for the others.
    _, port = demo_upstream
    proxy = await start_proxy(nursery, make_config(port))
    with trio.fail_after(5):
        async with await H2Client.connect(proxy.port) as client:
            replies = [await client.get("/echo") for _ in range(20)]
    ids = [reply.header(b"x-request-id") for reply in replies]
    assert len(set(ids)) == 20 and None not in ids
    for reply in replies[1:]:
        (field,) = [field for field in reply.headers if field[0] == b"x-request-id"]
        assert isinstance(field, hpack.NeverIndexedHeaderTuple)
    table = client.conn.decoder.header_table.dynamic_entries
    assert [value for name, value in table if name == b"x-request-id"] == [ids[0]]
    assert len(table) < 10


async def test_response_literals_go_out_without_huffman_coding(nursery, demo_upstream):
    # hpack's Huffman coding is a Python loop per byte: the literals of a response block
    # (the request ID in every one) are sent as they are, which any client decodes.
    _, port = demo_upstream
    proxy = await start_proxy(nursery, make_config(port))
    with trio.fail_after(5):
        async with await H2Client.connect(proxy.port) as client:
            replies = [await client.get("/bytes/10") for _ in range(3)]
        async with h2c_client(proxy.url) as httpx_client:
            response = await httpx_client.get("/echo")
    for reply in replies:
        request_id = reply.header(b"x-request-id")
        assert request_id is not None and request_id in client.received
    assert response.status_code == 200 and response.headers["x-request-id"]


async def test_a_connection_keeps_nothing_of_its_finished_streams(nursery, demo_upstream):
    # Its stream workers wait for the next stream holding nothing of the last one.
    _, port = demo_upstream
    proxy = await start_proxy(nursery, make_config(port))
    with trio.fail_after(5):
        async with await H2Client.connect(proxy.port) as client:
            replies = [await client.get("/bytes/10") for _ in range(3)]
            while proxy.proxy.active_exchanges:
                await trio.sleep(0.01)
            gc.collect()
            held = [o for o in gc.get_objects() if type(o) is H2Stream]
    assert [reply.status for reply in replies] == [200, 200, 200]
    assert held == []


def _tasks_named(suffix: str) -> list[trio.lowlevel.Task]:
    found: list[trio.lowlevel.Task] = []
    nurseries = list(trio.lowlevel.current_root_task().child_nurseries)
    while nurseries:
        for task in nurseries.pop().child_tasks:
            if task.name.endswith(suffix):
                found.append(task)
            nurseries += task.child_nurseries
    return found


async def test_after_a_burst_of_streams_a_connection_keeps_a_few_workers(nursery, demo_upstream):
    _, port = demo_upstream
    proxy = await start_proxy(nursery, make_config(port))
    with trio.fail_after(10):
        async with await H2Client.connect(proxy.port) as client:
            ids = [await client.start("GET", "/slow?delay=0.1") for _ in range(40)]
            replies = [await client.response(i) for i in ids]
            while proxy.proxy.active_exchanges:
                await trio.sleep(0.01)
            workers = len(_tasks_named("._stream_worker"))
            again = await client.get("/echo")
    assert [reply.status for reply in replies] == [200] * 40
    assert 1 <= workers <= IDLE_WORKERS < 40
    assert again.status == 200


async def test_a_reader_that_never_opens_its_window_does_not_grow_the_proxy(nursery, demo_upstream):
    _upstream, port = demo_upstream
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


# -- abuse: each ends with GOAWAY and a closed connection, never a hung proxy ------------------


async def _expect_cut_off(client: H2Client, code: int = ErrorCodes.ENHANCE_YOUR_CALM) -> None:
    await client.read_until_closed()
    assert client.closed
    assert client.goaway is not None and client.goaway.error_code == code, client.goaways


async def test_rapid_reset_client_is_cut_off(nursery, demo_upstream, caplog):
    _upstream, port = demo_upstream
    proxy = await start_proxy(nursery, make_config(port))
    with trio.fail_after(10):
        async with await H2Client.connect(proxy.port) as client:
            sent = 0
            try:
                while sent < 5000:
                    for _ in range(50):  # HEADERS then RST_STREAM at once, as CVE-2023-44487 does
                        stream_id = client.conn.get_next_available_stream_id()
                        client.conn.send_headers(
                            stream_id,
                            client.request_headers("GET", "/slow?delay=1"),
                            end_stream=True,
                        )
                        client.conn.reset_stream(stream_id, ErrorCodes.CANCEL)
                        sent += 1
                    await client.flush()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            await _expect_cut_off(client)
        while proxy.pool().statistics().in_use:
            await trio.sleep(0.01)
    print(f"\nrapid reset: cut off after the client had sent {sent} HEADERS+RST_STREAM pairs")
    assert sent < 5000  # the proxy stopped listening long before the client stopped
    assert "reset or refused streams" in caplog.text
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


@pytest.mark.parametrize(
    "frame",
    [SettingsFrame(0), PingFrame(0, opaque_data=b"12345678")],
    ids=["settings", "ping"],
)
async def test_settings_and_ping_floods_are_cut_off(nursery, demo_upstream, frame):
    _, port = demo_upstream
    proxy = await start_proxy(nursery, make_config(port))
    with trio.fail_after(5):
        async with await H2Client.connect(proxy.port) as client:
            try:
                await client.send_raw(frame.serialize() * 500)
            except trio.BrokenResourceError:
                pass
            await _expect_cut_off(client)
        async with await H2Client.connect(proxy.port) as fresh:
            assert (await fresh.get("/echo")).status == 200  # the proxy itself is fine


async def test_continuation_flood_is_cut_off(nursery, demo_upstream):
    _, port = demo_upstream
    proxy = await start_proxy(nursery, make_config(port))
    with trio.fail_after(5):
        async with await H2Client.connect(proxy.port) as client:
            block = client.conn.encoder.encode(client.request_headers("GET", "/echo"))
            frames = HeadersFrame(1, data=block[:5]).serialize()
            frames += b"".join(ContinuationFrame(1, data=b"").serialize() for _ in range(1000))
            try:
                await client.send_raw(frames)
            except trio.BrokenResourceError:
                pass
            await _expect_cut_off(client)


async def test_oversized_header_lists_are_cut_off(nursery, demo_upstream):
    _, port = demo_upstream
    proxy = await start_proxy(nursery, make_config(port, server={"max_header_bytes": 8192}))
    with trio.fail_after(5):
        # Over max_header_bytes once decoded, though a single small frame on the wire.
        async with await H2Client.connect(proxy.port) as client:
            await client.start("GET", "/echo", headers=[("x-big", "a" * 10000)])
            await client.read_until_closed()
            assert client.closed and client.goaway is not None
            assert client.goaway.error_code in (
                ErrorCodes.ENHANCE_YOUR_CALM,
                ErrorCodes.PROTOCOL_ERROR,
            )
        # A header block spread over many CONTINUATION frames, larger than we accept.
        async with await H2Client.connect(proxy.port) as client:
            block = client.conn.encoder.encode(
                client.request_headers("GET", "/echo", [(f"x-{i}", "v" * 1000) for i in range(30)])
            )
            pieces = [block[i : i + 1000] for i in range(0, len(block), 1000)]
            frames = HeadersFrame(1, data=pieces[0]).serialize()
            frames += b"".join(ContinuationFrame(1, data=p).serialize() for p in pieces[1:-1])
            frames += ContinuationFrame(1, data=pieces[-1], flags=["END_HEADERS"]).serialize()
            try:
                await client.send_raw(frames)
            except trio.BrokenResourceError:
                pass
            await _expect_cut_off(client)


async def test_protocol_errors_end_in_goaway_not_in_a_crash(nursery, demo_upstream, caplog):
    _, port = demo_upstream
    proxy = await start_proxy(nursery, make_config(port))
    with trio.fail_after(5):
        async with await H2Client.connect(proxy.port) as client:
            # RST_STREAM on stream 0 (hyperframe refuses to build one, so by hand)
            await client.send_raw(b"\x00\x00\x04\x03\x00\x00\x00\x00\x00" + b"\x00" * 4)
            await _expect_cut_off(client, ErrorCodes.PROTOCOL_ERROR)
        async with await H2Client.connect(proxy.port) as fresh:
            assert (await fresh.get("/echo")).status == 200
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


def _raw_headers(client: H2Client, stream_id: int, block: list[tuple[bytes, bytes]]) -> bytes:
    """A HEADERS frame with END_STREAM as a careless client would send it: no checks."""
    data = client.conn.encoder.encode(block)
    return HeadersFrame(stream_id, data=data, flags=["END_HEADERS", "END_STREAM"]).serialize()


async def test_a_malformed_header_block_ends_the_connection_as_h2_would(
    nursery, demo_upstream, caplog
):
    # h2's inbound checks run on every request block: a refused one is a connection error
    # (GOAWAY PROTOCOL_ERROR naming it), and nothing of the read it came in is served.
    upstream, port = demo_upstream
    proxy = await start_proxy(nursery, make_config(port))
    request = H2Client.request_headers(None, "GET", "/echo")  # type: ignore[arg-type]
    refused = {
        "upper-case name": [*request, (b"X-Upper", b"1")],
        "pseudo-header after a field": [*request[:3], (b"accept", b"*/*"), request[3]],
        "empty last cookie crumb": [*request, (b"cookie", b"a=1"), (b"cookie", b"")],
        "space around a value": [*request, (b"accept", b" */*")],
        "connection header": [*request, (b"connection", b"close")],
    }
    with trio.fail_after(10):
        for name, block in refused.items():
            async with await H2Client.connect(proxy.port) as client:
                # Stream 5 comes in the same read, after the refused block: h2 never saw it.
                await client.send_raw(
                    _raw_headers(client, 1, request)
                    + _raw_headers(client, 3, block)
                    + _raw_headers(client, 5, request)
                )
                await _expect_cut_off(client, ErrorCodes.PROTOCOL_ERROR)
                assert client.goaway is not None and client.goaway.last_stream_id == 3, name
                assert not [e for e in client.events if isinstance(e, h2.events.ResponseReceived)]
        # Cookie crumbs are joined before the checks: one before the pseudo-headers is fine.
        async with await H2Client.connect(proxy.port) as client:
            client.conn.config.validate_outbound_headers = False
            client.conn.config.normalize_outbound_headers = False
            client.replies[1] = H2Reply()
            client.conn.send_headers(
                1, [(b"cookie", b"a=1"), *request, (b"cookie", b""), (b"cookie", b"b=2")], True
            )
            await client.flush()
            reply = await client.response(1)
    assert upstream.stats.requests == 1
    assert reply.status == 200
    seen = dict(httpx.Response(200, content=bytes(reply.body)).json()["headers"])
    assert seen["cookie"] == "a=1; ; b=2"
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


# -- limits and timeouts ---------------------------------------------------------------------


async def test_body_over_max_body_bytes_gets_413(nursery, demo_upstream):
    _upstream, port = demo_upstream
    proxy = await start_proxy(nursery, make_config(port, server={"max_body_bytes": 1000}))
    with trio.fail_after(5):
        async with await H2Client.connect(proxy.port) as client:
            declared = await client.response(
                await client.start(
                    "POST", "/echo", headers=[("content-length", "5000")], body=b"x" * 5000
                )
            )
            undeclared = await client.response(
                await client.start("POST", "/echo", body=b"x" * 5000)
            )
            after = await client.get("/echo")
    assert declared.status == 413
    assert undeclared.status == 413
    assert after.status == 200  # the connection goes on


async def test_idle_h2_connection_is_closed_after_keepalive_timeout(nursery, demo_upstream):
    _, port = demo_upstream
    proxy = await start_proxy(nursery, make_config(port, server={"keepalive_timeout": 0.3}))
    with trio.fail_after(5):
        async with await H2Client.connect(proxy.port) as client:
            assert (await client.get("/echo")).status == 200
            started = trio.current_time()
            await client.read_until_closed()
            waited = trio.current_time() - started
    assert client.goaway is not None and client.goaway.error_code == ErrorCodes.NO_ERROR
    assert 0.2 < waited < 2


async def test_incomplete_header_block_times_out(nursery, demo_upstream):
    _, port = demo_upstream
    proxy = await start_proxy(nursery, make_config(port, server={"header_timeout": 0.3}))
    with trio.fail_after(5):
        async with await H2Client.connect(proxy.port) as client:
            # Not before the handshake is over: our SETTINGS ACK inside the open header block
            # would be a protocol error of its own, and end the connection at once.
            await client.until(
                lambda: any(isinstance(e, h2.events.SettingsAcknowledged) for e in client.events)
            )
            block = client.conn.encoder.encode(client.request_headers("GET", "/echo"))
            await client.send_raw(HeadersFrame(1, data=block).serialize())  # no END_HEADERS
            started = trio.current_time()
            await _expect_cut_off(client, ErrorCodes.PROTOCOL_ERROR)
            waited = trio.current_time() - started
    assert 0.25 < waited < 2


async def test_drain_sends_goaway_at_once_and_lets_streams_in_flight_finish(nursery, demo_upstream):
    _, port = demo_upstream
    proxy = await start_proxy(nursery, make_config(port))
    with trio.fail_after(5):
        async with (
            await H2Client.connect(proxy.port) as busy,
            await H2Client.connect(proxy.port) as idle,
        ):
            assert (await idle.get("/echo")).status == 200
            first = await busy.start("GET", "/echo")
            slow = await busy.start("GET", "/slow?delay=0.5")
            await busy.response(first)
            proxy.proxy.begin_drain()
            await busy.until(lambda: busy.goaway is not None)
            goaway = busy.goaway
            assert not busy.replies[slow].ended  # GOAWAY came first, the stream still runs
            reply = await busy.response(slow)
            await busy.read_until_closed()
            await idle.read_until_closed()  # an idle connection is closed right away
    assert goaway is not None and goaway.last_stream_id == slow and goaway.error_code == 0
    assert reply.status == 200 and reply.body == b"slow done\n"
    assert busy.closed and idle.closed and idle.goaway is not None


async def test_upload_to_a_stalled_upstream_backpressures_the_client(nursery):
    """The client's window is credited only as the upstream takes the body."""

    async def never_reads(stream: trio.SocketStream) -> None:
        async with stream:
            await trio.sleep_forever()

    listeners = await nursery.start(trio.serve_tcp, never_reads, 0)
    upstream_port = listeners[0].socket.getsockname()[1]
    proxy = await start_proxy(nursery, make_config(upstream_port, response_header_timeout=30.0))
    chunk = b"u" * 16384
    total = 64 * 1024 * 1024
    with trio.fail_after(15):
        async with await H2Client.connect(proxy.port) as client:
            stream_id = await client.start("POST", "/upload", end=False)
            sent = 0
            while sent < total:
                window = client.conn.local_flow_control_window(stream_id)
                if window >= len(chunk):
                    client.conn.send_data(stream_id, chunk)
                    sent += len(chunk)
                    await client.flush()
                    continue
                with trio.move_on_after(1.0) as stalled:
                    await client.receive()
                if stalled.cancelled_caught:
                    break  # no credit for a whole second: backpressure reached us
    print(f"\nupload to a stalled upstream: the client could send {sent} of {total} bytes")
    assert sent < 32 * 1024 * 1024  # kernel socket buffers plus one window, not the whole body


async def test_8_h2c_connections_10_streams_each_share_a_pool_of_8(nursery, demo_upstream):
    # 8 clients x 10 concurrent streams keep 80 requests in flight against a pool of 8
    # upstream connections: every request is answered, and the upstream never sees more.
    upstream, port = demo_upstream
    proxy = await start_proxy(nursery, make_config(port, max_connections=8))
    statuses: list[int] = []

    async def streams_in_turn(client: httpx.AsyncClient, count: int) -> None:
        for _ in range(count):
            response = await client.get("/echo")
            assert response.http_version == "HTTP/2"
            statuses.append(response.status_code)

    async def one_connection() -> None:
        async with h2c_client(proxy.url) as client, trio.open_nursery() as streams:
            for _ in range(10):
                streams.start_soon(streams_in_turn, client, 2)

    with trio.fail_after(30):
        async with trio.open_nursery() as connections:
            for _ in range(8):
                connections.start_soon(one_connection)
    assert statuses == [200] * 160
    assert upstream.stats.requests == 160
    assert upstream.stats.max_concurrent_connections <= 8
    # Upstream connections are reused: at most one per pool slot for 2000 requests.
    assert upstream.stats.connections_opened <= 8, upstream.stats


async def test_upstream_trailers_are_relayed_as_h2_trailers(nursery):
    async def with_trailers(stream: trio.SocketStream) -> None:
        async with stream:
            request = b""
            while b"\r\n\r\n" not in request:
                request += await stream.receive_some(65536)
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-checksum\r\n\r\n"
                b"5\r\nhello\r\n0\r\nx-checksum: abc\r\n\r\n"
            )
            await trio.sleep_forever()

    listeners = await nursery.start(trio.serve_tcp, with_trailers, 0)
    proxy = await start_proxy(nursery, make_config(listeners[0].socket.getsockname()[1]))
    with trio.fail_after(5):
        async with await H2Client.connect(proxy.port) as client:
            reply = await client.get("/", headers=[("te", "trailers")])
    assert reply.status == 200 and reply.body == b"hello"
    assert reply.trailers == [(b"x-checksum", b"abc")]


async def test_a_stream_whose_client_stops_reading_is_reset_after_write_timeout(
    nursery, demo_upstream
):
    _, port = demo_upstream
    proxy = await start_proxy(nursery, make_config(port, server={"write_timeout": 0.3}))
    with trio.fail_after(5):
        async with await H2Client.connect(proxy.port, auto_ack=False) as client:
            stalled = await client.start("GET", "/bytes/10000000")
            reply = await client.response(stalled)
            assert reply.reset_code == ErrorCodes.CANCEL and len(reply.body) == 65535
            client.auto_ack = True
            assert (await client.get("/echo")).status == 200  # only that stream was given up
        while proxy.pool().statistics().in_use:
            await trio.sleep(0.01)
    assert proxy.pool().statistics().closed.get("error") == 1  # half-read: never pooled


async def test_max_requests_per_connection_ends_h2_with_goaway(nursery, demo_upstream):
    _, port = demo_upstream
    proxy = await start_proxy(nursery, make_config(port, server={"max_requests_per_connection": 2}))
    with trio.fail_after(5):
        async with await H2Client.connect(proxy.port) as client:
            replies = [await client.get("/echo"), await client.get("/echo")]
            await client.read_until_closed()
    assert [r.status for r in replies] == [200, 200]
    assert client.goaway is not None and client.goaway.last_stream_id == 3


async def test_a_path_an_http1_upstream_cannot_take_is_a_400_not_a_crash(nursery, demo_upstream):
    # HTTP/2 lets any octets through in :path; h11 refuses to write non-ASCII ones upstream,
    # so the request validation refuses them first (the client's mistake, not the upstream's),
    # and the answer's details must not trip over the bytes either.
    _, port = demo_upstream
    proxy = await start_proxy(nursery, make_config(port))
    with trio.fail_after(5):
        async with await H2Client.connect(proxy.port) as client:
            stream_id = client.conn.get_next_available_stream_id()
            client.replies[stream_id] = H2Reply()
            client.conn.send_headers(
                stream_id,
                [
                    (b":method", b"GET"),
                    (b":scheme", b"http"),
                    (b":authority", b"x"),
                    (b":path", b"/\xff"),
                ],
                end_stream=True,
            )
            await client.flush()
            bad = await client.response(stream_id)
            good = await client.get("/status/200")
    assert bad.status == 400 and good.status == 200


async def test_a_small_body_goes_up_whole_with_a_length_and_a_slow_one_streams(nursery):
    # HEADERS, DATA and END_STREAM in one flush: the stream's task finds the whole body and
    # sends it up with a Content-Length in one write. A body still arriving is streamed,
    # chunked, as before.
    upstream, proxy = await run_scripted(nursery, {})
    with trio.fail_after(5):
        async with await H2Client.connect(proxy.port) as client:
            whole = await client.response(await client.start("POST", "/ok", body=b"hello"))
            stream_id = await client.start("POST", "/ok", body=b"hel", end=False)
            await trio.sleep(0.05)
            client.conn.send_data(stream_id, b"lo", end_stream=True)
            await client.flush()
            streamed = await client.response(stream_id)
    assert (whole.status, bytes(whole.body), streamed.status, bytes(streamed.body)) == (
        200,
        b"ok",
        200,
        b"ok",
    )
    first, second = [raw for heads in upstream.requests for raw in heads]
    assert b"\r\ncontent-length: 5\r\n" in first and first.endswith(b"\r\n\r\nhello")
    assert b"transfer-encoding" not in first
    assert b"\r\ntransfer-encoding: chunked\r\n" in second and b"content-length" not in second


async def test_response_blocks_need_none_of_h2s_outbound_normalization(nursery):
    # The front end turns h2's outbound header checks and normalization off: the block it
    # builds from an HTTP/1.1 response must already be one h2 would send. The hand-driven
    # client checks what it receives as h2 does (names lower-case, no connection-specific
    # fields, no surrounding whitespace in values).
    messy = (
        b"HTTP/1.1 200 OK\r\nX-Mixed-Case: a \r\nConnection: X-Hop, keep-alive\r\nX-Hop: 1\r\n"
        b"Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nUpgrade: h2c\r\n"
        b"Host: upstream.local\r\nSET-Cookie:\ts=1\t\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nok\r\n0\r\n\r\n"
    )
    _, proxy = await run_scripted(nursery, {"/messy": [messy]})
    with trio.fail_after(5):
        async with await H2Client.connect(proxy.port) as client:
            reply = await client.get("/messy")
    assert (reply.status, bytes(reply.body)) == (200, b"ok")
    fields = dict(reply.headers)
    assert fields[b"x-mixed-case"] == b"a" and fields[b"set-cookie"] == b"s=1"
    names = set(fields)
    assert not names & {b"connection", b"x-hop", b"keep-alive", b"proxy-connection", b"upgrade"}
    assert not names & {b"host", b"transfer-encoding"}
