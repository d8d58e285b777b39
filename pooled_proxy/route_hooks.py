"""The routes' Python hooks: imported at each config load, run for each request of their route.

Loading happens where the TLS files are loaded: at start (``check`` too) and on each reload,
in the reload's thread. Each ``"module:function"`` is imported from the Python path, then
from the config file's folder (appended to the path, so no file there can shadow a module of
the standard library). A module is imported again when its file changed since this module
imported it, so a reload picks up an edited hook and an unchanged module keeps its state;
what the modules themselves import is not imported again. Anything wrong (no such module,
an exception while importing it, no such function, not an ``async def`` of one argument) is
a ``ConfigError`` on the line of that hook in its route.

Running: a route's hooks run in order, each ``async def`` under ``hook_timeout`` (one cancel
scope whose deadline moves on per hook; a chain of plain functions, which cannot wait, runs
without one); the first that returns a Response answers the client. A hook
that raises is a :class:`HookError` (500), one that runs too long a :class:`HookTimeout`
(504): both are the operator's code failing, answered and logged by the forwarder as the
proxy's own errors, never counted against an upstream.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import traceback
from collections.abc import Awaitable, Collection, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from types import MappingProxyType, ModuleType
from typing import cast

import trio

from .config import Config, RouteConfig, problem_after_load
from .errors import ConfigError, ConfigProblem, HookError, HookTimeout
from .exchange import Exchange, ExchangeRecord, RequestHead, ResponseSink
from .headers import Headers, http_date
from .hooks import Hook, Request, Response, ResponseCallback, ResponseHead
from .request_ids import choose_request_id


@dataclass(frozen=True, slots=True)
class LoadedHook:
    name: str  # "module:function", as the config names it
    function: Hook
    waits: bool  # an async def (else a plain function, which returns at once)


@dataclass(frozen=True, slots=True)
class HookChain:
    """The hooks of one route, in order, and how long each may run."""

    hooks: tuple[LoadedHook, ...]
    timeout: float
    waits: bool  # some hook is an async def: the chain runs under a timer


RouteHooks = Mapping[RouteConfig, HookChain]  # the chain of each route that has hooks


# ------------------------------------------------------------------------------------- loading

# Module name -> (its file, st_mtime_ns, st_size) when this module last imported it.
_imported: dict[str, tuple[str, int, int] | None] = {}


def _signature(path: str | None) -> tuple[str, int, int] | None:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (path, st.st_mtime_ns, st.st_size)


def _import(name: str) -> ModuleType:
    """``name``, imported anew if its file changed since we imported it. A module someone else
    imported first (an installed package) is taken as it is."""
    module = sys.modules.get(name)
    if module is not None and (
        name not in _imported or _imported[name] == _signature(getattr(module, "__file__", None))
    ):
        return module
    # A fresh module object: hooks still running from the old one keep the old globals.
    old = sys.modules.pop(name, None)
    importlib.invalidate_caches()  # a module file created since the last look is found
    try:
        module = importlib.import_module(name)
    except BaseException:
        if old is not None:
            sys.modules[name] = old
        raise
    _imported[name] = _signature(getattr(module, "__file__", None))
    return module


def _where(exc: BaseException) -> str:
    """Where in the user's code an exception came from: `` (at FILE:LINE)``, or ``""``."""
    if isinstance(exc, SyntaxError):
        return ""  # its message already says "(FILE, line N)"
    frames = [frame for frame in traceback.extract_tb(exc.__traceback__)
              if "importlib" not in frame.filename]  # fmt: skip
    return f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""


def _resolve(spec: str, folder: str | None) -> LoadedHook:
    """The hook named ``spec``; ValueError says why it cannot be one."""
    module_name, _, attribute = spec.partition(":")
    try:
        module = _import(module_name)
    except Exception as exc:  # noqa: BLE001 (the user's module may raise anything: a config error)
        missing = isinstance(exc, ModuleNotFoundError) and (
            exc.name == module_name or module_name.startswith(f"{exc.name}.")
        )
        if missing:
            where = "on the Python path" + (f" or in {folder}" if folder else "")
            raise ValueError(f'cannot import module "{module_name}": not found {where}') from None
        raise ValueError(f'cannot import module "{module_name}": {exc!r}{_where(exc)}') from None
    target: object = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ValueError(f'module "{module_name}" has no "{attribute}"') from None
    if not callable(target):
        kind = type(target).__name__
        raise ValueError(f'"{spec}" is a {kind}: a hook is a function, "async def hook(request)"')
    try:
        inspect.signature(target).bind(None)
    except TypeError:
        raise ValueError(f'"{spec}" must take one argument, the request') from None
    except ValueError:
        pass  # no signature to read (a builtin): let it be tried
    # An async def, or an object whose __call__ is one.
    waits = inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(target.__call__)
    return LoadedHook(spec, target, waits)


def load_route_hooks(config: Config) -> RouteHooks:
    """Import every route's hooks; a ``ConfigError`` names each one that cannot be used."""
    if not any(route.hooks for route in config.routes):
        return MappingProxyType({})
    folder = str(config.path.parent.resolve()) if config.path is not None else None
    if folder is not None and folder not in sys.path:
        sys.path.append(folder)
    problems: list[ConfigProblem] = []
    chains: dict[RouteConfig, HookChain] = {}
    for i, route in enumerate(config.routes):
        hooks = []
        for j, spec in enumerate(route.hooks):
            try:
                hooks.append(_resolve(spec, folder))
            except ValueError as exc:
                problems.append(problem_after_load(config, ("routes", i, "hooks", j), str(exc)))
        if route.hooks:
            timeout = route.hook_timeout or config.server.hook_timeout
            chains[route] = HookChain(tuple(hooks), timeout, any(hook.waits for hook in hooks))
    if problems:
        raise ConfigError(problems)
    return MappingProxyType(chains)


