"""pooled_proxy/_h11.py: the compiled h11 when installed, pure h11 when asked for (or absent)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

PROBE = "from pooled_proxy._h11 import ACCELERATED, h11; print(h11.__name__, ACCELERATED)"


def _choice(**env: str) -> str:
    switches = ("POOLED_PROXY_H11", "POOLED_PROXY_PURE")
    environment = {k: v for k, v in os.environ.items() if k not in switches} | env
    return subprocess.run(
        [sys.executable, "-c", PROBE], env=environment, capture_output=True, text=True, check=True
    ).stdout.strip()


def test_pure_h11_when_asked_for() -> None:
    assert _choice(POOLED_PROXY_H11="h11") == "h11 False"
    assert _choice(POOLED_PROXY_PURE="1") == "h11 False"  # the whole pure build


@pytest.mark.skipif(
    importlib.util.find_spec("h11_mypyc") is None, reason="h11-mypyc is not installed here"
)
def test_compiled_h11_by_default_when_installed() -> None:
    assert _choice() == "h11_mypyc True"


def test_the_package_never_imports_h11_around_the_shim() -> None:
    """Every module takes h11 from _h11.py (the demo upstream excepted: it plays a third party),
    so h11 and h11_mypyc objects never meet in one process."""
    package = os.path.join(os.path.dirname(__file__), "..", "..", "pooled_proxy")
    offenders = []
    for folder, _, files in os.walk(package):
        for name in files:
            path = os.path.join(folder, name)
            if not name.endswith(".py") or name in ("_h11.py", "demo_upstream.py"):
                continue
            with open(path) as source:
                for line in source:
                    if line.startswith(("import h11", "from h11")):
                        offenders.append(f"{os.path.relpath(path, package)}: {line.strip()}")
    assert offenders == []
