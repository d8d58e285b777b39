"""TLS to https:// upstreams and the reload of TLS files, with trustme certificates on real
sockets: the upstream is the demo server behind a TLS listener that records what each client
presented (SNI, client certificate)."""

from __future__ import annotations

import logging
import os
import signal
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

from pooled_proxy.config import Config, load_config
from pooled_proxy.daemon.cli import main
from pooled_proxy.daemon.demo_upstream import DemoUpstream
from pooled_proxy.daemon.lifecycle import run
from pooled_proxy.proxy import Proxy
from tests.support.helpers import HOST, H11Client, RunningProxy, start_proxy


@dataclass
class TlsUpstream:
    """The demo upstream over TLS; ``server_names`` and ``client_certs`` hold what each
    handshake brought, ``handshake_errors`` the handshakes that failed."""

    demo: DemoUpstream
    port: int = 0
    server_names: list[str | None] = field(default_factory=list)
    client_certs: list[dict[str, Any]] = field(default_factory=list)
    handshake_errors: list[BaseException] = field(default_factory=list)


async def send_pending_alert(stream: trio.SSLStream[trio.SocketStream]) -> None:
    """Send the alert OpenSSL wrote when it refused the handshake, as a server on a plain
    socket does (Python's ssl module, nginx, Go's crypto/tls): trio's SSLStream raises
    without sending what its failed handshake left to send."""
    alert = stream._outgoing.read()  # trio has no public way to it
    if alert:
        try:
            await stream.transport_stream.send_all(alert)
        except trio.BrokenResourceError:
            pass


async def start_tls_upstream(
    nursery: trio.Nursery,
    cert: trustme.LeafCert,
    *,
    client_ca: trustme.CA | None = None,
    alpn: list[str] | None = None,
) -> TlsUpstream:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    if alpn:
        context.set_alpn_protocols(alpn)
    upstream = TlsUpstream(DemoUpstream())
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        client_ca.configure_trust(context)

    def sni(_obj: ssl.SSLObject, name: str | None, _context: ssl.SSLContext) -> None:
        upstream.server_names.append(name)

    context.sni_callback = sni  # type: ignore[assignment]

    async def handle(stream: trio.SSLStream[trio.SocketStream]) -> None:
        try:
            await stream.do_handshake()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            upstream.handshake_errors.append(exc)
            await send_pending_alert(stream)
            return
        peer = stream.getpeercert()
        if peer:
            upstream.client_certs.append(peer)
        await upstream.demo._handle(stream)  # type: ignore[arg-type]

    listeners = await trio.open_ssl_over_tcp_listeners(0, context, host=HOST)
    upstream.port = listeners[0].transport_listener.socket.getsockname()[1]
    nursery.start_soon(trio.serve_listeners, handle, listeners)
    return upstream


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def other_ca() -> trustme.CA:
    return trustme.CA()


def write_pem(path: Path, *blobs: trustme.Blob) -> Path:
    path.write_bytes(b"".join(blob.bytes() for blob in blobs))
    return path


def write_config(tmp_path: Path, port: int, *lines: str, server: str = "") -> Path:
    """A config with one upstream "app" on https://127.0.0.1:port and the given extra keys."""
    path = tmp_path / "proxy.toml"
    path.write_text(
        f'[server]\nlisten = ["{HOST}:0"]\n{server}\n'
        f'[log]\naccess = "off"\n\n'
        f'[upstreams.app]\nservers = ["https://{HOST}:{port}"]\n' + "\n".join(lines) + "\n"
    )
    return path


async def proxy_for(nursery: trio.Nursery, path: Path) -> RunningProxy:
    return await start_proxy(nursery, load_config(path))


