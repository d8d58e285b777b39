"""Python hooks per route, on real sockets: what the upstream and the client see when a hook
changes the request, answers by itself, fails, runs too long, picks another upstream or
changes the response head; hooks imported at start and on reload; import failures as config
errors with file and line; the examples in config/hooks/."""

from __future__ import annotations

import itertools
import json
import sys
import textwrap
from pathlib import Path

import h11
import httpx
import pytest
import trio
import trio.testing

from pooled_proxy.config import Config, load_config
from pooled_proxy.daemon.cli import main
from pooled_proxy.daemon.demo_upstream import DemoUpstream
from pooled_proxy.daemon.reload import Reloader
from pooled_proxy.exchange import ExchangeObserver, ExchangeRecord
from pooled_proxy.hooks import (
    HeaderFields,
    Request,
    Response,
    ResponseHead,
    bearer_token,
    check_bearer_token,
    cookie,
    redirect,
)
from pooled_proxy.route_hooks import load_route_hooks
from tests.support.helpers import HOST, H11Client, RunningProxy, start_proxy

ROOT = Path(__file__).resolve().parents[2]
_modules = itertools.count()


@pytest.fixture(autouse=True)
def _own_sys_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading hooks appends the config's folder to sys.path: undone after each test."""
    monkeypatch.setattr(sys, "path", list(sys.path))


def write_module(folder: Path, source: str) -> str:
    """A hook module in ``folder``, under a name no other test uses (modules are cached)."""
    name = f"userhooks_{next(_modules)}"
    (folder / f"{name}.py").write_text(textwrap.dedent(source))
    return name


def route(hooks: list[str], prefix: str = "/", extra: str = "") -> str:
    """A ``[[routes]]`` table to upstream "app" through ``hooks``."""
    return (f'[[routes]]\nupstream = "app"\npath_prefix = "{prefix}"\n'
            f"hooks = {json.dumps(hooks)}\n{extra}\n")  # fmt: skip


def write_config(
    folder: Path,
    port: int,
    *routes: str,
    server: str = "",
    upstreams: dict[str, int] | None = None,
) -> Path:
    """A config with upstream "app" on ``port`` (and ``upstreams``) and ``routes``."""
    extra = "".join(
        f'[upstreams.{name}]\nservers = ["{HOST}:{p}"]\n' for name, p in (upstreams or {}).items()
    )
    path = folder / "proxy.toml"
    path.write_text(
        f'[server]\nlisten = ["{HOST}:0"]\n{server}\n'
        f'[upstreams.app]\nservers = ["{HOST}:{port}"]\n{extra}\n' + "".join(routes)
    )
    return path


async def hooked_proxy(
    nursery: trio.Nursery,
    tmp_path: Path,
    port: int,
    source: str,
    *functions: str,
    observers: tuple[ExchangeObserver, ...] = (),
) -> RunningProxy:
    """A proxy whose one route runs ``functions`` of a module made of ``source``."""
    module = write_module(tmp_path, source)
    hooks = [f"{module}:{function}" for function in functions]
    path = write_config(tmp_path, port, route(hooks))
    return await start_proxy(nursery, load_config(path), observers=observers)


def echoed(reply_body: bytes) -> dict[str, object]:
    info: dict[str, object] = json.loads(reply_body)
    info["headers"] = dict(info["headers"])  # type: ignore[call-overload]
    return info


# -- the request head -------------------------------------------------------------------------

CHANGE_REQUEST = """
    from pooled_proxy.hooks import Request

    async def rewrite(request: Request) -> None:
        request.headers.set("x-tenant", "acme")
        request.headers.remove("x-secret")
        request.headers.add("x-hops", request.headers.get("x-hops", "0") + "+1")
        request.headers.set("x-id-seen-by-hook", request.request_id or "none")
        request.path = "/echo"

    def method(request: Request) -> None:  # a plain function: it cannot wait
        request.method = "PUT"
"""


