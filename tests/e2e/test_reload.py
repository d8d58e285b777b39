"""Config reload: ``Proxy.reload`` in-process on real sockets, then SIGHUP and ``--watch`` on
the real daemon as a subprocess."""

from __future__ import annotations

import signal
from dataclasses import replace
from functools import partial
from pathlib import Path

import h11
import trio

from pooled_proxy.config import Config, parse_config
from pooled_proxy.daemon.demo_upstream import DemoUpstream
from pooled_proxy.daemon.reload import watch_file
from tests.support.daemon import DaemonConfig, running_daemon
from tests.support.helpers import H11Client, start_proxy


def routes(*names: str) -> list[dict[str, object]]:
    """``/<name>/...`` -> upstream ``name``, prefix stripped."""
    return [{"path_prefix": f"/{n}/", "upstream": n, "strip_prefix": True} for n in names]


def config_of(upstreams: dict[str, int], **kwargs: object) -> Config:
    daemon_config = DaemonConfig(upstreams=upstreams, **kwargs)  # type: ignore[arg-type]
    return parse_config(daemon_config.to_toml())


async def two_upstreams(nursery: trio.Nursery) -> tuple[DemoUpstream, int, DemoUpstream, int]:
    a, b = DemoUpstream(event_interval=0.05), DemoUpstream(event_interval=0.05)
    return a, await nursery.start(a.serve), b, await nursery.start(b.serve)


async def wait_for(predicate) -> None:  # type: ignore[no-untyped-def]
    while not predicate():
        await trio.sleep(0.005)


# -- Proxy.reload, in-process ------------------------------------------------------------------


async def test_reload_adds_a_route_for_new_requests_and_keeps_existing_pools(nursery):
    a, a_port, b, b_port = await two_upstreams(nursery)
    running = await start_proxy(nursery, config_of({"a": a_port}, routes=routes("a")))
    with trio.fail_after(5):
        async with await H11Client.connect(running.port) as client:
            assert (await client.request("GET", "/a/echo")).status == 200
            assert (await client.request("GET", "/b/echo")).status == 404  # no route yet
            group_a = running.proxy.forwarder.upstreams["a"]

            summary = running.proxy.reload(
                config_of({"a": a_port, "b": b_port}, routes=routes("a", "b"))
            )
            # The same keep-alive client connection sees the new route at once.
            reply = await client.request("GET", "/b/echo")
            assert reply.status == 200 and reply.json()["path"] == "/echo"
            assert (await client.request("GET", "/a/echo")).status == 200
    assert (summary.kept, summary.added, summary.removed) == (("a",), ("b",), ())
    assert running.proxy.forwarder.upstreams["a"] is group_a
    # Upstream a's pooled connection carried over the reload: one TCP connection for both.
    assert a.stats.connections_opened == 1 and a.stats.requests == 2
    assert b.stats.requests == 1


async def test_removed_upstream_finishes_its_sse_stream_then_its_pool_closes(nursery):
    _a, a_port, b, b_port = await two_upstreams(nursery)
    running = await start_proxy(
        nursery, config_of({"a": a_port, "b": b_port}, routes=routes("a", "b"))
    )
    with trio.fail_after(5):
        async with await H11Client.connect(running.port) as idle_user, \
                await H11Client.connect(running.port) as sse:  # fmt: skip
            await sse.send(
                h11.Request(method="GET", target="/b/events?count=10", headers=[("host", "x")]),
                h11.EndOfMessage(),
            )
            assert (await sse.next_event()).status_code == 200
            assert b"id: 1\n" in (await sse.next_event()).data
            assert (await idle_user.request("GET", "/b/echo")).status == 200  # leaves one idle
            assert b.stats.connections_open == 2

            summary = running.proxy.reload(config_of({"a": a_port}, routes=routes("a")))
            assert summary.removed == ("b",)
            # b's idle pooled connection is closed at once; the SSE stream carries on.
            await wait_for(lambda: b.stats.connections_open == 1)
            body = b""
            while not isinstance(event := await sse.next_event(), h11.EndOfMessage):
                body += event.data
            assert [f"id: {n}\n".encode() in body for n in range(2, 11)] == [True] * 9
            # ... and its connection closes when the stream ends instead of going back idle.
            await wait_for(lambda: b.stats.connections_open == 0)
            assert (await idle_user.request("GET", "/b/echo")).status == 404
            assert (await idle_user.request("GET", "/a/echo")).status == 200


