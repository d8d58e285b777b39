"""The request inspector on real sockets: what it records of each hop, its JSON, HAR and event
stream on the admin listener, replay, masking, the body limit, and that it neither holds a
stream back nor keeps it in memory."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from typing import Any

import h11
import httpx
import pytest
import trio

from pooled_proxy.config import InspectConfig, ServerAddress, UpstreamConfig, parse_config
from pooled_proxy.errors import ConfigError
from tests.support.h2upstream import H2Upstream
from tests.support.helpers import HOST, H11Client, make_config
from tests.support.memory import MIB, reset_peak_rss, status_kib
from tests.support.operations import OperatedProxy, start_operated_proxy
from tests.support.scripted_upstream import SSE_HEAD, ScriptedUpstream, chunk

INSPECT = InspectConfig(enabled=True)
GAP = 0.25  # seconds the client waits before it lets the upstream write the next event
SECRET = "Bearer s3cr3t-t0ken"


async def inspecting(nursery: trio.Nursery, port: int, **inspect: Any) -> OperatedProxy:
    config = InspectConfig(enabled=True, **inspect)
    return await start_operated_proxy(nursery, make_config(port), inspect=config)


async def admin_get(proxy: OperatedProxy, path: str) -> httpx.Response:
    async with httpx.AsyncClient() as client:
        return await client.get(proxy.admin_url + path)


async def admin_json(proxy: OperatedProxy, path: str) -> Any:
    response = await admin_get(proxy, path)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    return response.json()


async def replay(
    proxy: OperatedProxy, ident: int, edits: object = None, **headers: str
) -> httpx.Response:
    async with httpx.AsyncClient() as client:
        return await client.post(
            f"{proxy.admin_url}/inspect/exchanges/{ident}/replay",
            content=json.dumps(edits or {}).encode(),
            headers={"content-type": "application/json", **headers},
        )


async def finished(proxy: OperatedProxy, ident: int) -> dict[str, Any]:
    with trio.fail_after(5):
        while True:
            exchange: dict[str, Any] = await admin_json(proxy, f"/inspect/exchanges/{ident}")
            if not exchange["in_progress"]:
                return exchange
            await trio.sleep(0.02)


class EventReader:
    """``GET /inspect/events`` on a raw connection to the admin port: the bytes as they come."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.text = ""

    @classmethod
    async def open(cls, proxy: OperatedProxy) -> EventReader:
        assert proxy.admin.address is not None
        stream = await trio.open_tcp_stream("127.0.0.1", proxy.admin.address.port)
        await stream.send_all(b"GET /inspect/events HTTP/1.1\r\nhost: a\r\n\r\n")
        return cls(stream)

    async def until(self, part: str) -> str:
        while part not in self.text:
            data = await self.stream.receive_some(65536)
            assert data, "the event stream ended"
            self.text += data.decode()
        return self.text

    async def until_finished(self, target: str) -> list[dict[str, Any]]:
        """Read until a row says the exchange for ``target`` finished; every row sent."""
        while True:
            rows = [row for changed in self.data("rows") for row in changed]
            if any(row["target"] == target and not row["in_progress"] for row in rows):
                return rows
            data = await self.stream.receive_some(65536)
            assert data, "the event stream ended"
            self.text += data.decode()

    def data(self, kind: str) -> list[Any]:
        """The data of every complete event of this kind so far."""
        out = []
        for event in self.text.split("\n\n"):
            if f"event: {kind}\ndata: " in event:
                out.append(json.loads(event.split("data: ", 1)[1]))
        return out


def header(headers: list[list[str]], name: str) -> list[str]:
    return [value for n, value in headers if n.lower() == name]


