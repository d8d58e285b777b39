"""pooled-proxy: a reverse proxy on trio, h11 and h2 with bounded keep-alive upstream pools."""

__version__ = "0.1.0"
__all__ = ["__version__"]