async def test_hooks_change_the_request_head_the_upstream_sees(nursery, demo_upstream, tmp_path):
    upstream, port = demo_upstream
    records: list[ExchangeRecord] = []
    proxy = await hooked_proxy(nursery, tmp_path, port, CHANGE_REQUEST, "rewrite", "method",
                               observers=(records.append,))  # fmt: skip
    with trio.fail_after(5):
        async with await H11Client.connect(proxy.port) as client:
            reply = await client.request(
                "GET",
                "/elsewhere?q=1",
                headers=[("x-tenant", "evil"), ("x-secret", "s"), ("x-hops", "0")],
            )
            no_id = await client.request("GET", "/x")
            with_id = await client.request("GET", "/x", headers=[("x-request-id", "abc-123")])
    assert reply.status == 200
    seen = echoed(reply.body)
    assert (seen["method"], seen["path"]) == ("PUT", "/echo?q=1")
    headers = seen["headers"]
    assert headers["x-tenant"] == "acme" and "x-secret" not in headers  # type: ignore[operator]
    assert headers["x-hops"] == "0+1"  # type: ignore[index]
    assert upstream.stats.requests == 3
    # The hook sees the request's ID: the one the upstream gets and the client gets back.
    for reply, expected in ((no_id, None), (with_id, "abc-123")):
        seen_id = echoed(reply.body)["headers"]["x-id-seen-by-hook"]  # type: ignore[index]
        assert seen_id == echoed(reply.body)["headers"]["x-request-id"]  # type: ignore[index]
        assert seen_id.encode() == reply.headers[b"x-request-id"] != b"none"
        assert expected is None or seen_id == expected
    # The client's own request is left as it came, for the access log (and the front end).
    record = records[0]
    assert (b"x-secret", b"s") in record.request_headers and record.method == b"GET"


async def test_http2_clients_go_through_the_hooks_too(nursery, demo_upstream, tmp_path):
    _, port = demo_upstream
    proxy = await hooked_proxy(nursery, tmp_path, port, CHANGE_REQUEST, "rewrite")
    with trio.fail_after(5):
        async with httpx.AsyncClient(http1=False, http2=True) as client:
            response = await client.get(f"{proxy.url}/x", headers={"x-secret": "s"})
    assert response.http_version == "HTTP/2" and response.status_code == 200
    headers = dict(response.json()["headers"])
    assert headers["x-tenant"] == "acme" and "x-secret" not in headers


async def test_a_request_body_streams_past_the_hooks(nursery, demo_upstream, tmp_path):
    _, port = demo_upstream
    proxy = await hooked_proxy(nursery, tmp_path, port, CHANGE_REQUEST, "rewrite")
    body = b"x" * 300_000
    with trio.fail_after(5):
        async with await H11Client.connect(proxy.port) as client:
            reply = await client.request("POST", "/upload", body=body)
    assert reply.status == 200 and reply.body == body


async def test_strip_prefix_applies_to_the_target_a_hook_leaves(nursery, demo_upstream, tmp_path):
    _, port = demo_upstream
    source = """
        async def to_other(request):
            if request.path == "/api/out":
                request.target = "/echo?moved"
    """
    module = write_module(tmp_path, source)
    path = write_config(
        tmp_path, port, route([f"{module}:to_other"], "/api/", "strip_prefix = true")
    )
    proxy = await start_proxy(nursery, load_config(path))
    with trio.fail_after(5):
        async with await H11Client.connect(proxy.port) as client:
            kept = await client.request("GET", "/api/echo")
            moved = await client.request("GET", "/api/out")
    assert echoed(kept.body)["path"] == "/echo"
    assert echoed(moved.body)["path"] == "/echo?moved"


# -- answers by the hook itself ---------------------------------------------------------------

AUTH = """
    from pooled_proxy.hooks import Response, check_bearer_token, redirect

    async def auth(request):
        return check_bearer_token(request, {"good-token"})

    async def never_here(request):
        raise AssertionError("a hook after one that answered ran")

    async def old_path(request):
        if request.path == "/old":
            return redirect("/new", 308)
        return None
"""


