"""The HTTP/1.1 protocol library, chosen in one place: h11, or its compiled fork when installed.

``h11_mypyc`` (PyPI ``h11-mypyc``; ``pip install 'pooled-proxy[fast]'``) is h11 compiled with
mypyc: the same API and state machine, about three times faster at parsing and serializing,
which is most of the proxy's own work per HTTP/1.1 request. It is an optional accelerator:
without it the pure-Python ``h11`` is used, and ``POOLED_PROXY_H11=h11`` in the environment
forces that fallback, as does ``POOLED_PROXY_PURE=1`` (the whole pure build, ``_compiled.py``);
the test suite runs both ways. Every module of the package takes h11
from here, so one process never mixes the two: their event classes and exceptions are
distinct types. (The demo upstream keeps plain h11: it plays a third-party server.)
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ._compiled import pure_requested

if TYPE_CHECKING or os.environ.get("POOLED_PROXY_H11") == "h11" or pure_requested():
    import h11
else:
    try:
        import h11_mypyc as h11
    except ImportError:
        import h11

__all__ = ["ACCELERATED", "h11"]

ACCELERATED: bool = h11.__name__ == "h11_mypyc"
