"""Every example in the README, docs/ and the comments of deploy/ manifests runs as written,
against real servers on the synthetic checkpoint, or says why it cannot (``no-run``).

The substitutions, which docs/development.md documents for authors of examples:
``localhost:50051`` (and ``$CLIPSERVE_ADDRESS``) is the test's first server, ``localhost:50052``
its second, ``localhost:51051`` and ``localhost:51052`` their HTTP faces;
``https://example.com/NAME`` an image on the loopback image host, and any URL under
``https://example.com/missing/`` a 404; ``dns:///clipserve.default.svc.cluster.local:50051``
both servers (a stand-in for the system resolver answers that name); ``dog.jpg``, ``cat.png``,
and ``qrels.jsonl`` with ``images.jsonl`` (three pairs over those two images) are in each
page's working directory; ``clipserve serve ...`` lines are checked against the server's flags
and the test's server stands in for the one they would start.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from clipserve_server.config_loaders import load_config

from ..conftest import ServerProcess
from ..docs_examples import (
    DNS_NAME,
    PLACEHOLDER_ADDRESSES,
    PLACEHOLDER_HTTP_ADDRESSES,
    PLACEHOLDER_IMAGES,
    ROOT,
    RUNNABLE,
    Example,
    cli_commands,
    clipserve_commands,
    documents,
    examples_of,
    without_serve,
)
from ..helpers import ImageHost, make_image

pytestmark = pytest.mark.cost(19)  # its CPU cost among the files (tests/conftest.py)

# Makes DNS_NAME resolve to the replicas in every Python process an example starts (the SDK
# asks clipserve._replicas.resolve_ips, as tests/e2e/test_scale_out.py's stand-in does in-process).
_STAND_IN_RESOLVER = '''
import json, os

try:
    import clipserve._replicas as _replicas
except ImportError:  # a Python without clipserve (an example's own venv): nothing to stand in for
    _replicas = None

if _replicas is not None:
    _answers = json.loads(os.environ["CLIPSERVE_DOCS_DNS"])
    _system = _replicas.resolve_ips

    def _resolve_ips(host, port):
        return list(_answers[host]) if host in _answers else _system(host, port)

    _replicas.resolve_ips = _resolve_ips
'''

DOCUMENTS = documents()
# What every page's working directory holds besides dog.jpg and cat.png.
SAMPLE_FILES = {
    "qrels.jsonl": "".join(
        json.dumps({"query_id": q, "query_text": text, "image_id": image}) + "\n"
        for q, text, image in (
            ("q1", "a dog on a beach", "dog"),
            ("q1", "a dog on a beach", "cat"),
            ("q2", "a cat on a sofa", "cat"),
        )
    ),
    "images.jsonl": '{"image_id": "dog", "image_url": "https://example.com/dog.jpg"}\n'
    '{"image_id": "cat", "image_url": "https://example.com/cat.png"}\n',
}


@pytest.fixture(scope="module")
def replicas(tiny_checkpoint: Path) -> Iterator[list[ServerProcess]]:
    """Two replicas of the synthetic checkpoint, started together; the first is also the
    server of ``localhost:50051``."""
    args = ["--model", str(tiny_checkpoint), "--allow-private-networks", "--fetch-timeout-s", "5"]
    started = [ServerProcess(args, wait=False) for _ in range(2)]
    servers = [server.wait_ready() for server in started]
    yield servers
    for server in servers:
        assert server.terminate() == 0, "".join(server.log)


@pytest.fixture(scope="module")
def example_env(replicas: list[ServerProcess], tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    stand_in = tmp_path_factory.mktemp("stand-in-resolver")
    (stand_in / "sitecustomize.py").write_text(_STAND_IN_RESOLVER)
    bin_dir = str(Path(sys.executable).parent)  # this environment's python, clipserve, grpcurl
    return {
        **os.environ,
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "PYTHONPATH": os.pathsep.join(
            [str(stand_in), str(ROOT / "client"), str(ROOT / "server"), os.environ.get("PYTHONPATH", "")]
        ),
        "CLIPSERVE_DOCS_DNS": json.dumps({DNS_NAME: [server.address for server in replicas]}),
        "CLIPSERVE_ADDRESS": replicas[0].address,
        "HF_HUB_OFFLINE": "1",
    }


def substituted(code: str, addresses: list[str], images: ImageHost) -> str:
    def image(match) -> str:
        name = match[1]
        if name.startswith("missing/"):
            return images.url("status/404")
        assert "/" not in name, f"https://example.com/{name}: images are NAME or missing/ANYTHING"
        if name not in images.images:
            fmt = "PNG" if name.lower().endswith(".png") else "JPEG"
            images.add(name, make_image(64, 48, seed=len(images.images), fmt=fmt))
        return images.url(f"img/{name}")

    for placeholder, address in zip(PLACEHOLDER_ADDRESSES + PLACEHOLDER_HTTP_ADDRESSES, addresses):
        code = code.replace(placeholder, address)
    return PLACEHOLDER_IMAGES.sub(image, code)


def check_commands(example: Example) -> None:
    """Every ``clipserve`` command line of a shell example parses with today's flags."""
    for command, args in clipserve_commands(example.code):
        if command == "serve":
            try:
                load_config(args, environ={})
            except (ValueError, OSError, SystemExit) as exc:
                pytest.fail(f"{example.where}: `clipserve serve {' '.join(args)}` is refused: {exc!r}")
            continue
        try:
            cli_commands()[command].parse_args(args)
        except SystemExit:
            pytest.fail(
                f"{example.where}: `clipserve {command} {' '.join(args)}` is refused by the CLI (see its stderr above)"
            )


