"""The README's commands run as written: the make targets and the CLI options it names exist,
its config examples load, its curl examples get answers from the demo, and its
troubleshooting table covers every error the proxy answers with."""

from __future__ import annotations

import re
import shlex
import shutil
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import trio

from pooled_proxy import errors
from pooled_proxy.config import dev_config
from pooled_proxy.daemon.cli import _parser, dev_config_from_args, main
from pooled_proxy.daemon.demo_upstream import DemoUpstream
from tests.support.helpers import H11Client, start_proxy

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
# The user-facing documents: what they say must hold for this project alone.
DOCUMENTS = ("README.md", "CONTRIBUTING.md", "bench/README.md")


def fenced_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.DOTALL | re.MULTILINE)


def shell_commands(text: str) -> list[list[str]]:
    """Every command of the ```sh blocks, split as the shell would, comments dropped."""
    return [
        shlex.split(line, comments=True)
        for block in fenced_blocks(text, "sh")
        for line in block.splitlines()
        if shlex.split(line, comments=True)
    ]


def section(title: str) -> str:
    return README.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_readme_sections_come_in_the_order_a_new_user_needs_them():
    titles = re.findall(r"^## (.+)$", README, re.MULTILINE)
    wanted = [
        "Quick start",
        "Install",
        "In front of my app",
        "Configuration",
        "Behaviour",
        "Operating it",
        "Troubleshooting",
        "Known limitations",
        "Performance",
    ]
    assert [title for title in titles if title in wanted] == wanted


@pytest.mark.parametrize("document", DOCUMENTS)
def test_documents_name_no_issue_numbers_or_internal_targets(document: str):
    text = (ROOT / document).read_text()
    assert not re.findall(r"(?i)\bissues? #?\d+|\(#\d+\)", text)


def test_the_readme_speaks_of_measurements_not_of_targets():
    assert not re.findall(r"(?i)\bbars?\b|\btargets?\b", section("Performance"))


def test_every_make_target_the_docs_name_exists():
    targets = {
        command[1]
        for document in ("README.md", "CONTRIBUTING.md")
        for command in shell_commands((ROOT / document).read_text())
        if command[0] == "make"
    }
    assert {"demo", "test", "interop-deps", "lint"} <= targets
    makefile = (ROOT / "Makefile").read_text()
    defined = set(re.findall(r"^([\w-]+):", makefile, re.MULTILINE))
    assert targets <= defined, targets - defined


def test_every_pooled_proxy_command_in_the_readme_parses():
    commands = [c for c in shell_commands(README) if c[0] == "pooled-proxy"]
    assert {c[1] for c in commands if c[1] != "--version"} == {
        "dev", "run", "check", "demo", "healthcheck"
    }  # fmt: skip
    for command in commands:
        if command[1] == "--version":
            continue
        args = _parser().parse_args(command[1:])
        if args.command == "dev":
            dev_config_from_args(args)  # the URLs, routes and address are valid
        config = getattr(args, "file", None) or getattr(args, "config", None)
        if config is not None and config.startswith("config/"):
            assert main(["check", "-c", str(ROOT / config)]) == 0


def test_every_pip_extra_the_readme_names_exists():
    extras = set(re.findall(r"\.\[(\w+)\]", README))
    assert extras == {"fast"}
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert extras <= pyproject["project"]["optional-dependencies"].keys()
    assert pyproject["project"]["license"] == "MIT"
    assert "MIT License" in (ROOT / "LICENSE").read_text()


def test_every_config_example_in_the_readme_loads(tmp_path: Path):
    # The examples name their TLS files relative to the config; the demo pair stands in.
    demo_tls = ROOT / "config" / "tls"
    pairs = (("cert.pem", "key.pem"), ("tls/fullchain.pem", "tls/privkey.pem"))
    # A self-signed certificate loads as a CA bundle too.
    shutil.copy(demo_tls / "demo-cert.pem", tmp_path / "internal-ca.pem")
    for cert, key in (*pairs, ("client.pem", "client.key")):
        (tmp_path / cert).parent.mkdir(exist_ok=True)
        shutil.copy(demo_tls / "demo-cert.pem", tmp_path / cert)
        shutil.copy(demo_tls / "demo-key.pem", tmp_path / key)
    # The Python hooks example names the module the README shows.
    (hooks_module,) = [b for b in fenced_blocks(README, "python") if b.startswith("# myhooks.py")]
    (tmp_path / "myhooks.py").write_text(hooks_module)
    blocks = fenced_blocks(README, "toml")
    assert len(blocks) >= 5  # the two-app file, the schema, and a recipe per common case
    for number, block in enumerate(blocks):
        path = tmp_path / f"example{number}.toml"
        path.write_text(block)
        assert main(["check", "-c", str(path)]) == 0, block


async def test_the_quick_start_curl_examples_get_answers_from_the_demo(nursery: trio.Nursery):
    upstream_port = await nursery.start(DemoUpstream(event_interval=0.05).serve, "127.0.0.1", 0)
    proxy = await start_proxy(nursery, dev_config(f"http://127.0.0.1:{upstream_port}"))
    curls = [c for c in shell_commands(section("Quick start")) if c[0] == "curl"]
    assert len(curls) == 4
    for command in curls:
        url = urlsplit(next(arg for arg in command if arg.startswith("http://")))
        assert url.netloc == "127.0.0.1:8080"  # where `make demo` listens
        target = url.path + (f"?{url.query}" if url.query else "")
        with trio.fail_after(5):
            if "-N" in command:  # an endless stream: its head and first event are enough
                stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
                async with stream:
                    await stream.send_all(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                    received = b""
                    while b"\ndata:" not in received:
                        received += await stream.receive_some(65536)
                assert received.startswith(b"HTTP/1.1 200 "), received
                continue
            body = command[command.index("-d") + 1].encode() if "-d" in command else b""
            async with await H11Client.connect(proxy.port) as client:
                reply = await client.request("POST" if body else "GET", target, body=body)
            assert reply.status == 200, command
            assert body in reply.body


def test_troubleshooting_explains_every_error_the_proxy_answers_with():
    def subclasses(cls: type[errors.ProxyError]) -> list[type[errors.ProxyError]]:
        return [cls, *(s for sub in cls.__subclasses__() for s in subclasses(sub))]

    kinds = {cls.proxy_status for cls in subclasses(errors.ProxyError)}
    explained = set(re.findall(r"^\| `(\w+)` \|", section("Troubleshooting"), re.MULTILINE))
    assert kinds <= explained, kinds - explained


def test_the_signals_table_names_each_signal_the_proxy_handles():
    signals = section("Operating it").split("### Signals", 1)[1].split("\n### ", 1)[0]
    for name in ("SIGTERM", "SIGINT", "SIGHUP"):
        assert f"`{name}`" in signals
