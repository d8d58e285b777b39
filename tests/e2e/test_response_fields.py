"""What the proxy adds to the responses it sends: a Date on every one (RFC 9110 6.6.1), and a
Proxy-Status that names the error but not the upstream's address (which the access log and
the warning log have). Real sockets, real clients."""

from __future__ import annotations

import email.utils
import logging
import time

import httpx
import trio

from tests.support.faulty_upstream import FaultyUpstream, refused_port
from tests.support.h2client import H2Client
from tests.support.helpers import H11Client, make_config, start_proxy
from tests.support.operations import start_operated_proxy


def _assert_now(date: bytes) -> None:
    parsed = email.utils.parsedate_to_datetime(date.decode())
    assert date.endswith(b" GMT") and abs(parsed.timestamp() - time.time()) < 5, date


async def test_a_response_without_date_gets_one_and_a_dated_one_keeps_its_own(
    nursery, demo_upstream
):
    faulty = FaultyUpstream(mode="ok")  # sends no Date
    faulty_port = await nursery.start(faulty.serve)
    _, demo_port = demo_upstream  # sends its own
    undated = await start_proxy(nursery, make_config(faulty_port))
    dated = await start_proxy(nursery, make_config(demo_port))
    with trio.fail_after(10):
        async with await H11Client.connect(undated.port) as client:
            reply = await client.request("GET", "/ok")
        assert reply.status == 200
        dates = [value for name, value in reply.header_list if name == b"date"]
        assert len(dates) == 1
        _assert_now(dates[0])
        async with await H2Client.connect(undated.port) as h2_client:
            h2_reply = await h2_client.get("/ok")
        assert h2_reply.status == 200
        _assert_now(h2_reply.header(b"date") or b"")

        async with await H11Client.connect(dated.port) as client:
            reply = await client.request("GET", "/echo")
        assert [name for name, _ in reply.header_list].count(b"date") == 1


async def test_the_proxys_own_answers_carry_a_date(nursery):
    dead = await refused_port()
    proxy = await start_proxy(nursery, make_config(dead))
    with trio.fail_after(10):
        async with await H11Client.connect(proxy.port) as client:
            refused = await client.request("GET", "/")
        async with await H11Client.connect(proxy.port) as client:
            bad = await client.request("GET", "/", headers=[("x-a", "a\x01b")])
        async with await H2Client.connect(proxy.port) as h2_client:
            h2_refused = await h2_client.get("/")
    assert (refused.status, bad.status, h2_refused.status) == (502, 400, 502)
    _assert_now(refused.headers[b"date"])
    _assert_now(bad.headers[b"date"])
    _assert_now(h2_refused.header(b"date") or b"")


async def test_proxy_status_names_the_error_not_the_upstream_address(nursery, caplog):
    dead = await refused_port()
    proxy = await start_operated_proxy(nursery, make_config(dead))
    address = f"127.0.0.1:{dead}"
    with trio.fail_after(10), caplog.at_level(logging.WARNING, logger="pooled_proxy.forward"):
        async with httpx.AsyncClient() as client:
            response = await client.get(proxy.url + "/x")
    assert response.status_code == 502
    assert response.headers["proxy-status"] == "pooled-proxy; error=connection_refused"
    assert address not in response.text
    # The operator still learns which server it was: the access log and the warning.
    assert proxy.log_entries()[-1]["upstream_server"] == address
    assert any(address in record.getMessage() for record in caplog.records)
