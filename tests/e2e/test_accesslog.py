"""The access log, parsed and matched line by line to the requests that were sent."""

from __future__ import annotations

import io
import json
import re
import time
from datetime import UTC, datetime

import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from pooled_proxy.config import LogConfig
from pooled_proxy.exchange import ExchangeRecord
from pooled_proxy.ops.accesslog import AccessLog, json_line
from tests.support.helpers import HOST, H11Client, make_config, raw_exchange, start_proxy
from tests.support.ports import free_port

COMBINED = re.compile(
    r'(?P<client>\S+) - - \[(?P<time>[^\]]+)\] "(?P<request>[^"]*)" (?P<status>\d{3}|-) '
    r'(?P<bytes_out>\d+|-) "(?P<referer>[^"]*)" "(?P<agent>[^"]*)" in=(?P<bytes_in>\d+) '
    r"upstream=(?P<upstream>\S+) conn=(?P<conn>new|reused|-) ttfb=(?P<ttfb>[\d.]+|-) "
    r"rt=(?P<rt>[\d.]+) error=(?P<error>\S+) rid=(?P<rid>\S+)\n"
)


async def test_json_lines_in_a_file_match_each_request(nursery, demo_upstream, tmp_path):
    _, port = demo_upstream
    path = tmp_path / "access.log"
    access_log = AccessLog.from_config(LogConfig(access=str(path), format="json"))
    assert access_log is not None
    proxy = await start_proxy(nursery, make_config(port), observers=(access_log,))
    started = time.time()
    sent: list[tuple[str, str, int, int, int]] = []  # method, path, status, bytes in, bytes out
    with trio.fail_after(5):
        async with await H11Client.connect(proxy.port) as client:
            for method, target, body in [
                ("GET", "/echo?x=1", b""),
                ("GET", "/status/404", b""),
                ("POST", "/echo", b"y" * 100),
            ]:
                reply = await client.request(method, target, body=body)
                sent.append((method, target, reply.status, len(body), len(reply.body)))
        # An error answered before any routing: a malformed request head.
        answer = await raw_exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: x\r\nbad header\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 400 ")
    # Line-buffered: every line is in the file while the proxy still runs.
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    access_log.close()
    assert len(entries) == 4
    for entry, (method, target, status, bytes_in, bytes_out) in zip(entries, sent):
        assert (entry["method"], entry["path"], entry["status"]) == (method, target, status)
        assert (entry["bytes_in"], entry["bytes_out"]) == (bytes_in, bytes_out)
        assert entry["protocol"] == "HTTP/1.1"
        assert entry["client"] == HOST
        assert entry["upstream"] == "app"
        assert entry["upstream_server"] == f"{HOST}:{port}"
        assert entry["error"] is None
        assert 0 <= entry["ttfb_ms"] <= entry["duration_ms"] < 5000
        logged_at = datetime.fromisoformat(entry["time"]).timestamp()
        assert started - 1 <= logged_at <= time.time()
    # One client connection, sequential requests: the first opened the upstream connection.
    assert [e["upstream_connection"] for e in entries[:3]] == ["new", "reused", "reused"]
    bad = entries[3]
    assert bad["status"] == 400 and bad["error"] == "http_request_error"
    assert bad["upstream_server"] is None and bad["upstream_connection"] is None


