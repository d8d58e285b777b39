"""The interop programs on a fresh machine and in CI: a test whose program is missing is skipped
with a line and a summary, and fails under POOLED_PROXY_REQUIRE_INTEROP=1, which CI sets
after installing the one list of programs (.ci/interop-deps) and checking the lint."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.interop.servers import REQUIRE_ENV

ROOT = Path(__file__).resolve().parents[2]
# Two cheap tests, each of which needs one program (neither of them in /usr/sbin or /sbin,
# where require_program also looks).
SELECTION = [
    "tests/interop/test_h2_clients.py::test_nghttp_parallel_streams_and_sse",
    "tests/interop/test_h2_clients.py::test_h2load_multiplexed_load",
]


def interop_programs() -> list[str]:
    done = subprocess.run(
        [ROOT / ".ci" / "interop-deps", "--list"], capture_output=True, text=True, check=True
    )
    return done.stdout.split()


def test_every_program_the_interop_tests_run_is_in_the_one_install_list():
    named = set()
    for source in (ROOT / "tests" / "interop").glob("*.py"):
        named |= set(re.findall(r"require_program\(\s*[\"'](\w+)[\"']", source.read_text()))
    assert named == set(interop_programs())


def test_ci_installs_the_programs_requires_them_and_lints_before_testing():
    steps = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert steps.index(".ci/interop-deps") < steps.index(f"export {REQUIRE_ENV}=1")
    assert steps.index(f"export {REQUIRE_ENV}=1") < steps.index("make lint")
    assert steps.index("make lint") < steps.index("make test")
    makefile = (ROOT / "Makefile").read_text()
    assert "\ninterop-deps:\n\t.ci/interop-deps\n" in makefile


def run_selection(capsys: pytest.CaptureFixture[str]) -> tuple[int | pytest.ExitCode, str]:
    """pytest on SELECTION in this process (a second one would spend seconds importing).
    ``timeout=0``: the inner tests set no alarm, which would replace this test's own."""
    code = pytest.main(
        ["-p", "no:cacheprovider", "-o", "timeout=0", "--rootdir", str(ROOT), *SELECTION]
    )
    return code, capsys.readouterr().out


def test_missing_programs_skip_with_a_summary_and_fail_when_required(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    monkeypatch.chdir(ROOT)
    # Nothing on PATH at all: the selected tests need no other program, and making a PATH of
    # everything but the interop programs costs more than the rest of this test.
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv(REQUIRE_ENV, raising=False)
    code, out = run_selection(capsys)
    assert code == pytest.ExitCode.OK, out
    assert "2 skipped" in out, out
    assert f"SKIPPED {SELECTION[0]}: nghttp is not installed" in out
    assert f"SKIPPED {SELECTION[1]}: h2load is not installed" in out
    assert (
        "2 interop test(s) skipped: nghttp, h2load not installed; `make interop-deps` installs them"
    ) in out

    monkeypatch.setenv(REQUIRE_ENV, "1")
    code, out = run_selection(capsys)
    assert code == pytest.ExitCode.TESTS_FAILED, out
    assert "2 failed" in out, out
    for program in ("nghttp", "h2load"):
        assert f"{program} is not installed and {REQUIRE_ENV} is set" in out
