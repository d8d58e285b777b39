"""WebSocket (HTTP/1.1 Upgrade) through the proxy, and the byte tunnel on its own.

End-to-end tests use wsproto for both peers, on real sockets: a WebSocket echo upstream and a
client, with the proxy between them. The tunnel's timing (idle timeout) is tested on
in-memory streams with trio's MockClock.
"""

from __future__ import annotations

import re
import struct

import h11
import trio
import trio.testing
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    RejectConnection,
    Request,
)

from pooled_proxy.exchange import ExchangeRecord
from pooled_proxy.tunnel import requested_upgrade, run_tunnel
from tests.support.helpers import HOST, H11Client, make_config, raw_exchange, start_proxy
from tests.support.tls import tls_port
from tests.support.websocket import WSClient, WSEchoUpstream

# -- peers -------------------------------------------------------------------------------------


def masked_text_frame(text: str, mask: bytes) -> bytes:
    """A client text frame built by hand (wsproto will not send before the handshake)."""
    payload = text.encode()
    assert len(payload) < 126 and len(mask) == 4
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return struct.pack("!BB", 0x81, 0x80 | len(payload)) + mask + masked


async def start(nursery: trio.Nursery, upstream: WSEchoUpstream, **upstream_config: object):  # type: ignore[no-untyped-def]
    port = await nursery.start(upstream.serve)
    records: list[ExchangeRecord] = []
    proxy = await start_proxy(
        nursery, make_config(port, **upstream_config), observers=(records.append,)
    )
    return proxy, records


# -- end to end --------------------------------------------------------------------------------


async def test_websocket_echo_through_the_proxy(nursery):
    upstream = WSEchoUpstream()
    proxy, records = await start(nursery, upstream)
    big = bytes(range(256)) * 4096  # 1 MiB in one frame: streamed through, both ways
    with trio.fail_after(10):
        client = await WSClient.connect(proxy.port)
        async with client.stream:
            await client.send("hello")
            assert await client.receive() == "hello"
            await client.send(big)
            assert await client.receive() == big
            for n in range(20):
                await client.send(f"message {n}")
                assert await client.receive() == f"message {n}"
            close = await client.close_handshake()
            assert close.code == 1000
            assert await client.at_eof()  # the upstream closed TCP, and the tunnel passed it on
        await upstream.closed.wait()
        while not records:
            await trio.sleep(0.01)
    # The upstream saw a real WebSocket handshake (wsproto refuses one without
    # Connection: upgrade / Upgrade: websocket / Sec-WebSocket-Key) that came through us.
    [handshake] = upstream.handshakes
    forwarded = dict(handshake.extra_headers)
    assert forwarded[b"x-forwarded-for"] == b"127.0.0.1"
    assert forwarded[b"via"] == b"1.1 pooled-proxy"
    # The upstream connection carried a tunnel: closed, never pooled.
    stats = proxy.pool().statistics()
    assert stats.in_use == 0 and stats.idle == 0
    assert stats.closed == {"upgraded": 1}
    [record] = records
    assert record.status == 101
    assert record.bytes_in > len(big) and record.bytes_out > len(big)
    assert record.extra["tunnel_closed_by"] == "upstream"


async def test_bytes_sent_right_behind_the_101_are_not_lost(nursery):
    # The upstream's first message arrives in the same segment as its 101: it sits in the
    # upstream h11 connection's buffer when the protocols switch, and must go into the tunnel.
    upstream = WSEchoUpstream(greeting="welcome")
    proxy, _ = await start(nursery, upstream)
    with trio.fail_after(5):
        client = await WSClient.connect(proxy.port)
        async with client.stream:
            assert await client.receive() == "welcome"
            await client.send("after")
            assert await client.receive() == "after"
            await client.close_handshake()


async def test_client_bytes_before_the_101_refuse_the_upgrade(nursery):
    # A client must wait for the 101 before it speaks WebSocket (RFC 6455 4.1). Bytes behind
    # the upgrade request (in the same segment) that are not HTTP are a framing violation: the
    # request goes up as an ordinary one, and the bytes are answered 400, never tunneled with
    # a gap where they were.
    upstream = WSEchoUpstream()
    proxy, _ = await start(nursery, upstream)
    handshake = WSConnection(ConnectionType.CLIENT).send(Request(host="test.local", target="/ws"))
    early = masked_text_frame("too early", mask=b"\0\0\0\0")  # a NUL: not HTTP, at once
    with trio.fail_after(5):
        data = await raw_exchange(proxy.port, handshake + early)
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", data)
    assert statuses == [b"426", b"400"]  # the upstream saw no upgrade request; then our 400
    assert upstream.refused == 1 and upstream.handshakes == []


