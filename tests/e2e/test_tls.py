"""The TLS listener: ALPN h2 / http/1.1 with trustme certificates, on real sockets."""

from __future__ import annotations

import logging
import ssl
import textwrap
from pathlib import Path

import httpx
import pytest
import trio

from pooled_proxy.daemon.cli import main
from tests.support.h2client import H2Client
from tests.support.helpers import HOST
from tests.support.tls import tls_port


async def test_httpx_with_http2_negotiates_h2_over_tls(
    nursery, demo_upstream, tls_files, client_context, caplog
):
    caplog.set_level(logging.INFO, logger="pooled_proxy.lifecycle")
    _upstream, port = demo_upstream
    plain, secure = await tls_port(nursery, port, tls_files)
    with trio.fail_after(10):
        async with httpx.AsyncClient(http2=True, verify=client_context) as client:
            response = await client.get(f"https://{HOST}:{secure}/echo")
            concurrent = []

            async def one() -> None:
                concurrent.append((await client.get(f"https://{HOST}:{secure}/echo")).http_version)

            async with trio.open_nursery() as streams:
                for _ in range(20):
                    streams.start_soon(one)
        async with httpx.AsyncClient(http2=False, verify=client_context) as client:
            h1_response = await client.get(f"https://{HOST}:{secure}/echo")
    assert response.http_version == "HTTP/2"
    assert response.status_code == 200
    seen = dict(response.json()["headers"])
    assert seen["x-forwarded-proto"] == "https"
    assert seen["via"] == "2 pooled-proxy"
    assert concurrent == ["HTTP/2"] * 20
    assert h1_response.http_version == "HTTP/1.1" and h1_response.status_code == 200
    assert dict(h1_response.json()["headers"])["x-forwarded-proto"] == "https"
    assert f"listening on https://{HOST}:{secure} (HTTP/1.1, h2)" in caplog.text
    assert f"listening on http://{HOST}:{plain} (HTTP/1.1, h2c)" in caplog.text


async def _tls_connect(
    port: int, context: ssl.SSLContext, alpn: list[str] | None
) -> trio.SSLStream:
    if alpn is not None:
        context.set_alpn_protocols(alpn)
    tcp = await trio.open_tcp_stream(HOST, port)
    stream = trio.SSLStream(tcp, context, server_hostname=HOST, https_compatible=True)
    await stream.do_handshake()
    return stream


@pytest.mark.parametrize(
    "alpn, expected",
    [(["h2", "http/1.1"], "h2"), (["http/1.1"], "http/1.1"), (["h2"], "h2")],
)
async def test_alpn_selects_the_protocol_that_is_served(
    nursery, demo_upstream, tls_files, client_context, alpn, expected
):
    _, port = demo_upstream
    _, secure = await tls_port(nursery, port, tls_files)
    with trio.fail_after(5):
        stream = await _tls_connect(secure, client_context, alpn)
        async with stream:
            assert stream.selected_alpn_protocol() == expected
            if expected == "h2":
                client = H2Client(stream)
                client.conn.initiate_connection()
                await client.flush()
                reply = await client.get("/echo")
                assert reply.status == 200
            else:
                await stream.send_all(b"GET /echo HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                data = b""
                while chunk := await stream.receive_some(65536):
                    data += chunk
                assert data.startswith(b"HTTP/1.1 200 ")


async def test_without_alpn_the_h2_preface_still_gets_http2(
    nursery, demo_upstream, tls_files, client_context
):
    _, port = demo_upstream
    _, secure = await tls_port(nursery, port, tls_files)
    with trio.fail_after(5):
        stream = await _tls_connect(secure, client_context, None)
        async with stream:
            assert stream.selected_alpn_protocol() is None
            client = H2Client(stream)
            client.conn.initiate_connection()
            await client.flush()
            assert (await client.get("/echo")).status == 200


async def test_a_stalled_handshake_is_dropped_after_header_timeout(
    nursery, demo_upstream, tls_files
):
    _, port = demo_upstream
    _, secure = await tls_port(nursery, port, tls_files, header_timeout=0.3)
    with trio.fail_after(5):
        async with await trio.open_tcp_stream(HOST, secure) as tcp:
            started = trio.current_time()
            assert await tcp.receive_some(1024) == b""  # closed without a word
            assert trio.current_time() - started < 2


def _write_config(path: Path, cert: str, key: str) -> Path:
    config = path / "proxy.toml"
    config.write_text(
        textwrap.dedent(
            f"""\
            [server]
            listen = ["127.0.0.1:0"]

            [server.tls]
            listen = ["127.0.0.1:0"]
            cert = "{cert}"
            key = "{key}"

            [upstreams.app]
            servers = ["127.0.0.1:9"]
            """
        )
    )
    return config


def test_a_certificate_that_does_not_load_is_a_config_error(tmp_path, tls_files, capsys):
    (tmp_path / "garbage.pem").write_text("not a certificate\n")
    config = _write_config(tmp_path, "garbage.pem", str(tls_files.key))
    assert main(["check", "-c", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"{config}:6: server.tls.cert: cannot load the certificate with its key" in err


def test_a_missing_key_is_a_config_error(tmp_path, tls_files, capsys):
    config = _write_config(tmp_path, str(tls_files.cert), "missing.pem")
    assert main(["check", "-c", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"{config}:7: server.tls.key: cannot read" in err


def test_a_good_pair_passes_check(tmp_path, tls_files, capsys):
    config = _write_config(tmp_path, str(tls_files.cert), str(tls_files.key))
    assert main(["check", "-c", str(config)]) == 0
