"""Python hooks per route: the types a hook sees and returns, and helpers for common cases.

A hook takes a :class:`Request` and returns ``None`` (go on to the next hook, then to the
upstream) or a :class:`Response` (answer the client with it; the upstream is not contacted).
An ``async def`` may wait for something (a lookup in another service) and runs under the
route's ``hook_timeout``; a plain ``def`` cannot wait, so it needs no timer and costs less::

    from pooled_proxy.hooks import Request, Response, check_bearer_token

    async def require_token(request: Request) -> Response | None:
        return check_bearer_token(request, await known_tokens())

    def add_tenant_header(request: Request) -> None:
        request.headers.set("x-tenant", request.host.split(".")[0])

and a route names them: ``hooks = ["myhooks:require_token", "myhooks:add_tenant_header"]``.

A hook may change the request head (method, target, host, header fields), send it to another
configured upstream (``request.upstream = "canary"``), and register a callback that may change
the response head before it goes to the client (:meth:`Request.on_response`). Bodies stream
past hooks untouched: no hook sees or holds one.

This module is the stable API: its public names keep their meaning across releases. Only
what the proxy itself frames is out of a hook's reach (:data:`MANAGED_FIELDS`), so that the
client's side and the upstream's side can never disagree on where a message ends.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Awaitable, Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Final

from .exchange import RequestHead
from .protocol.abnf import AUTHORITY, FIELD_VALUE, ORIGIN_FORM, TOKEN

__all__ = [
    "MANAGED_FIELDS",
    "HeaderFields",
    "Hook",
    "Request",
    "Response",
    "ResponseCallback",
    "ResponseHead",
    "add_request_header",
    "add_response_header",
    "bearer_token",
    "check_bearer_token",
    "cookie",
    "redirect",
    "remove_request_headers",
    "remove_response_headers",
]

# Fields that frame a message or belong to one hop (and Host, which is ``Request.host``): the
# proxy writes them itself. A hook that sets, adds or removes one gets a ValueError. Every other
# change is checked against the grammar the front ends check requests with (protocol/abnf.py),
# so a request head that passed the request validation (``RequestHead.validated``) stays one.
MANAGED_FIELDS: Final = frozenset({
    "connection", "content-length", "expect", "host", "keep-alive", "proxy-connection", "te",
    "trailer", "transfer-encoding", "upgrade",
})  # fmt: skip
# Statuses that say the response has no body: a hook may not turn one into another status, or
# another into one, because the body (or its absence) is the upstream's.
_BODYLESS_STATUSES = frozenset({204, 205, 304})
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# The client's framing depends on these methods (a HEAD response has no body; CONNECT makes a
# tunnel), so a hook may not change a method to or from one of them.
_FRAMING_METHODS = frozenset({"HEAD", "CONNECT"})

_TOKEN = re.compile(TOKEN)
_FIELD_VALUE = re.compile(FIELD_VALUE)
_ORIGIN_FORM = re.compile(ORIGIN_FORM)
_AUTHORITY = re.compile(AUTHORITY)


def _field_name(name: str) -> bytes:
    raw = name.lower().encode("latin-1", "replace")
    if not _TOKEN.fullmatch(raw):
        raise ValueError(f"invalid header field name {name!r}")
    if name.lower() in MANAGED_FIELDS:
        why = "use request.host" if name.lower() == "host" else "the proxy sets it itself"
        raise ValueError(f"header field {name!r} cannot be changed by a hook: {why}")
    return raw


def _field_value(name: str, value: str) -> bytes:
    try:
        raw = value.strip(" \t").encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError(f"value of header field {name!r} is not ISO-8859-1 text") from None
    if not _FIELD_VALUE.fullmatch(raw):
        raise ValueError(f"value of header field {name!r} has a control character")
    return raw


class HeaderFields:
    """The header fields of a request or response head, in order.

    Names are case-insensitive (kept lower-case); values are ``str`` (ISO-8859-1, as HTTP
    defines them). A name may appear several times: :meth:`get` gives the first value,
    :meth:`get_all` every one. Changing a field in :data:`MANAGED_FIELDS` raises ValueError,
    as does a name that is not a token or a value with a control character.
    """

    __slots__ = ("_fields",)

    def __init__(self, fields: list[tuple[bytes, bytes]]) -> None:
        self._fields = fields

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value of field ``name``, or ``default`` when there is none."""
        key = name.lower().encode("latin-1", "replace")
        for field_name, value in self._fields:
            if field_name == key:
                return value.decode("latin-1")
        return default

    def get_all(self, name: str) -> list[str]:
        """Every value of field ``name``, in order."""
        key = name.lower().encode("latin-1", "replace")
        return [value.decode("latin-1") for field_name, value in self._fields if field_name == key]

    def set(self, name: str, value: str) -> None:
        """Make ``value`` the only value of ``name`` (where the first one was, else at the end)."""
        key, raw = _field_name(name), _field_value(name, value)
        fields = self._fields
        at = next((i for i, (field_name, _) in enumerate(fields) if field_name == key), None)
        if at is None:
            fields.append((key, raw))
        else:
            fields[at] = (key, raw)
            fields[at + 1 :] = [field for field in fields[at + 1 :] if field[0] != key]

    def add(self, name: str, value: str) -> None:
        """Add a field ``name: value`` after the others (a name may repeat)."""
        self._fields.append((_field_name(name), _field_value(name, value)))

    def remove(self, name: str) -> None:
        """Remove every field ``name`` (nothing happens when there is none)."""
        key = _field_name(name)
        self._fields[:] = [field for field in self._fields if field[0] != key]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __iter__(self) -> Iterator[tuple[str, str]]:
        """``(name, value)`` pairs, in order."""
        return iter([(n.decode("latin-1"), v.decode("latin-1")) for n, v in self._fields])

    def __len__(self) -> int:
        return len(self._fields)

    def __repr__(self) -> str:
        return f"HeaderFields({list(self)!r})"


