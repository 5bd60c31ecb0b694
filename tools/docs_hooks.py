"""MkDocs hooks: the reference pages are generated from the code, never copied into docs/.

A page asks for a generated section with a marker line of its own:

    <!-- generate: cli -->      every `clipserve` command and its flags (the argparse parsers)
    <!-- generate: config -->   every server setting as flag, environment variable and toml key
                                (``ServerConfig``, the one config definition)
    <!-- generate: proto -->    the wire API from the comments of protos/clipserve/v1/scorer.proto

So a flag added to the parsers or the config, or a comment changed in the proto, shows in the
site at the next build, and `mkdocs build --strict` (tests/test_docs_site.py) fails on a marker
it does not know.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import MISSING, fields
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "protos" / "clipserve" / "v1" / "scorer.proto"
MARKER = re.compile(r"^<!-- generate: ([a-z]+) -->$", re.MULTILINE)

# The docs describe this checkout, not whatever clipserve happens to be installed.
for _package_root in (ROOT / "client", ROOT / "server"):
    if str(_package_root) not in sys.path:
        sys.path.insert(0, str(_package_root))


def _cell(text: object) -> str:
    """Text that stays inside one cell of a markdown table."""
    return str(text).replace("|", "\\|").replace("\n", " ")


# -- CLI ----------------------------------------------------------------------------------


def _options_table(parser: argparse.ArgumentParser) -> list[str]:
    rows = ["| argument | default | meaning |", "| --- | --- | --- |"]
    for action in parser._actions:  # argparse has no public walk over its arguments
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        if action.option_strings:
            name = ", ".join(f"`{option}`" for option in action.option_strings)
        else:
            name = f"`{action.metavar or action.dest}`" + (" (optional)" if action.nargs == "?" else "")
        default = "" if action.default in (None, False, argparse.SUPPRESS) or action.required else f"`{action.default}`"
        choices = f" (one of {', '.join(f'`{c}`' for c in action.choices)})" if action.choices else ""
        rows.append(f"| {name} | {_cell(default)} | {_cell(action.help or '')}{_cell(choices)} |")
    return rows


def cli_reference() -> str:
    from clipserve.cli import build_parser as client_parser
    from clipserve_server.config_loaders import build_parser as serve_parser

    parser = client_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    summaries = {choice.dest: choice.help for choice in subparsers._choices_actions}
    lines: list[str] = []
    for name, sub in subparsers.choices.items():
        if name == "serve":  # it parses its own flags: the server's parser is the reference
            sub = serve_parser()
        lines += [f"### clipserve {name}", "", _cell(summaries.get(name, "")), ""]
        if sub.description:
            lines += [sub.description, ""]
        lines += ["```text", sub.format_usage().strip(), "```", "", *_options_table(sub), ""]
    return "\n".join(lines)


# -- configuration ----------------------------------------------------------------------------


def config_reference() -> str:
    from clipserve_server.config_loaders import ENV_PREFIX, _field_type
    from clipserve_server.utils.config import ServerConfig

    lines = ["| flag | environment | `[server]` key | default | meaning |", "| --- | --- | --- | --- | --- |"]
    lines.append(
        f"| `--config FILE` (repeatable) | `{ENV_PREFIX}CONFIG` (paths separated by `:`) | — | — | "
        "clipserve.toml, or the benchmark maker's config.toml (its `[similarity_config]`) |"
    )
    for field in fields(ServerConfig):
        kind = _field_type(field)
        flag = "--" + field.name.replace("_", "-")
        flag_cell = (
            f"`{flag}` / `--no-{flag[2:]}`"
            if kind is bool
            else f"`{flag}`" + (" (repeatable)" if kind is tuple else "")
        )
        env = f"`{ENV_PREFIX}{field.name.upper()}`" + (" (`;` between entries)" if kind is tuple else "")
        default = field.default if field.default is not MISSING else field.default_factory()  # type: ignore[misc]
        default_cell = "—" if default in ("", (), None) else f"`{', '.join(default) if kind is tuple else default}`"
        lines.append(
            f"| {flag_cell} | {env} | `{field.name}` | {_cell(default_cell)} "
            f"| {_cell(field.metadata.get('help', ''))} |"
        )
    return "\n".join(lines)


# -- wire API -------------------------------------------------------------------------------


def _proto_blocks(text: str) -> tuple[str, list[tuple[str, str, str, list[tuple[str, str]]]]]:
    """The file's header comment, and each service / message / enum as (kind, name, comment,
    [(declaration, comment)])."""
    header: list[str] = []
    blocks: list[tuple[str, str, str, list[tuple[str, str]]]] = []
    comment: list[str] = []
    in_header = True
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("//"):
            comment.append(line[2:].strip())
            continue
        if in_header and (not line or line.startswith(("syntax", "package", "option", "import"))):
            header += comment + ([""] if comment else [])
            comment = []
            continue
        in_header = False
        opening = re.match(r"(service|message|enum)\s+(\w+)\s*\{\s*(\}?)", line)
        if opening:
            blocks.append((opening[1], opening[2], " ".join(comment), []))
        elif line and line not in ("}",) and not line.startswith("oneof") and blocks:
            blocks[-1][3].append((line.rstrip(";").rstrip("{").strip(), " ".join(comment)))
        comment = []
    return "\n".join(header).strip(), blocks


def proto_reference() -> str:
    header, blocks = _proto_blocks(PROTO.read_text(encoding="utf-8"))
    lines = [f"Generated from the comments of `{PROTO.relative_to(ROOT)}` at each build.", ""]
    lines += ["```text", header, "```", ""]
    for kind, name, comment, members in blocks:
        lines += [f"### {kind} `{name}`", ""]
        if comment:
            lines += [comment, ""]
        if members:
            lines += ["| declaration | meaning |", "| --- | --- |"]
            lines += [f"| `{_cell(declaration)}` | {_cell(note)} |" for declaration, note in members]
            lines.append("")
    return "\n".join(lines)


GENERATORS = {"cli": cli_reference, "config": config_reference, "proto": proto_reference}


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 (mkdocs' signature)
    def generated(match: re.Match) -> str:
        if match[1] not in GENERATORS:
            raise ValueError(f"{page.file.src_path}: no generator named {match[1]!r} (known: {', '.join(GENERATORS)})")
        return GENERATORS[match[1]]()

    return MARKER.sub(generated, markdown)
