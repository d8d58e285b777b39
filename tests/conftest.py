from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

from pooled_proxy.daemon.demo_upstream import DemoUpstream


def _outcomes(exc: BaseException) -> list[BaseException] | None:
    """The pytest.skip/pytest.fail outcomes at the leaves of ``exc``, or None if anything else
    is among them."""
    if isinstance(exc, BaseExceptionGroup):
        leaves: list[BaseException] = []
        for inner in exc.exceptions:
            found = _outcomes(inner)
            if found is None:
                return None
            leaves += found
        return leaves
    return [exc] if isinstance(exc, (pytest.skip.Exception, pytest.fail.Exception)) else None


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> None:
    """A skip or fail raised in a trio task reaches pytest wrapped in one exception group per
    nursery (pytest-trio turns a group of skips into a bare Skipped without a reason): report
    the first one itself, e.g. "SKIPPED ...: h2load is not installed"."""
    if call.excinfo is None:
        return
    exc = call.excinfo.value
    if isinstance(exc, pytest.skip.Exception) and isinstance(exc.__context__, BaseExceptionGroup):
        exc = exc.__context__
    if isinstance(exc, BaseExceptionGroup):
        outcomes = _outcomes(exc)
        if outcomes:
            call.excinfo = pytest.ExceptionInfo.from_exception(outcomes[0])


@pytest.fixture
async def demo_upstream(nursery: trio.Nursery) -> AsyncIterator[tuple[DemoUpstream, int]]:
    """The built-in demo upstream on 127.0.0.1, on an ephemeral port."""
    upstream = DemoUpstream(event_interval=0.05)
    port = await nursery.start(upstream.serve, "127.0.0.1", 0)
    yield upstream, port
