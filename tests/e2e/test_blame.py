"""Who is to blame: a client's bad request is refused before an upstream connection is taken,
and never counts against an upstream server (passive health, upstream error metrics).

Real sockets: two demo upstreams behind one upstream with passive health on, the proxy's
/metrics scraped over HTTP."""

from __future__ import annotations

import trio

from pooled_proxy.daemon.demo_upstream import DemoUpstream
from pooled_proxy.exchange import NO_BODY, Exchange, ExchangeRecord, RequestHead
from tests.support.h2client import H2Client, H2Reply
from tests.support.helpers import H11Client, make_config, raw_exchange
from tests.support.operations import OperatedProxy, start_operated_proxy

# Two failures in a minute would take a server out of the rotation for a minute.
HEALTH = {"max_fails": 2, "fail_window": 60.0, "fail_timeout": 60.0}
ROUNDS = 5


async def _two_servers(nursery: trio.Nursery) -> tuple[OperatedProxy, list[DemoUpstream]]:
    upstreams = [DemoUpstream(), DemoUpstream()]
    ports = [await nursery.start(upstream.serve, "127.0.0.1", 0) for upstream in upstreams]
    proxy = await start_operated_proxy(nursery, make_config(*ports, **HEALTH))
    return proxy, upstreams


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


# A request h2 accepts but the proxy cannot express in HTTP/1.1 upstream.
H2_TRIGGERS = {
    "space in :path": [(b":path", b"/a b")],
    "DEL in :path": [(b":path", b"/a\x7f")],
    "non-token :method": [(b":method", b"G(T")],
    "non-token field name": [(b"x(y", b"1")],
    "Content-Length without a body": [(b":method", b"POST"), (b"content-length", b"5")],
}
# HTTP/1.1 requests that would lose their framing if the header Connection names were
# stripped as hop-by-hop: sent in one write (the fast path), and in two.
H1_TRIGGERS = {
    "Connection: Content-Length": b"POST /echo HTTP/1.1\r\nHost: a\r\n"
    b"Connection: Content-Length\r\nContent-Length: 5\r\n\r\nhello",
    "Connection: Transfer-Encoding": b"POST /echo HTTP/1.1\r\nHost: a\r\n"
    b"Connection: Transfer-Encoding\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "Connection: Host": b"GET /echo HTTP/1.1\r\nHost: a\r\nConnection: host\r\n\r\n",
}


def _h2_request(changes: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    headers = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/")]
    for name, value in changes:
        for index, (old, _) in enumerate(headers):
            if old == name:
                headers[index] = (name, value)
                break
        else:
            headers.append((name, value))
    return headers


async def _in_two_writes(port: int, request: bytes) -> bytes:
    """The answer to a request whose head's last bytes come after a pause (so the front end
    reads it through h11, not its fast path for heads that arrive whole)."""
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(request[: request.index(b"\r\n\r\n")])
        await trio.sleep(0.005)
        await stream.send_all(request[request.index(b"\r\n\r\n") :])
        answer = b""
        while chunk := await stream.receive_some(65536):
            answer += chunk
        return answer


async def _h2_statuses(port: int, blocks: list[list[tuple[bytes, bytes]]]) -> list[int]:
    async with await H2Client.connect(port) as client:
        # Send what a careless client would: h2 validates nothing on the way out.
        client.conn.config.validate_outbound_headers = False
        stream_ids = []
        for block in blocks:
            stream_id = client.conn.get_next_available_stream_id()
            client.replies[stream_id] = H2Reply()
            client.conn.send_headers(stream_id, block, end_stream=True)
            stream_ids.append(stream_id)
        await client.flush()
        return [(await client.response(stream_id)).status for stream_id in stream_ids]


async def test_bad_requests_never_take_servers_out_of_rotation(nursery):
    proxy, upstreams = await _two_servers(nursery)
    port = proxy.running.port
    with trio.fail_after(20):
        for _ in range(ROUNDS):
            statuses = await _h2_statuses(
                port, [_h2_request(changes) for changes in H2_TRIGGERS.values()]
            )
            assert statuses == [400] * len(H2_TRIGGERS), statuses
            for name, request in H1_TRIGGERS.items():
                with trio.fail_after(2):  # (forwarded, it would be answered and kept open)
                    assert _status(await raw_exchange(port, request)) == 400, name
                with trio.fail_after(2):
                    answer = await _in_two_writes(port, request)
                assert _status(answer) == 400, name
            # Every good client is still served, over both protocols, by both servers.
            async with H11Client(await trio.open_tcp_stream("127.0.0.1", port)) as client:
                for _ in range(2):
                    assert (await client.request("GET", "/echo")).status == 200
            assert await _h2_statuses(port, [_h2_request([(b":path", b"/echo")])] * 2) == [
                200,
                200,
            ]
        scrape = await proxy.scrape()

    # No bad request reached an upstream: each server saw only the good ones.
    assert [upstream.stats.requests for upstream in upstreams] == [2 * ROUNDS, 2 * ROUNDS]
    assert scrape.value("pooled_proxy_upstream_server_healthy") == 2
    assert scrape.value("pooled_proxy_upstream_connections_closed_total", reason="error") == 0
    # The refusals are the client's: counted as error answers, against no upstream server.
    refused = scrape.value("pooled_proxy_error_responses_total", status="400")
    assert refused == ROUNDS * (len(H2_TRIGGERS) + 2 * len(H1_TRIGGERS))
    assert scrape.value("pooled_proxy_error_responses_total") == refused
    assert not [
        labels
        for name, labels, value in scrape.samples
        if name == "pooled_proxy_error_responses_total" and value and labels["server"]
    ]


class _Sink:
    """A client that keeps the answer it gets (the forwarder's ResponseSink)."""

    def __init__(self) -> None:
        self.head_sent = False
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []

    async def send_informational(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        raise AssertionError("no 1xx expected")

    async def send_head(
        self,
        status: int,
        headers: list[tuple[bytes, bytes]],
        *,
        body: bytes = b"",
        end: bool = False,
    ) -> None:
        self.head_sent = True
        self.status, self.headers = status, headers

    async def send_data(self, data: bytes) -> None:
        pass

    async def end(self, trailers: list[tuple[bytes, bytes]] | None = None) -> None:
        pass

    async def reset(self) -> None:
        raise AssertionError("no reset expected")


async def test_a_request_the_upstream_writer_refuses_is_the_proxys_fault(nursery):
    # A request that slipped past validation (built here by hand, as a front end never
    # would) and that h11 will not write: the proxy's own failure, answered 500, and the
    # servers it was meant for stay in the rotation.
    proxy, upstreams = await _two_servers(nursery)
    forwarder = proxy.running.proxy.forwarder
    with trio.fail_after(5):
        for _ in range(4):
            sink = _Sink()
            head = RequestHead(
                method=b"GET",
                target=b"/echo",
                authority=b"a",
                scheme=b"http",
                headers=[(b"x(y", b"1")],
                http_version=b"1.1",
                client_ip=b"127.0.0.1",
                has_body=False,
            )
            record = ExchangeRecord(start=trio.current_time(), wall_start=0.0)
            await forwarder.forward(Exchange(head=head, body=NO_BODY, sink=sink, record=record))
            assert sink.status == 500
            proxy_status = dict(sink.headers)[b"proxy-status"]
            assert proxy_status.startswith(b"pooled-proxy; error=proxy_internal_error")
    now = trio.current_time()
    assert all(health.is_up(now) for health in forwarder.upstreams["app"].health)
    assert [upstream.stats.requests for upstream in upstreams] == [0, 0]