async def test_combined_format_on_stdout_carries_the_proxy_fields(nursery, demo_upstream, capsys):
    _, port = demo_upstream
    dead_port = free_port()
    access_log = AccessLog.from_config(LogConfig(access="stdout", format="combined"))
    assert access_log is not None
    proxy = await start_proxy(nursery, make_config(port), observers=(access_log,))
    dead = await start_proxy(nursery, make_config(dead_port), observers=(access_log,))
    with trio.fail_after(5):
        async with await H11Client.connect(proxy.port) as client:
            ok = await client.request(
                "GET", '/echo?q="quoted"',
                headers=[("referer", "http://test.local/page"), ("user-agent", "agent/1.0")],
            )  # fmt: skip
            assert ok.status == 200
        async with await H11Client.connect(dead.port) as client:
            assert (await client.request("GET", "/x")).status == 502
        await trio.testing.wait_all_tasks_blocked()
    lines = capsys.readouterr().out.splitlines(keepends=True)
    assert len(lines) == 2
    first, second = (COMBINED.fullmatch(line) for line in lines)
    assert first is not None and second is not None, lines
    # A quote in the path cannot break out of the quoted request field.
    assert first["request"] == r"GET /echo?q=\x22quoted\x22 HTTP/1.1"
    assert (first["status"], first["bytes_out"]) == ("200", str(len(ok.body)))
    assert (first["referer"], first["agent"]) == ("http://test.local/page", "agent/1.0")
    assert (first["upstream"], first["conn"], first["error"]) == (f"{HOST}:{port}", "new", "-")
    assert float(first["ttfb"]) <= float(first["rt"])
    assert re.fullmatch(r"\d\d/[A-Z][a-z]{2}/\d{4}:\d\d:\d\d:\d\d \+0000", first["time"])
    assert (second["request"], second["status"]) == ("GET /x HTTP/1.1", "502")
    assert (second["conn"], second["ttfb"], second["error"]) == ("-", "-", "connection_refused")


async def test_event_streams_and_stale_retries_are_marked(nursery, demo_upstream):
    from tests.support.one_shot_upstream import OneShotUpstream

    _, port = demo_upstream
    stale_upstream = OneShotUpstream()
    stale_port = await nursery.start(stale_upstream.serve)
    log = io.StringIO()
    access_log = AccessLog(log)
    proxy = await start_proxy(nursery, make_config(port), observers=(access_log,))
    stale = await start_proxy(nursery, make_config(stale_port), observers=(access_log,))
    with trio.fail_after(5):
        async with await H11Client.connect(proxy.port) as client:
            reply = await client.request("GET", "/events?count=3&interval=0")
            assert reply.body.count(b"data: ") == 3
        async with await H11Client.connect(stale.port) as client:
            for _ in range(2):
                assert (await client.request("GET", "/")).status == 200
        await trio.testing.wait_all_tasks_blocked()  # the proxy logs after its last write
    events, first, retried = (json.loads(line) for line in log.getvalue().splitlines())
    assert events["event_stream"] is True and events["bytes_out"] == len(reply.body)
    assert first["retried"] is False and first["upstream_connection"] == "new"
    # The reused connection was dead: retried once, on a new connection.
    assert retried["retried"] is True and retried["upstream_connection"] == "new"
    assert retried["status"] == 200 and retried["error"] is None


async def test_a_failing_log_never_fails_the_exchange(nursery, demo_upstream, caplog):
    _, port = demo_upstream
    broken = io.StringIO()
    broken.close()  # writes raise ValueError, as a closed stdout would
    access_log = AccessLog(broken)
    proxy = await start_proxy(nursery, make_config(port), observers=(access_log,))
    with trio.fail_after(5):
        async with await H11Client.connect(proxy.port) as client:
            for _ in range(3):
                assert (await client.request("GET", "/echo")).status == 200
        await trio.testing.wait_all_tasks_blocked()
    assert (access_log.lines_written, access_log.lines_dropped) == (0, 3)
    assert [r.message for r in caplog.records if r.name == "pooled_proxy.accesslog"] == [
        "access log write failed, dropping lines: I/O operation on closed file"
    ]


def test_off_means_no_observer_at_all(tmp_path):
    assert AccessLog.from_config(LogConfig(access="off")) is None
    assert not list(tmp_path.iterdir())