async def test_an_exchange_shows_each_hop_its_timings_and_bodies(nursery, demo_upstream):
    _, port = demo_upstream
    proxy = await inspecting(nursery, port)
    with trio.fail_after(5):
        async with await H11Client.connect(proxy.running.port) as client:
            first = await client.request(
                "GET",
                "/status/204",
                headers=[("connection", "keep-alive, x-hop"), ("x-hop", "1"), ("x-app", "a")],
            )
            second = await client.request(
                "POST",
                "/echo?q=1",
                headers=[("content-type", "application/json")],
                body=b'{"name":"ada","n":[1,2]}',
            )
    assert (first.status, second.status) == (204, 200)
    listing = await admin_json(proxy, "/inspect/exchanges")
    assert listing["keep"] == 200
    newest, oldest = listing["exchanges"]
    assert (oldest["method"], oldest["target"], oldest["status"]) == ("GET", "/status/204", 204)
    assert (newest["method"], newest["target"], newest["status"]) == ("POST", "/echo?q=1", 200)
    assert oldest["server"] == f"127.0.0.1:{port}" and oldest["upstream"] == "app"
    assert (oldest["connection"], newest["connection"]) == ("new", "reused")
    assert oldest["protocol"] == "HTTP/1.1" and oldest["retried"] is False
    assert newest["bytes_in"] == 24 and newest["bytes_out"] == 24
    assert not oldest["in_progress"] and oldest["duration_ms"] > 0

    got = await admin_json(proxy, f"/inspect/exchanges/{oldest['id']}")
    client_side = got["request"]["client"]
    upstream_side = got["request"]["upstream"]
    # Hop-by-hop rewriting, as each side saw it.
    assert header(client_side["headers"], "x-hop") == ["1"]
    assert header(client_side["headers"], "connection") == ["keep-alive, x-hop"]
    assert header(upstream_side["headers"], "x-hop") == []
    assert header(upstream_side["headers"], "connection") == []
    assert header(upstream_side["headers"], "x-app") == ["a"]
    assert header(upstream_side["headers"], "x-forwarded-for") == ["127.0.0.1"]
    assert header(upstream_side["headers"], "via") == ["1.1 pooled-proxy"]
    response = got["response"]
    assert response["upstream"]["status"] == 204 and response["client"]["status"] == 204
    assert header(response["upstream"]["headers"], "via") == []
    assert header(response["client"]["headers"], "via") == ["1.1 pooled-proxy"]
    timings = got["timings"]
    assert timings["connect_ms"] > 0 and timings["queue_ms"] >= 0
    assert 0 < timings["ttfb_ms"] <= timings["total_ms"]

    posted = await admin_json(proxy, f"/inspect/exchanges/{newest['id']}")
    assert posted["timings"]["connect_ms"] is None  # a reused connection
    assert posted["request"]["upstream"]["target"] == "/echo?q=1"
    request_body = posted["request"]["body"]
    assert request_body["text"] == '{"name":"ada","n":[1,2]}'
    assert request_body["content_type"] == "application/json"
    assert (request_body["size"], request_body["truncated"]) == (24, False)
    assert posted["response"]["body"]["text"] == '{"name":"ada","n":[1,2]}'
    assert posted["response"]["events"] is None


async def test_secrets_are_masked_in_json_har_and_the_event_stream(nursery, demo_upstream):
    _, port = demo_upstream
    proxy = await inspecting(
        nursery, port, mask_headers=("authorization", "cookie", "set-cookie", "x-api-key")
    )
    with trio.fail_after(5):
        events = await EventReader.open(proxy)
        await events.until("event: reset")
        async with httpx.AsyncClient() as client:
            response = await client.get(
                proxy.url + "/status/200",
                headers={"authorization": SECRET, "cookie": "session=s3cr3t", "x-api-key": "k3y"},
            )
        assert response.status_code == 200
        await events.until_finished("/status/200")
        stream = events.text
        await events.stream.aclose()
    [row] = (await admin_json(proxy, "/inspect/exchanges"))["exchanges"]
    shown = await admin_get(proxy, f"/inspect/exchanges/{row['id']}")
    har = await admin_get(proxy, "/inspect/har")
    for text in (shown.text, har.text, stream):
        assert "s3cr3t" not in text and "k3y" not in text
    got = shown.json()
    for hop in ("client", "upstream"):
        headers = got["request"][hop]["headers"]
        assert header(headers, "authorization") == ["[masked]"]
        assert header(headers, "cookie") == ["[masked]"]
        assert header(headers, "x-api-key") == ["[masked]"]