async def test_a_trusted_ca_verifies_the_upstream_and_its_connection_is_reused(
    nursery, ca, tmp_path
):
    upstream = await start_tls_upstream(nursery, ca.issue_cert(HOST))
    ca_file = write_pem(tmp_path / "ca.pem", ca.cert_pem)
    running = await proxy_for(nursery, write_config(tmp_path, upstream.port, 'tls_ca = "ca.pem"'))
    assert ca_file.exists()
    with trio.fail_after(5):
        async with await H11Client.connect(running.port) as client:
            replies = [await client.request("GET", "/echo") for _ in range(3)]
    assert [reply.status for reply in replies] == [200, 200, 200]
    assert replies[0].json()["headers"]  # the demo upstream's own answer
    # One TLS connection carried all three: it went back to the pool after each exchange.
    assert upstream.demo.stats.connections_opened == 1
    stats = running.pool().statistics()
    assert (stats.opened, stats.reused) == (1, 2)
    assert upstream.server_names == [None]  # no SNI for an IP address, as RFC 6066 says


async def test_a_certificate_from_another_ca_is_a_502_tls_certificate_error(
    nursery, ca, other_ca, tmp_path
):
    upstream = await start_tls_upstream(nursery, other_ca.issue_cert(HOST))
    write_pem(tmp_path / "ca.pem", ca.cert_pem)
    running = await proxy_for(nursery, write_config(tmp_path, upstream.port, 'tls_ca = "ca.pem"'))
    with trio.fail_after(5):
        async with await H11Client.connect(running.port) as client:
            reply = await client.request("GET", "/echo")
    assert reply.status == 502
    status = reply.headers[b"proxy-status"].decode()
    assert status.startswith("pooled-proxy; error=tls_certificate_error; details=")
    assert "certificate verify failed" in status or "unable to get local issuer" in status
    assert upstream.demo.stats.requests == 0


async def test_tls_server_name_is_sent_as_sni_and_checked_against_the_certificate(
    nursery, ca, tmp_path
):
    upstream = await start_tls_upstream(nursery, ca.issue_cert("api.internal"))
    write_pem(tmp_path / "ca.pem", ca.cert_pem)
    named = await proxy_for(
        nursery,
        write_config(tmp_path, upstream.port, 'tls_ca = "ca.pem"',
                     'tls_server_name = "api.internal"'),
    )  # fmt: skip
    (tmp_path / "unnamed").mkdir()
    write_pem(tmp_path / "unnamed" / "ca.pem", ca.cert_pem)
    unnamed = await proxy_for(
        nursery, write_config(tmp_path / "unnamed", upstream.port, 'tls_ca = "ca.pem"')
    )
    with trio.fail_after(5):
        async with await H11Client.connect(named.port) as client:
            good = await client.request("GET", "/echo")
        async with await H11Client.connect(unnamed.port) as client:
            bad = await client.request("GET", "/echo")
    assert good.status == 200
    # The Host the upstream sees is the client's: the name only concerns TLS.
    assert ["host", "test.local"] in good.json()["headers"]
    assert upstream.server_names == ["api.internal", None]
    assert bad.status == 502
    assert b"error=tls_certificate_error" in bad.headers[b"proxy-status"]
    # Why, but not with whom: the address it did not match is for the log.
    assert b"IP address mismatch" in bad.headers[b"proxy-status"]
    assert b"127.0.0.1" not in bad.headers[b"proxy-status"]