async def test_an_http10_request_is_logged_with_its_protocol(nursery, demo_upstream):
    _, port = demo_upstream
    log = io.StringIO()
    proxy = await start_proxy(nursery, make_config(port), observers=(AccessLog(log),))
    with trio.fail_after(5):
        answer = await raw_exchange(proxy.port, b"GET /echo HTTP/1.0\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ")
    (entry,) = (json.loads(line) for line in log.getvalue().splitlines())
    assert (entry["protocol"], entry["path"], entry["status"]) == ("HTTP/1.0", "/echo", 200)


async def test_a_request_after_an_idle_wait_is_logged_at_its_own_time(nursery, demo_upstream):
    """The log's time is when the request came, not when its keep-alive connection went idle."""
    _, port = demo_upstream
    log = io.StringIO()
    proxy = await start_proxy(nursery, make_config(port), observers=(AccessLog(log),))
    with trio.fail_after(5):
        async with await H11Client.connect(proxy.port) as client:
            assert (await client.request("GET", "/echo")).status == 200
            await trio.sleep(0.6)  # idle between requests
            sent_second = time.time()
            assert (await client.request("GET", "/echo")).status == 200
        await trio.testing.wait_all_tasks_blocked()
    _, second = (json.loads(line) for line in log.getvalue().splitlines())
    logged_at = datetime.fromisoformat(second["time"]).timestamp()
    assert logged_at >= sent_second - 0.05, (logged_at, sent_second)


def _reference_json_line(record: ExchangeRecord) -> str:
    """What the JSON line is: json.dumps of these fields (the written-out line must match)."""
    stamp = datetime.fromtimestamp(record.wall_start, UTC)
    return (
        json.dumps(
            {
                "time": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                "client": record.client_ip.decode("latin-1"),
                "method": record.method.decode("latin-1"),
                "path": record.target.decode("latin-1"),
                "protocol": record.protocol.decode("latin-1"),
                "status": record.status,
                "bytes_in": record.bytes_in,
                "bytes_out": record.bytes_out,
                "route": record.route or None,
                "upstream": record.route_upstream or None,
                "upstream_server": record.upstream_server or None,
                "upstream_connection": None
                if record.upstream_reused is None
                else ("reused" if record.upstream_reused else "new"),
                "upstream_failed": [
                    {"server": server, "error": error} for server, error in record.servers_failed
                ],
                "retried": record.retried,
                "ttfb_ms": None if record.ttfb is None else round(record.ttfb * 1000.0, 3),
                "duration_ms": round(record.duration * 1000.0, 3),
                "event_stream": record.event_stream,
                "error": record.error or None,
                "request_id": record.request_id.decode("latin-1") or None,
            },
            separators=(",", ":"),
        )
        + "\n"
    )


@settings(max_examples=300, deadline=None)
@given(
    wall_start=st.floats(0, 4e9, allow_nan=False)
    | st.sampled_from([1.9999995, 1.0000005, 59.9995]),
    text=st.binary(max_size=20),
    words=st.text(max_size=12),
    number=st.integers(0, 10**12),
    seconds=st.none() | st.floats(0, 1e5, allow_nan=False),
    flags=st.tuples(st.booleans(), st.booleans(), st.none() | st.booleans()),
    failed=st.lists(st.tuples(st.text(max_size=12), st.text(max_size=12)), max_size=3),
)
def test_the_json_line_is_json_dumps_of_its_fields(
    wall_start, text, words, number, seconds, flags, failed
):
    record = ExchangeRecord(
        start=0.0,
        wall_start=wall_start,
        client_ip=text,
        method=text[:3],
        target=text,
        protocol=b"HTTP/1.1",
        status=number % 600,
        bytes_in=number,
        bytes_out=number // 3,
        route=words,
        route_upstream=words[:2],
        upstream_server=words,
        retried=flags[0],
        servers_failed=tuple(failed),
        event_stream=flags[1],
        upstream_reused=flags[2],
        ttfb=seconds,
        duration=seconds or 0.0,
        error=words[:3],
        request_id=text[-5:],
    )
    assert json_line(record) == _reference_json_line(record)