async def test_client_bytes_before_the_101_that_pass_the_checks_are_tunneled_intact(nursery):
    # The same impatience with bytes that could still be the start of a request head: they
    # wait in h11's buffer, and the tunnel delivers them first.
    upstream = WSEchoUpstream()
    proxy, _ = await start(nursery, upstream)
    client = WSClient(await trio.open_tcp_stream(HOST, proxy.port))
    early = masked_text_frame("too early", mask=b"\x01\x02\x03\x04")
    with trio.fail_after(5):
        async with client.stream:
            await client.stream.send_all(
                client.ws.send(Request(host="test.local", target="/ws")) + early
            )
            assert isinstance(await client.next_event(), AcceptConnection)
            assert await client.receive() == "too early"
            await client.close_handshake()


async def test_websocket_over_tls(nursery, tls_files, client_context):
    # The client side of the tunnel is a TLS stream, which cannot be half-closed: the
    # upstream's end-of-stream ends the tunnel, and the client gets a TLS close.
    upstream = WSEchoUpstream()
    port = await nursery.start(upstream.serve)
    _, secure = await tls_port(nursery, port, tls_files)
    client_context.set_alpn_protocols(["http/1.1"])
    with trio.fail_after(5):
        tcp = await trio.open_tcp_stream(HOST, secure)
        tls = trio.SSLStream(tcp, client_context, server_hostname=HOST, https_compatible=True)
        client = await WSClient.connect(secure, stream=tls)
        async with client.stream:
            big = bytes(range(256)) * 1024
            await client.send(big)
            assert await client.receive() == big
            await client.close_handshake()
            assert await client.at_eof()
        await upstream.closed.wait()
    assert dict(upstream.handshakes[0].extra_headers)[b"x-forwarded-proto"] == b"https"


async def test_a_drain_waits_for_an_open_tunnel_then_closes_it(nursery):
    upstream = WSEchoUpstream()
    port = await nursery.start(upstream.serve)
    records: list[ExchangeRecord] = []
    proxy = await start_proxy(
        nursery, make_config(port, server={"drain_timeout": 0.5}), observers=(records.append,)
    )
    with trio.fail_after(5):
        client = await WSClient.connect(proxy.port)
        async with client.stream:
            proxy.proxy.begin_drain()
            started = trio.current_time()
            await trio.sleep(0.2)
            await client.send("still open while draining")
            assert await client.receive() == "still open while draining"
            assert await client.at_eof()  # cut at the deadline
            assert 0.4 < trio.current_time() - started < 1.5
        await upstream.closed.wait()
    assert records[0].extra["tunnel_closed_by"] == "cancelled"


async def test_client_that_vanishes_closes_the_upstream_side(nursery):
    upstream = WSEchoUpstream()
    proxy, records = await start(nursery, upstream)
    with trio.fail_after(5):
        client = await WSClient.connect(proxy.port)
        await client.send("ping")
        assert await client.receive() == "ping"
        await client.stream.aclose()  # no close handshake: just gone
        await upstream.closed.wait()
        while not records:
            await trio.sleep(0.01)
    assert upstream.connections_open == 0
    assert records[0].extra["tunnel_closed_by"] == "client"
    assert proxy.pool().statistics().closed == {"upgraded": 1}


