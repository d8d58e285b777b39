"""gRPC end to end through the proxy, with grpcio on both sides: a real gRPC server (an echo
service of all four call kinds, defined without protoc: generic handlers on raw bytes) behind
an HTTP/2 upstream, and the grpcio client in front, over h2c and over TLS (trustme).

grpcio is blocking: the client calls run in threads (trio.to_thread), the server in its own
thread pool; the proxy runs in the test's trio loop.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
import pytest
import trio
import trio.testing
import trustme

from pooled_proxy.config import (
    Config,
    RouteConfig,
    ServerAddress,
    ServerConfig,
    TlsConfig,
    UpstreamConfig,
)
from tests.support.h2client import H2Client
from tests.support.helpers import HOST, start_proxy

SERVICE = "test.Echo"
CHANNEL_OPTIONS = [("grpc.enable_http_proxy", 0), ("grpc.enable_retries", 0)]


@dataclass
class EchoService:
    """What the server saw, for the tests to check."""

    metadata: list[tuple[tuple[str, str], ...]] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)
    bidi_received: list[bytes] = field(default_factory=list)

    def unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.metadata.append(tuple(context.invocation_metadata()))
        if request == b"fail":
            context.abort(grpc.StatusCode.NOT_FOUND, "no such thing: \u00e9t\u00e9 100%")
        if request.startswith(b"sleep:"):
            time.sleep(float(request[6:]))
        context.set_trailing_metadata((("x-trailer", "at the end"),))
        return b"echo:" + request

    def server_stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        count = int(request)
        for i in range(count):
            yield b"%d:" % i + b"x" * 1000

    def client_stream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        total = 0
        parts = 0
        for part in requests:
            total += len(part)
            parts += 1
        return b"%d parts, %d bytes" % (parts, total)

    def bidi(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        context.add_callback(self.cancelled.set)
        for part in requests:
            self.bidi_received.append(part)
            yield part.upper()


@dataclass
class GrpcUpstream:
    server: grpc.Server
    port: int
    service: EchoService


def start_grpc_server(credentials: grpc.ServerCredentials | None = None) -> GrpcUpstream:
    service = EchoService()
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(service.unary),
            "ServerStream": grpc.unary_stream_rpc_method_handler(service.server_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(service.client_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(service.bidi),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((handler,))
    if credentials is None:
        port = server.add_insecure_port(f"{HOST}:0")
    else:
        port = server.add_secure_port(f"{HOST}:0", credentials)
    server.start()
    return GrpcUpstream(server, port, service)


@pytest.fixture
def grpc_upstream() -> Iterator[GrpcUpstream]:
    upstream = start_grpc_server()
    yield upstream
    upstream.server.stop(grace=None)


def grpc_config(
    servers: tuple[ServerAddress, ...], *, tls: TlsConfig | None = None, **kw: Any
) -> Config:
    app = UpstreamConfig(name="app", servers=servers, protocol="h2", **kw)
    return Config(
        server=ServerConfig(listen=(ServerAddress(HOST, 0),), tls=tls),
        upstreams={"app": app},
        routes=(RouteConfig(upstream="app"),),
    )


def call(channel: grpc.Channel, kind: str, method: str) -> Callable[..., Any]:
    factory = getattr(channel, kind)
    return factory(f"/{SERVICE}/{method}")  # no serializers: bytes in, bytes out


def every_call_kind(
    target: str, credentials: grpc.ChannelCredentials | None = None
) -> dict[str, Any]:
    """Each of the four call kinds through ``target``, in a thread."""
    if credentials is None:
        channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
    else:
        channel = grpc.secure_channel(
            target,
            credentials,
            options=[*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", "proxy.test")],
        )
    with channel:
        unary, unary_call = call(channel, "unary_unary", "Unary").with_call(b"hello", timeout=10)
        server_stream = list(call(channel, "unary_stream", "ServerStream")(b"50", timeout=10))
        parts = (b"y" * 10_000 for _ in range(40))
        client_stream = call(channel, "stream_unary", "ClientStream")(parts, timeout=10)
        bidi = list(call(channel, "stream_stream", "Bidi")(iter([b"a", b"b", b"c"]), timeout=10))
        try:
            call(channel, "unary_unary", "Unary")(b"fail", timeout=10)
        except grpc.RpcError as exc:
            error = (exc.code(), exc.details())
        return {
            "unary": unary,
            "trailers": dict(unary_call.trailing_metadata()),
            "server_stream": server_stream,
            "client_stream": client_stream,
            "bidi": bidi,
            "error": error,
        }


def check_every_call_kind(results: dict[str, Any]) -> None:
    assert results["unary"] == b"echo:hello"
    assert results["trailers"]["x-trailer"] == "at the end"
    assert len(results["server_stream"]) == 50
    assert results["server_stream"][49] == b"49:" + b"x" * 1000
    assert results["client_stream"] == b"40 parts, 400000 bytes"
    assert results["bidi"] == [b"A", b"B", b"C"]
    # grpc-status and a percent-encoded grpc-message, relayed in the trailers
    assert results["error"] == (grpc.StatusCode.NOT_FOUND, "no such thing: \u00e9t\u00e9 100%")


async def test_every_call_kind_over_h2c(nursery: trio.Nursery, grpc_upstream: GrpcUpstream) -> None:
    config = grpc_config((ServerAddress(HOST, grpc_upstream.port, h2=True),))
    proxy = await start_proxy(nursery, config)
    results = await trio.to_thread.run_sync(every_call_kind, f"{HOST}:{proxy.port}")
    check_every_call_kind(results)
    # The calls shared one upstream connection.
    assert proxy.pool().statistics().opened == 1
    metadata = dict(grpc_upstream.service.metadata[0])
    assert "x-forwarded-for" in metadata


async def test_every_call_kind_over_tls(nursery: trio.Nursery, tmp_path: Any) -> None:
    """TLS on both sides: the client to the proxy, the proxy to the server with ALPN h2."""
    ca = trustme.CA()
    upstream_cert = ca.issue_cert("grpc.test")
    proxy_cert = ca.issue_cert("proxy.test")
    credentials = grpc.ssl_server_credentials(
        [(upstream_cert.private_key_pem.bytes(), upstream_cert.cert_chain_pems[0].bytes())]
    )
    upstream = start_grpc_server(credentials)
    try:
        ca_file = tmp_path / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        cert_file, key_file = tmp_path / "proxy.pem", tmp_path / "proxy.key"
        proxy_cert.cert_chain_pems[0].write_to_path(str(cert_file))
        proxy_cert.private_key_pem.write_to_path(str(key_file))
        config = grpc_config(
            (ServerAddress(HOST, upstream.port, tls=True, h2=True),),
            tls=TlsConfig(listen=(ServerAddress(HOST, 0),), cert=cert_file, key=key_file),
            tls_ca=ca_file,
            tls_server_name="grpc.test",
        )
        config = replace(config, server=replace(config.server, listen=()))
        proxy = await start_proxy(nursery, config)
        client_credentials = grpc.ssl_channel_credentials(root_certificates=ca.cert_pem.bytes())
        results = await trio.to_thread.run_sync(
            every_call_kind, f"{HOST}:{proxy.port}", client_credentials
        )
        check_every_call_kind(results)
        assert proxy.pool().statistics().opened == 1
    finally:
        upstream.server.stop(grace=None)


GRPC_HEADERS = [("content-type", "application/grpc"), ("te", "trailers")]


def grpc_message(payload: bytes) -> bytes:
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
    return port


async def test_no_upstream_is_a_grpc_unavailable_in_trailers_only_form(
    nursery: trio.Nursery,
) -> None:
    config = grpc_config((ServerAddress(HOST, free_port(), h2=True),))
    proxy = await start_proxy(nursery, config)
    async with await H2Client.connect(proxy.port) as client:
        with trio.fail_after(5):
            reply = await client.response(
                await client.start(
                    "POST", f"/{SERVICE}/Unary", headers=GRPC_HEADERS, body=grpc_message(b"hi")
                )
            )
    assert reply.status == 200
    assert reply.ended and not reply.body and not reply.trailers  # one HEADERS, END_STREAM
    assert reply.header(b"content-type") == b"application/grpc"
    assert reply.header(b"grpc-status") == b"14"
    assert reply.header(b"grpc-message") == b"pooled-proxy: upstream refused the connection"
    assert reply.header(b"proxy-status") == b"pooled-proxy; error=connection_refused"

    def grpcio_call() -> tuple[grpc.StatusCode, str]:
        with grpc.insecure_channel(f"{HOST}:{proxy.port}", options=CHANNEL_OPTIONS) as channel:
            try:
                call(channel, "unary_unary", "Unary")(b"hi", timeout=10)
            except grpc.RpcError as exc:
                return exc.code(), exc.details()
        raise AssertionError("the call succeeded")

    code, details = await trio.to_thread.run_sync(grpcio_call)
    assert code == grpc.StatusCode.UNAVAILABLE
    assert details == "pooled-proxy: upstream refused the connection"


async def test_grpc_timeout_is_the_calls_deadline(nursery: trio.Nursery) -> None:
    """The upstream never answers; the call's grpc-timeout (200 ms) ends it: DEADLINE_EXCEEDED
    to the client, and the upstream's stream is cancelled."""
    from tests.support.h2upstream import H2Upstream

    held = trio.Event()

    async def never(connection: Any, request: Any) -> None:
        await held.wait()

    upstream = await H2Upstream(never).start(nursery)
    proxy = await start_proxy(nursery, grpc_config((ServerAddress(HOST, upstream.port, h2=True),)))
    async with await H2Client.connect(proxy.port) as client:
        started = trio.current_time()
        with trio.fail_after(5):
            reply = await client.response(
                await client.start(
                    "POST",
                    f"/{SERVICE}/Unary",
                    headers=[*GRPC_HEADERS, ("grpc-timeout", "200m")],
                    body=grpc_message(b"hi"),
                )
            )
        elapsed = trio.current_time() - started
        with trio.fail_after(5):
            await upstream.requests[0].reset.wait()
    assert 0.2 <= elapsed < 3
    assert (reply.status, reply.header(b"grpc-status")) == (200, b"4")
    # What was left of the 200 ms when the request went up (the connect took some).
    sent = upstream.requests[0].header(b"grpc-timeout")
    assert sent is not None and sent.endswith(b"m") and 1 <= int(sent[:-1]) <= 200
    assert upstream.requests[0].header(b"te") == b"trailers"
    held.set()


