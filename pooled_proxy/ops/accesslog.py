"""The access log: one line per exchange, as JSON or in the combined format.

It is an ``ExchangeRecord`` observer. ``[log] access = "off"`` registers no observer at all,
so an unused log costs nothing.

Writing is synchronous, on the event loop: one ``write(2)`` per line, to a line-buffered file
or to stdout flushed after each line. On a local file or a container's stdout pipe that takes
microseconds and never loses a line to a crash; the price is that a reader that stops draining
stdout (a full pipe) or a stalled disk stalls the event loop with it. A queue drained by a
worker thread would decouple the two at the cost of losing lines on a crash and of memory
while the disk is slow; at one line per exchange the direct write is the better trade.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Callable
from typing import TextIO

from ..config import LogConfig
from ..exchange import ExchangeRecord
from ..headers import first_value

LOG = logging.getLogger("pooled_proxy.accesslog")

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
# Bytes that must not reach a combined-format line raw: quotes, backslashes, controls, non-ASCII.
_ESCAPES = {b: f"\\x{b:02X}" for b in (*range(0x20), 0x22, 0x5C, *range(0x7F, 0x100))}


def _text(value: bytes) -> str:
    return value.decode("latin-1")


def _escaped(value: bytes) -> str:
    """A value safe inside a combined-format field (no line or quote injection)."""
    return "".join(_ESCAPES.get(b) or chr(b) for b in value) if value else "-"


def _connection(record: ExchangeRecord) -> str | None:
    if record.upstream_reused is None:
        return None
    return "reused" if record.upstream_reused else "new"


def _json_failed(record: ExchangeRecord) -> str:
    """The servers the request went on from, each with its error, as a JSON array."""
    tries = ",".join(
        f'{{"server":{_json_string(server)},"error":{_json_string(error)}}}'
        for server, error in record.servers_failed
    )
    return f"[{tries}]"


def _upstreams(record: ExchangeRecord) -> str:
    """The servers tried, the one that served (or failed) last, as nginx's $upstream_addr."""
    if record.servers_failed:
        return ",".join([*(server for server, _ in record.servers_failed), record.upstream_server])
    return record.upstream_server or "-"


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


# A JSON string literal, escaped as json.dumps escapes it (ASCII only); in C.
_json_string: Callable[[str], str] = json.encoder.encode_basestring_ascii


def _json_text(value: str | None) -> str:
    return "null" if not value else _json_string(value)


def _json_number(value: float | None) -> str:
    return "null" if value is None else repr(value)


class _UtcSeconds:
    """``YYYY-MM-DDTHH:MM:SS`` of a Unix time, remembered for the last second asked: one
    formatting per second instead of one per line."""

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def __call__(self, second: int) -> str:
        if second != self._second:
            self._second = second
            self._text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return self._text


_utc_seconds = _UtcSeconds()


def _iso_millis(timestamp: float) -> str:
    """``datetime.fromtimestamp(t, utc).isoformat(timespec="milliseconds")`` with a ``Z``:
    the microseconds rounded as datetime rounds them, then cut to milliseconds."""
    fraction, whole = math.modf(timestamp)
    micros = round(fraction * 1e6)
    if micros >= 1_000_000:
        whole += 1
        micros -= 1_000_000
    return f"{_utc_seconds(int(whole))}.{micros // 1000:03d}Z"


def json_line(record: ExchangeRecord) -> str:
    """One JSON object per line; durations in milliseconds, absent values as null.

    Written out field by field (what ``json.dumps`` of the same dict with compact separators
    gives, at a third of its cost: this runs for every exchange)."""
    return (
        f'{{"time":"{_iso_millis(record.wall_start)}",'
        f'"client":{_json_string(_text(record.client_ip))},'
        f'"method":{_json_string(_text(record.method))},'
        f'"path":{_json_string(_text(record.target))},'
        f'"protocol":{_json_string(_text(record.protocol))},'
        f'"status":{record.status},"bytes_in":{record.bytes_in},"bytes_out":{record.bytes_out},'
        f'"route":{_json_text(record.route)},'
        f'"upstream":{_json_text(record.route_upstream)},'
        f'"upstream_server":{_json_text(record.upstream_server)},'
        f'"upstream_connection":{_json_text(_connection(record))},'
        f'"upstream_failed":{_json_failed(record) if record.servers_failed else "[]"},'
        f'"retried":{"true" if record.retried else "false"},'
        f'"ttfb_ms":{_json_number(_ms(record.ttfb))},'
        f'"duration_ms":{_json_number(_ms(record.duration))},'
        f'"event_stream":{"true" if record.event_stream else "false"},'
        f'"error":{_json_text(record.error)},'
        f'"request_id":{_json_text(_text(record.request_id))}}}\n'
    )