class Request:
    """The request head a hook sees and may change. The proxy makes one per request of a route
    with hooks; tests of a hook make their own with the keyword arguments below.

    ``upstreams`` are the names the hook may choose from (the config's upstreams); ``upstream``
    is the route's.
    """

    __slots__ = ("_head", "_headers", "_request_id", "_response_callbacks", "_upstream",
                 "_upstreams")  # fmt: skip

    def __init__(
        self,
        *,
        method: str = "GET",
        target: str = "/",
        host: str = "localhost",
        headers: Sequence[tuple[str, str]] = (),
        scheme: str = "http",
        http_version: str = "1.1",
        client_ip: str = "127.0.0.1",
        upstream: str = "app",
        upstreams: Collection[str] = ("app",),
        request_id: str = "",
    ) -> None:
        head = RequestHead(
            method=b"GET",
            target=b"/",
            authority=b"",
            scheme=scheme.encode("ascii"),
            headers=[],
            http_version=http_version.encode("ascii"),
            client_ip=client_ip.encode("ascii"),
            has_body=False,
        )
        self._setup(head, upstream, upstreams, request_id)
        self.method, self.target, self.host = method, target, host
        for name, value in headers:
            self._headers.add(name, value)

    @classmethod
    def _for(cls, head: RequestHead, upstream: str, upstreams: Collection[str]) -> Request:
        """The view of a client's request: a copy of ``head``, so that the client's own head
        (which the front end and the access log read) stays as it came."""
        copy = object.__new__(RequestHead)
        for name in RequestHead.__slots__:  # every field, without dataclasses.replace's checks
            setattr(copy, name, getattr(head, name))
        copy.headers = list(head.headers)
        request = cls.__new__(cls)
        request._setup(copy, upstream, upstreams, "")
        return request

    def _setup(
        self, head: RequestHead, upstream: str, upstreams: Collection[str], request_id: str
    ) -> None:
        self._head = head
        self._headers = HeaderFields(head.headers)
        self._upstream = upstream
        self._upstreams = upstreams
        self._response_callbacks: list[ResponseCallback] | None = None
        self._request_id = request_id

    @property
    def method(self) -> str:
        return self._head.method.decode("latin-1")

    @method.setter
    def method(self, value: str) -> None:
        raw = value.encode("latin-1", "replace")
        if not _TOKEN.fullmatch(raw):
            raise ValueError(f"invalid method {value!r}")
        if raw != self._head.method and _FRAMING_METHODS & {value, self.method}:
            raise ValueError(f"the method cannot be changed from {self.method} to {value}")
        self._head.method = raw

    @property
    def target(self) -> str:
        """The request target: the path with its query, e.g. ``/search?q=x``."""
        return self._head.target.decode("latin-1")

    @target.setter
    def target(self, value: str) -> None:
        raw = value.encode("latin-1", "replace")
        if not _ORIGIN_FORM.fullmatch(raw):
            raise ValueError(f'a target starts with "/" and has no space or control: {value!r}')
        self._head.target = raw

    @property
    def path(self) -> str:
        """The target without its query."""
        return self._head.path.decode("latin-1")

    @path.setter
    def path(self, value: str) -> None:
        query = self.query
        self.target = f"{value}?{query}" if query else value

    @property
    def query(self) -> str:
        """The target's query, without the ``?`` ("" when there is none)."""
        return self.target.partition("?")[2]

    @query.setter
    def query(self, value: str) -> None:
        self.target = f"{self.path}?{value}" if value else self.path

    @property
    def host(self) -> str:
        """The Host header (HTTP/1.1) or ``:authority`` (HTTP/2), port included if given."""
        return self._head.authority.decode("latin-1")

    @host.setter
    def host(self, value: str) -> None:
        raw = value.encode("latin-1", "replace")
        if not _AUTHORITY.fullmatch(raw):
            raise ValueError(f"invalid host {value!r}")
        self._head.authority = raw

    @property
    def headers(self) -> HeaderFields:
        return self._headers

    @property
    def scheme(self) -> str:
        """``http`` or ``https``: how the client reached the proxy."""
        return self._head.scheme.decode("latin-1")

    @property
    def http_version(self) -> str:
        """The client's protocol: ``1.0``, ``1.1`` or ``2``."""
        return self._head.http_version.decode("latin-1")

    @property
    def client_ip(self) -> str:
        return self._head.client_ip.decode("latin-1")

    @property
    def request_id(self) -> str:
        """The request's ID, as the access log and the upstream get it ("" when off)."""
        return self._request_id

    @property
    def upstream(self) -> str:
        """The upstream the request goes to: the route's, unless a hook chose another."""
        return self._upstream

    @upstream.setter
    def upstream(self, name: str) -> None:
        if name not in self._upstreams:
            known = ", ".join(sorted(self._upstreams))
            raise ValueError(f"no upstream named {name!r} in the config (there are: {known})")
        self._upstream = name

    def on_response(self, callback: ResponseCallback) -> None:
        """Call ``callback`` with the upstream's response head before it goes to the client.

        A plain function or an ``async def``, run under the route's ``hook_timeout``. It is
        not called for an answer that a hook or the proxy itself makes (a 401 from a hook, a
        502 for a failed upstream), nor for a WebSocket switch (101).
        """
        if self._response_callbacks is None:
            self._response_callbacks = []
        self._response_callbacks.append(callback)

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.target} host={self.host!r} -> {self.upstream}>"


