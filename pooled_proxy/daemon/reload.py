"""Config reload: on SIGHUP, or whenever the file changes (``pooled-proxy run --watch``).

A reload reads and validates the whole file first, and loads the TLS files it names (in a
thread: the event loop never waits for them); a bad file is logged problem by problem
(``FILE:LINE: key: message``, as ``check`` prints them) and the running config stays. A good
one is swapped in by :meth:`Proxy.reload`: new requests see the new routes and upstreams,
new connections the new certificates, exchanges in flight and open connections are untouched.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from ..config import Config, load_config, parse_config
from ..errors import ConfigError
from ..proxy import Proxy
from ..route_hooks import RouteHooks, load_route_hooks
from ..tls_contexts import TlsContexts, load_tls_contexts
from .sdnotify import Notifier

LOG = logging.getLogger("pooled_proxy.reload")

WATCH_INTERVAL = 0.25  # seconds between two looks at the file's stat()

FileSignature = tuple[int, int, int]  # (st_mtime_ns, st_size, st_ino)


def read_config(path: str) -> tuple[Config, str, TlsContexts, RouteHooks]:
    """The config in ``path``, the exact text it was parsed from, its TLS contexts and its
    routes' hooks (blocking: run it in a thread). Raises ConfigError, naming an unreadable
    file, a TLS file that does not load or a hook that does not import as ``check`` does."""
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError):
        load_config(path)  # raises the ConfigError that names the problem
        raise  # the file became readable in between: report the first failure anyway
    config = parse_config(text, path, base_dir=Path(path).parent)
    return config, text, load_tls_contexts(config), load_route_hooks(config)


def log_problems(error: ConfigError, path: str) -> None:
    LOG.error("reload failed: %s has %d problem(s); keeping the running config",
              path, len(error.problems))  # fmt: skip
    for problem in error.problems:
        LOG.error("%s", problem)


class Reloader:
    """Reloads one proxy from its config file; reloads run one at a time."""

    def __init__(self, proxy: Proxy, path: str, notifier: Notifier | None = None) -> None:
        self.proxy = proxy
        self.path = path
        self.notifier = notifier or Notifier(None)
        self._lock = trio.Lock()

    async def reload(self, why: str) -> bool:
        """Read, validate and apply the file; False (and the old config kept) if it is bad."""
        async with self._lock:
            if self.proxy.draining:
                LOG.info("not reloading (%s): draining", why)
                return False
            # systemd waits for READY=1 after RELOADING=1, whether the reload worked or not.
            self.notifier.reloading()
            try:
                return await self._reload(why)
            finally:
                self.notifier.ready()

    async def _reload(self, why: str) -> bool:
        try:
            config, _, tls, hooks = await trio.to_thread.run_sync(read_config, self.path)
        except ConfigError as exc:
            log_problems(exc, self.path)
            self.proxy.last_reload_ok = False
            return False
        except (OSError, UnicodeDecodeError) as exc:
            LOG.error("reload failed: cannot read %s: %s; keeping the running config",
                      self.path, exc)  # fmt: skip
            self.proxy.last_reload_ok = False
            return False
        summary = self.proxy.reload(config, tls, hooks)
        logging.getLogger().setLevel(config.log.level.upper())
        LOG.info("config reloaded (%s) from %s: %s", why, self.path, summary)
        for key in summary.needs_restart:
            LOG.warning("%s changed in %s: it takes effect after a restart", key, self.path)
        return True


def _signature(path: str) -> FileSignature | None:
    try:
        st = os.stat(path)
    except OSError:
        return None  # gone for a moment: editors often save by writing a new file and renaming
    return (st.st_mtime_ns, st.st_size, st.st_ino)


async def watch_file(
    path: str,
    on_change: Callable[[], Awaitable[object]],
    *,
    interval: float = WATCH_INTERVAL,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Call ``on_change`` each time ``path`` changes (mtime, size or inode), once the change
    has settled for one ``interval``, so a save in several writes is read once, whole.
    Started (``nursery.start``) once the file as it is now is known: a save made after
    that is a change, even one made before the first look of a slow thread."""
    seen = await trio.to_thread.run_sync(_signature, path)
    task_status.started()
    while True:
        await trio.sleep(interval)
        current = await trio.to_thread.run_sync(_signature, path)
        if current is None or current == seen:
            continue
        await trio.sleep(interval)
        settled = await trio.to_thread.run_sync(_signature, path)
        if settled != current:
            continue  # still being written; look again next round
        seen = current
        await on_change()
