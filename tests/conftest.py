from __future__ import annotations

import importlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trustme

from pooled_proxy._compiled import MODULES, is_compiled, pure_requested
from pooled_proxy.config import ServerAddress, TlsConfig
from pooled_proxy.daemon.demo_upstream import DemoUpstream
from tests.support.helpers import HOST


def pytest_sessionstart(session: pytest.Session) -> None:
    """Compiled modules older than their source would test yesterday's code: stop at once."""
    if pure_requested():
        return
    stale = []
    for name in MODULES:
        module = importlib.import_module(name)
        compiled = Path(module.__file__ or "")
        source = compiled.with_name(name.rpartition(".")[2] + ".py")
        # (A module whose extension file is gone still loads from mypyc's shared library.)
        if is_compiled(module) and (
            not compiled.exists() or source.stat().st_mtime > compiled.stat().st_mtime
        ):
            stale.append(str(source))
    if stale:
        pytest.exit(
            f"compiled modules older than their source ({', '.join(stale)}): run `make compiled`,"
            " or POOLED_PROXY_PURE=1 for the pure build",
            returncode=4,
        )


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


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_files(ca: trustme.CA, tmp_path: Path) -> TlsConfig:
    cert = ca.issue_cert(HOST, "localhost")
    cert.cert_chain_pems[0].write_to_path(tmp_path / "cert.pem")
    for pem in cert.cert_chain_pems[1:]:
        pem.write_to_path(tmp_path / "cert.pem", append=True)
    cert.private_key_pem.write_to_path(tmp_path / "key.pem")
    return TlsConfig(
        listen=(ServerAddress(HOST, 0),), cert=tmp_path / "cert.pem", key=tmp_path / "key.pem"
    )


@pytest.fixture
def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context