class ResponseHead:
    """The upstream's response head, as a response callback sees it and may change it. The
    proxy makes one per response; tests of a callback make their own with the arguments."""

    __slots__ = ("_headers", "_status", "request")

    def __init__(
        self,
        status: int = 200,
        headers: Sequence[tuple[str, str]] = (),
        request: Request | None = None,
    ) -> None:
        self._status = status
        self._headers = HeaderFields([])
        for name, value in headers:
            self._headers.add(name, value)
        self.request = request if request is not None else Request()  # the request it answers

    @classmethod
    def _for(cls, status: int, fields: list[tuple[bytes, bytes]], request: Request) -> ResponseHead:
        """The view of a response on its way: ``fields`` are changed in place."""
        head = cls.__new__(cls)
        head._status, head._headers, head.request = status, HeaderFields(fields), request
        return head

    @property
    def status(self) -> int:
        return self._status

    @status.setter
    def status(self, value: int) -> None:
        if type(value) is not int or not 200 <= value <= 599:
            raise ValueError(f"a response status is from 200 to 599, got {value!r}")
        if value != self._status and _BODYLESS_STATUSES & {value, self._status}:
            raise ValueError(f"the status cannot be changed from {self._status} to {value}")
        self._status = value

    @property
    def headers(self) -> HeaderFields:
        return self._headers

    def __repr__(self) -> str:
        return f"<ResponseHead {self.status} for {self.request!r}>"


