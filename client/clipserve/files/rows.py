"""Row files for file scoring: JSONL, CSV or Parquet (by extension), read whole and written
chunk by chunk, plus the safe way to replace a file."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol


class RunFailed(Exception):
    """The run could not go on (server unreachable, bad input file); exit non-zero."""


def kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if suffix in (".csv", ".parquet"):
        return suffix[1:]
    raise RunFailed(f"{path}: unknown file type {suffix!r} (use .jsonl, .csv or .parquet)")


def pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise RunFailed("Parquet files need pyarrow: pip install 'clipserve[parquet]'") from None
    return pyarrow


def split_lines(text: str) -> list[str]:
    """Lines with their endings, split at "\\n" only: a JSON string may hold U+2028 and other
    characters that ``str.splitlines`` would also split at."""
    return re.findall(r"[^\n]*\n|[^\n]+$", text)


def read_text(path: Path) -> str:
    if not path.exists():
        raise RunFailed(f"{path}: no such file")
    # newline="": "\r\n" stays "\r\n", so that rows kept as they are stay byte for byte.
    with path.open(encoding="utf-8", newline="") as fh:
        return fh.read()


def parse_jsonl_line(path: Path, number: int, line: str) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise RunFailed(f"{path}:{number}: not JSON: {exc}") from None
    if not isinstance(row, dict):
        raise RunFailed(f"{path}:{number}: not a JSON object")
    return row


def read_rows(path: Path) -> list[dict[str, Any]]:
    file_kind = kind(path)
    if file_kind == "parquet":
        if not path.exists():
            raise RunFailed(f"{path}: no such file")
        return pyarrow().parquet.read_table(path).to_pylist()
    text = read_text(path)
    if file_kind == "csv":
        return list(csv.DictReader(split_lines(text)))
    return [parse_jsonl_line(path, number, line) for number, line in enumerate(split_lines(text), 1) if line.strip()]


def replace_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Write ``path`` as a temporary file in the same folder, then rename it into place: a
    crash half way leaves the old file whole, never a truncated one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    temporary = Path(name)
    try:
        if path.exists():
            shutil.copymode(path, temporary)  # mkstemp makes it private; keep the file's own mode
        write(temporary)
        with temporary.open("rb") as fh:
            os.fsync(fh.fileno())  # the data is on disk before the name points at it
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def parquet_table(rows: Sequence[dict[str, Any]], types: dict[str, str]) -> Any:
    """The rows as an Arrow table; ``types`` (column -> Arrow type name) types the columns
    that hold only nulls, which Arrow would otherwise give the type ``null``."""
    pa = pyarrow()
    table = pa.Table.from_pylist(list(rows))
    for name, type_name in types.items():
        index = table.schema.get_field_index(name)
        if index >= 0 and pa.types.is_null(table.schema.field(index).type):
            table = table.set_column(index, name, table.column(index).cast(pa.type_for_alias(type_name)))
    return table


class RowWriter(Protocol):
    def write(self, rows: Sequence[dict[str, Any]]) -> None: ...
    def close(self) -> None: ...


class _JsonlWriter:
    def __init__(self, path: Path, append: bool) -> None:
        self._fh = path.open("a" if append else "w", encoding="utf-8")

    def write(self, rows: Sequence[dict[str, Any]]) -> None:
        self._fh.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        self._fh.flush()  # what is written survives a crash: --resume picks up from there

    def close(self) -> None:
        self._fh.close()


class _CsvWriter:
    def __init__(self, path: Path, append: bool, fieldnames: list[str]) -> None:
        self._fh = path.open("a" if append else "w", encoding="utf-8", newline="")
        self._writer = csv.DictWriter(self._fh, fieldnames=fieldnames)
        if not append:
            self._writer.writeheader()

    def write(self, rows: Sequence[dict[str, Any]]) -> None:
        self._writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


class _ParquetWriter:
    """Parquet cannot be appended to: rows are collected and written when the run ends."""

    def __init__(self, path: Path, existing: list[dict[str, Any]], types: dict[str, str]) -> None:
        self._path = path
        self._rows = list(existing)
        self._types = types

    def write(self, rows: Sequence[dict[str, Any]]) -> None:
        self._rows.extend(rows)

    def close(self) -> None:
        table = parquet_table(self._rows, self._types)
        replace_atomically(self._path, lambda temporary: pyarrow().parquet.write_table(table, temporary))


def open_writer(path: Path, existing: list[dict[str, Any]], fieldnames: list[str], types: dict[str, str]) -> RowWriter:
    """A writer that appends to ``path`` after the ``existing`` rows already in it (--resume)."""
    file_kind = kind(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if file_kind == "jsonl":
        return _JsonlWriter(path, append=bool(existing))
    if file_kind == "csv":
        return _CsvWriter(path, append=bool(existing), fieldnames=fieldnames)
    return _ParquetWriter(path, existing, types)
