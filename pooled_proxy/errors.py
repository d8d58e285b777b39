"""The one exception tree of pooled-proxy.

Every error the proxy can answer a client with is a ``ProxyError`` that knows its HTTP status,
its RFC 9209 ``Proxy-Status`` error type and whose fault it is (``blame``), so the mapping to a
response is one function (:func:`pooled_proxy.answers.error_response`), not a chain of
``except`` clauses spread through the code.

Blame is one of three sides. ``"client"``: the request (or the client's connection) was at
fault; answered 4xx, never counted against an upstream. ``"upstream"``: the upstream server
failed (refused or timed-out connect, reset, invalid response, response-header or read
timeout); only these feed passive health. ``"proxy"``: the proxy's own limits, state or
failure (a full pool queue, a drain, an internal error).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Blame = Literal["client", "proxy", "upstream"]


class ProxyError(Exception):
    """Base of everything pooled-proxy raises on purpose."""

    status: int = 502
    proxy_status: str = "proxy_internal_error"
    reason: str = "proxy error"
    blame: Blame = "proxy"
    # The detail goes in the answer's Proxy-Status (RFC 9209 ``details``); not when it names
    # what a client has no business knowing (an upstream's address): the logs have it.
    public_detail: bool = True
    # The HTTP/2 error code a client's stream is reset with when the response had already
    # started (RFC 9113 INTERNAL_ERROR: the response is incomplete).
    reset_code: int = 0x2

    def __init__(self, detail: str = "", *, client_detail: str | None = None) -> None:
        super().__init__(detail or self.reason)
        self.detail = detail or self.reason
        # What the answer's details say: ``detail``, or where that is not public, only what
        # the raiser gives here without the address (a TLS verification failure's cause).
        if client_detail is None:
            client_detail = self.detail if self.public_detail else ""
        self.client_detail = client_detail


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One problem in a config file, printed as ``FILE:LINE: key: message``."""

    path: str
    line: int
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.key}: {self.message}"


class ConfigError(ProxyError):
    """A config that cannot be used; carries every problem found, not just the first."""

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class ClientError(ProxyError):
    """The client sent something we will not forward (answered 4xx, usually with a close)."""

    status = 400
    proxy_status = "http_request_error"
    reason = "bad request"
    blame = "client"

    def __init__(self, detail: str = "", *, status: int | None = None) -> None:
        super().__init__(detail)
        if status is not None:
            self.status = status


class RequestHeaderTimeout(ClientError):
    status = 408
    reason = "request header timeout"


class RequestBodyTimeout(ClientError):
    status = 408
    proxy_status = "http_request_error"
    reason = "request body timeout"


class BodyTooLarge(ClientError):
    status = 413
    proxy_status = "http_request_error"
    reason = "request body too large"


class NoRoute(ProxyError):
    status = 404
    proxy_status = "destination_not_found"
    reason = "no route for this host and path"
    blame = "client"


class ProxyInternalError(ProxyError):
    """The proxy failed on its own: e.g. it built an upstream request that its HTTP/1.1
    writer refuses, although the request passed validation. Answered 500, logged as an
    error, never counted against the upstream server."""

    status = 500
    proxy_status = "proxy_internal_error"
    reason = "proxy internal error"
    public_detail = False


class HookError(ProxyInternalError):
    """A route's Python hook raised, or returned something other than None or a Response.
    The operator's code failed: answered 500, logged with its traceback, and never counted
    against the upstream (no upstream was contacted for it)."""

    proxy_status = "hook_error"
    reason = "a hook of this route failed"


class HookTimeout(HookError):
    """A route's hook ran past its ``hook_timeout`` and was cancelled."""

    status = 504
    proxy_status = "hook_timeout"
    reason = "a hook of this route took too long"


class UpstreamError(ProxyError):
    """The upstream server failed: passive health counts it (see forward.py)."""

    status = 502
    blame = "upstream"
    public_detail = False  # the details name the server's address


class UpstreamConnectError(UpstreamError):
    proxy_status = "connection_refused"
    reason = "upstream refused the connection"


class UpstreamTlsError(UpstreamConnectError):
    """The TLS handshake with the upstream failed (no common version or cipher, not TLS)."""

    proxy_status = "tls_protocol_error"
    reason = "TLS handshake with the upstream failed"


class UpstreamTlsCertificateError(UpstreamTlsError):
    """The upstream's certificate did not verify: unknown CA, wrong name, expired."""

    proxy_status = "tls_certificate_error"
    reason = "the upstream's TLS certificate was not accepted"