@dataclass(frozen=True, slots=True)
class Response:
    """An answer a hook gives in place of the upstream's: a short response, sent whole.

    The proxy adds ``Date``, ``Content-Length`` and ``Content-Type`` (``content_type``); a
    ``str`` body is sent as UTF-8.
    """

    status: int
    body: bytes | str = b""
    headers: Sequence[tuple[str, str]] = ()
    content_type: str = "text/plain; charset=utf-8"

    def __post_init__(self) -> None:
        if type(self.status) is not int or not 200 <= self.status <= 599:
            raise ValueError(f"a hook answers with a status from 200 to 599, got {self.status!r}")
        if self.body and self.status in _BODYLESS_STATUSES:
            raise ValueError(f"a {self.status} response has no body")
        for name, value in self.headers:
            if _field_name(name) == b"content-type":
                raise ValueError("a Response takes its Content-Type as content_type=")
            _field_value(name, value)
        _field_value("content-type", self.content_type)

    def _head(self) -> tuple[list[tuple[bytes, bytes]], bytes]:
        """The fields the proxy sends (its own first) and the body's bytes."""
        body = self.body.encode() if isinstance(self.body, str) else self.body
        fields = [(b"content-type", self.content_type.encode("latin-1"))] if body else []
        fields.append((b"content-length", b"%d" % len(body)))
        fields += [(_field_name(name), _field_value(name, value)) for name, value in self.headers]
        return fields, body


Hook = Callable[[Request], Awaitable[Response | None]] | Callable[[Request], Response | None]
"""What a route's ``hooks`` name: ``async def hook(request: Request) -> Response | None``, or
the same as a plain ``def`` (no timer: it cannot wait)."""

ResponseCallback = Callable[[ResponseHead], Awaitable[None] | None]
"""What :meth:`Request.on_response` takes: a function or ``async def`` of a ResponseHead."""


# ------------------------------------------------------------------------------------ helpers


def bearer_token(request: Request) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` field, or None."""
    scheme, _, token = (request.headers.get("authorization") or "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def check_bearer_token(
    request: Request, tokens: Collection[str], *, realm: str = "pooled-proxy"
) -> Response | None:
    """None when the request carries one of ``tokens`` as its bearer token, else the 401 to
    answer with (RFC 6750: ``WWW-Authenticate: Bearer``, with ``error="invalid_token"`` when
    a token was given but is not one of them). Tokens compare in constant time."""
    given = bearer_token(request)
    if given is not None:
        offered = given.encode()
        # Every token is compared, so the time taken says nothing of which one nearly matched.
        matches = [hmac.compare_digest(offered, token.encode()) for token in tokens]
        if any(matches):
            return None
    challenge = f'Bearer realm="{realm}"'
    if given is not None:
        challenge += ', error="invalid_token"'
    body = "401 Unauthorized: a valid bearer token is required\n"
    return Response(401, body, headers=[("www-authenticate", challenge)])


def redirect(location: str, status: int = 302) -> Response:
    """A redirect to ``location`` (301, 302, 303, 307 or 308)."""
    if status not in _REDIRECT_STATUSES:
        raise ValueError(f"a redirect status is 301, 302, 303, 307 or 308, got {status!r}")
    return Response(status, f"redirecting to {location}\n", headers=[("location", location)])


def cookie(request: Request, name: str) -> str | None:
    """The value of cookie ``name`` in the request's ``Cookie`` fields, or None."""
    for field in request.headers.get_all("cookie"):
        for pair in field.split(";"):
            key, equals, value = pair.strip().partition("=")
            if equals and key == name:
                return value.strip('"')
    return None


def add_request_header(name: str, value: str) -> Hook:
    """A hook that adds the field ``name: value`` to every request of its route."""
    _field_value(name, value)
    _field_name(name)

    def hook(request: Request) -> None:
        request.headers.add(name, value)

    return hook


def remove_request_headers(*names: str) -> Hook:
    """A hook that removes the fields ``names`` from every request of its route (before they
    reach the upstream: e.g. a client's own ``X-User`` that only the proxy may set)."""
    for name in names:
        _field_name(name)

    def hook(request: Request) -> None:
        for name in names:
            request.headers.remove(name)

    return hook


def add_response_header(name: str, value: str) -> Hook:
    """A hook that adds ``name: value`` to every upstream response of its route."""
    _field_value(name, value)
    _field_name(name)

    def add(response: ResponseHead) -> None:
        response.headers.add(name, value)

    def hook(request: Request) -> None:
        request.on_response(add)

    return hook


def remove_response_headers(*names: str) -> Hook:
    """A hook that removes the fields ``names`` from every upstream response of its route
    (e.g. ``Server`` or ``X-Powered-By``, which tell an attacker what runs behind)."""
    for name in names:
        _field_name(name)

    def remove(response: ResponseHead) -> None:
        for name in names:
            response.headers.remove(name)

    def hook(request: Request) -> None:
        request.on_response(remove)

    return hook
