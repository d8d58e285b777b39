"""Pure routing and header rewriting."""

from __future__ import annotations

import email.utils
import time

from hypothesis import given
from hypothesis import strategies as st

from pooled_proxy.config import RouteConfig
from pooled_proxy.headers import (
    client_response_headers,
    format_http_date,
    h1_response_to_h2,
    h2_request_to_h1,
    keep_alive_timeout,
    upstream_request_headers,
)
from pooled_proxy.routing import Router, normalize_host, rewrite_target

ROUTES = (
    RouteConfig(upstream="api", host="api.localhost", path_prefix="/v1"),
    RouteConfig(upstream="wild", host="*.example.com"),
    RouteConfig(upstream="static", path_prefix="/static/", strip_prefix=True),
    RouteConfig(upstream="default"),
)


def route_of(host: bytes, path: bytes) -> str | None:
    route = Router(ROUTES).match(host, path)
    return route.upstream if route else None


def test_first_match_wins_by_host_and_path():
    assert route_of(b"api.localhost:8080", b"/v1/users") == "api"
    assert route_of(b"API.localhost", b"/v1") == "api"
    assert route_of(b"api.localhost", b"/v1x") == "default"  # segment boundary
    assert route_of(b"a.example.com", b"/anything") == "wild"
    assert route_of(b"a.b.example.com", b"/") == "wild"
    assert route_of(b"example.com", b"/") == "default"  # the wildcard is not the apex
    assert route_of(b"other", b"/static/app.js") == "static"
    assert Router(ROUTES[:1]).match(b"other", b"/v1") is None


def test_normalize_host_strips_port_and_keeps_ipv6_brackets():
    assert normalize_host(b"Example.COM:443") == "example.com"
    assert normalize_host(b"[::1]:8080") == "[::1]"


def test_strip_prefix_rewrites_the_target():
    route = ROUTES[2]
    assert rewrite_target(route, b"/static/app.js?v=1") == b"/app.js?v=1"
    assert rewrite_target(route, b"/static/") == b"/"
    assert rewrite_target(ROUTES[0], b"/v1/x") == b"/v1/x"


def test_request_headers_strip_hop_by_hop_and_add_forwarding():
    headers = [
        (b"connection", b"close, x-private"),
        (b"x-private", b"1"),
        (b"upgrade", b"h2c"),
        (b"proxy-connection", b"keep-alive"),
        (b"transfer-encoding", b"chunked"),
        (b"x-forwarded-for", b"1.2.3.4"),
        (b"x-forwarded-proto", b"https"),  # spoofed: replaced
        (b"via", b"1.0 edge"),
        (b"accept", b"*/*"),
    ]
    out = upstream_request_headers(
        headers, host=b"h", client_ip=b"127.0.0.1", scheme=b"http", protocol=b"2"
    )
    assert out == [
        (b"host", b"h"),
        (b"accept", b"*/*"),
        (b"x-forwarded-for", b"1.2.3.4, 127.0.0.1"),
        (b"x-forwarded-proto", b"http"),
        (b"x-forwarded-host", b"h"),
        (b"via", b"1.0 edge, 2 pooled-proxy"),
    ]


def test_response_headers_strip_hop_by_hop_and_append_via():
    out = client_response_headers(
        [(b"keep-alive", b"timeout=5"), (b"connection", b"keep-alive"), (b"x", b"1")],
        protocol=b"1.1",
    )
    assert out == [(b"x", b"1"), (b"via", b"1.1 pooled-proxy")]


def test_a_response_without_date_gets_one_from_the_clock_given():
    out = client_response_headers([(b"x", b"1")], protocol=b"1.1", date=lambda: b"D")
    assert out == [(b"x", b"1"), (b"date", b"D"), (b"via", b"1.1 pooled-proxy")]
    dated = [(b"date", b"Sun, 06 Nov 1994 08:49:37 GMT")]
    assert client_response_headers(dated, protocol=b"1.1", date=lambda: b"D")[:1] == dated


def test_http_dates_are_imf_fixdate():
    for second in (0, 784111777, 951782400, 1700000000, 4102444799, int(time.time())):
        assert format_http_date(second) == email.utils.formatdate(second, usegmt=True).encode()


def test_keep_alive_timeout_parsing():
    assert keep_alive_timeout([(b"keep-alive", b"timeout=5, max=100")]) == 5.0
    assert keep_alive_timeout([(b"keep-alive", b"max=100")]) is None
    assert keep_alive_timeout([(b"keep-alive", b"timeout=abc")]) is None
    assert keep_alive_timeout([]) is None


def test_h2_cookie_crumbs_are_joined_and_pseudo_headers_split():
    pseudo, headers = h2_request_to_h1(
        [(b":method", b"GET"), (b":authority", b"a"), (b"cookie", b"a=1"), (b"cookie", b"b=2")]
    )
    assert pseudo == {b":method": b"GET", b":authority": b"a"}
    assert headers == [(b"cookie", b"a=1; b=2")]


def test_h1_response_to_h2_drops_connection_specific_headers():
    assert h1_response_to_h2(200, [(b"Connection", b"close"), (b"X-A", b"1")]) == [
        (b":status", b"200"),
        (b"x-a", b"1"),
    ]


@given(
    st.lists(
        st.tuples(
            st.sampled_from([b"connection", b"keep-alive", b"te", b"x-a", b"x-b", b"accept"]),
            st.sampled_from([b"x-a", b"close", b"1", b"x-b, x-a"]),
        )
    )
)
def test_no_hop_by_hop_header_ever_reaches_the_upstream(headers):
    named = {
        token.strip()
        for name, value in headers
        if name == b"connection"
        for token in value.split(b",")
    }
    out = upstream_request_headers(
        headers, host=b"h", client_ip=b"c", scheme=b"http", protocol=b"1.1"
    )
    names = {name for name, _ in out}
    assert not names & ({b"connection", b"keep-alive", b"te"} | named)
