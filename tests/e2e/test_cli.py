"""The pooled-proxy command as a user runs it: real subprocesses, real sockets."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support.cli import CLI, stop, wait_for_port
from tests.support.ports import free_port

ROOT = Path(__file__).resolve().parents[2]


def test_check_reports_every_problem_with_file_and_line(tmp_path):
    config = tmp_path / "proxy.toml"
    config.write_text(
        '[server]\nlisten = ["127.0.0.1:8080"]\nheader_timeout = "10"\n\n'
        '[upstreams.api]\nservers = ["127.0.0.1:9000"]\nmax_conections = 5\n\n'
        '[[routes]]\npath_prefix = "/api/"\nupstream = "apii"\n'
    )
    result = subprocess.run([*CLI, "check", "-c", str(config)], capture_output=True, text=True)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith(f"{config}:3: server.header_timeout: bad duration")
    assert lines[1] == (
        f"{config}:7: upstreams.api.max_conections: unknown key (did you mean max_connections?)"
    )
    assert lines[2].startswith(f"{config}:11: routes[0].upstream: unknown upstream")


def test_check_accepts_a_good_config(tmp_path):
    config = tmp_path / "proxy.toml"
    config.write_text('[upstreams.app]\nservers = ["127.0.0.1:9000"]\n')
    result = subprocess.run([*CLI, "check", "-c", str(config)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_run_refuses_a_bad_config_before_listening(tmp_path):
    port = free_port()
    config = tmp_path / "proxy.toml"
    config.write_text(f'[server]\nlisten = ["127.0.0.1:{port}"]\n[upstreams.app]\nservers = []\n')
    result = subprocess.run(
        [*CLI, "run", "-c", str(config)], capture_output=True, text=True, timeout=20
    )
    assert result.returncode == 2
    assert re.match(rf"{re.escape(str(config))}:4: upstreams\.app\.servers: ", result.stderr)


def test_run_without_config_is_a_usage_error():
    env = {k: v for k, v in os.environ.items() if k != "POOLED_PROXY_CONFIG"}
    result = subprocess.run([*CLI, "run"], capture_output=True, text=True, env=env)
    assert result.returncode == 2
    assert "no config file" in result.stderr


def test_config_from_environment_variable(tmp_path):
    config = tmp_path / "proxy.toml"
    config.write_text('[upstreams.app]\nservers = ["127.0.0.1:9000"]\n')
    env = {**os.environ, "POOLED_PROXY_CONFIG": str(config)}
    result = subprocess.run([*CLI, "check"], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr


def test_dev_proxies_one_upstream_without_a_config_file():
    upstream_port, proxy_port = free_port(), free_port()
    upstream = subprocess.Popen(
        [sys.executable, "-m", "pooled_proxy.daemon.demo_upstream", "--port", str(upstream_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    dev_args = [f"http://127.0.0.1:{upstream_port}", "--listen", f"127.0.0.1:{proxy_port}"]
    proxy = subprocess.Popen(
        [*CLI, "dev", *dev_args, "--admin", "127.0.0.1:0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(upstream_port, upstream)
        wait_for_port(proxy_port, proxy)
        response = httpx.get(f"http://127.0.0.1:{proxy_port}/echo", timeout=5)
        assert response.status_code == 200
        assert response.json()["path"] == "/echo"
        assert stop(proxy) == 0
    finally:
        for process in (proxy, upstream):
            if process.poll() is None:
                process.kill()
                process.wait()


def _readme_setup_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in section.strip().splitlines()]


def test_readme_setup_is_two_commands_and_ci_runs_the_same_test_command():
    assert _readme_setup_commands() == ["make demo", "make test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.rstrip().splitlines()[-1] == "make test"


@pytest.mark.skipif(
    not (ROOT / ".venv" / "bin" / "pooled-proxy").exists(), reason="needs make's .venv"
)
def test_readme_make_demo_serves_the_demo_and_drains_on_sigterm():
    port = free_port()
    process = subprocess.Popen(
        ["make", "--no-print-directory", "demo", f"LISTEN=127.0.0.1:{port}"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for_port(port, process)
        base = f"http://127.0.0.1:{port}"
        assert "EventSource" in httpx.get(base + "/", timeout=5).text
        assert httpx.post(base + "/echo", content=b"hello", timeout=5).content == b"hello"
        with httpx.stream("GET", base + "/events?count=2&interval=0.05", timeout=5) as events:
            text = "".join(events.iter_text())
        assert text.count("data: ") == 2
        # Signal the proxy (make's child), as a terminal's Ctrl-C or a supervisor would;
        # make then exits with the proxy's status.
        children = Path("/proc") / str(process.pid) / "task" / str(process.pid) / "children"
        for child in children.read_text().split():
            os.kill(int(child), signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_a_port_in_use_is_one_clear_line_and_exit_1(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = tmp_path / "proxy.toml"
        config.write_text(
            f'[server]\nlisten = ["127.0.0.1:{port}"]\n[upstreams.app]\nservers = ["127.0.0.1:9"]\n'
        )
        result = subprocess.run(
            [*CLI, "run", "-c", str(config)], capture_output=True, text=True, timeout=20
        )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in result.stderr
    assert "Traceback" not in result.stderr


# -------------------------------------------------------------------- check and run agree

AGREEMENT_CASES = [
    (
        "[admin] on the [server] address",
        '[server]\nlisten = ["127.0.0.1:{port}"]\n[admin]\nlisten = "127.0.0.1:{port}"\n',
        ':4: admin.listen: "127.0.0.1:{port}" is already taken by server.listen[0]',
    ),
    (
        "an access log in a folder that does not exist",
        '[server]\nlisten = ["127.0.0.1:{port}"]\n[log]\naccess = "missing/access.log"\n',
        ":4: log.access: cannot create ",
    ),
]


@pytest.mark.parametrize(("case", "config_text", "message"), AGREEMENT_CASES)
def test_check_refuses_what_run_would_fail_on_and_run_refuses_it_before_listening(
    tmp_path, case, config_text, message
):
    port = free_port()
    config = tmp_path / "proxy.toml"
    config.write_text(
        config_text.format(port=port) + '[upstreams.app]\nservers = ["127.0.0.1:9"]\n'
    )
    expected = f"{config}{message.format(port=port)}"
    checked = subprocess.run(
        [*CLI, "check", str(config)], capture_output=True, text=True, check=False
    )
    assert (checked.returncode, checked.stderr.startswith(expected)) == (2, True), checked.stderr
    ran = subprocess.run(
        [*CLI, "run", "-c", str(config)], capture_output=True, text=True, timeout=20, check=False
    )
    # Exit 2 with check's very words: refused as a config error, before listening (a failed
    # bind or open once running is exit 1 with another message).
    assert (ran.returncode, ran.stderr) == (2, checked.stderr)


def test_check_takes_the_file_as_an_argument_or_with_c(tmp_path):
    config = tmp_path / "proxy.toml"
    config.write_text('[upstreams.app]\nservers = ["127.0.0.1:9000"]\n')
    for args in (["check", str(config)], ["check", "-c", str(config)]):
        result = subprocess.run([*CLI, *args], capture_output=True, text=True, check=False)
        assert (result.returncode, result.stdout) == (
            0,
            f"{config}: ok (1 upstream(s), 1 route(s))\n",
        )
    other = tmp_path / "other.toml"
    both = subprocess.run(
        [*CLI, "check", str(config), "-c", str(other)], capture_output=True, text=True, check=False
    )
    assert both.returncode == 2 and "two config files" in both.stderr


@pytest.mark.parametrize("command", ["run", "check", "dev", "demo", "healthcheck"])
def test_every_subcommand_help_has_a_description_and_examples(command):
    result = subprocess.run([*CLI, command, "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0
    usage, description, *_ = result.stdout.split("\n\n")
    assert usage.startswith(f"usage: pooled-proxy {command}")
    assert len(description.split()) >= 10, description
    examples = result.stdout.split("examples:\n", 1)[1]
    assert examples.strip().startswith(f"pooled-proxy {command}") or command == "healthcheck"
    assert f"pooled-proxy {command}" in examples


# ------------------------------------------------------------------------------- dev proxy


def start_dev(*args: str) -> subprocess.Popen[str]:
    """``pooled-proxy dev``, with its admin listener on a port of its own choosing unless
    ``args`` name one (the default, 9901, may be taken on this machine)."""
    admin = () if "--admin" in args else ("--admin", "127.0.0.1:0")
    return subprocess.Popen(
        [*CLI, "dev", *args, *admin], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def demo_upstream_process(port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "pooled_proxy.daemon.demo_upstream", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def kill_all(*processes: subprocess.Popen) -> None:  # type: ignore[type-arg]
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()


def test_dev_takes_caddys_shorthand_routes_two_apps_and_says_what_it_does(tmp_path):
    app_port, api_port, proxy_port, admin_port = free_port(), free_port(), free_port(), free_port()
    access_log = tmp_path / "access.log"
    app, api = demo_upstream_process(app_port), demo_upstream_process(api_port)
    proxy = start_dev(
        f":{app_port}",
        "--listen", str(proxy_port),
        "--route", f"/api=http://127.0.0.1:{api_port}",
        "--access-log", str(access_log),
        "--admin", str(admin_port),
    )  # fmt: skip
    try:
        wait_for_port(app_port, app)
        wait_for_port(api_port, api)
        wait_for_port(proxy_port, proxy)
        base = f"http://127.0.0.1:{proxy_port}"
        page = httpx.get(f"{base}/echo", timeout=5)
        assert page.status_code == 200 and page.json()["path"] == "/echo"
        # The demo upstream answers /echo only: /api/echo reaching the api app (prefix kept)
        # is a 404 from it, with its own body.
        api_reply = httpx.get(f"{base}/api/echo", timeout=5)
        assert api_reply.status_code == 404 and "no such endpoint: /api/echo" in api_reply.text
        # The client's Host goes up unchanged without --change-host-header.
        assert dict(page.json()["headers"])["host"] == f"127.0.0.1:{proxy_port}"
        # The inspector is on, on the admin port.
        inspected = httpx.get(f"http://127.0.0.1:{admin_port}/inspect/exchanges", timeout=5)
        rows = [(row["target"], row["upstream"]) for row in inspected.json()["exchanges"]]
        assert rows == [("/api/echo", "api"), ("/echo", "app")]
        assert stop(proxy) == 0
        log = proxy.stderr.read() if proxy.stderr else ""
    finally:
        kill_all(proxy, app, api)
    lines = [line.split(": ", 1)[1] for line in log.splitlines() if " INFO pooled_proxy: " in line]
    assert lines[0].startswith("pooled-proxy 0.1.0 (dev, pid ")
    assert lines[1:] == [
        f"listen: http://127.0.0.1:{proxy_port}",
        f"route */api -> upstream api: http://127.0.0.1:{api_port}",
        f"route */ -> upstream app: http://localhost:{app_port}",
        f"admin: http://127.0.0.1:{admin_port}",
        f"inspector: http://127.0.0.1:{admin_port}/inspect (the last 200 exchanges)",
        f"access log: {access_log} (combined)",
    ]
    assert f"listening on http://127.0.0.1:{proxy_port}" in log
    logged = access_log.read_text().splitlines()
    assert len(logged) == 2 and '"GET /api/echo HTTP/1.1" 404' in logged[1]


def test_dev_change_host_header_sends_the_upstreams_name(tmp_path):
    app_port, proxy_port = free_port(), free_port()
    app = demo_upstream_process(app_port)
    proxy = start_dev(f"localhost:{app_port}", "--listen", f":{proxy_port}", "--change-host-header")
    try:
        wait_for_port(app_port, app)
        wait_for_port(proxy_port, proxy)
        reply = httpx.get(f"http://127.0.0.1:{proxy_port}/echo", timeout=5).json()
        headers = dict(reply["headers"])
        assert headers["host"] == f"localhost:{app_port}"
        assert headers["x-forwarded-host"] == f"127.0.0.1:{proxy_port}"
        assert stop(proxy) == 0
    finally:
        kill_all(proxy, app)


def test_ctrl_c_on_dev_with_an_event_stream_open_waits_2s_not_30s():
    app_port, proxy_port = free_port(), free_port()
    app = demo_upstream_process(app_port)
    proxy = start_dev(str(app_port), "--listen", str(proxy_port), "--access-log", "off")
    try:
        wait_for_port(app_port, app)
        wait_for_port(proxy_port, proxy)
        with httpx.stream("GET", f"http://127.0.0.1:{proxy_port}/events", timeout=5) as events:
            lines = events.iter_lines()  # kept: a dropped iterator closes the stream
            assert next(lines).startswith("id: ")  # the stream is open and flowing
            proxy.send_signal(signal.SIGINT)  # what Ctrl-C sends
            started = time.monotonic()
            assert proxy.wait(timeout=15) == 0
            waited = time.monotonic() - started
        log = proxy.stderr.read() if proxy.stderr else ""
    finally:
        kill_all(proxy, app)
    assert "waiting up to 2s (drain_timeout)" in log, log
    assert "1 cut" in log, log
    assert 1.9 <= waited < 10, waited


@pytest.mark.skipif(not socket.has_ipv6, reason="needs IPv6")
@pytest.mark.parametrize("workers", [1, 2])
def test_a_star_listens_on_ipv4_and_ipv6(tmp_path, workers):
    upstream_port, port = free_port(), free_port()
    config = tmp_path / "proxy.toml"
    config.write_text(
        f'[server]\nlisten = ["*:{port}"]\nworkers = {workers}\n'
        f'[upstreams.app]\nservers = ["127.0.0.1:{upstream_port}"]\n'
    )
    upstream = demo_upstream_process(upstream_port)
    proxy = subprocess.Popen(
        [*CLI, "run", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for_port(upstream_port, upstream)
        wait_for_port(port, proxy)
        for host in ("127.0.0.1", "[::1]"):
            deadline = time.monotonic() + 20
            while True:  # with workers, the IPv6 listener may come a moment after the IPv4 one
                try:
                    reply = httpx.get(f"http://{host}:{port}/echo", timeout=5)
                    break
                except httpx.ConnectError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            assert reply.status_code == 200
        assert stop(proxy) == 0
    finally:
        kill_all(proxy, upstream)