class UpstreamTlsAlert(UpstreamTlsError):
    """The upstream ended the handshake with a TLS alert (it refused our client certificate,
    or its absence, say)."""

    proxy_status = "tls_alert_received"
    reason = "the upstream refused the TLS handshake"


class UpstreamProtocolError(UpstreamError):
    proxy_status = "http_protocol_error"
    reason = "upstream sent an invalid response"


class UpstreamClosed(UpstreamError):
    """The upstream closed or reset the connection before a complete response.

    When it happens on a reused connection before any response byte arrived, the exchange
    may be retried once on a fresh connection (the keep-alive race).
    """

    proxy_status = "http_response_incomplete"
    reason = "upstream closed the connection before a complete response"


class StreamNotProcessed(UpstreamClosed):
    """An HTTP/2 upstream did not process the request: its stream is above the last stream id
    of the server's GOAWAY, the server refused it (REFUSED_STREAM), or the connection went
    away before it was sent. RFC 9113 section 8.7: it may be sent again, whatever its method."""

    reason = "upstream did not process the request"


class UpstreamStreamReset(UpstreamError):
    """An HTTP/2 upstream reset the exchange's stream (RST_STREAM) before the response was
    complete, with an error code other than REFUSED_STREAM (that is ``StreamNotProcessed``).

    Not the keep-alive race: the connection is alive and the server may have processed the
    request, so it is never sent again. Before the response head the client gets a 502 whose
    Proxy-Status names the code; after it, its stream is reset with ``reset_code``.
    """

    proxy_status = "http_response_incomplete"
    reason = "upstream reset the stream"

    def __init__(self, detail: str, *, error_code: int, code_name: str) -> None:
        super().__init__(detail, client_detail=f"upstream reset the stream ({code_name})")
        self.error_code = error_code
        if error_code in RELAYED_RESET_CODES:
            self.reset_code = error_code


# The upstream's reset codes a client's stream is reset with as they came: INTERNAL_ERROR,
# CANCEL and ENHANCE_YOUR_CALM say something about the exchange (gRPC clients read CANCELLED
# and RESOURCE_EXHAUSTED from the last two). The others are INTERNAL_ERROR to the client:
# PROTOCOL_ERROR, FLOW_CONTROL_ERROR and the like describe the proxy's connection to the
# upstream, not the client's; REFUSED_STREAM after a response began would invite the client
# to replay a request that was processed; NO_ERROR would hide that the response is cut short.
RELAYED_RESET_CODES = frozenset({0x2, 0x8, 0xB})


class UpstreamTimeout(UpstreamError):
    status = 504
    proxy_status = "http_response_timeout"
    reason = "upstream timed out"


class ConnectTimeout(UpstreamTimeout):
    proxy_status = "connection_timeout"
    reason = "timed out connecting to upstream"


class ResponseHeaderTimeout(UpstreamTimeout):
    proxy_status = "http_response_timeout"
    reason = "upstream sent no response head in time"


class ReadTimeout(UpstreamTimeout):
    proxy_status = "http_response_timeout"
    reason = "upstream stopped sending the response body"


class DeadlineExceeded(ProxyError):
    """The deadline the client gave its request (gRPC's ``grpc-timeout``) passed. The client
    chose it: it says nothing about the upstream's health."""

    status = 504
    proxy_status = "http_response_timeout"
    reason = "the request's deadline passed"
    blame = "client"


class UpstreamUnavailable(UpstreamError):
    """Every server of the upstream is marked down by passive health checks."""

    status = 502
    proxy_status = "destination_unavailable"
    reason = "no upstream server available"


class PoolTimeout(ProxyError):
    """The wait queue for an upstream connection is full, or the wait took too long."""

    status = 503
    proxy_status = "connection_limit_reached"
    reason = "upstream connection pool exhausted"
    public_detail = False  # the details name the server's address


class TooManyConnections(ProxyError):
    """Over ``server.max_connections`` client connections: answered 503, then closed."""

    status = 503
    proxy_status = "connection_limit_reached"
    reason = "too many client connections"


class Draining(ProxyError):
    """The proxy is shutting down and takes no new work."""

    status = 503
    proxy_status = "proxy_internal_error"
    reason = "proxy is shutting down"


class ClientDisconnected(ProxyError):
    """The client went away (or stopped reading) while we were answering; nobody to answer."""

    status = 499
    proxy_status = "client_disconnected"
    reason = "client disconnected"
    blame = "client"