async def test_har_export_is_har_1_2(nursery, demo_upstream):
    _, port = demo_upstream
    proxy = await inspecting(nursery, port)
    async with httpx.AsyncClient() as client:
        await client.get(proxy.url + "/echo?a=1&b=two")
        await client.post(proxy.url + "/echo", content=b"\x00\xff binary")
        await client.get(proxy.url + "/status/503")
    response = await admin_get(proxy, "/inspect/har")
    assert response.headers["content-disposition"] == 'attachment; filename="pooled-proxy.har"'
    log = response.json()["log"]
    assert log["version"] == "1.2" and log["creator"]["name"] == "pooled-proxy"
    first, binary, failed = log["entries"]  # oldest first
    for entry in log["entries"]:
        assert set(entry) >= {"startedDateTime", "time", "request", "response", "cache", "timings"}
        assert all(entry["timings"][k] >= -1 for k in ("blocked", "dns", "connect"))
        assert all(entry["timings"][k] >= 0 for k in ("send", "wait", "receive"))
        assert entry["request"]["headersSize"] == entry["response"]["headersSize"] == -1
    request = first["request"]
    assert request["url"].startswith("http://127.0.0.1:") and request["url"].endswith(
        "/echo?a=1&b=two"
    )
    assert request["queryString"] == [{"name": "a", "value": "1"}, {"name": "b", "value": "two"}]
    assert json.loads(first["response"]["content"]["text"])["path"] == "/echo?a=1&b=two"
    assert first["response"]["content"]["mimeType"] == "application/json"
    assert binary["request"]["postData"]["text"] == "AP8gYmluYXJ5"  # base64: not UTF-8
    assert binary["response"]["content"]["encoding"] == "base64"
    assert (failed["response"]["status"], failed["response"]["statusText"]) == (
        503,
        "Service Unavailable",
    )


async def test_the_list_filters_by_path_status_and_method(nursery, demo_upstream):
    _, port = demo_upstream
    proxy = await inspecting(nursery, port)
    async with httpx.AsyncClient() as client:
        await client.get(proxy.url + "/status/404")
        await client.post(proxy.url + "/echo", content=b"x")
        await client.get(proxy.url + "/status/502")
        await client.get(proxy.url + "/echo")

    async def targets(query: str) -> list[str]:
        listing = await admin_json(proxy, "/inspect/exchanges?" + query)
        return [(row["method"], row["target"]) for row in listing["exchanges"]]

    assert await targets("status=4xx") == [("GET", "/status/404")]
    assert await targets("status=502") == [("GET", "/status/502")]
    assert await targets("method=post") == [("POST", "/echo")]
    assert await targets("path=echo&method=GET") == [("GET", "/echo")]
    assert len(await targets("")) == 4


async def test_only_the_last_exchanges_and_the_start_of_each_body_are_kept(nursery, demo_upstream):
    _, port = demo_upstream
    proxy = await inspecting(nursery, port, keep=3, max_body_bytes=10)
    async with httpx.AsyncClient() as client:
        for n in range(5):
            await client.post(proxy.url + f"/echo?n={n}", content=b"0123456789abcdef")
    listing = await admin_json(proxy, "/inspect/exchanges")
    assert [row["target"] for row in listing["exchanges"]] == [
        "/echo?n=4",
        "/echo?n=3",
        "/echo?n=2",
    ]
    got = await admin_json(proxy, f"/inspect/exchanges/{listing['exchanges'][0]['id']}")
    for body in (got["request"]["body"], got["response"]["body"]):
        assert (body["text"], body["kept"], body["size"], body["truncated"]) == (
            "0123456789",
            10,
            16,
            True,
        )
    gone = await admin_get(proxy, "/inspect/exchanges/1")
    assert gone.status_code == 404 and "only the last ones are kept" in gone.text
    refused = await replay(proxy, listing["exchanges"][0]["id"])
    assert refused.status_code == 409 and "max_body_bytes" in refused.text
    # With a body of its own, it can go.
    edited = await replay(proxy, listing["exchanges"][0]["id"], {"body": "new"})
    assert edited.status_code == 200


