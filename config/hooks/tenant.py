"""A tenant header the upstream can trust: ``X-Tenant`` is the first label of the host name
the client asked for (``acme.example.com`` -> ``acme``), and whatever ``X-Tenant`` the client
sent itself is dropped, so no client can claim another tenant's name.
"""

from __future__ import annotations

from pooled_proxy.hooks import Request


def add_tenant_header(request: Request) -> None:
    name = request.host.rpartition(":")[0] or request.host  # without the port
    tenant = name.split(".", 1)[0] if "." in name else "default"
    request.headers.set("x-tenant", tenant)  # replaces any the client sent