async def test_upgrade_refused_by_upstream_is_an_ordinary_response(nursery, demo_upstream):
    # The demo upstream does not speak WebSocket: it answers an upgrade request like any other.
    upstream, port = demo_upstream
    proxy = await start_proxy(nursery, make_config(port))
    upgrade_headers = [
        ("connection", "Upgrade"),
        ("upgrade", "websocket"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("sec-websocket-version", "13"),
    ]
    with trio.fail_after(5):
        async with await H11Client.connect(proxy.port) as client:
            await client.send(
                h11.Request(method="GET", target="/echo", headers=[("host", "a"), *upgrade_headers])
            )
            await client.send(h11.EndOfMessage())
            reply = await client.read_reply()
            assert reply.status == 200
            seen = {k: v for k, v in reply.json()["headers"]}
            assert seen["upgrade"] == "websocket"  # forwarded, so the upstream could decide
            assert "upgrade" not in {k.lower() for k in reply.headers}
            # The denied switch leaves both connections in plain keep-alive HTTP.
            assert (await client.request("GET", "/status/204")).status == 204
    assert upstream.stats.connections_opened == 1
    assert proxy.pool().statistics().idle == 1


async def test_other_upgrades_are_not_forwarded(nursery, demo_upstream):
    _, port = demo_upstream
    proxy = await start_proxy(nursery, make_config(port))
    with trio.fail_after(5):
        async with await H11Client.connect(proxy.port) as client:
            reply = await client.request(
                "GET",
                "/echo",
                headers=[
                    ("connection", "Upgrade, HTTP2-Settings"),
                    ("upgrade", "h2c"),
                    ("http2-settings", "AAMAAABkAAQAoAAAAAIAAAAA"),
                ],
            )
    seen = {k for k, _ in reply.json()["headers"]}
    assert reply.status == 200
    assert not seen & {"upgrade", "connection", "http2-settings"}


async def test_wsproto_client_sees_a_rejection_as_a_rejection(nursery, demo_upstream):
    _, port = demo_upstream
    proxy = await start_proxy(nursery, make_config(port))
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream(HOST, proxy.port)
        async with stream:
            ws = WSConnection(ConnectionType.CLIENT)
            await stream.send_all(ws.send(Request(host="a", target="/status/403")))
            events: list[object] = []
            while not events:
                ws.receive_data(await stream.receive_some(65536))
                events.extend(ws.events())
    assert isinstance(events[0], RejectConnection) and events[0].status_code == 403


# -- the tunnel on its own (in-memory streams, MockClock) -----------------------------------------


async def test_tunnel_idle_timeout_counts_traffic_in_either_direction(autojump_clock):
    client, client_far = trio.testing.memory_stream_pair()
    upstream, upstream_far = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        result = []

        async def tunnel() -> None:
            result.append(await run_tunnel(client, upstream, idle_timeout=10.0))

        nursery.start_soon(tunnel)
        started = trio.current_time()
        for _ in range(5):  # 40 s of life, each direction silent for 16 s at a time
            await trio.sleep(8)
            await client_far.send_all(b"up")
            assert await upstream_far.receive_some() == b"up"
            await trio.sleep(8)
            await upstream_far.send_all(b"down")
            assert await client_far.receive_some() == b"down"
        assert not result
        silent_from = trio.current_time()
        assert await client_far.receive_some() == b""  # closed by the idle timeout
    assert trio.current_time() - started >= 80
    assert trio.current_time() - silent_from == 10.0
    assert result[0].closed_by == "idle_timeout"
    assert (result[0].bytes_up, result[0].bytes_down) == (10, 20)


async def test_tunnel_passes_half_close_on_and_keeps_the_other_direction(autojump_clock):
    client, client_far = trio.testing.memory_stream_pair()
    upstream, upstream_far = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        result = []

        async def tunnel() -> None:
            result.append(await run_tunnel(client, upstream, upstream_data=b"first"))

        nursery.start_soon(tunnel)
        assert await client_far.receive_some() == b"first"
        await client_far.send_eof()  # the client is done sending ...
        assert await upstream_far.receive_some() == b""
        await upstream_far.send_all(b"still talking")  # ... but still reads
        assert await client_far.receive_some() == b"still talking"
        await upstream_far.aclose()
        assert await client_far.receive_some() == b""
    assert result[0].closed_by == "client"


async def test_tunnel_backpressure_stops_reading_from_the_sender(autojump_clock):
    # Lockstep streams have no buffer: a write completes only when the peer reads it.
    client, client_far = trio.testing.lockstep_stream_pair()
    upstream, upstream_far = trio.testing.lockstep_stream_pair()
    sent = 0

    async def flood() -> None:
        nonlocal sent
        while True:
            await upstream_far.send_all(b"x" * 1000)
            sent += 1000

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_tunnel, client, upstream)
        nursery.start_soon(flood)
        await trio.sleep(60)  # the client reads nothing for a minute
        assert sent <= 2000  # one chunk held by the tunnel's pending write, one in the flood
        await client_far.receive_some(1000)
        await trio.sleep(1)
        assert sent <= 3000
        nursery.cancel_scope.cancel()


def test_requested_upgrade_only_for_a_single_websocket_with_connection_upgrade():
    def ask(*headers: tuple[bytes, bytes]) -> bytes | None:
        return requested_upgrade(list(headers))

    assert ask((b"connection", b"keep-alive, Upgrade"), (b"upgrade", b"WebSocket")) == b"WebSocket"
    assert ask((b"upgrade", b"websocket")) is None  # Connection does not name it
    assert ask((b"connection", b"upgrade"), (b"upgrade", b"h2c")) is None
    assert ask((b"connection", b"upgrade"), (b"upgrade", b"websocket, h2c")) is None
    assert ask((b"connection", b"upgrade")) is None


async def test_a_tunnel_is_logged_when_it_closes_and_counted_as_upgraded(nursery):
    from tests.support.operations import start_operated_proxy

    upstream = WSEchoUpstream()
    port = await nursery.start(upstream.serve)
    proxy = await start_operated_proxy(nursery, make_config(port))
    with trio.fail_after(5):
        client = await WSClient.connect(proxy.running.port)
        async with client.stream:
            await client.send("x" * 1000)
            assert await client.receive() == "x" * 1000
            assert proxy.log_entries() == []  # nothing logged while the tunnel is open
            await client.close_handshake()
        await upstream.closed.wait()
        while not proxy.log_entries():
            await trio.sleep(0.01)
        scrape = await proxy.scrape()
    [entry] = proxy.log_entries()
    assert entry["status"] == 101 and entry["error"] is None
    assert entry["bytes_in"] > 1000 and entry["bytes_out"] > 1000
    closed = "pooled_proxy_upstream_connections_closed_total"
    assert scrape.value(closed, reason="upgraded") == 1
    assert scrape.value(closed, reason="error") == 0