# ------------------------------------------------------------------------------------- running


def _checked(hook: LoadedHook, result: object) -> Response | None:
    if result is None or isinstance(result, Response):
        return result
    if inspect.isawaitable(result):
        close = getattr(result, "close", None)
        if close is not None:
            close()  # never awaited: no "was never awaited" warning
        why = "an awaitable (make it an async def: only those are awaited)"
    else:
        why = f"a {type(result).__name__}"
    raise HookError(f"hook {hook.name} returned {why}, not None or a Response")


async def _run_chain(chain: HookChain, request: Request) -> Response | None:
    # A timer only for a chain with an async def: a plain function cannot be interrupted.
    scope = trio.CancelScope() if chain.waits else None
    current = chain.hooks[0]
    with scope or nullcontext():
        for current in chain.hooks:
            try:
                result = current.function(request)
                if scope is not None and current.waits:
                    scope.deadline = trio.current_time() + chain.timeout
                    result = await cast(Awaitable[Response | None], result)
            except Exception as exc:
                raise HookError(f"hook {current.name} raised {exc!r}") from exc
            if result is not None:
                return _checked(current, result)
        return None
    raise HookTimeout(f"hook {current.name} ran past hook_timeout ({chain.timeout:g}s)")


async def _answer(exchange: Exchange, response: Response, request_id_header: bytes) -> None:
    """Send a hook's own answer to the client (with the request ID, as every answer has)."""
    fields, body = response._head()
    fields.insert(0, (b"date", http_date()))
    record = exchange.record
    if record.request_id:
        fields.append((request_id_header, record.request_id))
    record.status = response.status
    if exchange.head.method == b"HEAD":
        await exchange.sink.send_head(response.status, fields, end=True)
        return
    await exchange.sink.send_head(response.status, fields, body=body, end=True)


def _with_request_id(fields: Headers, request_id_header: bytes) -> bytes:
    """Choose the request's ID now, so that the hooks see it, and carry it in the request's
    fields as the one field of its name: the upstream then gets that same ID."""
    client_value = next((value for name, value in fields if name == request_id_header), None)
    request_id = choose_request_id(client_value)
    fields[:] = [field for field in fields if field[0] != request_id_header]
    fields.append((request_id_header, request_id))
    return request_id


async def run_hooks(
    chain: HookChain,
    exchange: Exchange,
    upstream: str,
    upstreams: Collection[str],
    request_id_header: bytes,
) -> tuple[RequestHead, str, ResponseSink] | None:
    """Run a route's hooks on ``exchange``: None when one of them answered the client, else
    the request head to send, the upstream to send it to and the sink for the response (the
    client's, or one that runs the response callbacks first). ``request_id_header``: the
    request-ID field's name, b"" when request IDs are off."""
    request = Request._for(exchange.head, upstream, upstreams)
    record = exchange.record
    if request_id_header:
        record.request_id = _with_request_id(request._head.headers, request_id_header)
        request._request_id = record.request_id.decode("ascii")
    response = await _run_chain(chain, request)
    if response is not None:
        await _answer(exchange, response, request_id_header)
        return None
    callbacks = request._response_callbacks
    sink = exchange.sink
    if callbacks:
        sink = _HookedSink(sink, request, callbacks, chain.timeout, record)
    return request._head, request.upstream, sink


class _HookedSink:
    """The client's sink, with the response callbacks run on the response head first."""

    __slots__ = ("_callbacks", "_record", "_request", "_sink", "_timeout")

    def __init__(
        self,
        sink: ResponseSink,
        request: Request,
        callbacks: list[ResponseCallback],
        timeout: float,
        record: ExchangeRecord,
    ) -> None:
        self._sink = sink
        self._request = request
        self._callbacks = callbacks
        self._timeout = timeout
        self._record = record

    @property
    def head_sent(self) -> bool:
        return self._sink.head_sent

    async def send_informational(self, status: int, headers: Headers) -> None:
        await self._sink.send_informational(status, headers)

    async def send_head(
        self, status: int, headers: Headers, *, body: bytes = b"", end: bool = False
    ) -> None:
        response = ResponseHead._for(status, headers, self._request)
        for callback in self._callbacks:
            name = getattr(callback, "__qualname__", repr(callback))
            try:
                result = callback(response)
                if isinstance(result, Awaitable):
                    with trio.move_on_after(self._timeout) as scope:
                        await result
                    if scope.cancelled_caught:
                        raise HookTimeout(
                            f"response callback {name} ran past hook_timeout ({self._timeout:g}s)"
                        )
            except HookTimeout:
                raise
            except Exception as exc:
                raise HookError(f"response callback {name} raised {exc!r}") from exc
        self._record.status = response.status
        await self._sink.send_head(response.status, headers, body=body, end=end)

    async def send_data(self, data: bytes) -> None:
        await self._sink.send_data(data)

    async def end(self, trailers: Headers | None = None) -> None:
        await self._sink.end(trailers)

    async def reset(self, error_code: int = 0x2) -> None:
        await self._sink.reset(error_code)
