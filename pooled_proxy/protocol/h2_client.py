"""The sans-IO half of the HTTP/2 upstream connection: GOAWAY frames taken out of the
server's bytes before h2 reads them.

Why: on a GOAWAY, h2 moves the whole connection to CLOSED and refuses every frame after it,
those of the streams the server still completes included. RFC 9113 section 6.8 says a
graceful GOAWAY lets the streams up to its last stream id finish (servers restarting
gracefully send one, gRPC servers first with the highest id and then with the real one).
So the connection reads GOAWAY frames itself, from this splitter, and h2 only sees the
rest: it keeps serving the streams the server still answers, and the connection shell
stops opening new ones and replays the ones above the last stream id.

Every other byte is passed through as it came; only frame headers are looked at.
"""

from __future__ import annotations

from dataclasses import dataclass

GOAWAY = 7
FRAME_HEADER_SIZE = 9
GOAWAY_MIN_PAYLOAD = 8  # last stream id and error code
MAX_DEBUG_DATA = 256  # kept of a GOAWAY's debug data, for the log; the rest is skipped
MAX_FRAME_SIZE = 16384  # the client's SETTINGS_MAX_FRAME_SIZE (h2's default, never raised)


@dataclass(frozen=True, slots=True)
class Goaway:
    last_stream_id: int
    error_code: int
    debug_data: bytes


class GoawaySplitter:
    """Feed it the server's bytes; it returns them without GOAWAY frames, and the GOAWAYs."""

    def __init__(self) -> None:
        self._header = bytearray()  # a frame header split across reads
        self._pass = 0  # payload bytes of the current frame still to pass through
        self._goaway_left = 0  # payload bytes of the current GOAWAY still to come
        self._goaway = bytearray()

    def feed(self, data: bytes) -> tuple[bytes, list[Goaway]]:
        if not self._header and not self._goaway_left and len(data) <= self._pass:
            self._pass -= len(data)  # the middle of a large DATA frame: nothing to look at
            return data, []
        out: list[bytes] = []
        goaways: list[Goaway] = []
        pos, end = 0, len(data)
        while pos < end:
            if self._pass:
                taken = min(self._pass, end - pos)
                out.append(data[pos : pos + taken])
                self._pass -= taken
                pos += taken
                continue
            if self._goaway_left:
                taken = min(self._goaway_left, end - pos)
                room = GOAWAY_MIN_PAYLOAD + MAX_DEBUG_DATA - len(self._goaway)
                self._goaway += data[pos : pos + min(taken, max(room, 0))]
                self._goaway_left -= taken
                pos += taken
                if not self._goaway_left:
                    goaways.append(_parse_goaway(bytes(self._goaway)))
                    self._goaway.clear()
                continue
            need = FRAME_HEADER_SIZE - len(self._header)
            self._header += data[pos : pos + need]
            pos += min(need, end - pos)
            if len(self._header) < FRAME_HEADER_SIZE:
                break
            header = bytes(self._header)
            self._header.clear()
            length = int.from_bytes(header[:3], "big")
            stream_id = int.from_bytes(header[5:9], "big") & 0x7FFFFFFF
            if (
                header[3] == GOAWAY
                and stream_id == 0
                and GOAWAY_MIN_PAYLOAD <= length <= MAX_FRAME_SIZE
            ):
                self._goaway_left = length
            else:
                # A malformed GOAWAY too: h2 answers it as the connection error it is.
                out.append(header)
                self._pass = length
        return b"".join(out), goaways


def _parse_goaway(payload: bytes) -> Goaway:
    return Goaway(
        last_stream_id=int.from_bytes(payload[:4], "big") & 0x7FFFFFFF,
        error_code=int.from_bytes(payload[4:8], "big"),
        debug_data=payload[8:],
    )
