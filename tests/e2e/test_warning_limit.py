"""An upstream outage does not flood the log: one warning per server and kind per second."""

from __future__ import annotations

import logging
import socket

import trio

from pooled_proxy.log_limit import WarningLimiter
from tests.support.helpers import H11Client, make_config, start_proxy


def test_one_line_per_key_per_interval_with_the_count_of_the_rest():
    limiter = WarningLimiter(interval=1.0)
    assert limiter.admit(("a", "connection_refused"), 0.0) == 0
    assert [limiter.admit(("a", "connection_refused"), t) for t in (0.1, 0.5, 0.99)] == [None] * 3
    assert limiter.admit(("b", "connection_refused"), 0.5) == 0  # another server
    assert limiter.admit(("a", "connection_timeout"), 0.5) == 0  # another kind
    assert limiter.admit(("a", "connection_refused"), 1.0) == 3
    assert limiter.admit(("a", "connection_refused"), 5.0) == 0


def refused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # closed again: connects are refused


async def test_an_outage_logs_one_warning_per_second_with_a_count(autojump_clock, nursery, caplog):
    proxy = await start_proxy(nursery, make_config(refused_port()))
    caplog.set_level(logging.WARNING, logger="pooled_proxy.forward")
    async with await H11Client.connect(proxy.port) as client:
        for _ in range(20):
            assert (await client.request("GET", "/")).status == 502
        await trio.sleep(1.0)
        assert (await client.request("GET", "/")).status == 502
    lines = [r.getMessage() for r in caplog.records if r.name == "pooled_proxy.forward"]
    assert len(lines) == 2, lines
    assert "more like it" not in lines[0]
    assert "(19 more like it since the last one, not logged)" in lines[1]
