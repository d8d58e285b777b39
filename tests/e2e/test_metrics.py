"""/metrics after real traffic: scraped over HTTP, parsed with prometheus_client.parser, and
matched against what was sent (and against what the upstream itself saw)."""

from __future__ import annotations

import h11
import httpx
import prometheus_client
import trio
import trio.testing

from pooled_proxy.config import (
    Config,
    RouteConfig,
    ServerAddress,
    ServerConfig,
    UpstreamConfig,
    parse_config,
)
from pooled_proxy.ops.metrics import ProxyMetrics
from tests.support.h2client import H2Client
from tests.support.helpers import HOST, H11Client, make_config
from tests.support.one_shot_upstream import OneShotUpstream
from tests.support.operations import Scrape, start_operated_proxy
from tests.support.ports import free_port


def _three_upstreams(app_port: int, dead_port: int) -> Config:
    """app: the demo upstream; slow: the same, with a short response-header timeout;
    tight: the same, one connection and no wait queue; dead: nothing listening."""

    def upstream(name: str, port: int, **limits: object) -> UpstreamConfig:
        return UpstreamConfig(name=name, servers=(ServerAddress(HOST, port),), **limits)  # type: ignore[arg-type]

    return Config(
        server=ServerConfig(listen=(ServerAddress(HOST, 0),)),
        upstreams={
            "app": upstream("app", app_port),
            "slow": upstream("slow", app_port, response_header_timeout=0.2),
            "tight": upstream("tight", app_port, max_connections=1, queue_size=0),
            "dead": upstream("dead", dead_port),
        },
        routes=(
            RouteConfig(upstream="dead", path_prefix="/dead/", strip_prefix=True),
            RouteConfig(upstream="slow", path_prefix="/slow-upstream/", strip_prefix=True),
            RouteConfig(upstream="tight", path_prefix="/tight/", strip_prefix=True),
            RouteConfig(upstream="app"),
        ),
    )