async def test_a_client_certificate_is_presented_to_an_upstream_that_requires_one(
    nursery, ca, other_ca, tmp_path
):
    upstream = await start_tls_upstream(nursery, ca.issue_cert(HOST), client_ca=other_ca)
    client_cert = other_ca.issue_cert("proxy@example.test")
    write_pem(tmp_path / "ca.pem", ca.cert_pem)
    write_pem(tmp_path / "client.pem", *client_cert.cert_chain_pems)
    write_pem(tmp_path / "client.key", client_cert.private_key_pem)
    with_cert = await proxy_for(
        nursery,
        write_config(tmp_path, upstream.port, 'tls_ca = "ca.pem"', 'tls_cert = "client.pem"',
                     'tls_key = "client.key"'),
    )  # fmt: skip
    (tmp_path / "bare").mkdir()
    write_pem(tmp_path / "bare" / "ca.pem", ca.cert_pem)
    without = await proxy_for(
        nursery, write_config(tmp_path / "bare", upstream.port, 'tls_ca = "ca.pem"')
    )
    with trio.fail_after(5):
        async with await H11Client.connect(with_cert.port) as client:
            good = await client.request("GET", "/echo")
        async with await H11Client.connect(without.port) as client:
            bad = await client.request("GET", "/echo")
    assert good.status == 200
    assert len(upstream.client_certs) == 1
    subject_alt_names = upstream.client_certs[0]["subjectAltName"]
    assert ("email", "proxy@example.test") in subject_alt_names
    # Refused by the upstream. Under TLS 1.3 it says so after the handshake, which looked
    # complete to the proxy: the first read after it finds the alert.
    assert bad.status == 502
    assert bad.headers[b"proxy-status"] == (
        b'pooled-proxy; error=tls_alert_received; details="the server sent the alert '
        b'TLSV13_ALERT_CERTIFICATE_REQUIRED"'
    )
    assert len(upstream.handshake_errors) == 1
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in repr(upstream.handshake_errors[0].__cause__)
    assert upstream.demo.stats.requests == 1


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_a_server_refusing_the_client_certificate_after_the_handshake_is_skipped(
    nursery, ca, other_ca, tmp_path, method
):
    """Two servers, the first refusing the proxy (it has no client certificate). Its TLS
    1.3 alert comes with the first read after the handshake, yet nothing of the request
    was processed: the request goes on to the other server, as after a failed handshake,
    a POST with its body too; the refusal counts against the first."""
    refusing = await start_tls_upstream(nursery, ca.issue_cert(HOST), client_ca=other_ca)
    accepting = await start_tls_upstream(nursery, ca.issue_cert(HOST))
    write_pem(tmp_path / "ca.pem", ca.cert_pem)
    path = write_config(tmp_path, refusing.port, 'tls_ca = "ca.pem"')
    path.write_text(
        path.read_text().replace(
            f'"https://{HOST}:{refusing.port}"',
            f'"https://{HOST}:{refusing.port}", "https://{HOST}:{accepting.port}"',
        )
    )
    running = await proxy_for(nursery, path)
    with trio.fail_after(5):
        async with await H11Client.connect(running.port) as client:
            reply = await client.request(
                method, "/echo", body=b"order=1" if method == "POST" else b""
            )
    assert reply.status == 200  # round robin's first choice was the refusing server
    if method == "POST":
        assert reply.body == b"order=1"
    assert len(refusing.handshake_errors) == 1 and refusing.demo.stats.requests == 0
    assert accepting.demo.stats.requests == 1
    last = running.proxy.forwarder.upstreams["app"].health[0].last_failure
    assert last is not None and last[1] == "tls_alert_received"


async def test_tls_verify_false_accepts_any_certificate_and_warns_at_start(
    nursery, other_ca, tmp_path, caplog
):
    caplog.set_level(logging.WARNING, logger="pooled_proxy.tls")
    upstream = await start_tls_upstream(nursery, other_ca.issue_cert("somewhere.else"))
    running = await proxy_for(nursery, write_config(tmp_path, upstream.port, "tls_verify = false"))
    with trio.fail_after(5):
        async with await H11Client.connect(running.port) as client:
            reply = await client.request("GET", "/echo")
    assert reply.status == 200
    assert "upstream app: tls_verify = false" in caplog.text


def _server_tls(tmp_path: Path, ca: trustme.CA, name: str) -> None:
    cert = ca.issue_cert(HOST, common_name=name)
    write_pem(tmp_path / "server.pem", *cert.cert_chain_pems)
    write_pem(tmp_path / "server.key", cert.private_key_pem)


async def _tls_client(port: int, trust: ssl.SSLContext) -> H11Client:
    stream = trio.SSLStream(
        await trio.open_tcp_stream(HOST, port), trust, server_hostname=HOST,
        https_compatible=True,
    )  # fmt: skip
    await stream.do_handshake()
    return H11Client(stream)  # type: ignore[arg-type]


