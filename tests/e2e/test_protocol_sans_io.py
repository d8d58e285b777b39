"""pooled_proxy.protocol is sans-IO: importing any module under it, with everything it imports
in turn, loads no trio, sockets or event loop."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pooled_proxy.protocol

IO_MODULES = ["trio", "socket", "select", "selectors", "ssl", "asyncio"]
PROTOCOL_DIR = Path(pooled_proxy.protocol.__file__).parent


def _io_modules_loaded_by(*modules: str) -> list[str]:
    """Import ``modules`` in a fresh interpreter; which IO modules ended up loaded."""
    code = (
        "import json, sys\n"
        f"for name in {list(modules)!r}:\n"
        "    __import__(name)\n"
        f"print(json.dumps(sorted(m for m in {IO_MODULES!r} if m in sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=PROTOCOL_DIR.parent.parent,
    )
    return list(json.loads(out.stdout))


def test_protocol_modules_load_no_io() -> None:
    modules = sorted(
        "pooled_proxy." + ".".join(p.relative_to(PROTOCOL_DIR.parent).with_suffix("").parts)
        for p in PROTOCOL_DIR.rglob("*.py")
    )
    assert "pooled_proxy.protocol.http1.connection" in modules
    assert _io_modules_loaded_by(*modules) == []


def test_the_check_sees_io_when_there_is_some() -> None:
    # The test above must be able to fail: a trio shell module is reported.
    assert "trio" in _io_modules_loaded_by("pooled_proxy.upstream.pool")
