"""``server.workers = N``: a supervisor process and N worker processes sharing the port.

The supervisor listens on every listen address (port 0 becomes one real port for all
workers) but never accepts: each worker is a fresh interpreter (``python -m
pooled_proxy.daemon.worker``) that inherits the listening sockets and accepts from them, a
worker with more client connections than another leaving new ones to it first
(server/group.py). A connection waiting to be accepted is not lost when a worker dies: the
others, and the one restarted in its place, accept it.

The supervisor passes the config text it validated to each worker on its stdin, so a worker
restarted after someone broke the file still starts with the last good config; the pipe then
stays open, and a worker whose supervisor vanished (EOF) drains and exits. Workers run in
their own process group: a terminal's Ctrl-C reaches only the supervisor, which passes
signals on, so each worker sees each signal once.

- a worker that dies is restarted, with a backoff (0.1 s doubling to 5 s, reset once a
  worker has lived 10 s);
- SIGTERM/SIGINT: every worker drains; the supervisor exits 0 once all of them exited
  cleanly. A second signal is passed on (workers stop at once); workers still alive after
  ``drain_timeout`` + 5 s (or 1 s after a second signal) are killed;
- SIGHUP (or a change of the file with ``--watch``): the supervisor checks the file; a bad
  one is logged and nothing changes, a good one is passed on as SIGHUP to every worker;
- SIGUSR1 is passed on (each worker reopens its access log file); SIGUSR2 is ignored;
- under systemd (``$NOTIFY_SOCKET``), the workers report to a socket of the supervisor's,
  which tells systemd READY=1 once every worker listens.

With ``[admin]``, the supervisor serves the admin listener for the whole group: ``/metrics``
asks every worker for its registry over a socket pair of its own (a :class:`WorkerLink`; the
worker end is inherited as ``report_fd``) and sums them (metrics_group.py).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import asdict, dataclass, replace
from functools import partial

import trio

from ..config import Config, ServerAddress
from ..errors import ConfigError
from ..ops.admin import AdminServer
from ..ops.metrics_group import GroupMetrics, Report
from ..ops.status import GroupStatus, JsonObject
from ..server.group import ConnectionCounts
from ..server.listen import listening_sockets
from .lifecycle import HANDLED_SIGNALS, IGNORED_SIGNALS, REOPEN_SIGNAL
from .reload import log_problems, read_config, watch_file
from .sdnotify import ENV as NOTIFY_ENV
from .sdnotify import Notifier

LOG = logging.getLogger("pooled_proxy.workers")

WORKER_ENV = "POOLED_PROXY_WORKER"
RESTART_BACKOFF_MIN = 0.1
RESTART_BACKOFF_MAX = 5.0
STABLE_AFTER = 10.0  # a worker that lived this long resets the restart backoff
KILL_MARGIN = 5.0  # after drain_timeout, workers still alive are killed
STOP_GRACE = 1.0  # after a second signal, workers still alive are killed
EXIT_OK, EXIT_RUNTIME = 0, 1
# A worker that does not answer a metrics request in this long is reported with its last
# answer: a busy worker must not leave a hole in the group's counters (a false reset).
REPORT_TIMEOUT = 2.0
MAX_REPORT_HEADER = 64


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker is told through its environment."""

    index: int
    config_path: str
    listen: list[str]  # the supervisor's listening addresses, port 0 resolved
    tls_listen: list[str]
    report_fd: int = -1  # the worker's end of its WorkerLink, if the supervisor has [admin]
    listen_fds: tuple[int, ...] = ()  # the listening sockets of ``listen``, in its order
    tls_listen_fds: tuple[int, ...] = ()
    counts_fd: int = -1  # the group's ConnectionCounts


