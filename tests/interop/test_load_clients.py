"""Load generators in front of the proxy: h2load (HTTP/1.1 mode here; h2 in test_h2_clients)."""

from __future__ import annotations

import trio.testing

from tests.support.helpers import make_config, start_proxy

from .clients import h2load


async def test_h2load_http11_keepalive_load(nursery, demo_upstream):
    upstream, port = demo_upstream
    proxy = await start_proxy(nursery, make_config(port, max_connections=8))
    result = await h2load("--h1", "-n", "1000", "-c", "16", f"{proxy.url}/echo")
    assert (result.total, result.succeeded, result.failed, result.errored) == (1000, 1000, 0, 0), (
        result.output
    )
    assert result.status_2xx == 1000
    await trio.testing.wait_all_tasks_blocked()
    assert upstream.stats.max_concurrent_connections <= 8
    assert upstream.stats.requests == 1000
    # Upstream connections are reused: at most one per pool slot for 1000 requests.
    assert upstream.stats.connections_opened <= 8, upstream.stats