async def test_changed_upstream_gets_new_pools_and_restart_only_keys_are_kept(nursery):
    a, a_port, _, _ = await two_upstreams(nursery)
    running = await start_proxy(nursery, config_of({"a": a_port}, routes=routes("a")))
    proxy = running.proxy
    listening_on = proxy.server.listen
    with trio.fail_after(5):
        async with await H11Client.connect(running.port) as client:
            assert (await client.request("GET", "/a/echo")).status == 200
            old_group = proxy.forwarder.upstreams["a"]
            await wait_for(lambda: old_group.pools[0].statistics().idle == 1)
            moved = config_of({"a": a_port}, routes=routes("a"), server={"listen": ["127.0.0.1:1"]})
            new_config = _with_upstream_key(moved, "a", "max_idle", 7)
            summary = proxy.reload(new_config)
            assert summary.replaced == ("a",) and summary.needs_restart == ("server.listen",)
            assert proxy.server.listen == listening_on  # the running sockets stay
            assert proxy.forwarder.upstreams["a"] is not old_group
            # The old pool's idle connection is closed at once.
            assert old_group.pools[0].statistics().closed == {"drain": 1}
            await wait_for(lambda: a.stats.connections_open == 0)
            assert (await client.request("GET", "/a/echo")).status == 200
    assert a.stats.connections_opened == 2  # a new pool, a new connection


def _with_upstream_key(config: Config, name: str, key: str, value: object) -> Config:
    from dataclasses import replace
    from types import MappingProxyType

    upstreams = dict(config.upstreams)
    upstreams[name] = replace(upstreams[name], **{key: value})
    return replace(config, upstreams=MappingProxyType(upstreams))


# -- the real daemon: SIGHUP -------------------------------------------------------------------


async def test_sighup_adds_a_route_live_and_a_bad_file_keeps_the_old_config(nursery, tmp_path):
    a, a_port, _b, b_port = await two_upstreams(nursery)
    config = DaemonConfig(upstreams={"a": a_port}, routes=routes("a"))
    async with running_daemon(nursery, tmp_path, config) as daemon:
        with trio.fail_after(10):
            async with await H11Client.connect(daemon.port) as client:
                assert (await client.request("GET", "/a/echo")).status == 200
                assert (await client.request("GET", "/b/echo")).status == 404

                # A bad file: every problem logged with file and line, the old config stays.
                daemon.config_path.write_text(
                    DaemonConfig(upstreams={"a": a_port}, routes=routes("a", "nope")).to_toml()
                )
                mark = len(daemon.lines)
                daemon.send_signal(signal.SIGHUP)
                await daemon.wait_for_line("reload failed: .* has 1 problem", after=mark)
                problem = await daemon.wait_for_line(r"proxy\.toml:(\d+): routes\[1\]\.upstream",
                                                     after=mark)  # fmt: skip
                line = int(problem[1])
                assert 'upstream = "nope"' in daemon.config_path.read_text().splitlines()[line - 1]
                assert (await client.request("GET", "/a/echo")).status == 200

                good = DaemonConfig(upstreams={"a": a_port, "b": b_port}, routes=routes("a", "b"))
                daemon.config_path.write_text(good.to_toml())
                mark = len(daemon.lines)
                daemon.send_signal(signal.SIGHUP)
                await daemon.wait_for_line(r"config reloaded \(SIGHUP\)", after=mark)
                # The keep-alive connection opened before the reload keeps working and sees
                # the new route.
                assert (await client.request("GET", "/b/echo")).status == 200
                assert (await client.request("GET", "/a/echo")).status == 200
            daemon.send_signal(signal.SIGTERM)
            assert await daemon.wait() == 0
    assert a.stats.connections_opened == 1  # a's pool survived both reloads
    assert daemon.has_line("upstreams kept: a; upstreams added: b")


