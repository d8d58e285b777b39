"""pooled-proxy: a reverse proxy on trio, h11 and h2 with bounded keep-alive upstream pools."""

from ._compiled import install_pure_switch

# Before any submodule is imported: POOLED_PROXY_PURE=1 takes the pure-Python source of the
# modules that may be compiled (_compiled.py).
install_pure_switch()

__version__ = "0.1.0"
__all__ = ["__version__"]
