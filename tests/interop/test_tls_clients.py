"""Clients over TLS with ALPN (trustme certificates): curl, httpx, h2load, nghttp.

The proxy's TLS listener offers ``h2`` and ``http/1.1``; each client is checked for the
protocol it actually got, not only for a 200.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import trio
import trio.testing

from .checks import assert_live, payload, post_roundtrip, read_sse, sse_events_from_lines
from .clients import curl, h2load, run, stream_lines
from .conftest import TlsSetup, start_tls_proxy
from .servers import require_program


async def test_curl_over_tls_negotiates_h2_and_http11(
    nursery, demo_upstream, tls_setup: TlsSetup, tmp_path: Path
):
    _, port = demo_upstream
    proxy = await start_tls_proxy(nursery, port, tls_setup)
    cacert = ("--cacert", str(tls_setup.ca_file))
    done = await curl(*cacert, "-i", f"{proxy.tls_url}/echo?x=1")  # curl offers h2 by ALPN
    head, _, content = done.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/2 200"), head
    seen = dict(json.loads(content)["headers"])
    assert seen["x-forwarded-proto"] == "https"
    assert seen["via"] == "2 pooled-proxy"

    done = await curl(
        *cacert, "--http1.1", "-o", "/dev/null", "-w", "%{http_version}", f"{proxy.tls_url}/echo"
    )
    assert done.stdout == b"1.1"

    body = payload(2 << 20)
    (tmp_path / "body.bin").write_bytes(body)
    done = await curl(
        *cacert, "--data-binary", f"@{tmp_path / 'body.bin'}", f"{proxy.tls_url}/echo"
    )
    assert done.stdout == body
    # Over TLS (ALPN, not prior knowledge) curl 7.88 does reuse its h2 connection.
    done = await curl(
        *cacert,
        "-o",
        "/dev/null",
        "-o",
        "/dev/null",
        "-o",
        "/dev/null",
        "-w",
        "%{http_version} %{http_code} %{num_connects}\n",
        f"{proxy.tls_url}/bytes/1000000",
        f"{proxy.tls_url}/status/204",
        f"{proxy.tls_url}/echo",
    )
    assert done.stdout.decode().split("\n")[:3] == ["2 200 1", "2 204 0", "2 200 0"]
    lines = await stream_lines(
        [
            require_program("curl"),
            "-sS",
            "-N",
            *cacert,
            f"{proxy.tls_url}/events?count=5&interval=0.15",
        ]
    )
    assert_live(sse_events_from_lines(lines), 5)


async def test_httpx_h2_and_h1_over_tls(nursery, demo_upstream, tls_setup: TlsSetup):
    _, port = demo_upstream
    proxy = await start_tls_proxy(nursery, port, tls_setup)
    with trio.fail_after(20):
        for http2, expected in ((True, "HTTP/2"), (False, "HTTP/1.1")):
            async with httpx.AsyncClient(
                base_url=proxy.tls_url, http2=http2, verify=tls_setup.client_context()
            ) as client:
                response = await client.get("/bytes/2000000")
                assert response.http_version == expected
                assert response.content == (bytes(range(256)) * 7813)[:2000000]
                await post_roundtrip(client, "/echo", payload(500_000), chunked=True)
                events = await read_sse(client, "/events?count=4&interval=0.15")
                assert_live(events, 4)


async def test_h2load_over_tls(nursery, demo_upstream, tls_setup: TlsSetup):
    upstream, port = demo_upstream
    proxy = await start_tls_proxy(nursery, port, tls_setup, max_connections=8)
    result = await h2load("-n", "1000", "-c", "4", "-m", "16", f"{proxy.tls_url}/echo")
    assert result.protocol == "h2", result.output
    assert (result.total, result.succeeded, result.failed, result.errored) == (1000, 1000, 0, 0), (
        result.output
    )
    assert result.status_2xx == 1000
    await trio.testing.wait_all_tasks_blocked()
    assert upstream.stats.max_concurrent_connections <= 8
    # Upstream connections are reused: at most one per pool slot for 1000 requests.
    assert upstream.stats.connections_opened <= 8, upstream.stats


async def test_nghttp_over_tls(nursery, demo_upstream, tls_setup: TlsSetup):
    _, port = demo_upstream
    proxy = await start_tls_proxy(nursery, port, tls_setup)
    done = await run(
        [
            require_program("nghttp"),
            "-nsv",
            f"{proxy.tls_url}/echo",
            f"{proxy.tls_url}/bytes/300000",
        ]
    )
    out = done.stdout.decode()
    assert done.returncode == 0, (out, done.stderr)
    assert "The negotiated protocol: h2" in out, out
    assert out.count(":status: 200") == 2, out
