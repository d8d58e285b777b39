"""config/systemd/: the unit file and the logrotate snippet agree with the code (command,
signals, drain time), and systemd itself accepts the unit (``systemd-analyze verify``, where
installed). The readiness protocol is tested on a real socket in test_signals.py."""

from __future__ import annotations

import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pooled_proxy.config import load_config
from pooled_proxy.daemon.cli import _parser
from pooled_proxy.daemon.lifecycle import DRAIN_SIGNALS, RELOAD_SIGNAL, REOPEN_SIGNAL

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "config" / "systemd" / "pooled-proxy.service"
LOGROTATE = ROOT / "config" / "systemd" / "pooled-proxy.logrotate"
INSTALLED = "/opt/pooled-proxy/bin/pooled-proxy"


def unit_settings(path: Path) -> dict[str, list[str]]:
    """``Key=value`` lines of the unit (all sections), a key's values in order."""
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def command(line: str) -> list[str]:
    program, *args = shlex.split(line)
    assert program == INSTALLED
    return args


def test_the_unit_runs_checks_reloads_and_stops_the_proxy_as_the_code_expects():
    unit = unit_settings(UNIT)
    assert unit["Type"] == ["notify"] and unit["NotifyAccess"] == ["main"]
    (environment,) = unit["Environment"]
    assert environment.startswith("POOLED_PROXY_CONFIG=/")
    assert _parser().parse_args(command(unit["ExecStartPre"][0])).command == "check"
    assert _parser().parse_args(command(unit["ExecStart"][0])).command == "run"
    check, kill = unit["ExecReload"]
    assert _parser().parse_args(command(check)).command == "check"
    assert kill == f"/bin/kill -{RELOAD_SIGNAL.name.removeprefix('SIG')} $MAINPID"
    assert signal.Signals[unit["KillSignal"][0]] in DRAIN_SIGNALS
    # The supervisor passes SIGTERM on to its workers: systemd must not signal them too.
    assert unit["KillMode"] == ["mixed"]
    drain = load_config(ROOT / "config" / "production.toml").server.drain_timeout
    assert float(unit["TimeoutStopSec"][0].removesuffix("s")) > drain


def test_logrotate_signals_the_proxy_to_reopen_its_logs():
    text = LOGROTATE.read_text()
    unit = unit_settings(UNIT)
    (logs,) = unit["LogsDirectory"]
    assert f"/var/log/{logs}/*.log {{" in text
    assert f"--signal={REOPEN_SIGNAL.name} {UNIT.name}" in text
    assert "--kill-whom=main" in text  # the supervisor passes it on to each worker
    assert "delaycompress" in text  # lines written before the reopen land in the moved file


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="needs systemd-analyze")
def test_systemd_accepts_the_unit(tmp_path):
    here = Path(sys.executable).parent / "pooled-proxy"
    if not here.exists():
        pytest.skip("needs the installed pooled-proxy script")
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace(INSTALLED, str(here)))
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
