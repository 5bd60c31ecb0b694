"""Reading the client's settings from the benchmark maker's config.toml."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

DEFAULT_ADDRESS = "localhost:50051"
# The local_clip adapter's CLIPConfig default: the column the benchmark maker writes when its
# [similarity_config] has no col_name.
DEFAULT_COL_NAME = "clip_score"


@dataclass(frozen=True)
class ClientConfig:
    """What the SDK takes from ``[similarity_config]``: the score column.

    ``address`` and ``timeout`` are read when present for files written before the benchmark
    maker's loader was known to refuse them; they are not documented, and a config.toml that
    the benchmark maker can load never has them.
    """

    address: str | None = None
    col_name: str = DEFAULT_COL_NAME
    timeout: float | None = None


def read_toml(path: str | Path) -> dict[str, Any]:
    with open(path, "rb") as fh:
        return tomllib.load(fh)


def load_client_config(path: str | Path) -> ClientConfig:
    section = read_toml(path).get("similarity_config", {})
    timeout = section.get("timeout")
    return ClientConfig(
        address=section.get("address"),
        col_name=section.get("col_name", DEFAULT_COL_NAME),
        timeout=float(timeout) if timeout is not None else None,
    )