async def test_a_hook_answers_401_and_the_upstream_never_hears_of_it(
    nursery, demo_upstream, tmp_path
):
    upstream, port = demo_upstream
    proxy = await hooked_proxy(nursery, tmp_path, port, AUTH, "auth", "never_here")
    with trio.fail_after(5):
        async with await H11Client.connect(proxy.port) as client:
            missing = await client.request("GET", "/echo")
            wrong = await client.request("GET", "/echo", headers=[("authorization", "Bearer x")])
            head = await client.request("HEAD", "/echo")
    assert missing.status == 401 and b"bearer token is required" in missing.body
    assert missing.headers[b"www-authenticate"] == b'Bearer realm="pooled-proxy"'
    assert missing.headers[b"content-length"] == str(len(missing.body)).encode()
    assert b"date" in missing.headers and b"proxy-status" not in missing.headers
    assert missing.headers[b"x-request-id"] != wrong.headers[b"x-request-id"]
    assert wrong.headers[b"www-authenticate"].endswith(b'error="invalid_token"')
    assert head.status == 401 and head.body == b""
    assert upstream.stats.connections_opened == 0


async def test_a_hook_answers_a_request_whose_body_it_never_read(nursery, demo_upstream, tmp_path):
    upstream, port = demo_upstream
    proxy = await hooked_proxy(nursery, tmp_path, port, AUTH, "auth")
    with trio.fail_after(5):
        async with await H11Client.connect(proxy.port) as client:
            refused = await client.request("POST", "/echo", body=b"x" * 200_000)
        async with await H11Client.connect(proxy.port) as client:
            small = await client.request("POST", "/echo", body=b"y" * 10)
            after = await client.request("GET", "/echo")  # the connection is still usable
    assert refused.status == small.status == after.status == 401
    assert upstream.stats.connections_opened == 0


async def test_a_hook_passes_a_good_token_and_redirects(nursery, demo_upstream, tmp_path):
    upstream, port = demo_upstream
    proxy = await hooked_proxy(nursery, tmp_path, port, AUTH, "auth", "old_path")
    good = [("authorization", "Bearer good-token")]
    with trio.fail_after(5):
        async with await H11Client.connect(proxy.port) as client:
            passed = await client.request("GET", "/echo", headers=good)
            moved = await client.request("GET", "/old", headers=good)
    assert passed.status == 200 and upstream.stats.requests == 1
    assert moved.status == 308 and moved.headers[b"location"] == b"/new"
    assert upstream.stats.requests == 1


# -- failures: the operator's, never the upstream's -------------------------------------------

FAILING = """
    import trio

    cancelled = []

    async def boom(request):
        raise KeyError("no such tenant")

    async def sleepy(request):
        try:
            await trio.sleep(30)
        except trio.Cancelled:
            cancelled.append(request.path)
            raise

    async def wrong_result(request):
        return 401

    def not_awaited(request):
        return boom(request)

    async def forbidden_change(request):
        request.headers.set("content-length", "0")

    async def fine(request):
        if request.path == "/boom":
            raise RuntimeError("boom")
"""


@pytest.mark.parametrize(
    ("hook", "detail"),
    [
        ("boom", "raised KeyError('no such tenant')"),
        ("wrong_result", "returned a int, not None or a Response"),
        ("not_awaited", "returned an awaitable (make it an async def"),
        ("forbidden_change", "cannot be changed by a hook"),
    ],
)
async def test_a_failing_hook_is_a_500_hook_error_and_the_proxy_serves_on(
    nursery, demo_upstream, tmp_path, caplog, hook, detail
):
    upstream, port = demo_upstream
    module = write_module(tmp_path, FAILING)
    path = write_config(tmp_path, port, route([f"{module}:{hook}"], "/f/"),
                        route([f"{module}:fine"]))  # fmt: skip
    proxy = await start_proxy(nursery, load_config(path))
    with trio.fail_after(5):
        async with await H11Client.connect(proxy.port) as client:
            failed = await client.request("GET", "/f/echo")
            served = await client.request("GET", "/echo")  # same connection, next request
    assert failed.status == 500
    assert failed.headers[b"proxy-status"] == b"pooled-proxy; error=hook_error"
    assert detail.encode() not in failed.body  # the client learns nothing of the hook's code
    assert served.status == 200 and upstream.stats.requests == 1
    (logged,) = [r for r in caplog.records if r.name == "pooled_proxy.forward"]
    assert logged.levelname == "ERROR" and detail in logged.getMessage()
    request_id = failed.headers[b"x-request-id"].decode()
    assert f"GET /f/echo (request {request_id}): hook {module}:{hook}" in logged.getMessage()
    if hook == "boom":
        assert logged.exc_info is not None and logged.exc_info[0] is KeyError  # the traceback
    # The operator's code failed, not the upstream: passive health saw nothing.
    assert proxy.proxy.forwarder.upstreams["app"].health[0].last_failure is None