async def test_replay_sends_the_request_again_and_it_appears_in_the_list(nursery, demo_upstream):
    upstream, port = demo_upstream
    proxy = await inspecting(nursery, port)
    async with httpx.AsyncClient() as client:
        sent = await client.post(
            proxy.url + "/echo?from=client",
            content=b"hello",
            headers={"authorization": SECRET, "x-app": "1", "content-type": "text/plain"},
        )
    assert sent.status_code == 200
    [original] = (await admin_json(proxy, "/inspect/exchanges"))["exchanges"]
    before = upstream.stats.requests

    again = await replay(proxy, original["id"])
    assert again.status_code == 200, again.text
    assert again.json() == {"id": original["id"] + 1, "replay_of": original["id"]}
    same = await finished(proxy, again.json()["id"])
    assert (same["method"], same["target"], same["status"]) == ("POST", "/echo?from=client", 200)
    assert same["replay_of"] == original["id"]
    assert (same["bytes_in"], same["bytes_out"]) == (5, 5)
    assert same["response"]["body"]["text"] == "hello"  # what the upstream got, echoed

    edits = {
        "method": "PUT",
        "target": "/echo?from=replay",
        "headers": [["authorization", "[masked]"], ["x-app", "2"], ["content-type", "text/plain"]],
        "body": "edited body",
    }
    edited = await replay(proxy, original["id"], edits)
    assert edited.status_code == 200, edited.text
    changed = await finished(proxy, edited.json()["id"])
    assert upstream.stats.requests == before + 2
    assert (changed["method"], changed["target"]) == ("PUT", "/echo?from=replay")
    assert changed["response"]["body"]["text"] == "edited body"
    upstream_headers = changed["request"]["upstream"]["headers"]
    assert header(upstream_headers, "x-app") == ["2"]
    assert header(upstream_headers, "content-length") == ["11"]
    assert header(upstream_headers, "authorization") == ["[masked]"]  # shown masked...
    entry = proxy.inspector.get(changed["id"]) if proxy.inspector else None
    assert entry is not None and entry.upstream_request is not None
    sent_headers = dict(entry.upstream_request[1])
    assert sent_headers[b"authorization"] == SECRET.encode()  # ... sent as it was
    # The list has all three, newest first.
    listing = await admin_json(proxy, "/inspect/exchanges")
    assert [row["replay_of"] for row in listing["exchanges"]] == [original["id"]] * 2 + [None]
    assert "replay_of" in proxy.log_entries()[-1] or proxy.log_entries()[-1]["status"] == 200


async def test_a_replay_is_refused_clearly(nursery, demo_upstream):
    _, port = demo_upstream
    proxy = await inspecting(nursery, port)
    async with httpx.AsyncClient() as client:
        await client.get(proxy.url + "/echo")
        ident = (await admin_json(proxy, "/inspect/exchanges"))["exchanges"][0]["id"]
        url = f"{proxy.admin_url}/inspect/exchanges/{ident}/replay"
        as_form = await client.post(url, data={"a": "b"})
        via_get = await client.get(url)
    other_site = await replay(proxy, ident, origin="http://evil.example")
    unknown = await replay(proxy, 999)
    not_json = await replay(proxy, ident, ["GET"])
    smuggling = await replay(proxy, ident, {"headers": [["x-a", "1\r\nx-b: 2"]]})
    bad_target = await replay(proxy, ident, {"target": "http://elsewhere/"})
    assert as_form.status_code == 415
    assert (via_get.status_code, via_get.headers["allow"]) == (405, "POST")
    assert other_site.status_code == 403
    assert unknown.status_code == 404
    assert not_json.status_code == 400 and "JSON object" in not_json.text
    assert smuggling.status_code == 400 and "x-a" in smuggling.text
    assert bad_target.status_code == 400 and "target" in bad_target.text
    # Only the one exchange the client sent went through.
    assert len((await admin_json(proxy, "/inspect/exchanges"))["exchanges"]) == 1