def run(example: Example, workdir: Path, env: dict[str, str], addresses: list[str], images: ImageHost) -> None:
    code = substituted(example.code, addresses, images)
    if RUNNABLE[example.language] == "python":
        script = workdir / f"example_{example.line}.py"
        script.write_text(code)
        command = [sys.executable, script.name]
    else:
        command = ["bash", "-e", "-o", "pipefail", "-c", without_serve(code)]
    done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (
        f"{example.where} exited {done.returncode}:\n{code}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    )


@pytest.mark.parametrize("document", DOCUMENTS, ids=[str(p.relative_to(ROOT)) for p in DOCUMENTS])
def test_every_example_of_a_page_runs_against_a_real_server(
    document, replicas, example_env, image_host, tmp_path, monkeypatch
):
    """The page's examples, in order, in one working directory: each exits 0; files it marks
    are written first; the server commands' flags parse; no-run blocks give a reason and still
    parse (Python compiles, `clipserve` lines have today's flags)."""
    examples = examples_of(document)
    addresses = [server.address for server in replicas] + [server.http_address for server in replicas]
    (tmp_path / "dog.jpg").write_bytes(make_image(64, 48, seed=7, fmt="JPEG"))
    (tmp_path / "cat.png").write_bytes(make_image(48, 64, seed=8))
    for name, text in SAMPLE_FILES.items():
        (tmp_path / name).write_text(substituted(text, addresses, image_host))
    monkeypatch.chdir(tmp_path)  # `clipserve serve --config FILE` lines read files from there
    for example in examples:
        if example.no_run is not None:
            assert example.no_run, f"{example.where}: a no-run example must say why"
        if example.file is not None:
            (tmp_path / example.file).write_text(substituted(example.code, addresses, image_host))
            continue
        if RUNNABLE.get(example.language) == "bash":
            check_commands(example)
        elif RUNNABLE.get(example.language) == "python":
            compile(example.code, example.where, "exec")
        if example.runs:
            run(example, tmp_path, example_env, addresses, image_host)


def test_the_kubernetes_manifest_tells_users_what_runs():
    """The manifest's usage lines are examples the test above runs against replicas named by
    dns:///, in Python and on the command line."""
    manifest = ROOT / "deploy" / "kubernetes" / "clipserve.yaml"
    runnable = [e for e in examples_of(manifest) if e.runs]
    assert {e.language for e in runnable} >= {"python", "bash"}
    assert all(f"dns:///{DNS_NAME}:50051" in e.code for e in runnable)


@pytest.mark.parametrize("manifest", [p for p in DOCUMENTS if p.suffix in (".yaml", ".yml")], ids=lambda p: p.name)
def test_no_usage_line_of_a_manifest_escapes_the_examples(manifest):
    """A comment line that calls the SDK or a `clipserve` command is inside an example block,
    where the test above runs it: usage written as plain comments would drift unseen."""
    commands = "|".join(re.escape(name) for name in cli_commands())
    usage = re.compile(rf"clipserve\.[A-Z]\w*\(|(?:^|\s)clipserve\s+(?:{commands})\b")
    in_examples = {line.strip() for example in examples_of(manifest) for line in example.code.splitlines()}
    for number, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), 1):
        text = re.sub(r"^\s*# ?", "", line) if line.lstrip().startswith("#") else ""
        if usage.search(text):
            assert text.strip() in in_examples, (
                f"{manifest.name}:{number}: usage outside an example block: {text.strip()}"
            )