async def test_a_hook_past_hook_timeout_is_cancelled_and_answered_504(
    nursery, demo_upstream, tmp_path
):
    upstream, port = demo_upstream
    module = write_module(tmp_path, FAILING)
    path = write_config(tmp_path, port, route([f"{module}:sleepy"]), server='hook_timeout = "50ms"')
    proxy = await start_proxy(nursery, load_config(path))
    with trio.fail_after(5):
        async with await H11Client.connect(proxy.port) as client:
            started = trio.current_time()
            reply = await client.request("GET", "/slow-hook")
            took = trio.current_time() - started
    assert reply.status == 504
    assert reply.headers[b"proxy-status"] == b"pooled-proxy; error=hook_timeout"
    assert 0.05 <= took < 4  # cancelled at the deadline, not after the hook's 30 s
    assert sys.modules[module].cancelled == ["/slow-hook"]
    assert upstream.stats.connections_opened == 0


async def test_the_route_hook_timeout_wins_over_the_server_one(nursery, demo_upstream, tmp_path):
    _, port = demo_upstream
    module = write_module(tmp_path, FAILING)
    path = write_config(tmp_path, port, route([f"{module}:sleepy"], extra='hook_timeout = "20ms"'),
                        server='hook_timeout = "60s"')  # fmt: skip
    config = load_config(path)
    assert config.routes[0].hook_timeout == 0.02 and config.server.hook_timeout == 60
    proxy = await start_proxy(nursery, config)
    with trio.fail_after(5):
        async with await H11Client.connect(proxy.port) as client:
            assert (await client.request("GET", "/")).status == 504


# -- choosing another upstream -----------------------------------------------------------------


async def test_a_hook_sends_the_request_to_another_upstream(nursery, demo_upstream, tmp_path):
    main_upstream, port = demo_upstream
    canary = DemoUpstream()
    canary_port = await nursery.start(canary.serve)
    source = """
        async def pick(request):
            if request.headers.get("x-canary") == "1":
                request.upstream = "canary"

        async def unknown(request):
            request.upstream = "nope"
    """
    module = write_module(tmp_path, source)
    path = write_config(
        tmp_path, port, route([f"{module}:pick"]), upstreams={"canary": canary_port}
    )
    proxy = await start_proxy(nursery, load_config(path))
    with trio.fail_after(5):
        async with await H11Client.connect(proxy.port) as client:
            assert (await client.request("GET", "/echo", headers=[("x-canary", "1")])).status == 200
            assert (canary.stats.requests, main_upstream.stats.requests) == (1, 0)
            assert (await client.request("GET", "/echo")).status == 200
            assert (canary.stats.requests, main_upstream.stats.requests) == (1, 1)


# -- the response head -------------------------------------------------------------------------

RESPONSE = """
    import trio

    async def stamp(request):
        async def later(response):
            await trio.sleep(0)
            response.headers.set("x-upstream-status", str(response.status))
            response.headers.remove("x-echo-path")

        request.on_response(lambda response: response.headers.add("x-served-by", "hook"))
        request.on_response(later)
        if request.path == "/status/404":
            request.on_response(teapot_to_410)

    def teapot_to_410(response):
        response.status = 410

    async def bad_callback(request):
        request.on_response(lambda response: 1 / 0)

    async def slow_callback(request):
        async def slow(response):
            await trio.sleep(30)

        request.on_response(slow)
"""


@pytest.mark.parametrize("path", ["/echo", "/bytes/300000", "/status/404"])
async def test_a_response_callback_changes_the_response_head(
    nursery, demo_upstream, tmp_path, path
):
    _, port = demo_upstream
    proxy = await hooked_proxy(nursery, tmp_path, port, RESPONSE, "stamp")
    with trio.fail_after(5):
        async with await H11Client.connect(proxy.port) as client:
            reply = await client.request("GET", path)
    assert reply.headers[b"x-served-by"] == b"hook"
    assert b"x-echo-path" not in reply.headers
    if path == "/status/404":
        assert (reply.status, reply.headers[b"x-upstream-status"]) == (410, b"404")
    else:
        assert (reply.status, reply.headers[b"x-upstream-status"]) == (200, b"200")
    if path == "/bytes/300000":  # streamed: the body went by untouched
        assert len(reply.body) == 300000