async def test_an_event_stream_goes_event_by_event_and_is_shown_so(nursery):
    # The upstream writes an event only once the client has the one before and has waited
    # GAP: a proxy that held events back would see no next one, and the inspector's times
    # are at least GAP apart however busy the machine is.
    events = [b'id: %d\ndata: {"n": %d}\n\n' % (n, n) for n in (1, 2, 3)]
    go = [trio.Event(), trio.Event()]
    script: list[bytes | trio.Event | None] = [
        SSE_HEAD, chunk(events[0]), go[0], chunk(events[1]), go[1], chunk(events[2]) + b"0\r\n\r\n",
    ]  # fmt: skip
    upstream = ScriptedUpstream({"/events": script})
    proxy = await inspecting(nursery, await nursery.start(upstream.serve))
    arrivals: list[float] = []
    with trio.fail_after(10):
        async with await H11Client.connect(proxy.running.port) as client:
            await client.send(
                h11.Request(method="GET", target="/events", headers=[("host", "a")]),
                h11.EndOfMessage(),
            )
            assert isinstance(await client.next_event(), h11.Response)
            while isinstance(event := await client.next_event(), h11.Data):
                arrivals.append(time.monotonic())
                assert event.data == events[len(arrivals) - 1]  # one event, as written
                if len(arrivals) == 2:
                    # Mid-stream, the inspector already shows what passed.
                    [row] = (await admin_json(proxy, "/inspect/exchanges"))["exchanges"]
                    assert row["in_progress"] and row["event_stream"] and row["status"] == 200
                if len(arrivals) < 3:
                    await trio.sleep(GAP)
                    go[len(arrivals) - 1].set()
    assert len(arrivals) == 3
    assert arrivals[1] - arrivals[0] > GAP and arrivals[2] - arrivals[1] > GAP
    [row] = (await admin_json(proxy, "/inspect/exchanges"))["exchanges"]
    got = await admin_json(proxy, f"/inspect/exchanges/{row['id']}")
    shown = got["response"]["events"]
    assert [json.loads(e["text"].split("data: ")[1])["n"] for e in shown] == [1, 2, 3]
    assert [e["text"].split("\n")[0] for e in shown] == ["id: 1", "id: 2", "id: 3"]
    times = [e["at_ms"] for e in shown]
    assert times[1] - times[0] > GAP * 1000 - 1 and times[2] - times[1] > GAP * 1000 - 1


async def test_the_event_stream_sends_the_list_then_each_change(nursery, demo_upstream):
    _, port = demo_upstream
    proxy = await inspecting(nursery, port)
    async with httpx.AsyncClient() as client:
        await client.get(proxy.url + "/status/201")
        with trio.fail_after(5):
            events = await EventReader.open(proxy)
            head = await events.until("event: reset\ndata: ")
            assert "content-type: text/event-stream" in head.lower()
            assert "\r\nretry: 2000\n\nevent: reset" in head
            await events.until("\n\n")
            await client.get(proxy.url + "/status/202")
            rows = await events.until_finished("/status/202")
            await events.stream.aclose()
    [reset] = events.data("reset")
    assert [row["status"] for row in reset["exchanges"]] == [201]
    assert {row["target"] for row in rows} == {"/status/202"}
    assert rows[-1]["status"] == 202 and not rows[-1]["in_progress"]


async def test_off_by_default_the_inspector_is_not_there(nursery, demo_upstream):
    _, port = demo_upstream
    proxy = await start_operated_proxy(nursery, make_config(port))
    assert proxy.running.proxy.forwarder.tap is None
    async with httpx.AsyncClient() as client:
        assert (await client.get(proxy.url + "/echo")).status_code == 200
        page = await client.get(proxy.admin_url + "/inspect")
        listing = await client.get(proxy.admin_url + "/inspect/exchanges")
    assert page.status_code == listing.status_code == 404


async def test_the_inspector_is_never_on_the_proxys_port(nursery, demo_upstream):
    _, port = demo_upstream
    proxy = await inspecting(nursery, port)
    async with httpx.AsyncClient() as client:
        on_proxy = await client.get(proxy.url + "/inspect/exchanges")
    # The app's answer, recorded as any other.
    assert (on_proxy.status_code, on_proxy.text) == (404, "no such endpoint: /inspect/exchanges\n")
    [row] = (await admin_json(proxy, "/inspect/exchanges"))["exchanges"]
    assert (row["target"], row["status"]) == ("/inspect/exchanges", 404)


async def test_the_page_is_self_contained(nursery, demo_upstream):
    _, port = demo_upstream
    proxy = await inspecting(nursery, port)
    page = await admin_get(proxy, "/inspect")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert "http" not in page.text.replace("http://", "").lower().split("<script>")[0]
    assert "src=" not in page.text and "<link" not in page.text