@pytest.mark.parametrize(
    ("code", "after_headers", "status"),
    [
        (0x8, True, grpc.StatusCode.CANCELLED),  # CANCEL
        (0xB, True, grpc.StatusCode.RESOURCE_EXHAUSTED),  # ENHANCE_YOUR_CALM
        (0x1, True, grpc.StatusCode.INTERNAL),  # PROTOCOL_ERROR: the proxy's hop, not relayed
        (0x8, False, grpc.StatusCode.CANCELLED),  # before headers: in a trailers-only answer
        (0xB, False, grpc.StatusCode.RESOURCE_EXHAUSTED),
    ],
)
async def test_an_upstream_reset_reaches_a_grpc_client_as_its_status(
    nursery: trio.Nursery, code: int, after_headers: bool, status: grpc.StatusCode
) -> None:
    """A gRPC server that resets a call learns the client of its status by the reset's code
    (the gRPC spec's mapping): the proxy relays the code, or answers with that status."""
    from tests.support.h2upstream import H2Upstream

    async def resets(connection: Any, request: Any) -> None:
        await request.ended.wait()
        if after_headers:
            connection.h2.send_headers(
                request.stream_id, [(b":status", b"200"), (b"content-type", b"application/grpc")]
            )
        await connection.reset(request.stream_id, code)

    upstream = await H2Upstream(resets).start(nursery)
    proxy = await start_proxy(nursery, grpc_config((ServerAddress(HOST, upstream.port, h2=True),)))

    def grpcio_call() -> grpc.StatusCode:
        with grpc.insecure_channel(f"{HOST}:{proxy.port}", options=CHANNEL_OPTIONS) as channel:
            try:
                call(channel, "unary_unary", "Unary")(b"hi", timeout=10)
            except grpc.RpcError as exc:
                result: grpc.StatusCode = exc.code()
                return result
        raise AssertionError("the call succeeded")

    assert await trio.to_thread.run_sync(grpcio_call) == status
    assert len(upstream.requests) == 1