async def test_a_failing_response_callback_is_a_500_and_a_slow_one_a_504(
    nursery, demo_upstream, tmp_path
):
    _, port = demo_upstream
    module = write_module(tmp_path, RESPONSE)
    routes = route([f"{module}:slow_callback"], "/slow/"), route([f"{module}:bad_callback"])
    path = write_config(tmp_path, port, *routes, server='hook_timeout = "50ms"')
    proxy = await start_proxy(nursery, load_config(path))
    with trio.fail_after(5):
        async with await H11Client.connect(proxy.port) as client:
            failed = await client.request("GET", "/echo")
            slow = await client.request("GET", "/slow/echo")
    assert failed.status == 500
    assert failed.headers[b"proxy-status"] == b"pooled-proxy; error=hook_error"
    assert slow.status == 504
    assert slow.headers[b"proxy-status"] == b"pooled-proxy; error=hook_timeout"
    # The upstream answered well: passive health saw a success, not a failure.
    assert proxy.proxy.forwarder.upstreams["app"].health[0].last_failure is None


# -- loading: at start, on reload, and what fails ----------------------------------------------


async def test_a_reload_imports_the_changed_hook(nursery, demo_upstream, tmp_path):
    _, port = demo_upstream
    module = write_module(
        tmp_path, 'async def tag(request):\n    request.headers.set("x-v", "1")\n'
    )
    path = write_config(tmp_path, port, route([f"{module}:tag"]))
    proxy = await start_proxy(nursery, load_config(path))
    reloader = Reloader(proxy.proxy, str(path))
    with trio.fail_after(5):
        async with await H11Client.connect(proxy.port) as client:
            first = echoed((await client.request("GET", "/echo")).body)
            # An unchanged module is not imported again by a reload.
            assert await reloader.reload("test")
            same = echoed((await client.request("GET", "/echo")).body)
            (tmp_path / f"{module}.py").write_text(
                'async def tag(request):\n    request.headers.set("x-v", "two")\n'
            )
            assert await reloader.reload("test")
            second = echoed((await client.request("GET", "/echo")).body)
            # A module that no longer imports: the reload fails, the running hook stays.
            (tmp_path / f"{module}.py").write_text("async def tag(request):\n    return (\n")
            assert not await reloader.reload("test")
            kept = echoed((await client.request("GET", "/echo")).body)
    assert first["headers"]["x-v"] == same["headers"]["x-v"] == "1"  # type: ignore[index]
    assert second["headers"]["x-v"] == kept["headers"]["x-v"] == "two"  # type: ignore[index]


