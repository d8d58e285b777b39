from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

from pooled_proxy.demo import DemoUpstream


@pytest.fixture
async def demo_upstream(nursery: trio.Nursery) -> AsyncIterator[tuple[DemoUpstream, int]]:
    """The built-in demo upstream on 127.0.0.1, on an ephemeral port."""
    upstream = DemoUpstream(event_interval=0.05)
    port = await nursery.start(upstream.serve, "127.0.0.1", 0)
    yield upstream, port
