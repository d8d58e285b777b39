"""config/: every example passes `pooled-proxy check`, says what it is for, and is shaped as
the README promises (the production one with two upstreams, TLS and admin)."""

from __future__ import annotations

import io
import json
import ssl
import subprocess
import sys
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import h11
import httpx
import pytest
import trio
import trio.testing
from cryptography import x509

from pooled_proxy.config import Config, ServerAddress, load_config
from pooled_proxy.daemon.cli import main
from pooled_proxy.daemon.lifecycle import serve
from pooled_proxy.ops.accesslog import AccessLog
from pooled_proxy.proxy import Proxy
from pooled_proxy.routing import Router
from tests.support.helpers import HOST, H11Client
from tests.support.operations import start_operated_proxy

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "config"
EXAMPLES = sorted(CONFIG.glob("*.toml")) + [ROOT / "docker" / "pooled-proxy.toml"]


def test_the_promised_examples_are_there():
    names = {path.name for path in CONFIG.glob("*.toml")}
    assert {"dev.toml", "production.toml", "sse.toml", "pooled-proxy.toml"} <= names
    assert "run -c config/pooled-proxy.toml" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.name)
def test_every_example_passes_check(path, capsys):
    assert main(["check", "-c", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"{path}: ok (") and err == ""
    # Commented: it opens by saying what it is for, and explains its settings.
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# ")
    assert sum("#" in line for line in lines) >= 8


def test_check_in_a_real_process_from_the_repository_root():
    result = subprocess.run(
        [sys.executable, "-m", "pooled_proxy", "check", "-c", "config/production.toml"],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == "config/production.toml: ok (2 upstream(s), 3 route(s))\n"


def test_production_has_two_upstreams_tls_and_admin():
    config = load_config(CONFIG / "production.toml")
    assert len(config.upstreams) == 2
    assert any(len(upstream.servers) > 1 for upstream in config.upstreams.values())
    assert config.admin is not None and config.admin.listen.host == "127.0.0.1"
    assert config.log.format == "json"
    tls = config.server.tls
    assert tls is not None
    # The pair loads together (the key matches the certificate), as the TLS listener loads it.
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls.cert, tls.key)
    certificate = x509.load_pem_x509_certificate(tls.cert.read_bytes())
    assert "DO NOT USE IN PRODUCTION" in certificate.subject.rfc4514_string()
    assert tls.cert.parent == CONFIG / "tls" and (CONFIG / "tls" / "README.md").exists()
    # Regenerate it (config/tls/README.md) before it lapses and `check` users get a surprise.
    assert certificate.not_valid_after_utc > datetime.now(UTC) + timedelta(days=365)
    router = Router(config.routes)
    assert router.match(b"shop.example.com", b"/api/orders").upstream == "api"
    assert router.match(b"api.example.com", b"/v2/orders").upstream == "api"
    assert router.match(b"shop.example.com", b"/").upstream == "web"


def test_dev_fails_fast_but_waits_for_breakpoints():
    config = load_config(CONFIG / "dev.toml")
    (upstream,) = config.upstreams.values()
    assert {address.host for address in config.server.listen} == {"127.0.0.1"}
    assert config.log.format == "combined"
    assert upstream.connect_timeout <= 1 and upstream.response_header_timeout >= 60


def _local(config: Config, upstream_port: int) -> Config:
    """The example with its addresses moved to port 0 and its upstreams to ``upstream_port``."""
    here = ServerAddress(HOST, 0)
    upstreams = {
        name: replace(upstream, servers=(ServerAddress(HOST, upstream_port),))
        for name, upstream in config.upstreams.items()
    }
    return replace(config, server=replace(config.server, listen=(here,)), upstreams=upstreams)


async def test_sse_example_relays_a_stream_with_long_silences(nursery, demo_upstream):
    config = load_config(CONFIG / "sse.toml")
    events = config.upstreams["events"]
    assert events.read_timeout == 0  # silence mid-stream is never cut
    assert Router(config.routes).match(b"x", b"/events").upstream == "events"
    assert Router(config.routes).match(b"x", b"/other").upstream == "api"
    _, port = demo_upstream
    proxy = await start_operated_proxy(nursery, _local(config, port))
    with trio.fail_after(10):
        async with await H11Client.connect(proxy.running.port) as client:
            await client.send(
                h11.Request(
                    method="GET", target="/events?count=3&interval=0.2", headers=[("host", "x")]
                ),
                h11.EndOfMessage(),
            )
            head = await client.next_event()
            assert head.status_code == 200
            received = b""
            while not isinstance(event := await client.next_event(), h11.EndOfMessage):
                received += event.data
        await trio.testing.wait_all_tasks_blocked()  # the exchange is logged after its last write
    assert received.count(b"data: ") == 3
    (entry,) = proxy.log_entries()
    assert entry["event_stream"] is True and entry["upstream"] == "events"
    assert entry["duration_ms"] >= 400


async def test_production_example_serves_https_and_h2_with_its_demo_pair(nursery, demo_upstream):
    config = load_config(CONFIG / "production.toml")
    assert config.server.tls is not None
    _, port = demo_upstream
    local = _local(config, port)
    tls = replace(config.server.tls, listen=(ServerAddress(HOST, 0),))
    local = replace(local, server=replace(local.server, tls=tls))
    log = io.StringIO()
    proxy = Proxy(local, observers=(AccessLog(log),))
    addresses = await nursery.start(serve, proxy)
    (https,) = [address for address in addresses if address.tls]
    trust = ssl.create_default_context(cafile=str(config.server.tls.cert))
    with trio.fail_after(10):
        async with httpx.AsyncClient(verify=trust, http2=True) as client:
            response = await client.get(f"https://{HOST}:{https.port}/echo")
        await trio.testing.wait_all_tasks_blocked()
    assert response.status_code == 200 and response.http_version == "HTTP/2"
    assert response.json()["path"] == "/echo"
    (entry,) = (json.loads(line) for line in log.getvalue().splitlines())
    assert (entry["protocol"], entry["upstream"]) == ("HTTP/2", "web")