BROKEN = {
    "missing_module": ("", "nosuchmodule_xyz:hook",
                       'cannot import module "nosuchmodule_xyz": not found on the Python path'),
    "syntax_error": ("async def hook(request):\n    return (\n", None, "SyntaxError("),
    "raises_on_import": ("x = 1\nraise RuntimeError('no key file')\n", None,
                         "RuntimeError('no key file') (at {file}:2)"),
    "missing_function": ("async def other(request): pass\n", None, 'has no "hook"'),
    "not_callable": ("hook = 3\n", None, 'is a int: a hook is a function, "async def hook'),
    "no_argument": ("async def hook(): pass\n", None, "must take one argument, the request"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_hook_that_cannot_be_used_is_a_config_error_at_its_line(tmp_path, capsys, case):
    source, spec, message = BROKEN[case]
    module = write_module(tmp_path, source)
    spec = spec or f"{module}:hook"
    good = write_module(tmp_path, "async def ok(request): pass\n") + ":ok"
    path = write_config(tmp_path, 9, route([good, spec]))  # the route's second hook
    assert main(["check", "-c", str(path)]) == 2
    _out, err = capsys.readouterr()
    (line,) = err.splitlines()
    number = path.read_text().splitlines().index(f'hooks = ["{good}", "{spec}"]') + 1
    assert line.startswith(f"{path}:{number}: routes[0].hooks[1]: "), line
    assert message.format(file=tmp_path / f"{module}.py") in line, line
    if case == "missing_module":
        assert str(tmp_path) in line  # where else it looked


def test_config_keys_of_hooks_are_checked_where_they_are_written(tmp_path, capsys):
    path = tmp_path / "proxy.toml"
    path.write_text(
        '[server]\nhook_timeout = "soon"\n'
        '[upstreams.app]\nservers = ["127.0.0.1:9"]\n'
        '[[routes]]\nupstream = "app"\nhooks = ["ok:hook", "not a spec"]\n'
        '[[routes]]\nupstream = "app"\nhook_timeout = "1s"\n'
        '[[routes]]\nupstream = "app"\nhooks = "m:f"\n'
    )
    assert main(["check", "-c", str(path)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        (
            f'{path}:2: server.hook_timeout: bad duration "soon": expected a number with a unit '
            "ms, s, m or h"
        ),
        (
            f'{path}:7: routes[0].hooks[1]: expected "module:function", such as '
            '"myhooks:require_token"; got "not a spec"'
        ),
        f"{path}:10: routes[1].hook_timeout: has no effect: this route has no hooks",
        f'{path}:13: routes[2].hooks: expected an array of "module:function" strings, got string',
    ]


def test_hooks_are_imported_once_at_start_not_for_each_load(tmp_path):
    module = write_module(tmp_path, "loads = []\nloads.append(1)\nasync def hook(request): pass\n")
    config = load_config(write_config(tmp_path, 9, route([f"{module}:hook"])))
    first, second = load_route_hooks(config), load_route_hooks(config)  # check, then run
    assert sys.modules[module].loads == [1]
    assert first[config.routes[0]] == second[config.routes[0]]
    assert first[config.routes[0]].timeout == 1.0  # the default hook_timeout


def test_a_config_without_hooks_loads_no_module_and_adds_no_path(tmp_path):
    path = tmp_path / "proxy.toml"
    path.write_text('[upstreams.app]\nservers = ["127.0.0.1:9"]\n')
    assert load_route_hooks(load_config(path)) == {}
    assert str(tmp_path) not in sys.path


# -- the API, without a proxy ------------------------------------------------------------------


async def test_the_api_can_be_used_to_test_a_hook_without_a_proxy():
    request = Request(method="POST", target="/a?b=1", host="shop.example.com",
                      headers=[("Authorization", "Bearer t0"), ("Cookie", "a=1; canary=1")])  # fmt: skip
    assert (request.path, request.query, request.host) == ("/a", "b=1", "shop.example.com")
    assert bearer_token(request) == "t0" and cookie(request, "canary") == "1"
    assert await _passes(request, {"t0"}) and not await _passes(request, {"t1"})
    request.query = ""
    assert request.target == "/a"
    response = ResponseHead(200, [("Server", "x")], request)
    response.headers.remove("server")
    assert list(response.headers) == []


async def _passes(request: Request, tokens: set[str]) -> bool:
    return check_bearer_token(request, tokens) is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.headers.set("Transfer-Encoding", "chunked"), "cannot be changed by a hook"),
        (lambda r: r.headers.add("host", "x"), "use request.host"),
        (lambda r: r.headers.add("bad name", "x"), "invalid header field name"),
        (lambda r: r.headers.add("x-a", "one\r\ntwo"), "has a control character"),
        (lambda r: r.headers.add("x-a", "ünïcødé ✓"), "is not ISO-8859-1 text"),
        (lambda r: setattr(r, "method", "HEAD"), "cannot be changed from GET to HEAD"),
        (lambda r: setattr(r, "target", "http://x/"), 'a target starts with "/"'),
        (lambda r: setattr(r, "host", "a b"), "invalid host"),
        (lambda r: setattr(r, "upstream", "nope"), "no upstream named 'nope'"),
    ],
)
def test_what_a_hook_may_not_change_raises_a_clear_value_error(change, message):
    with pytest.raises(ValueError, match=message):
        change(Request(upstreams=("app", "canary")))


