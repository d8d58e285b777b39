"""systemd's readiness protocol (``sd_notify``), without libsystemd.

When systemd starts a ``Type=notify`` service it sets ``NOTIFY_SOCKET`` to a unix datagram
socket (a path, or an abstract name written with a leading ``@``). The service sends
newline-separated ``KEY=VALUE`` fields there: ``READY=1`` once it serves (``systemctl start``
returns then, and units ordered after it start), ``RELOADING=1`` while a reload runs (with
``MONOTONIC_USEC``, as ``Type=notify-reload`` wants) followed by ``READY=1``, and
``STOPPING=1`` when a drain begins. Without ``NOTIFY_SOCKET`` nothing is sent.

A message that cannot be sent is logged once and otherwise ignored: readiness reporting
must never stop the proxy from serving.
"""

from __future__ import annotations

import logging
import os
import socket
import time

LOG = logging.getLogger("pooled_proxy.sdnotify")

ENV = "NOTIFY_SOCKET"


def socket_address(value: str) -> str | bytes:
    """The ``NOTIFY_SOCKET`` value as ``sendto`` takes it: ``@name`` is the abstract ``\\0name``."""
    return b"\0" + value[1:].encode() if value.startswith("@") else value


class Notifier:
    """Sends state changes to ``address`` (a ``NOTIFY_SOCKET`` value), or nothing if None."""

    def __init__(self, address: str | None) -> None:
        self.address = address or None
        self._failed = False

    @classmethod
    def from_environment(cls) -> Notifier:
        return cls(os.environ.get(ENV))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> None:
        if self.address is None:
            return
        message = "\n".join(fields).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                # Never wait for a receiver that is not reading: a full queue drops the message.
                sock.setblocking(False)
                sock.sendto(message, socket_address(self.address))
        except OSError as exc:
            if not self._failed:
                self._failed = True
                LOG.warning("cannot notify %s=%s: %s", ENV, self.address, exc)

    def ready(self, status: str = "") -> None:
        self.send("READY=1", *((f"STATUS={status}",) if status else ()))

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        self.send("STOPPING=1")