async def test_scrape_counts_match_the_traffic_sent(nursery, demo_upstream):
    upstream, app_port = demo_upstream
    dead_port = free_port()
    proxy = await start_operated_proxy(nursery, _three_upstreams(app_port, dead_port))
    app_bytes_out = 0
    with trio.fail_after(10):
        async with httpx.AsyncClient(base_url=proxy.url) as client:
            for _ in range(5):
                response = await client.get("/echo")
                assert response.status_code == 200
                app_bytes_out += len(response.content)
            for _ in range(2):
                response = await client.get("/status/404")
                assert response.status_code == 404
                app_bytes_out += len(response.content)
            response = await client.post("/echo", content=b"x" * 1000)
            assert response.status_code == 200 and response.content == b"x" * 1000
            app_bytes_out += len(response.content)
            for _ in range(3):
                assert (await client.get("/dead/x")).status_code == 502
            assert (await client.get("/slow-upstream/slow?delay=2")).status_code == 504

            # tight: one connection busy with a slow request, no queue -> the next gets 503.
            tight_pool = proxy.running.proxy.forwarder.upstreams["tight"].pools[0]
            async with trio.open_nursery() as background:
                background.start_soon(client.get, "/tight/slow?delay=0.3")
                while tight_pool.statistics().in_use == 0:
                    await trio.sleep(0.01)
                refused = await client.get("/tight/echo")
                assert refused.status_code == 503
        scrape = await proxy.scrape()

    # Requests by route, upstream and status class.
    assert scrape.value("pooled_proxy_requests_total", upstream="app", status_class="2xx") == 6
    assert scrape.value("pooled_proxy_requests_total", upstream="app", status_class="4xx") == 2
    assert scrape.value("pooled_proxy_requests_total", route="*/", upstream="app") == 8
    assert scrape.value("pooled_proxy_requests_total", route="*/dead/", status_class="5xx") == 3
    assert scrape.value("pooled_proxy_requests_total", upstream="slow", status_class="5xx") == 1
    assert scrape.value("pooled_proxy_requests_total", upstream="tight", status_class="2xx") == 1
    assert scrape.value("pooled_proxy_requests_total", upstream="tight", status_class="5xx") == 1
    assert scrape.value("pooled_proxy_requests_total") == 14

    # The proxy's own answers, per upstream server, with their Proxy-Status error.
    dead = f"{HOST}:{dead_port}"
    app = f"{HOST}:{app_port}"
    errors = "pooled_proxy_error_responses_total"
    assert scrape.value(errors, server=dead, status="502", error="connection_refused") == 3
    assert scrape.value(errors, upstream="slow", server=app, status="504",
                        error="http_response_timeout") == 1  # fmt: skip
    assert scrape.value(errors, upstream="tight", status="503",
                        error="connection_limit_reached") == 1  # fmt: skip
    assert scrape.value(errors) == 5
    assert scrape.value("pooled_proxy_upstream_queue_rejections_total",
                        upstream="tight", reason="full") == 1  # fmt: skip

    # Pool counters agree with what the upstream itself counted (it saw every connection).
    opened = scrape.value("pooled_proxy_upstream_connections_opened_total", upstream="app")
    reused = scrape.value("pooled_proxy_upstream_connections_reused_total", upstream="app")
    assert opened == 1  # one client connection, sequential requests: one upstream connection
    assert opened + reused == 8
    all_opened = scrape.value("pooled_proxy_upstream_connections_opened_total", server=app)
    assert all_opened == upstream.stats.connections_opened
    assert scrape.value("pooled_proxy_upstream_connections", upstream="app", state="idle") == 1
    assert scrape.value("pooled_proxy_upstream_connections", upstream="app", state="in_use") == 0
    # The 504 closed its connection as an error; the dead server never opened one.
    assert scrape.value("pooled_proxy_upstream_connections_closed_total",
                        upstream="slow", reason="error") == 1  # fmt: skip
    assert scrape.value("pooled_proxy_upstream_connections_opened_total", server=dead) == 0

    # Histograms: one observation per exchange that got that far.
    assert scrape.value("pooled_proxy_request_duration_seconds_count") == 14
    assert scrape.value("pooled_proxy_request_duration_seconds_bucket", upstream="app",
                        le="+Inf") == 8  # fmt: skip
    assert scrape.value("pooled_proxy_upstream_connect_duration_seconds_count",
                        upstream="app") == opened  # fmt: skip
    assert scrape.value("pooled_proxy_upstream_response_header_duration_seconds_count",
                        upstream="app") == 8  # fmt: skip
    # The 504 never got a response head.
    assert scrape.value("pooled_proxy_upstream_response_header_duration_seconds_count",
                        upstream="slow") == 0  # fmt: skip
    assert 0 < scrape.value("pooled_proxy_request_duration_seconds_sum", upstream="app") < 5
    assert scrape.value("pooled_proxy_request_duration_seconds_sum", upstream="slow") >= 0.2
    assert scrape.value("pooled_proxy_request_body_bytes_total", upstream="app") == 1000
    assert scrape.value("pooled_proxy_response_body_bytes_total", upstream="app") == app_bytes_out
    assert scrape.types["pooled_proxy_request_duration_seconds"] == "histogram"
    assert scrape.types["pooled_proxy_upstream_connections"] == "gauge"


async def test_live_gauges_follow_an_event_stream(nursery, demo_upstream):
    _, port = demo_upstream
    proxy = await start_operated_proxy(nursery, make_config(port))
    with trio.fail_after(10):
        before = await proxy.scrape()
        assert before.value("pooled_proxy_event_streams_active") == 0
        assert before.value("pooled_proxy_client_connections", protocol="http/1.1") == 0
        assert before.has("pooled_proxy_client_connections", protocol="h2")

        async with await H11Client.connect(proxy.running.port) as client:
            await client.send(
                h11.Request(method="GET", target="/events?interval=0.05", headers=[("host", "x")]),
                h11.EndOfMessage(),
            )
            head = await client.next_event()
            assert head.status_code == 200
            assert (await client.next_event()).data.startswith(b"id: 1")
            during = await proxy.scrape()
        assert during.value("pooled_proxy_event_streams_active") == 1
        assert during.value("pooled_proxy_exchanges_in_flight") == 1
        assert during.value("pooled_proxy_client_connections", protocol="http/1.1") == 1
        assert during.value("pooled_proxy_upstream_connections", state="in_use") == 1
        assert during.value("pooled_proxy_event_streams_total") == 0

        # The client left: the proxy notices on its next write and ends the exchange.
        while (after := await proxy.scrape()).value("pooled_proxy_exchanges_in_flight"):
            await trio.sleep(0.02)
    assert after.value("pooled_proxy_event_streams_active") == 0
    assert after.value("pooled_proxy_event_streams_total") == 1
    assert after.value("pooled_proxy_requests_total", status_class="2xx") == 1
    assert after.value("pooled_proxy_error_responses_total", error="client_disconnected") == 1
    # A half-read stream's upstream connection is never pooled again.
    assert after.value("pooled_proxy_upstream_connections_closed_total", reason="error") == 1
    assert after.value("pooled_proxy_upstream_connections", state="in_use") == 0
    # Event streams stay out of the request duration histogram (they would swamp it).
    assert after.value("pooled_proxy_request_duration_seconds_count") == 0


