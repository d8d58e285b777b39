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

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "pooled_proxy"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"exited early with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listening on {port}")


def stop(process: subprocess.Popen[bytes]) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


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
        [sys.executable, "-m", "pooled_proxy.demo", "--port", str(upstream_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    proxy = subprocess.Popen(
        [*CLI, "dev", f"http://127.0.0.1:{upstream_port}", "--listen", f"127.0.0.1:{proxy_port}"],
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