async def test_a_256_mib_stream_each_way_through_the_inspector_keeps_memory_flat(
    nursery, demo_upstream
):
    # As test_streaming's test without the inspector: one process, so the peak RSS bounds
    # what the inspector kept of the bodies (max_body_bytes of each), not the stream.
    if not reset_peak_rss():
        pytest.skip("cannot reset VmHWM via /proc/self/clear_refs")
    _, port = demo_upstream
    proxy = await inspecting(nursery, port)
    size = 256 * MIB
    baseline = status_kib("VmRSS")
    block = bytes(range(256)) * 256  # 64 KiB
    with trio.fail_after(120):
        async with await H11Client.connect(proxy.running.port) as client:
            await client.send(
                h11.Request(
                    method="POST",
                    target="/echo",
                    headers=[("host", "a"), ("content-length", str(size))],
                )
            )
            echoed = 0

            async def upload() -> None:
                for _ in range(size // len(block)):
                    await client.send(h11.Data(data=block))
                await client.send(h11.EndOfMessage())

            async with trio.open_nursery() as uploader:
                uploader.start_soon(upload)
                assert isinstance(await client.next_event(), h11.Response)
                while isinstance(event := await client.next_event(), h11.Data):
                    echoed += len(event.data)
            assert echoed == size
    growth_mib = (status_kib("VmHWM") - baseline) / 1024
    assert growth_mib < 32, f"peak RSS grew by {growth_mib:.1f} MiB"
    [row] = (await admin_json(proxy, "/inspect/exchanges"))["exchanges"]
    got = await admin_json(proxy, f"/inspect/exchanges/{row['id']}")
    for body in (got["request"]["body"], got["response"]["body"]):
        assert (body["size"], body["kept"], body["truncated"]) == (size, 65536, True)


# ------------------------------------------------------------------------------------ config


def test_check_reports_bad_inspect_keys_by_file_and_line():
    text = """\
[server]
workers = 2

[admin]
listen = "127.0.0.1:9901"

[inspect]
enabled = true
keep = 0
max_body_bytes = -1
mask_headers = ["authorization", "not a name"]
keeep = 5

[upstreams.app]
servers = ["127.0.0.1:3000"]
"""
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "proxy.toml")
    assert [str(p) for p in caught.value.problems] == [
        "proxy.toml:8: inspect.enabled: needs server.workers = 1 (got 2)",
        "proxy.toml:9: inspect.keep: must be at least 1, got 0",
        "proxy.toml:10: inspect.max_body_bytes: must be at least 0, got -1",
        (
            "proxy.toml:11: inspect.mask_headers: expected header names such as "
            "\"authorization\", got 'not a name'"
        ),
        "proxy.toml:12: inspect.keeep: unknown key (did you mean keep?)",
    ]


def test_the_inspector_needs_the_admin_listener():
    with pytest.raises(ConfigError) as caught:
        parse_config('[inspect]\nenabled = true\n[upstreams.app]\nservers = ["h:1"]\n', "p.toml")
    assert [str(p) for p in caught.value.problems] == [
        "p.toml:2: inspect.enabled: needs [admin] listen: the inspector is served there"
    ]
    config = parse_config(
        '[admin]\nlisten = "127.0.0.1:0"\n[inspect]\nenabled = true\nmask_headers = ["X-Key"]\n'
        '[upstreams.app]\nservers = ["h:1"]\n'
    )
    assert config.inspect == InspectConfig(enabled=True, mask_headers=("x-key",))


async def test_the_upstream_hop_names_the_upstreams_http_version(nursery, demo_upstream):
    # An HTTP/1.1 client in front, an h2c server behind: each hop says what it spoke.
    upstream = await H2Upstream().start(nursery)
    app = UpstreamConfig(name="app", servers=(ServerAddress(HOST, upstream.port, h2=True),))
    config = replace(make_config(demo_upstream[1]), upstreams={"app": app})
    proxy = await start_operated_proxy(nursery, config, inspect=INSPECT)
    async with await H11Client.connect(proxy.running.port) as client:
        with trio.fail_after(5):
            assert (await client.request("GET", "/over-h2")).status == 200
    exchange = await finished(proxy, 1)
    assert exchange["request"]["client"]["version"] == "HTTP/1.1"
    assert exchange["request"]["upstream"]["version"] == "HTTP/2"
