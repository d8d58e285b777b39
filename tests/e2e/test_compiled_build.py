"""pooled_proxy/_compiled.py: which build runs (the compiled modules or their source), the
switch to the pure build, and where a user sees which one it is.

``make test`` runs the suite on the compiled build and ``make test-h11`` on the pure one
(``POOLED_PROXY_PURE=1``); CI sets ``POOLED_PROXY_REQUIRE_COMPILED=1`` for the first, so that
a build that silently fell back to Python fails here instead of testing the pure code twice.
"""

from __future__ import annotations

import glob
import importlib
import importlib.machinery
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pooled_proxy import __version__
from pooled_proxy._compiled import MODULES, PURE_SWITCH, codec, describe, h11_library
from pooled_proxy.config import dev_config
from pooled_proxy.daemon.cli import describe as start_up_lines

ROOT = Path(__file__).resolve().parents[2]
PROBE = (
    "import importlib; from pooled_proxy._compiled import MODULES, codec;"
    "print(codec(), *(importlib.import_module(m).__file__.rpartition('.')[2] for m in MODULES))"
)


def _run(code: str, **env: str) -> str:
    environment = {
        k: v for k, v in os.environ.items() if k not in (PURE_SWITCH, "POOLED_PROXY_H11")
    }
    return subprocess.run(
        [sys.executable, "-c", code], env=environment | env, cwd=ROOT, capture_output=True,
        text=True, check=True,
    ).stdout.strip()  # fmt: skip


def _extension_files(module: str) -> list[str]:
    stem = str(ROOT / module.replace(".", "/"))
    return [
        path
        for suffix in importlib.machinery.EXTENSION_SUFFIXES
        for path in glob.glob(glob.escape(stem) + suffix)
    ]


def test_this_run_tests_the_build_it_was_asked_to() -> None:
    files = [importlib.import_module(name).__file__ or "" for name in MODULES]
    if os.environ.get(PURE_SWITCH, "") not in ("", "0"):
        assert [Path(f).suffix for f in files] == [".py"] * len(MODULES)
        assert (codec(), h11_library()) == ("pure", "h11")
    elif os.environ.get("POOLED_PROXY_REQUIRE_COMPILED"):
        assert [Path(f).suffix for f in files] == [".so"] * len(MODULES), files
        assert (codec(), h11_library()) == ("compiled", "h11-mypyc")
    else:
        # Outside `make`: either build, but whole (a module added to the list and not yet
        # compiled would test a mix of the two).
        assert codec() in ("pure", "compiled"), files


def test_the_pure_switch_takes_the_source_beside_the_extension_modules() -> None:
    if not all(_extension_files(name) for name in MODULES):
        pytest.skip("the modules are not compiled in this tree (make compiled)")
    assert _run(PROBE) == "compiled" + " so" * len(MODULES)
    assert _run(PROBE, **{PURE_SWITCH: "1"}) == "pure" + " py" * len(MODULES)
    assert _run(PROBE, **{PURE_SWITCH: "0"}) == "compiled" + " so" * len(MODULES)


def test_version_and_start_up_log_name_the_build() -> None:
    version = subprocess.run(
        [sys.executable, "-m", "pooled_proxy", "--version"], cwd=ROOT, capture_output=True,
        text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert version == f"pooled-proxy {__version__} ({describe()})"
    first = start_up_lines(dev_config("http://127.0.0.1:9000"), "dev", None)[0]
    assert first.startswith(f"pooled-proxy {__version__} (dev, pid {os.getpid()}, {describe()}): ")
    pure = _run(
        "from pooled_proxy._compiled import describe; print(describe())", **{PURE_SWITCH: "1"}
    )
    assert pure == "pure-Python codec, h11"