def _reserve(address: ServerAddress) -> list[socket.socket]:
    """Listen on every address ``address`` stands for (both families for ``*``, one missing
    on this system skipped), for the workers to inherit."""
    infos = socket.getaddrinfo(
        address.host or None, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    try:
        return listening_sockets(infos)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen on {address}: {exc.strerror}") from None


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class _LinkClosed(Exception):
    pass


async def _read_exactly(stream: trio.SocketStream, buffer: bytearray, size: int) -> bytes:
    while len(buffer) < size:
        data = await stream.receive_some(65536)
        if not data:
            raise _LinkClosed
        buffer += data
    out = bytes(buffer[:size])
    del buffer[:size]
    return out


async def _read_line(stream: trio.SocketStream, buffer: bytearray) -> bytes:
    while (end := buffer.find(b"\n")) < 0:
        if len(buffer) > MAX_REPORT_HEADER:
            raise _LinkClosed
        data = await stream.receive_some(65536)
        if not data:
            raise _LinkClosed
        buffer += data
    return await _read_exactly(stream, buffer, end + 1)


class WorkerLink:
    """The supervisor's end of a socket pair with one worker: ``SEQ NAME\n`` asks for a
    report, ``SEQ LENGTH\n`` and the report's bytes answer. Answers that come after their
    request timed out carry an old SEQ and are skipped."""

    def __init__(self, sock: socket.socket) -> None:
        self._stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        self._buffer = bytearray()
        self._seq = 0
        self._lock = trio.Lock()
        self.closed = False
        self.last_report: Report | None = None  # its last metrics, kept if it dies

    async def ask(self, name: str) -> bytes | None:
        """The worker's report ``name``; None if it did not answer within REPORT_TIMEOUT."""
        async with self._lock:
            self._seq += 1
            with trio.move_on_after(REPORT_TIMEOUT):
                try:
                    await self._stream.send_all(b"%d %s\n" % (self._seq, name.encode()))
                    while True:
                        seq, length = map(
                            int, (await _read_line(self._stream, self._buffer)).split()
                        )
                        data = await _read_exactly(self._stream, self._buffer, length)
                        if seq == self._seq:
                            return data
                except (_LinkClosed, ValueError, trio.BrokenResourceError, trio.ClosedResourceError,
                        OSError):  # fmt: skip
                    await self.aclose()
            return None

    async def aclose(self) -> None:
        self.closed = True
        await self._stream.aclose()


async def answer_supervisor(
    sock: socket.socket,
    reports: Mapping[str, Callable[[], bytes]],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The worker's end of its :class:`WorkerLink`: answer each request with the report of
    that name (empty if there is none) until the supervisor closes it."""
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    buffer = bytearray()
    task_status.started()
    async with stream:
        try:
            while True:
                seq, name = (await _read_line(stream, buffer)).split()
                make = reports.get(name.decode("ascii", "replace"))
                data = make() if make is not None else b""
                await stream.send_all(b"%s %d\n" % (seq, len(data)) + data)
        except (_LinkClosed, ValueError, trio.BrokenResourceError, trio.ClosedResourceError):
            return


class Supervisor:
    def __init__(self, config: Config, path: str, text: str, *, watch: bool) -> None:
        self.config = config
        self.path = os.path.abspath(path)
        self.text = text  # the last config text that passed the checks
        self.watch = watch
        self.workers: dict[int, trio.Process] = {}
        self.stopping = False
        self.clean = True
        self._stop_requested = trio.Event()
        self._reload_lock = trio.Lock()
        self._listen: list[str] = []
        self._tls_listen: list[str] = []
        self._sockets: dict[str, list[socket.socket]] = {"listen": [], "tls_listen": []}
        self._counts_fd = -1
        # For the reload gauges, as a proxy keeps them: the supervisor's check decides.
        self.last_reload_ok = True
        self.config_loaded_at = time.time()
        self.generation = 1  # configs accepted: the start, then each good reload
        self.links: dict[int, WorkerLink] = {}  # by worker index, with [admin] only
        self.metrics = GroupMetrics(self) if config.admin is not None else None
        self.notifier = Notifier.from_environment()
        self._worker_notify: str | None = None  # NOTIFY_SOCKET for the workers, if any

    @property
    def draining(self) -> bool:
        return self.stopping

    # -- ports --------------------------------------------------------------------------------

    def reserve(self) -> list[socket.socket]:
        """Listen on every listen address; the caller closes the sockets at exit (the
        supervisor closes them earlier when it stops, so that new connections are refused
        once the workers closed theirs)."""
        sockets: list[socket.socket] = []
        try:
            tls = self.config.server.tls
            for addresses, into, kind in (
                (self.config.server.listen, self._listen, "listen"),
                (tls.listen if tls is not None else (), self._tls_listen, "tls_listen"),
            ):
                for address in addresses:
                    for sock in _reserve(address):
                        sockets.append(sock)
                        self._sockets[kind].append(sock)
                        host, port = sock.getsockname()[:2]
                        into.append(str(ServerAddress(host, port)))
        except BaseException:
            for sock in sockets:
                sock.close()
            raise
        self._counts_fd = ConnectionCounts.create(self.config.server.workers)
        return sockets

    def _close_listeners(self) -> None:
        for socks in self._sockets.values():
            for sock in socks:
                sock.close()

    # -- workers ------------------------------------------------------------------------------

    async def _spawn(self, index: int) -> trio.Process:
        ours, theirs = socket.socketpair() if self.metrics is not None else (None, None)
        report_fd = theirs.fileno() if theirs is not None else -1
        listen_fds = tuple(sock.fileno() for sock in self._sockets["listen"])
        tls_listen_fds = tuple(sock.fileno() for sock in self._sockets["tls_listen"])
        spec = WorkerSpec(index, self.path, self._listen, self._tls_listen, report_fd,
                          listen_fds, tls_listen_fds, self._counts_fd)  # fmt: skip
        inherited = (*listen_fds, *tls_listen_fds, self._counts_fd)
        env = {**os.environ, WORKER_ENV: json.dumps(asdict(spec))}
        env.pop(NOTIFY_ENV, None)  # systemd hears the supervisor, not each worker
        if self._worker_notify is not None:
            env[NOTIFY_ENV] = self._worker_notify
        try:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "pooled_proxy.daemon.worker"],
                stdin=subprocess.PIPE,
                env=env,
                process_group=0,  # its own group: terminal signals reach the supervisor only
                pass_fds=(*inherited, report_fd) if theirs is not None else inherited,
            )
        except BaseException:
            if ours is not None:
                ours.close()
            raise
        finally:
            if theirs is not None:
                theirs.close()
        if ours is not None:
            self.links[index] = WorkerLink(ours)
        data = self.text.encode()
        assert process.stdin is not None
        try:
            await process.stdin.send_all(b"%d\n" % len(data) + data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # it died before reading: process.wait() reports how
        LOG.info("worker %d started: pid %d", index, process.pid)
        return process

    async def _run_slot(self, index: int) -> None:
        """Keep worker ``index`` running until the supervisor stops."""
        backoff = RESTART_BACKOFF_MIN
        while not self.stopping:
            started = trio.current_time()
            process = await self._spawn(index)
            self.workers[index] = process
            if self.stopping:  # the drain began while it was starting
                process.send_signal(signal.SIGTERM)
            code = await process.wait()
            del self.workers[index]
            await self._unlink(index)
            if process.stdin is not None:
                await process.stdin.aclose()
            if self.stopping:
                if code not in (0, -signal.SIGTERM):
                    self.clean = False
                LOG.info("worker %d (pid %d) exited: %s", index, process.pid, _describe(code))
                return
            if trio.current_time() - started >= STABLE_AFTER:
                backoff = RESTART_BACKOFF_MIN
            LOG.warning("worker %d (pid %d) died (%s); restarting in %.1fs",
                        index, process.pid, _describe(code), backoff)  # fmt: skip
            with trio.move_on_after(backoff):
                await self._stop_requested.wait()
            backoff = min(backoff * 2, RESTART_BACKOFF_MAX)

    async def _unlink(self, index: int) -> None:
        link = self.links.pop(index, None)
        if link is None:
            return
        if link.last_report is not None and self.metrics is not None:
            self.metrics.retire(link.last_report)
        await link.aclose()

    # -- the admin listener -------------------------------------------------------------------

    async def _report(self, index: int, link: WorkerLink, into: dict[int, Report]) -> None:
        data = await link.ask("metrics")
        if data is not None:
            try:
                link.last_report = json.loads(data)
            except ValueError:
                LOG.warning("worker %d sent a metrics report that is not JSON", index)
        if link.last_report is not None:
            into[index] = link.last_report

    async def scrape(self, accept: str) -> tuple[bytes, str]:
        """``/metrics`` for the group: every worker's report, asked for now, merged."""
        assert self.metrics is not None
        reports: dict[int, Report] = {}
        async with trio.open_nursery() as nursery:
            for index, link in list(self.links.items()):
                nursery.start_soon(self._report, index, link, reports)
        # A worker that exited meanwhile is already counted among the retired.
        live = [(str(i), reports[i]) for i in sorted(reports) if self.links.get(i) is not None
                and not self.links[i].closed]  # fmt: skip
        return self.metrics.exposition(live, accept)

    async def _status(self, index: int, link: WorkerLink, into: dict[int, JsonObject]) -> None:
        data = await link.ask("status")
        if not data:
            return  # it did not answer in time, or it is gone
        try:
            into[index] = json.loads(data)
        except ValueError:
            LOG.warning("worker %d sent a status that is not JSON", index)

    async def worker_statuses(self) -> list[tuple[int, JsonObject]]:
        """The status page's view of each worker that answers now (status.GroupStatus)."""
        statuses: dict[int, JsonObject] = {}
        async with trio.open_nursery() as nursery:
            for index, link in list(self.links.items()):
                nursery.start_soon(self._status, index, link, statuses)
        return sorted(statuses.items())

    async def unready_upstreams(self) -> list[str]:
        """For ``/readyz`` with ``ready_requires_healthy_upstreams``: the upstreams that some
        worker has no server in rotation for (each worker probes on its own)."""
        admin = self.config.admin
        if admin is None or not admin.ready_requires_healthy_upstreams:
            return []
        answers: list[bytes | None] = []

        async def ask(link: WorkerLink) -> None:
            answers.append(await link.ask("upstreams_out_of_rotation"))

        async with trio.open_nursery() as nursery:
            for link in list(self.links.values()):
                nursery.start_soon(ask, link)
        names: set[str] = set()
        for answer in answers:
            try:
                names.update(json.loads(answer) if answer else ())
            except ValueError:
                LOG.warning("a worker sent an upstreams report that is not JSON")
        return sorted(names)

    def _broadcast(self, signum: int) -> None:
        for process in list(self.workers.values()):
            try:
                process.send_signal(signum)
            except ProcessLookupError:
                pass

    async def _kill_after(self, delay: float) -> None:
        await trio.sleep(delay)
        for index, process in list(self.workers.items()):
            LOG.warning("worker %d (pid %d) still running after %gs: killing it",
                        index, process.pid, delay)  # fmt: skip
            self.clean = False
            try:
                process.kill()
            except ProcessLookupError:
                pass

    async def _ready_when_workers_are(
        self, path: str, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Receive the workers' sd_notify messages on ``path``; tell systemd READY=1 once each
        worker sent its own. The sender is known from its credentials (SO_PASSCRED), so a
        worker that reloads (and says READY=1 again) is not counted twice. Later messages
        (a reload, a restarted worker) are read and dropped: the supervisor speaks for them."""
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        with sock:
            await sock.bind(path)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            task_status.started()
            ready: set[int] = set()
            ucred = struct.calcsize("3i")  # pid, uid, gid
            while True:
                data, ancillary, _, _ = await sock.recvmsg(4096, socket.CMSG_SPACE(ucred))
                if len(ready) >= self.config.server.workers or b"READY=1" not in data.split():
                    continue
                for level, kind, value in ancillary:
                    if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS):
                        ready.add(struct.unpack("3i", value[:ucred])[0])
                if len(ready) == self.config.server.workers:
                    listen = ", ".join(f"http://{address}" for address in self._listen)
                    self.notifier.ready(f"{len(ready)} workers serving on {listen}")
                    LOG.info("every worker is serving: READY=1 sent to systemd")

    # -- signals and reload -------------------------------------------------------------------

    async def _reload(self, why: str) -> None:
        async with self._reload_lock:
            if self.stopping:
                return
            self.notifier.reloading()
            try:
                await self._check_and_pass_on(why)
            finally:
                self.notifier.ready()

    async def _check_and_pass_on(self, why: str) -> None:
        try:
            config, text, _, _ = await trio.to_thread.run_sync(read_config, self.path)
        except ConfigError as exc:
            log_problems(exc, self.path)
            self.last_reload_ok = False
            return
        except (OSError, UnicodeDecodeError) as exc:
            LOG.error("reload failed: cannot read %s: %s; keeping the running config",
                      self.path, exc)  # fmt: skip
            self.last_reload_ok = False
            return
        self.last_reload_ok = True
        self.config_loaded_at = time.time()
        self.generation += 1
        if config.server.workers != self.config.server.workers:
            LOG.warning("server.workers changed in %s: it takes effect after a restart",
                        self.path)  # fmt: skip
        workers = self.config.server.workers
        self.config = replace(config, server=replace(config.server, workers=workers))
        self.text = text
        LOG.info("%s: %s checked, reloading %d worker(s)", why, self.path, len(self.workers))
        self._broadcast(signal.SIGHUP)

    async def _watch_signals(self, signals: AsyncIterator[int], nursery: trio.Nursery) -> None:
        async for signum in signals:
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                nursery.start_soon(self._reload, name)
            elif signum == REOPEN_SIGNAL:
                LOG.info("%s: passed on to %d worker(s)", name, len(self.workers))
                self._broadcast(signum)
            elif signum in IGNORED_SIGNALS:
                LOG.info("%s: ignored (SIGHUP reloads, SIGUSR1 reopens the log files)", name)
            elif not self.stopping:
                self.stopping = True
                self._stop_requested.set()
                self.notifier.stopping()
                LOG.info("%s: draining %d worker(s)", name, len(self.workers))
                self._broadcast(signal.SIGTERM)
                self._close_listeners()
                nursery.start_soon(self._kill_after, self.config.server.drain_timeout + KILL_MARGIN)
            else:
                LOG.warning("%s again: stopping %d worker(s) now", name, len(self.workers))
                self._broadcast(signal.SIGTERM)  # a worker's second signal stops it at once
                nursery.start_soon(self._kill_after, STOP_GRACE)

    async def run(self) -> int:
        count = self.config.server.workers
        LOG.info("supervisor pid %d: %d workers on %s", os.getpid(), count,
                 ", ".join(f"http://{a}" for a in self._listen))  # fmt: skip
        with (
            trio.open_signal_receiver(*HANDLED_SIGNALS) as signals,
            tempfile.TemporaryDirectory(prefix="pooled-proxy-") as private,
        ):
            async with trio.open_nursery() as nursery:
                if self.config.admin is not None and self.metrics is not None:
                    status = GroupStatus(self)
                    await nursery.start(status.run_sampler)
                    admin = AdminServer(self, self, self.config.admin.listen, status=status)
                    try:
                        await nursery.start(admin.serve)
                    except OSError as exc:
                        LOG.error("admin: %s", exc)
                        return EXIT_RUNTIME
                nursery.start_soon(self._watch_signals, signals, nursery)
                if self.notifier.enabled:
                    self._worker_notify = os.path.join(private, "notify")
                    await nursery.start(self._ready_when_workers_are, self._worker_notify)
                if self.watch:
                    await nursery.start(
                        watch_file, self.path, partial(self._reload, "file changed")
                    )
                async with trio.open_nursery() as slots:
                    for index in range(count):
                        slots.start_soon(self._run_slot, index)
                nursery.cancel_scope.cancel()
        LOG.info("all workers stopped")
        return EXIT_OK if self.clean else EXIT_RUNTIME


def supervise(config: Config, path: str, *, watch: bool = False) -> int:
    """Run the supervisor for ``config`` (loaded from ``path``) until it is told to stop."""
    try:
        _, text, _, _ = read_config(path)
    except (ConfigError, OSError, UnicodeDecodeError) as exc:
        LOG.error("cannot read %s again: %s", path, exc)
        return EXIT_RUNTIME
    supervisor = Supervisor(config, path, text, watch=watch)
    try:
        reservations = supervisor.reserve()
    except OSError as exc:
        LOG.error("%s", exc)
        return EXIT_RUNTIME
    try:
        return trio.run(supervisor.run)
    finally:
        for sock in reservations:
            sock.close()
