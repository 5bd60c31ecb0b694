"""The documentation site builds with `mkdocs build --strict` (no broken link, no page missing
from the nav, no warning), and its reference pages are generated from the code: every flag,
environment variable and RPC there is, and nothing that is not."""

from __future__ import annotations

import html
import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from clipserve_server.config_loaders import ENV_PREFIX
from clipserve_server.utils.config import ServerConfig

from .docs_examples import ROOT, cli_commands


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(ROOT / "mkdocs.yml"),
            "--site-dir",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},  # material's banner about its successor: noise here
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def page_text(site: Path, page: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", (site / page / "index.html").read_text(encoding="utf-8")))


def test_the_configuration_page_names_every_setting_three_ways(site):
    text = page_text(site, "configuration")
    for field in fields(ServerConfig):
        assert "--" + field.name.replace("_", "-") in text, field.name
        assert ENV_PREFIX + field.name.upper() in text, field.name


def test_the_cli_page_has_every_command_and_flag_of_the_parsers(site):
    text = page_text(site, "cli")
    for name, parser in cli_commands().items():  # serve's flags: the server's parser
        assert f"clipserve {name}" in text
        for action in parser._actions:
            for option in action.option_strings:
                assert option in text, f"clipserve {name} {option}"


def test_the_wire_api_page_has_every_rpc_and_message_of_the_proto(site):
    text = page_text(site, "wire-api")
    proto = (ROOT / "protos" / "clipserve" / "v1" / "scorer.proto").read_text(encoding="utf-8")
    for rpc in re.findall(r"^\s*rpc (\w+)", proto, re.M):
        assert f"rpc {rpc}(" in text, rpc
    for message in re.findall(r"^message (\w+)", proto, re.M):
        assert f"message {message}" in text, message  # its own section, not only a mention
    assert "IMAGE_BYTES_NEEDED" in text  # the comments come along


def test_the_sdk_reference_comes_from_the_docstrings(site):
    text = page_text(site, "sdk")
    assert "dns:///name:port" in text  # CLIP's docstring, Args: address
    assert "clipserve.CLIP" in text and "score_batch" in text


def test_the_readme_is_a_short_page_that_opens_with_the_two_commands():
    """At most 200 lines; its first block is the run command and, verbatim, the install-and-test
    command that CI (.ci/run) runs."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200
    first_block = re.search(r"^```bash\n(.*?)^```", readme, re.S | re.M)
    assert first_block is not None
    run, test = first_block[1].splitlines()
    assert run.startswith("pip install '.[server]' && clipserve serve --model openai/clip-vit-base-patch32")
    ci_command = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()[-1]
    assert test.split("   #")[0].strip() == ci_command