async def test_grpc_timeout_goes_up_less_the_time_spent_in_the_queue(
    nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    """One stream on one connection: the second call waits 0.75 s for it, and its 2 s
    grpc-timeout goes up as the 1.25 s left. (A MockClock that moves only when told: the
    sockets are real.)"""
    from tests.support.h2upstream import H2Upstream, answer

    first_may_end = trio.Event()

    async def holds_the_first(connection: Any, request: Any) -> None:
        if request.header(b":path") == b"/first":
            await first_may_end.wait()
        await answer(connection, request)

    upstream = await H2Upstream(holds_the_first, max_streams=1).start(nursery)
    config = grpc_config(
        (ServerAddress(HOST, upstream.port, h2=True),), max_connections=1, queue_timeout=10.0
    )
    proxy = await start_proxy(nursery, config)
    pool = proxy.pool()

    async def until(predicate: Callable[[], bool]) -> None:
        while not predicate():  # real I/O, no timer: the clock stands still meanwhile
            await trio.testing.wait_all_tasks_blocked()

    async with await H2Client.connect(proxy.port) as client:
        first = await client.start("POST", "/first", headers=GRPC_HEADERS, body=b"")
        await until(lambda: len(upstream.requests) == 1)
        second = await client.start(
            "POST", "/second", headers=[*GRPC_HEADERS, ("grpc-timeout", "2S")], body=b""
        )
        await until(lambda: pool.statistics().waiting == 1)
        mock_clock.jump(0.75)
        first_may_end.set()
        await client.response(first)
        reply = await client.response(second)
    assert reply.status == 200
    assert [r.header(b"grpc-timeout") for r in upstream.requests] == [None, b"1250m"]


def test_grpc_timeout_values_keep_the_syntax() -> None:
    from pooled_proxy.grpc import grpc_timeout, grpc_timeout_value

    assert grpc_timeout_value(1.25) == b"1250m"
    assert grpc_timeout_value(0.0001) == b"1m"  # under a millisecond left: not zero
    assert grpc_timeout_value(-3.0) == b"1m"  # (the proxy's own deadline ends the call)
    assert grpc_timeout_value(99_999.999) == b"99999999m"  # 8 digits at most
    assert grpc_timeout_value(100_000.0) == b"100000S"
    assert grpc_timeout_value(1e9) == b"16666667M"
    assert grpc_timeout_value(1e12) == b"99999999H"
    for seconds in (0.2, 1.25, 3600.0, 123_456.0):
        value = grpc_timeout_value(seconds)
        assert grpc_timeout([(b"grpc-timeout", value)]) == pytest.approx(seconds, rel=1e-3)


async def test_client_cancel_reaches_the_grpc_server(
    nursery: trio.Nursery, grpc_upstream: GrpcUpstream
) -> None:
    """A bidirectional call the client cancels midway: the server's call is cancelled too
    (RST_STREAM relayed upstream), and the connection carries the next call."""
    config = grpc_config((ServerAddress(HOST, grpc_upstream.port, h2=True),))
    proxy = await start_proxy(nursery, config)
    service = grpc_upstream.service

    def cancel_midway() -> bytes:
        with grpc.insecure_channel(f"{HOST}:{proxy.port}", options=CHANNEL_OPTIONS) as channel:
            more = threading.Event()

            def requests() -> Iterator[bytes]:
                yield b"first"
                more.wait(10)

            responses = call(channel, "stream_stream", "Bidi")(requests(), timeout=10)
            assert next(responses) == b"FIRST"
            responses.cancel()
            more.set()
            if not service.cancelled.wait(5):
                raise AssertionError("the server's call was not cancelled")
            result: bytes = call(channel, "unary_unary", "Unary")(b"again", timeout=10)
            return result

    assert await trio.to_thread.run_sync(cancel_midway) == b"echo:again"
    assert proxy.pool().statistics().opened == 1
