"""The HTTP/1.1 client watch across keep-alive cycles.

One task per client connection watches the socket while an exchange waits and keeps
waiting into the idle time after it, so the next request arrives through it: these tests
check that a disconnect is still seen on later exchanges of a connection, that a client
closing an idle connection frees it at once, and that requests sent after an idle wait,
or pipelined, are still answered in order.
"""

from __future__ import annotations

import re

import h11
import trio

from pooled_proxy.exchange import ExchangeRecord
from tests.support.helpers import H11Client, make_config, sse_request, start_proxy, wait_until


async def test_a_disconnect_on_a_later_exchange_cancels_it_at_once(nursery, demo_upstream):
    _, port = demo_upstream
    records: list[ExchangeRecord] = []
    proxy = await start_proxy(nursery, make_config(port), observers=(records.append,))
    with trio.fail_after(5):
        client = await H11Client.connect(proxy.port)
        for _ in range(3):
            assert (await client.request("GET", "/status/200")).status == 200
        await trio.sleep(0.05)  # idle between requests: the watch holds the socket
        await client.send(sse_request("/events?interval=30"), h11.EndOfMessage())
        assert isinstance(await client.next_event(), h11.Response)
        await client.next_event()  # the first event; the next one is 30 s away
        await client.aclose()
        left = trio.current_time()
        await wait_until(lambda: len(records) == 4)
        assert trio.current_time() - left < 0.5
    assert [r.error for r in records] == ["", "", "", "client_disconnected"]
    # The stream's upstream connection was closed, not pooled: the upstream sees it too.
    assert proxy.pool().statistics().closed == {"error": 1}


async def test_a_client_closing_an_idle_connection_frees_it_at_once(nursery, demo_upstream):
    _, port = demo_upstream
    proxy = await start_proxy(nursery, make_config(port))
    counts = proxy.proxy.connections_by_protocol
    with trio.fail_after(5):
        client = await H11Client.connect(proxy.port)
        assert (await client.request("GET", "/status/200")).status == 200
        await wait_until(lambda: counts["http/1.1"] == 1)
        await client.aclose()
        await wait_until(lambda: counts["http/1.1"] == 0 and proxy.proxy.client_connections == 0)


async def test_requests_after_idle_waits_and_pipelined_ones_are_answered_in_order(
    nursery, demo_upstream
):
    _, port = demo_upstream
    proxy = await start_proxy(nursery, make_config(port))
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
        async with stream:
            received = b""

            async def statuses_until(count: int) -> list[bytes]:
                nonlocal received
                while received.count(b"HTTP/1.1 ") < count:
                    received += await stream.receive_some(65536)
                return re.findall(rb"HTTP/1\.1 (\d{3}) ", received)

            for number, status in enumerate((200, 201, 202), start=1):
                await trio.sleep(0.02)  # idle: the watch holds the socket when this one comes
                await stream.send_all(b"GET /status/%d HTTP/1.1\r\nHost: a\r\n\r\n" % status)
                await statuses_until(number)
            # Two at once: the second is read while the first is served.
            await stream.send_all(
                b"GET /status/203 HTTP/1.1\r\nHost: a\r\n\r\n"
                b"GET /status/204 HTTP/1.1\r\nHost: a\r\n\r\n"
            )
            await statuses_until(5)
            await trio.sleep(0.02)
            await stream.send_all(b"GET /status/205 HTTP/1.1\r\nHost: a\r\n\r\n")
            assert await statuses_until(6) == [b"200", b"201", b"202", b"203", b"204", b"205"]


async def test_a_client_that_leaves_while_queued_for_a_connection_is_let_go_at_once(
    nursery, demo_upstream
):
    # The watch starts when an exchange has to wait (here in the pool's queue, behind a slow
    # request holding the only connection), not only when it waits for the upstream.
    _, port = demo_upstream
    records: list[ExchangeRecord] = []
    proxy = await start_proxy(
        nursery,
        make_config(port, max_connections=1, queue_timeout=5.0),
        observers=(records.append,),
    )
    with trio.fail_after(5):
        holder = await H11Client.connect(proxy.port)
        await holder.send(
            h11.Request(method="GET", target="/slow?delay=1", headers=[("host", "a")]),
            h11.EndOfMessage(),
        )
        await wait_until(lambda: proxy.pool().statistics().in_use == 1)
        queued = await H11Client.connect(proxy.port)
        await queued.send(
            h11.Request(method="GET", target="/status/200", headers=[("host", "a")]),
            h11.EndOfMessage(),
        )
        await wait_until(lambda: proxy.pool().statistics().waiting == 1)
        await queued.aclose()
        left = trio.current_time()
        await wait_until(lambda: len(records) == 1)
        assert trio.current_time() - left < 0.5  # the slow one still runs
        assert records[0].error == "client_disconnected" and records[0].target == b"/status/200"
        assert proxy.pool().statistics().waiting == 0
        assert isinstance(await holder.next_event(), h11.Response)
        await holder.aclose()


async def test_a_client_that_leaves_while_the_upstream_thinks_is_let_go_at_once(
    nursery, demo_upstream
):
    # On a reused upstream connection (no connect to wait for), the watch starts when the
    # response head is not there yet: leaving then cancels the exchange at once, and its
    # upstream connection is closed rather than pooled.
    _, port = demo_upstream
    records: list[ExchangeRecord] = []
    proxy = await start_proxy(nursery, make_config(port), observers=(records.append,))
    with trio.fail_after(5):
        client = await H11Client.connect(proxy.port)
        assert (await client.request("GET", "/status/200")).status == 200
        await client.send(
            h11.Request(method="GET", target="/slow?delay=30", headers=[("host", "a")]),
            h11.EndOfMessage(),
        )
        await wait_until(lambda: proxy.pool().statistics().in_use == 1)
        await client.aclose()
        left = trio.current_time()
        await wait_until(lambda: len(records) == 2)
        assert trio.current_time() - left < 0.5
    assert records[1].error == "client_disconnected" and records[1].upstream_reused
    assert proxy.pool().statistics().closed == {"error": 1}
