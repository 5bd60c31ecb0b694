"""The code examples of the README, docs/ and the comments of deploy/ manifests, as the test
of examples runs them (tests/e2e/test_docs_examples.py; docs/development.md says how to write one).

An example is a fenced block. ``python`` and ``bash`` blocks run, in page order, in one working
directory per page. A marker on the line before a block changes that:

    <!-- no-run: REASON -->   the block cannot run here (a download, a GPU); it is still
                              checked: Python compiles, and every `clipserve` command line in it
                              parses with today's flags
    <!-- file: NAME -->       the block is a file the next examples use: written to NAME

In a manifest, the examples live in its comment lines (``# `` stripped), in the same form.
"""

from __future__ import annotations

import argparse
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNNABLE = {"python": "python", "py": "python", "bash": "bash", "sh": "bash", "shell": "bash"}
_FENCE = re.compile(r"^(\s*)```\s*([\w+-]*)\s*$")
_MARKER = re.compile(r"^<!--\s*(no-run|file):\s*(.*?)\s*-->$")
# One `clipserve COMMAND ARGS` of a shell line (continuations joined), up to what ends a
# simple command or starts a redirection or comment.
_COMMAND = re.compile(r"(?:^|[\s;&|(])clipserve\s+([a-z][\w-]*)([^&;|#<>\n]*)")
# Placeholders the examples use, and what they stand for in the test (see docs/development.md).
PLACEHOLDER_ADDRESSES = ("localhost:50051", "localhost:50052")  # the first and the second server
PLACEHOLDER_HTTP_ADDRESSES = ("localhost:51051", "localhost:51052")  # their HTTP faces (--http-port auto)
PLACEHOLDER_IMAGES = re.compile(r"https://example\.com/([\w./-]+)")
DNS_NAME = "clipserve.default.svc.cluster.local"


@dataclass(frozen=True)
class Example:
    source: Path
    line: int  # of the opening fence, 1-based
    language: str  # as written after the fence
    code: str
    no_run: str | None = None  # the reason, when marked no-run
    file: str | None = None  # the file name, when marked as one

    @property
    def where(self) -> str:
        return f"{self.source.relative_to(ROOT)}:{self.line}"

    @property
    def runs(self) -> bool:
        return self.no_run is None and self.file is None and self.language in RUNNABLE


def examples_in_markdown(text: str, source: Path, line_offset: int = 0) -> list[Example]:
    examples: list[Example] = []
    lines = text.splitlines()
    index = 0
    marker: tuple[str, str] | None = None
    while index < len(lines):
        line = lines[index]
        fence = _FENCE.match(line)
        if not fence:
            found = _MARKER.match(line.strip())
            if found:
                marker = (found[1], found[2])
            elif line.strip():
                marker = None
            index += 1
            continue
        indent, language = fence[1], fence[2]
        body: list[str] = []
        start = index
        index += 1
        while index < len(lines) and lines[index].strip() != "```":
            body.append(lines[index][len(indent):] if lines[index].startswith(indent) else lines[index])
            index += 1
        if index == len(lines):
            raise ValueError(f"{source}:{start + 1 + line_offset}: a code block that never closes")
        kind, value = marker or ("", "")
        examples.append(
            Example(
                source,
                start + 1 + line_offset,
                language,
                "\n".join(body) + "\n",
                no_run=value if kind == "no-run" else None,
                file=value if kind == "file" else None,
            )
        )
        marker = None
        index += 1
    return examples


def examples_in_manifest(path: Path) -> list[Example]:
    """The examples of a YAML manifest's comments: each run of comment lines is read as
    markdown, without its ``# ``."""
    examples: list[Example] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    index = 0
    while index < len(lines):
        if not lines[index].lstrip().startswith("#"):
            index += 1
            continue
        start = index
        comment: list[str] = []
        while index < len(lines) and lines[index].lstrip().startswith("#"):
            comment.append(re.sub(r"^\s*# ?", "", lines[index]))
            index += 1
        examples += examples_in_markdown("\n".join(comment), path, line_offset=start)
    return examples


def documents() -> list[Path]:
    """Every file whose examples must run."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    manifests = sorted(p for p in (ROOT / "deploy").rglob("*") if p.suffix in (".yaml", ".yml"))
    return pages + manifests


def examples_of(path: Path) -> list[Example]:
    if path.suffix in (".yaml", ".yml"):
        return examples_in_manifest(path)
    return examples_in_markdown(path.read_text(encoding="utf-8"), path)


def cli_commands() -> dict[str, argparse.ArgumentParser]:
    """Each ``clipserve`` command and its parser (``serve``'s flags are the server's own)."""
    from clipserve.cli import build_parser
    from clipserve_server.config_loaders import build_parser as serve_parser

    parser = build_parser()
    commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction)).choices
    return {**commands, "serve": serve_parser()}


def clipserve_commands(shell: str) -> list[tuple[str, list[str]]]:
    """Each ``clipserve COMMAND ARGS`` of a shell script, as (command, args)."""
    joined = shell.replace("\\\n", " ")
    return [(match[1], shlex.split(match[2], comments=True)) for match in _COMMAND.finditer(joined)]


def without_serve(shell: str) -> str:
    """The script with each ``clipserve serve ...`` replaced by a no-op: the test's server
    stands in for the one it would start (its flags are checked on their own)."""
    joined = shell.replace("\\\n", " ")
    return re.sub(r"(^|[\s;&|(])clipserve\s+serve\b[^&;|#<>\n]*&?", r"\1true ", joined, flags=re.MULTILINE)
