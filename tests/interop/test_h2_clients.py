"""HTTP/2 clients in front of the proxy over cleartext (h2c, prior knowledge): curl, httpx,
h2load and nghttp, with the demo upstream behind it. TLS + ALPN: test_tls_clients.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import trio
import trio.testing

from tests.support.helpers import make_config, start_proxy

from .checks import assert_live, payload, post_roundtrip, read_sse, sse_events_from_lines
from .clients import curl, h2load, run, stream_lines
from .servers import require_program


async def test_curl_http2_prior_knowledge(nursery, demo_upstream, tmp_path: Path):
    _, port = demo_upstream
    proxy = await start_proxy(nursery, make_config(port))
    done = await curl("--http2-prior-knowledge", "-i", f"{proxy.url}/echo?x=1")
    head, _, content = done.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/2 200")
    seen = dict(json.loads(content)["headers"])
    assert seen["via"] == "2 pooled-proxy"  # the client's hop was HTTP/2
    assert seen["host"] == f"127.0.0.1:{proxy.port}"  # :authority became Host

    body = payload(2 << 20)
    (tmp_path / "body.bin").write_bytes(body)
    done = await curl(
        "--http2-prior-knowledge", "--data-binary", f"@{tmp_path / 'body.bin'}", f"{proxy.url}/echo"
    )
    assert done.stdout == body
    # One URL per curl: curl 7.88 fails to reuse a prior-knowledge connection for a second
    # URL ("Error in the HTTP2 framing layer", curl issue 10634, fixed in 7.89), against any
    # server. Reuse by a multiplexing client is covered by httpx, h2load and nghttp below.
    done = await curl(
        "--http2-prior-knowledge",
        "-o",
        "/dev/null",
        "-w",
        "%{http_version} %{http_code} %{size_download}",
        f"{proxy.url}/bytes/1000000",
    )
    assert done.stdout == b"2 200 1000000"
    lines = await stream_lines(
        [
            require_program("curl"),
            "-sS",
            "-N",
            "--http2-prior-knowledge",
            f"{proxy.url}/events?count=5&interval=0.15",
        ]
    )
    assert_live(sse_events_from_lines(lines), 5)


async def test_httpx_http2(nursery, demo_upstream):
    _, port = demo_upstream
    proxy = await start_proxy(nursery, make_config(port, max_connections=4))
    with trio.fail_after(20):
        # http1=False on an http:// URL: HTTP/2 with prior knowledge
        async with httpx.AsyncClient(base_url=proxy.url, http1=False, http2=True) as client:
            response = await client.get("/bytes/3000000")
            assert response.http_version == "HTTP/2"
            assert response.content == (bytes(range(256)) * 11719)[:3000000]
            await post_roundtrip(client, "/echo", payload(1 << 20))
            await post_roundtrip(client, "/echo", payload(300_000), chunked=True)

            async def one() -> None:
                assert (await client.get("/slow?delay=0.1")).status_code == 200

            async with trio.open_nursery() as streams:  # many streams, one connection
                for _ in range(20):
                    streams.start_soon(one)
            events = await read_sse(client, "/events?count=5&interval=0.15")
    assert_live(events, 5)


async def test_h2load_multiplexed_load(nursery, demo_upstream):
    upstream, port = demo_upstream
    proxy = await start_proxy(nursery, make_config(port, max_connections=8))
    result = await h2load("-n", "1000", "-c", "4", "-m", "16", f"{proxy.url}/echo")
    assert result.protocol == "h2c", result.output
    assert (result.total, result.succeeded, result.failed, result.errored) == (1000, 1000, 0, 0), (
        result.output
    )
    assert result.status_2xx == 1000
    await trio.testing.wait_all_tasks_blocked()
    assert upstream.stats.requests == 1000
    assert upstream.stats.max_concurrent_connections <= 8
    # Upstream connections are reused: at most one per pool slot for 1000 requests.
    assert upstream.stats.connections_opened <= 8, upstream.stats


async def test_nghttp_parallel_streams_and_sse(nursery, demo_upstream):
    _, port = demo_upstream
    proxy = await start_proxy(nursery, make_config(port))
    nghttp = require_program("nghttp")
    # -n: discard bodies; -s: per-stream statistics; three URLs on one connection.
    done = await run(
        [nghttp, "-ns", f"{proxy.url}/echo", f"{proxy.url}/bytes/500000", f"{proxy.url}/status/204"]
    )
    out = done.stdout.decode()
    assert done.returncode == 0, (out, done.stderr)
    assert out.count(" 200 ") == 2 and out.count(" 204 ") == 1, out
    # nghttp buffers what it prints, so take its own receive timestamps from -v instead.
    done = await run([nghttp, "-v", f"{proxy.url}/events?count=5&interval=0.2"])
    out = done.stdout.decode()
    assert done.returncode == 0, out
    events = [json.loads(line[5:]) for line in out.splitlines() if line.startswith("data: {")]
    assert [event["n"] for event in events] == [1, 2, 3, 4, 5]
    data_times = [
        float(match.group(1))
        for match in re.finditer(
            r"\[\s*([\d.]+)\] recv DATA frame <length=[1-9]\d*, flags=0x00, stream_id=\d+>", out
        )
    ]
    assert len(data_times) >= 5, out
    # five events written 0.2 s apart reached nghttp spread over ~0.8 s, not in one burst
    assert data_times[-1] - data_times[0] >= 0.6, data_times