def combined_line(record: ExchangeRecord) -> str:
    """The Apache/nginx combined format, then the proxy's fields as ``key=value``:

    ``127.0.0.1 - - [10/Oct/2025:13:55:36 +0000] "GET /x HTTP/1.1" 200 512 "-" "curl/8.5"
    in=0 upstream=127.0.0.1:9000 conn=reused ttfb=0.002 rt=0.003 error=- rid=5f0c...``

    Times are seconds with millisecond precision; ``-`` marks an absent value. ``upstream``
    lists every server tried, comma-separated, when the request went on to a next one.
    """
    t = time.gmtime(record.wall_start)
    stamp = (
        f"{t.tm_mday:02d}/{_MONTHS[t.tm_mon - 1]}/{t.tm_year}:"
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000"
    )
    request = b" ".join(part for part in (record.method, record.target, record.protocol) if part)
    ttfb = "-" if record.ttfb is None else f"{record.ttfb:.3f}"
    return (
        f'{_text(record.client_ip) or "-"} - - [{stamp}] "{_escaped(request)}" '
        f"{record.status or '-'} {record.bytes_out or '-'} "
        f'"{_escaped(first_value(record.request_headers, b"referer") or b"")}" '
        f'"{_escaped(first_value(record.request_headers, b"user-agent") or b"")}" '
        f"in={record.bytes_in} upstream={_upstreams(record)} "
        f"conn={_connection(record) or '-'} ttfb={ttfb} rt={record.duration:.3f} "
        f"error={record.error or '-'} rid={_escaped(record.request_id)}\n"
    )


def _open(path: str) -> TextIO:
    # The log owns the file for its lifetime and closes it in close() or reopen().
    return open(path, "a", encoding="utf-8", buffering=1)


class AccessLog:
    """Writes one line per exchange to ``stream``; call it as an ``ExchangeRecord`` observer."""

    def __init__(
        self,
        stream: TextIO,
        log_format: str = "json",
        *,
        close_stream: bool = False,
        path: str | None = None,
    ) -> None:
        self.stream = stream
        self.format = json_line if log_format == "json" else combined_line
        self._close_stream = close_stream
        self.path = path  # the file, reopened by name on SIGUSR1; None for stdout
        self.lines_written = 0
        self.lines_dropped = 0

    @classmethod
    def from_config(cls, config: LogConfig) -> AccessLog | None:
        """The access log ``[log]`` asks for, or ``None`` for ``access = "off"``.

        A file is opened for appending (so rotation by copy-and-truncate works) and
        line-buffered: every line is written through as it is logged.
        """
        if config.access == "off":
            return None
        if config.access == "stdout":
            return cls(sys.stdout, config.format)
        return cls(_open(config.access), config.format, close_stream=True, path=config.access)

    def reopen(self) -> None:
        """Open the file by its name again (logrotate moved the old one away; SIGUSR1) and
        write the following lines there. Nothing is lost: every line already went through
        to the old file, and the swap happens between two lines. If the new file cannot be
        opened, lines keep going to the old one."""
        if self.path is None:
            LOG.info("access log goes to stdout: nothing to reopen")
            return
        try:
            stream = _open(self.path)
        except OSError as exc:
            LOG.error("cannot reopen the access log %s: %s; still writing to the old file",
                      self.path, exc)  # fmt: skip
            return
        old, self.stream = self.stream, stream
        old.close()
        LOG.info("access log reopened: %s", self.path)

    def __call__(self, record: ExchangeRecord) -> None:
        try:
            self.stream.write(self.format(record))
            if not self._close_stream:
                self.stream.flush()  # stdout may be a block-buffered pipe (a container's log)
        except (OSError, ValueError) as exc:
            # A full disk or a closed stdout must not fail the exchange being logged.
            self.lines_dropped += 1
            if self.lines_dropped == 1:
                LOG.error("access log write failed, dropping lines: %s", exc)
            return
        self.lines_written += 1

    def close(self) -> None:
        if self._close_stream:
            self.stream.close()