def test_responses_and_their_statuses_are_checked():
    with pytest.raises(ValueError, match="from 200 to 599"):
        Response(101)
    with pytest.raises(ValueError, match="a 304 response has no body"):
        Response(304, "x")
    with pytest.raises(ValueError, match="content_type="):
        Response(200, "x", headers=[("Content-Type", "text/html")])
    with pytest.raises(ValueError, match="redirect status"):
        redirect("/x", 200)
    response = ResponseHead(304)
    with pytest.raises(ValueError, match="from 304 to 200"):
        response.status = 200
    assert isinstance(response.headers, HeaderFields)


# -- the examples in config/hooks/ ---------------------------------------------------------------


@pytest.fixture
async def example_proxy(nursery, monkeypatch, demo_upstream):
    """config/hooks.toml with its upstreams on demo servers: api, web and web_canary."""
    monkeypatch.setenv("API_KEYS", "key-1, key-2")
    for name in ("hooks", "hooks.api_key", "hooks.tenant", "hooks.canary"):
        monkeypatch.delitem(sys.modules, name, raising=False)  # imported with this environment
    config = load_config(ROOT / "config" / "hooks.toml")
    upstreams = {"api": demo_upstream}
    for name in ("web", "web_canary"):
        upstream = DemoUpstream()
        upstreams[name] = (upstream, await nursery.start(upstream.serve))
    local = _local(config, {name: port for name, (_, port) in upstreams.items()})
    proxy = await start_proxy(nursery, local)
    return proxy, {name: upstream for name, (upstream, _) in upstreams.items()}


def _local(config: Config, ports: dict[str, int]) -> Config:
    from dataclasses import replace

    from pooled_proxy.config import ServerAddress

    upstreams = {
        name: replace(upstream, servers=(ServerAddress(HOST, ports[name]),))
        for name, upstream in config.upstreams.items()
    }
    server = replace(config.server, listen=(ServerAddress(HOST, 0),))
    return replace(config, server=server, upstreams=upstreams)


async def test_example_api_key_auth_and_tenant_header(example_proxy):
    proxy, upstreams = example_proxy
    tenant = [("host", "acme.example.com"), ("x-tenant", "evil")]
    with trio.fail_after(5):
        async with await H11Client.connect(proxy.port) as client:
            refused = await client.request("GET", "/api/echo")
            wrong = await client.request("GET", "/api/echo", headers=[("x-api-key", "key-3")])
            assert upstreams["api"].stats.requests == 0
            by_header = await _get(client, "/api/echo", [("x-api-key", "key-2"), *tenant])
            by_bearer = await client.request(
                "GET", "/api/echo", headers=[("authorization", "Bearer key-1")]
            )
    assert refused.status == wrong.status == 401
    assert by_header.status == by_bearer.status == 200
    seen = echoed(by_header.body)["headers"]
    assert "x-api-key" not in seen and seen["x-tenant"] == "acme"  # type: ignore[index,operator]
    assert "authorization" not in echoed(by_bearer.body)["headers"]  # type: ignore[operator]
    assert upstreams["api"].stats.requests == 2


async def _get(client: H11Client, target: str, headers: list[tuple[str, str]]):  # type: ignore[no-untyped-def]
    """A request whose Host is among ``headers``."""
    await client.send(h11.Request(method="GET", target=target, headers=headers), h11.EndOfMessage())
    return await client.read_reply()


async def test_example_canary_routing_by_cookie(example_proxy):
    proxy, upstreams = example_proxy
    with trio.fail_after(5):
        async with await H11Client.connect(proxy.port) as client:
            opted_in = await client.request("GET", "/echo", headers=[("cookie", "canary=1")])
            assert (upstreams["web_canary"].stats.requests, upstreams["web"].stats.requests) == (
                1,
                0,
            )
            stable = await client.request("GET", "/echo", headers=[("cookie", "a=b; canary=0")])
            assert (upstreams["web_canary"].stats.requests, upstreams["web"].stats.requests) == (
                1,
                1,
            )
            new_user = await client.request("GET", "/echo")
    assert b"set-cookie" not in opted_in.headers and b"set-cookie" not in stable.headers
    # A new user is assigned a side, told which by a cookie, and was served by that side.
    assigned = new_user.headers[b"set-cookie"]
    assert assigned.startswith((b"canary=0; Path=/;", b"canary=1; Path=/;"))
    side = "web_canary" if assigned.startswith(b"canary=1") else "web"
    assert upstreams[side].stats.requests == 2
