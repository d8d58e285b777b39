"""curl in front of the proxy (demo upstream behind it) over HTTP/1.1.

curl over h2c is in test_h2_clients.py, over TLS with ALPN in test_tls_clients.py.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.support.helpers import make_config, start_proxy

from .checks import assert_live, payload, sse_events_from_lines
from .clients import curl, stream_lines
from .servers import require_program


async def test_http11_get_post_and_connection_reuse(nursery, demo_upstream, tmp_path: Path):
    _upstream, port = demo_upstream
    proxy = await start_proxy(nursery, make_config(port))
    body = payload(2 << 20)
    (tmp_path / "body.bin").write_bytes(body)
    done = await curl("--http1.1", "-i", f"{proxy.url}/echo?x=1")
    head, _, content = done.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"\r\nvia: 1.1 pooled-proxy" in head.lower()
    assert json.loads(content)["path"] == "/echo?x=1"

    done = await curl(
        "--http1.1", "--data-binary", f"@{tmp_path / 'body.bin'}", f"{proxy.url}/echo"
    )
    assert done.stdout == body
    # -T - sends the body chunked (no length known in advance)
    done = await curl(
        "--http1.1",
        "-X",
        "POST",
        "-H",
        "transfer-encoding: chunked",
        "--data-binary",
        f"@{tmp_path / 'body.bin'}",
        f"{proxy.url}/echo",
    )
    assert done.stdout == body
    # Several URLs on one command line: curl reuses its one connection to the proxy.
    done = await curl(
        "--http1.1",
        "-o",
        "/dev/null",
        "-o",
        "/dev/null",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{num_connects}\n",
        f"{proxy.url}/status/204",
        f"{proxy.url}/bytes/100000",
        f"{proxy.url}/echo",
    )
    assert done.stdout.decode().split("\n")[:3] == ["204 1", "200 0", "200 0"]


async def test_http11_expect_100_continue(nursery, demo_upstream, tmp_path: Path):
    _, port = demo_upstream
    proxy = await start_proxy(nursery, make_config(port))
    body = payload(300_000)
    (tmp_path / "body.bin").write_bytes(body)
    done = await curl(
        "--http1.1",
        "-v",
        "-H",
        "expect: 100-continue",
        "--data-binary",
        f"@{tmp_path / 'body.bin'}",
        f"{proxy.url}/echo",
    )
    assert done.stdout == body
    assert b"< HTTP/1.1 100" in done.stderr  # relayed from the upstream


async def test_http11_sse_arrives_live(nursery, demo_upstream):
    _, port = demo_upstream
    proxy = await start_proxy(nursery, make_config(port))
    lines = await stream_lines(
        [
            require_program("curl"),
            "-sS",
            "-N",
            "--http1.1",
            f"{proxy.url}/events?count=6&interval=0.15",
        ]
    )
    assert_live(sse_events_from_lines(lines), 6)