async def test_an_event_stream_stays_counted_across_a_reload(nursery, demo_upstream):
    _, port = demo_upstream
    proxy = await start_operated_proxy(nursery, make_config(port))
    with trio.fail_after(10):
        async with await H11Client.connect(proxy.running.port) as client:
            await client.send(
                h11.Request(method="GET", target="/events?interval=0.05", headers=[("host", "x")]),
                h11.EndOfMessage(),
            )
            assert (await client.next_event()).status_code == 200
            await client.next_event()
            # New settings for the upstream: a new forwarder and new pools take new requests;
            # the stream goes on on the old ones.
            summary = proxy.running.proxy.reload(make_config(port, idle_timeout=30.0))
            assert summary.replaced == ("app",)
            await client.next_event()
            during = await proxy.scrape()
        while (after := await proxy.scrape()).value("pooled_proxy_exchanges_in_flight"):
            await trio.sleep(0.02)
    assert during.value("pooled_proxy_event_streams_active") == 1
    assert after.value("pooled_proxy_event_streams_active") == 0
    assert after.value("pooled_proxy_event_streams_total") == 1


async def test_h2_connections_and_exchanges_are_counted(nursery, demo_upstream):
    from tests.support.h2client import H2Client

    _, port = demo_upstream
    proxy = await start_operated_proxy(nursery, make_config(port))
    with trio.fail_after(5):
        async with await H2Client.connect(proxy.running.port) as client:
            replies = [await client.get("/echo"), await client.get("/status/503")]
            assert [reply.status for reply in replies] == [200, 503]
            during = await proxy.scrape()
        while (after := await proxy.scrape()).value(
            "pooled_proxy_client_connections", protocol="h2"
        ):
            await trio.sleep(0.02)
    assert during.value("pooled_proxy_client_connections", protocol="h2") == 1
    assert during.value("pooled_proxy_client_connections", protocol="http/1.1") == 0
    assert after.value("pooled_proxy_requests_total", status_class="2xx") == 1
    assert after.value("pooled_proxy_requests_total", status_class="5xx") == 1
    # The upstream's own 503 is not one of the proxy's error answers.
    assert after.value("pooled_proxy_error_responses_total") == 0
    assert [entry["protocol"] for entry in proxy.log_entries()] == ["HTTP/2", "HTTP/2"]


async def test_close_reasons_and_stale_retries_are_counted(nursery, demo_upstream):
    _, port = demo_upstream
    recycled = await start_operated_proxy(nursery, make_config(port, max_requests_per_connection=2))
    stale_upstream = OneShotUpstream()
    stale_port = await nursery.start(stale_upstream.serve)
    stale = await start_operated_proxy(nursery, make_config(stale_port))
    with trio.fail_after(10):
        async with await H11Client.connect(recycled.running.port) as client:
            for _ in range(4):
                assert (await client.request("GET", "/echo")).status == 200
        async with await H11Client.connect(stale.running.port) as client:
            for _ in range(3):
                assert (await client.request("GET", "/")).status == 200
        await trio.testing.wait_all_tasks_blocked()
        scrape = await recycled.scrape()
        stale_scrape = await stale.scrape()
    closed = "pooled_proxy_upstream_connections_closed_total"
    assert scrape.value(closed, reason="max_requests") == 2
    assert scrape.value("pooled_proxy_upstream_connections_opened_total") == 2
    assert scrape.value(closed, reason="idle_timeout") == 0  # exported before it first moves
    # Each reuse found the connection dead and retried once on a fresh one: never a 502.
    assert stale_scrape.value("pooled_proxy_upstream_stale_retries_total") == 2
    assert stale_scrape.value("pooled_proxy_upstream_connections_opened_total") == 3
    assert stale_scrape.value("pooled_proxy_requests_total", status_class="2xx") == 3
    assert stale_scrape.value("pooled_proxy_error_responses_total") == 0


async def test_idle_connections_closed_by_the_reaper_are_counted(nursery, demo_upstream):
    _, port = demo_upstream
    proxy = await start_operated_proxy(nursery, make_config(port, idle_timeout=0.1))
    with trio.fail_after(5):
        async with httpx.AsyncClient(base_url=proxy.url) as client:
            assert (await client.get("/echo")).status_code == 200
        while (scrape := await proxy.scrape()).value(
            "pooled_proxy_upstream_connections", state="idle"
        ):
            await trio.sleep(0.05)
    assert scrape.value("pooled_proxy_upstream_connections_closed_total",
                        reason="idle_timeout") == 1  # fmt: skip