def _common_name(client: H11Client) -> str:
    """The common name of the certificate the proxy presented on this connection."""
    peer = client.stream.getpeercert()  # type: ignore[attr-defined]
    subject = dict(pair[0] for pair in peer["subject"])
    return str(subject["commonName"])


async def test_sighup_loads_new_tls_files_for_new_connections_and_keeps_open_ones(
    nursery, ca, other_ca, tmp_path
):
    upstream = await start_tls_upstream(nursery, ca.issue_cert(HOST))
    write_pem(tmp_path / "ca.pem", other_ca.cert_pem)  # the wrong CA, for now
    _server_tls(tmp_path, ca, "first")
    server = f'\n[server.tls]\nlisten = ["{HOST}:0"]\ncert = "server.pem"\nkey = "server.key"\n'
    path = write_config(tmp_path, upstream.port, 'tls_ca = "ca.pem"', server=server)
    proxy = Proxy(load_config(path))
    addresses = await nursery.start(lambda **kw: run(proxy, config_path=str(path), **kw))
    secure = next(address.port for address in addresses if address.tls)
    trust = ssl.create_default_context()
    ca.configure_trust(trust)
    with trio.fail_after(10):
        old = await _tls_client(secure, trust)
        assert _common_name(old) == "first"
        assert (await old.request("GET", "/echo")).status == 502  # the upstream's CA is wrong

        # New files on disk, then SIGHUP: the same config text, other certificates.
        _server_tls(tmp_path, ca, "second")
        write_pem(tmp_path / "ca.pem", ca.cert_pem)
        os.kill(os.getpid(), signal.SIGHUP)
        while proxy.reloads == 0:
            await trio.sleep(0.01)

        new = await _tls_client(secure, trust)
        assert _common_name(new) == "second"
        assert (await new.request("GET", "/echo")).status == 200
        # The connection opened before the reload carries on, with its certificate.
        assert (await old.request("GET", "/echo")).status == 200
        assert _common_name(old) == "first"
        await old.aclose()
        await new.aclose()
    proxy.begin_drain()


# -- check: the TLS keys are validated with file and line -------------------------------------


