"""Reading the server's configuration: defaults < config files < ``CLIPSERVE_*`` env <
command-line flags, into the one frozen ``ServerConfig`` (utils/config.py), which knows nothing
of where its values came from.

Config files (``--config``, repeatable, later ones win): clipserve's own ``clipserve.toml``
(a ``[server]`` table taking any flag by name, and ``[models.NAME]`` tables), and the benchmark
maker's ``config.toml``, from whose ``[similarity_config]`` the model, device, dtype and
safetensors choice are read (nothing of clipserve's ever goes into that file: its loader
refuses keys it does not know).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from .utils.config import ServerConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ENV_PREFIX = "CLIPSERVE_"

# Keys of the adapter's [similarity_config] table that mean the same thing here.
_SIMILARITY_KEYS = {"model": "model", "device": "device", "torch_dtype": "dtype", "use_safetensors": "use_safetensors"}
# What a [models.NAME] table of clipserve.toml may hold: the per-model flags.
_MODEL_TABLE_KEYS = {"source": "model", "text_model": "text_model", "pretrained": "pretrained"}

def _field_type(field: dataclasses.Field) -> type:
    annotation = str(field.type)
    if annotation.startswith("tuple"):
        return tuple
    if annotation.startswith("bool"):
        return bool
    if annotation.startswith("int"):
        return int
    if annotation.startswith("float"):
        return float
    return str


def _coerce(field: dataclasses.Field, value: Any, source: str) -> Any:
    kind = _field_type(field)
    if kind is tuple:
        # A list (TOML), or one string: several entries separated by ";" (environment).
        entries = value if isinstance(value, (list, tuple)) else str(value).split(";")
        if not all(isinstance(entry, str) for entry in entries):
            raise ValueError(f"{source}: expected text, got {value!r}")
        return tuple(entry.strip() for entry in entries if entry.strip())
    if isinstance(value, str):
        text = value.strip()
        if kind is bool:
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"{source}: expected true/false, got {value!r}")
        try:
            return kind(text)
        except ValueError:
            raise ValueError(f"{source}: expected {kind.__name__}, got {value!r}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is not str and not isinstance(value, kind):
        raise ValueError(f"{source}: expected {kind.__name__}, got {value!r}")
    return value


def from_toml(path: str | Path) -> dict[str, Any]:
    """Settings from a config file: the benchmark maker's ``[similarity_config]`` keys, and
    clipserve's own ``[server]`` and ``[models.NAME]`` tables."""
    with open(path, "rb") as fh:
        data = tomllib.load(fh)
    known = {f.name: f for f in fields(ServerConfig)}
    values: dict[str, Any] = {}
    for key, name in _SIMILARITY_KEYS.items():
        if key in data.get("similarity_config", {}):
            values[name] = _coerce(known[name], data["similarity_config"][key], f"{path}: [similarity_config].{key}")
    for key, value in data.get("server", {}).items():
        if key not in known:
            raise ValueError(f"{path}: unknown key [server].{key}")
        values[key] = _coerce(known[key], value, f"{path}: [server].{key}")
    models = data.get("models", {})
    if models:
        per_model: dict[str, list[str]] = {name: [] for name in _MODEL_TABLE_KEYS.values()}
        for name, table in models.items():
            if not isinstance(table, dict) or "source" not in table:
                raise ValueError(f"{path}: [models.{name}] needs source = \"<hub id or folder>\"")
            for key, value in table.items():
                if key not in _MODEL_TABLE_KEYS:
                    raise ValueError(
                        f"{path}: unknown key [models.{name}].{key} (it takes {', '.join(_MODEL_TABLE_KEYS)})"
                    )
                per_model[_MODEL_TABLE_KEYS[key]].append(f"{name}={value}")
        values.update({flag: tuple(entries) for flag, entries in per_model.items() if entries})
    return values


def from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for field in fields(ServerConfig):
        name = ENV_PREFIX + field.name.upper()
        if name in environ and environ[name] != "":
            values[field.name] = _coerce(field, environ[name], name)
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipserve serve",
        description="Serve a CLIP-family model over gRPC. Every flag can also be set as "
        f"{ENV_PREFIX}<FLAG> (e.g. {ENV_PREFIX}MAX_BATCH_SIZE; several models separated by ';') or in the [server] "
        "table of a --config file; flags win over the environment, which wins over the files.",
    )
    parser.add_argument(
        "--config",
        action="append",
        default=None,
        help="clipserve.toml ([server], [models.NAME]) or the benchmark maker's config.toml "
        f"(its [similarity_config] model, device, torch_dtype); repeatable, later files win (env: {ENV_PREFIX}CONFIG)",
    )
    for field in fields(ServerConfig):
        flag = "--" + field.name.replace("_", "-")
        help_text = f"{field.metadata.get('help', '')} (default: {field.default})"
        kind = _field_type(field)
        if kind is bool:
            parser.add_argument(
                flag, dest=field.name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        elif kind is tuple:
            parser.add_argument(flag, dest=field.name, action="append", default=None, help=help_text)
        else:
            parser.add_argument(
                flag, dest=field.name, type=kind, default=None, help=help_text, choices=field.metadata.get("choices")
            )
    return parser


def load_config(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> ServerConfig:
    """Build the one frozen config from flags, environment and file (see module docstring)."""
    environ = os.environ if environ is None else environ
    args = build_parser().parse_args(argv)
    config_paths = args.config or [p for p in environ.get(ENV_PREFIX + "CONFIG", "").split(os.pathsep) if p]
    values: dict[str, Any] = {}
    for path in config_paths:
        values.update(from_toml(path))
    values.update(from_env(environ))
    values.update(
        {k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items() if k != "config" and v is not None}
    )
    return ServerConfig(**values)