async def test_registries_are_per_proxy_never_global(nursery, demo_upstream):
    _, port = demo_upstream
    first = await start_operated_proxy(nursery, make_config(port))
    second = await start_operated_proxy(nursery, make_config(port))
    with trio.fail_after(5):
        async with httpx.AsyncClient() as client:
            assert (await client.get(first.url + "/echo")).status_code == 200
        one, other = await first.scrape(), await second.scrape()
    assert one.value("pooled_proxy_requests_total") == 1
    assert other.value("pooled_proxy_requests_total") == 0
    global_text = prometheus_client.generate_latest(prometheus_client.REGISTRY).decode()
    assert "pooled_proxy_" not in global_text
    # An unbound registry (no proxy yet) still renders its own series, without the gauges.
    lonely = Scrape.parse(ProxyMetrics().exposition()[0].decode())
    assert "pooled_proxy_requests" in lonely.types
    assert "pooled_proxy_upstream_connections" not in lonely.types


async def test_openmetrics_is_served_when_asked_for(nursery, demo_upstream):
    _, port = demo_upstream
    proxy = await start_operated_proxy(nursery, make_config(port))
    with trio.fail_after(5):
        async with httpx.AsyncClient() as client:
            response = await client.get(
                proxy.admin_url + "/metrics",
                headers={"accept": "application/openmetrics-text; version=1.0.0"},
            )
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n")


async def test_process_build_and_reload_metrics(nursery, demo_upstream, tmp_path):
    from pooled_proxy import __version__
    from pooled_proxy._compiled import codec, h11_library
    from pooled_proxy.daemon.reload import Reloader
    from tests.support.daemon import DaemonConfig

    _, port = demo_upstream
    path = tmp_path / "proxy.toml"
    path.write_text(DaemonConfig(upstreams={"app": port}).to_toml())
    proxy = await start_operated_proxy(nursery, parse_config(path.read_text(), str(path)))
    reloader = Reloader(proxy.running.proxy, str(path))
    with trio.fail_after(5):
        started = await proxy.scrape()
        path.write_text(path.read_text().replace("[upstreams.app]", "[upstreams.app]\nbad = 1"))
        assert not await reloader.reload("test")
        failed = await proxy.scrape()
        path.write_text(path.read_text().replace("bad = 1\n", ""))
        assert await reloader.reload("test")
        fixed = await proxy.scrape()
    assert started.value("process_cpu_seconds_total") > 0
    assert started.value("process_resident_memory_bytes") > 0
    assert started.has("python_gc_collections_total")
    build = {"version": __version__, "codec": codec(), "h11": h11_library()}
    assert started.value("pooled_proxy_build_info", **build) == 1
    assert started.value("pooled_proxy_config_last_reload_success") == 1
    loaded = started.value("pooled_proxy_config_last_reload_success_timestamp_seconds")
    assert failed.value("pooled_proxy_config_last_reload_success") == 0
    assert failed.value("pooled_proxy_config_last_reload_success_timestamp_seconds") == loaded
    assert fixed.value("pooled_proxy_config_last_reload_success") == 1
    assert fixed.value("pooled_proxy_config_last_reload_success_timestamp_seconds") > loaded


async def test_client_connections_count_idle_ones_of_every_protocol(nursery, demo_upstream):
    _, port = demo_upstream
    proxy = await start_operated_proxy(nursery, make_config(port))
    gauge = "pooled_proxy_client_connections"
    with trio.fail_after(10):
        h1 = [await H11Client.connect(proxy.running.port) for _ in range(3)]
        h2 = [await H2Client.connect(proxy.running.port) for _ in range(2)]
        silent = [await trio.open_tcp_stream(HOST, proxy.running.port) for _ in range(4)]
        try:
            for client in h1:
                assert (await client.request("GET", "/echo")).status == 200
            for h2_client in h2:
                assert (await h2_client.get("/echo")).status == 200
            # All idle now: keep-alive between requests, or connected and silent.
            while proxy.running.proxy.client_connections < 9:
                await trio.sleep(0.01)
            scrape = await proxy.scrape()
        finally:
            for stream in [*(c.stream for c in h1), *(c.stream for c in h2), *silent]:
                await stream.aclose()
    assert scrape.value(gauge, protocol="http/1.1") == 3
    assert scrape.value(gauge, protocol="h2") == 2
    assert scrape.value(gauge, protocol="pending") == 4
    assert scrape.value("pooled_proxy_exchanges_in_flight") == 0
