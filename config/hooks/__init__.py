"""Example hooks for pooled-proxy (config/hooks.toml names them as ``hooks.MODULE:FUNCTION``).

Each module is one use: API-key authentication (api_key.py), a tenant header set by the proxy
(tenant.py), canary routing by cookie (canary.py). Copy one next to your config and edit it.
"""
