"""The modules of the package that may be compiled with mypyc, and the switch back to their
source.

They are compiled only when asked for (``POOLED_PROXY_COMPILE=1`` at build time; ``make
compiled`` in a working tree): the same source, the pure-Python modules stay the fallback.
``MODULES`` is the one list the build (setup.py), ``make compiled`` and the runtime read; a
module added here must compile (stdlib and the package's own compiled or typed modules; no
trio) and the suite must pass on both builds.

``POOLED_PROXY_PURE=1`` in the environment makes the process import the ``.py`` source of
these modules even where their extension modules lie beside it, and the pure-Python h11
(``_h11.py``): the whole pure build, without deleting anything. The switch is read once,
when the package is imported; nothing is left in the import path otherwise.

This module imports only the standard library: setup.py runs it before anything is installed.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from types import ModuleType

MODULES: tuple[str, ...] = (
    "pooled_proxy.protocol.http1._abnf",
    "pooled_proxy.protocol.http1.parse",
    "pooled_proxy.protocol.http1.write",
    "pooled_proxy.protocol.http1.connection",
    "pooled_proxy.protocol.request_checks",
    "pooled_proxy.protocol.h2_server",
    "pooled_proxy.headers",
    "pooled_proxy.routing",
)

COMPILE_SWITCH = "POOLED_PROXY_COMPILE"  # read by the build (setup.py, build_backend.py)
PURE_SWITCH = "POOLED_PROXY_PURE"


def _on(switch: str) -> bool:
    return os.environ.get(switch, "") not in ("", "0")


def compile_requested() -> bool:
    return _on(COMPILE_SWITCH)


def source_paths() -> list[str]:
    """The modules' source files, relative to the repository root."""
    return [name.replace(".", "/") + ".py" for name in MODULES]


def pure_requested() -> bool:
    return _on(PURE_SWITCH)


class PureSourceFinder(importlib.abc.MetaPathFinder):
    """Finds the ``.py`` file of a module of ``MODULES``, ahead of the extension module that
    the standard path finder would prefer."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MODULES or path is None:
            return None
        filename = fullname.rpartition(".")[2] + ".py"
        for folder in path:
            candidate = os.path.join(folder, filename)
            if os.path.isfile(candidate):
                return importlib.util.spec_from_file_location(fullname, candidate)
        return None


def install_pure_switch() -> None:
    """Put the finder first on the import path when ``POOLED_PROXY_PURE`` asks for it."""
    if pure_requested() and not any(isinstance(f, PureSourceFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, PureSourceFinder())


def is_compiled(module: ModuleType) -> bool:
    return isinstance(getattr(module, "__loader__", None), importlib.machinery.ExtensionFileLoader)


def compiled_modules() -> list[str]:
    """The modules of ``MODULES`` this process runs compiled (each imported if it was not)."""
    return [name for name in MODULES if is_compiled(importlib.import_module(name))]


def codec() -> str:
    """``compiled``, ``pure``, or ``mixed`` (some compiled: a partial in-place build)."""
    compiled = compiled_modules()
    if not compiled:
        return "pure"
    return "compiled" if len(compiled) == len(MODULES) else "mixed"


def h11_library() -> str:
    from ._h11 import ACCELERATED  # (it reads the pure switch from here)

    return "h11-mypyc" if ACCELERATED else "h11"


def describe() -> str:
    """The build that runs, for ``--version`` and the start-up log."""
    name = codec()
    return f"{'pure-Python' if name == 'pure' else name} codec, {h11_library()}"