# -- the real daemon: --watch ------------------------------------------------------------------


async def test_a_save_right_after_the_watch_started_is_a_change(nursery, tmp_path: Path):
    # The daemon says it serves once the watch has started; a save made then, before the
    # watch's thread had first looked at the file, used to become the file it compared with.
    path = tmp_path / "proxy.toml"
    path.write_text("before\n")
    changed = trio.Event()

    async def on_change() -> None:
        changed.set()

    await nursery.start(partial(watch_file, str(path), on_change, interval=0.01))
    path.write_text("after the start\n")
    with trio.fail_after(10):
        await changed.wait()


async def test_watch_reloads_when_the_file_changes(nursery, tmp_path: Path):
    _a, a_port, _b, b_port = await two_upstreams(nursery)
    config = DaemonConfig(upstreams={"a": a_port}, routes=routes("a"))
    async with running_daemon(nursery, tmp_path, config, "--watch") as daemon:
        with trio.fail_after(10):
            async with await H11Client.connect(daemon.port) as client:
                assert (await client.request("GET", "/b/echo")).status == 404
                mark = len(daemon.lines)
                good = DaemonConfig(upstreams={"a": a_port, "b": b_port}, routes=routes("a", "b"))
                daemon.config_path.write_text(good.to_toml())
                await daemon.wait_for_line(r"config reloaded \(file changed\)", after=mark)
                assert (await client.request("GET", "/b/echo")).status == 200

                # A save that breaks the file is reported and changes nothing.
                mark = len(daemon.lines)
                daemon.config_path.write_text(good.to_toml().replace('"3s"', '"3 seconds"'))
                await daemon.wait_for_line(r"proxy\.toml:\d+: server\.drain_timeout", after=mark)
                assert (await client.request("GET", "/b/echo")).status == 200
            daemon.send_signal(signal.SIGTERM)
            assert await daemon.wait() == 0


class PeerCloseUpstream:
    """Answers every request with 200 and counts the connections the proxy closes."""

    def __init__(self) -> None:
        self.closed_by_proxy = 0

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        async with stream:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    if not data:
                        self.closed_by_proxy += 1
                        return
                    conn.receive_data(data)
                elif isinstance(event, h11.EndOfMessage):
                    await stream.send_all(
                        conn.send(h11.Response(status_code=200, headers=[("content-length", "0")]))
                        + conn.send(h11.EndOfMessage())
                    )
                    conn.start_next_cycle()


async def test_the_reaper_of_a_pool_a_reload_adds_closes_its_idle_connections(
    nursery, autojump_clock
):
    upstream = PeerCloseUpstream()
    port = await nursery.start(upstream.serve)
    running = await start_proxy(nursery, config_of({"a": port}, routes=routes("a")))
    added = config_of({"a": port, "late": port}, routes=routes("a", "late"))
    late = replace(added.upstreams["late"], idle_timeout=30.0)
    running.proxy.reload(replace(added, upstreams={**added.upstreams, "late": late}))
    async with await H11Client.connect(running.port) as client:
        assert (await client.request("GET", "/late/x")).status == 200
    await trio.sleep(29.0)
    pool = running.proxy.forwarder.upstreams["late"].pools[0]
    assert upstream.closed_by_proxy == 0 and pool.statistics().idle == 1
    await trio.sleep(2.0)
    assert upstream.closed_by_proxy == 1  # seen on the wire: the proxy closed it at 30 s
    assert pool.statistics().closed == {"idle_timeout": 1}
