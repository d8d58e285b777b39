"""The build's one dynamic part: the extension modules, compiled by mypyc only when asked for
(POOLED_PROXY_COMPILE=1); everything else is in pyproject.toml. ``build_backend.py`` adds mypy
to the build requirements in that case, so a plain build needs neither mypy nor a compiler."""

from __future__ import annotations

import os
import runpy

from setuptools import Extension, setup

# The list of modules and the switch, from the package (standard library only).
COMPILED = runpy.run_path(os.path.join(os.path.dirname(__file__), "pooled_proxy", "_compiled.py"))


def extensions() -> list[Extension]:
    if not COMPILED["compile_requested"]():
        return []
    # Asked for and impossible is an error, never a quiet pure build: the build fails here,
    # or in mypyc, or in the C compiler.
    try:
        from mypyc.build import mypycify
    except ImportError as exc:
        switch = COMPILED["COMPILE_SWITCH"]
        raise SystemExit(f"{switch}=1 needs mypy (its mypyc) in the build: {exc}") from None
    # mypyc puts the code of all the modules in one shared library, a top-level module named
    # after the group (pooled_proxy__mypyc.*.so): mypyc's own layout, which the modules' own
    # __file__ is derived from.
    compiled: list[Extension] = mypycify(COMPILED["source_paths"](), group_name="pooled_proxy")
    return compiled


setup(ext_modules=extensions())
