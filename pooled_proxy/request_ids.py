"""Request IDs: the client's own when it is a sane token, else a new one.

A new ID is a random prefix drawn once per process (again in a forked worker) followed by a
counter, both in hex: unique across processes and restarts for all practical purposes, and
cheap, because one is made for every request that comes without one. ``os.urandom`` per
request would make them unguessable too, which an ID that is logged and echoed does not need.
"""

from __future__ import annotations

import itertools
import os
import re

from .protocol.abnf import TOKEN_CHAR

MAX_LENGTH = 200
# RFC 9110 token characters, plus "/" and "=" so that base64 IDs pass too; nothing that could
# split a log line or a header, and no spaces.
_SANE = re.compile(TOKEN_CHAR[:-1] + rb"/=]{1,%d}" % MAX_LENGTH)


_prefix = b""
_counter = itertools.count(1)


def _reseed() -> None:
    global _prefix, _counter
    _prefix = os.urandom(8).hex().encode()
    _counter = itertools.count(1)


_reseed()
# A forked worker must not hand out its parent's IDs.
os.register_at_fork(after_in_child=_reseed)


def choose_request_id(client_value: bytes | None) -> bytes:
    """The client's ID if it is sane (1 to MAX_LENGTH of the characters above), else a new
    one: 16 hex digits of this process's random prefix, then the counter in hex."""
    if client_value is not None and _SANE.fullmatch(client_value) is not None:
        return client_value
    return b"%s%08x" % (_prefix, next(_counter))
