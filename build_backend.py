"""The PEP 517 build backend: setuptools', plus the compiler's requirements when a compiled
build is asked for (POOLED_PROXY_COMPILE=1, see pooled_proxy/_compiled.py and setup.py). A
plain build requires only setuptools: ``pip install .`` works without mypy or a C compiler."""

from __future__ import annotations

import os
import runpy
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # the other hooks are setuptools' own

_COMPILED = runpy.run_path(os.path.join(os.path.dirname(__file__), "pooled_proxy", "_compiled.py"))

# mypyc (part of mypy, the version `make lint` pins) and what it reads to type the compiled
# modules: the HTTP/1.1 library they call.
COMPILE_REQUIRES = ["mypy==2.4.1", "h11>=0.16"]

_Settings = dict[str, str | list[str]] | None


@contextmanager
def _not_compiling() -> Iterator[None]:
    switch = _COMPILED["COMPILE_SWITCH"]
    saved = os.environ.pop(switch, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[switch] = saved


def _with_compiler(hook: Callable[[_Settings], list[str]], settings: _Settings) -> list[str]:
    if not _COMPILED["compile_requested"]():
        return hook(settings)
    # setuptools runs setup.py to collect its requirements, before mypy is there to import:
    # that run leaves the extensions out.
    with _not_compiling():
        return hook(settings) + COMPILE_REQUIRES


def get_requires_for_build_wheel(config_settings: _Settings = None) -> list[str]:
    return _with_compiler(_setuptools.get_requires_for_build_wheel, config_settings)


def get_requires_for_build_editable(config_settings: _Settings = None) -> list[str]:
    return _with_compiler(_setuptools.get_requires_for_build_editable, config_settings)