def _check(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    code = main(["check", "-c", str(path)])
    return code, capsys.readouterr().err.strip().splitlines()


def test_check_reports_tls_key_problems_with_file_and_line(tmp_path, capsys):
    path = tmp_path / "proxy.toml"
    path.write_text(
        "[upstreams.secure]\n"
        'servers = ["https://10.0.0.1"]\n'
        'tls_ca = "missing.pem"\n'
        'tls_cert = "ca.pem"\n'
        'tls_server_name = "not a name"\n'
        "tls_verify = 1\n"
        "\n[upstreams.plain]\n"
        'servers = ["10.0.0.2:80"]\n'
        'tls_server_name = "api.internal"\n'
        "\n[upstreams.loose]\n"
        'servers = ["https://10.0.0.3"]\n'
        "tls_verify = false\n"
        'tls_ca = "ca.pem"\n'
        'tls_key = "ca.pem"\n'
        "\n[[routes]]\n"
        'upstream = "secure"\n'
    )
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    code, lines = _check(path, capsys)
    assert code == 2
    shown = str(path)
    assert lines[0].startswith(f'{shown}:3: upstreams.secure.tls_ca: cannot read "')
    assert lines[1:] == [
        f"{shown}:4: upstreams.secure.tls_cert: needs tls_key (the client certificate's"
        + " private key)",
        f"{shown}:5: upstreams.secure.tls_server_name: expected a DNS name such as"
        + ' "api.internal", got "not a name"',
        f"{shown}:6: upstreams.secure.tls_verify: expected true or false, got integer",
        f"{shown}:10: upstreams.plain.tls_server_name: has no effect: no server of this"
        + " upstream is https://",
        f"{shown}:15: upstreams.loose.tls_ca: has no effect with tls_verify = false",
        f"{shown}:16: upstreams.loose.tls_key: needs tls_cert (the client certificate it"
        + " belongs to)",
    ]


def test_check_loads_the_tls_files(tmp_path, capsys, ca):
    cert = ca.issue_cert("api.internal")
    write_pem(tmp_path / "ca.pem", ca.cert_pem)
    write_pem(tmp_path / "client.pem", *cert.cert_chain_pems)
    write_pem(tmp_path / "wrong.key", ca.issue_cert("x").private_key_pem)
    (tmp_path / "junk.pem").write_text("junk\n")
    path = tmp_path / "proxy.toml"
    path.write_text(
        "[upstreams.a]\n"
        'servers = ["https://10.0.0.1"]\n'
        'tls_ca = "junk.pem"\n'
        "\n[upstreams.b]\n"
        'servers = ["https://10.0.0.2"]\n'
        'tls_ca = "ca.pem"\n'
        'tls_key = "wrong.key"\n'
        'tls_cert = "client.pem"\n'
        "\n[[routes]]\n"
        'upstream = "a"\n'
    )
    code, lines = _check(path, capsys)
    assert code == 2
    assert len(lines) == 2
    assert lines[0].startswith(f"{path}:3: upstreams.a.tls_ca: cannot load CA certificates from ")
    assert lines[1].startswith(
        f"{path}:9: upstreams.b.tls_cert: cannot load the client certificate with its key ("
    )

    path.write_text(path.read_text().replace("junk.pem", "ca.pem").replace("wrong.key", "c.key"))
    write_pem(tmp_path / "c.key", cert.private_key_pem)
    assert _check(path, capsys) == (0, [])


def test_a_config_with_tls_upstreams_builds_each_context_once(tmp_path, ca):
    write_pem(tmp_path / "ca.pem", ca.cert_pem)
    path = write_config(tmp_path, 443, 'tls_ca = "ca.pem"')
    text = path.read_text().replace(
        f'servers = ["https://{HOST}:443"]', 'servers = ["https://10.0.0.1", "https://10.0.0.2"]'
    )
    path.write_text(text)
    config: Config = load_config(path)
    proxy = Proxy(config)
    pools = proxy.forwarder.upstreams["app"].pools
    assert pools[0].ssl_context is pools[1].ssl_context is proxy.tls.upstreams["app"]


async def test_an_h2_upstream_that_does_not_select_h2_by_alpn_is_a_502(nursery, ca, tmp_path):
    """protocol = "h2" offers only h2 by ALPN; an HTTP/1.1-only TLS server selects nothing."""
    upstream = await start_tls_upstream(nursery, ca.issue_cert(HOST))
    write_pem(tmp_path / "ca.pem", ca.cert_pem)
    path = write_config(tmp_path, upstream.port, 'tls_ca = "ca.pem"', 'protocol = "h2"')
    running = await proxy_for(nursery, path)
    with trio.fail_after(5):
        async with await H11Client.connect(running.port) as client:
            reply = await client.request("GET", "/echo")
    assert reply.status == 502
    assert reply.headers[b"proxy-status"] == (
        b'pooled-proxy; error=tls_protocol_error; details="the server did not select h2 by ALPN"'
    )
    assert upstream.demo.stats.requests == 0


async def test_an_h2_upstream_refusing_a_missing_client_certificate_is_a_tls_alert(
    nursery, ca, other_ca, tmp_path
):
    """The alert of a TLS 1.3 server that wants a client certificate arrives where the
    HTTP/2 handshake waits for the server's SETTINGS."""
    upstream = await start_tls_upstream(
        nursery, ca.issue_cert(HOST), client_ca=other_ca, alpn=["h2"]
    )
    write_pem(tmp_path / "ca.pem", ca.cert_pem)
    path = write_config(tmp_path, upstream.port, 'tls_ca = "ca.pem"', 'protocol = "h2"')
    running = await proxy_for(nursery, path)
    with trio.fail_after(5):
        async with await H11Client.connect(running.port) as client:
            reply = await client.request("GET", "/echo")
    assert reply.status == 502
    assert reply.headers[b"proxy-status"] == (
        b'pooled-proxy; error=tls_alert_received; details="the server sent the alert '
        b'TLSV13_ALERT_CERTIFICATE_REQUIRED"'
    )
    assert len(upstream.handshake_errors) == 1
