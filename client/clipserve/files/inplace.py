"""A scored file rewritten in place with some rows changed (``score-file --retry-failed``).

Rows that are not changed are written back exactly as they were read: the same line text
for JSONL and CSV, the same values for Parquet. Changed rows keep every other column and
their position. The file is replaced atomically, so a crash leaves the old file whole.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from .rows import RunFailed, kind, parse_jsonl_line, pyarrow, read_text, replace_atomically, split_lines

Updates = dict[int, dict[str, Any]]  # row index -> the columns to set in that row


class ScoredFile(Protocol):
    rows: list[dict[str, Any]]

    def save(self, updates: Updates, types: dict[str, str]) -> None:
        """Write the file back with ``updates`` applied (``types``: Arrow type names of the
        updated columns, for Parquet)."""


def open_scored(path: Path) -> ScoredFile:
    if not path.exists():
        raise RunFailed(f"{path}: no such file; score it first (without --retry-failed)")
    file_kind = kind(path)
    if file_kind == "jsonl":
        return _JsonlFile(path)
    if file_kind == "csv":
        return _CsvFile(path)
    return _ParquetFile(path)


def _ending(line: str) -> str:
    return line[len(line.rstrip("\r\n")) :]


def _write_text(path: Path, lines: Iterator[str]) -> None:
    with path.open("w", encoding="utf-8", newline="") as fh:
        fh.writelines(lines)


class _JsonlFile:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._lines = split_lines(read_text(path))
        self._line_of: list[int] = []  # row index -> line index (blank lines are not rows)
        self.rows: list[dict[str, Any]] = []
        for number, line in enumerate(self._lines):
            if line.strip():
                self.rows.append(parse_jsonl_line(path, number + 1, line))
                self._line_of.append(number)

    def save(self, updates: Updates, types: dict[str, str]) -> None:
        changed = {self._line_of[i]: {**self.rows[i], **columns} for i, columns in updates.items()}

        def lines() -> Iterator[str]:
            for number, line in enumerate(self._lines):
                row = changed.get(number)
                yield line if row is None else json.dumps(row, ensure_ascii=False) + _ending(line)

        replace_atomically(self._path, lambda temporary: _write_text(temporary, lines()))


def _csv_text(values: list[str], ending: str) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator=ending).writerow(values)
    return buffer.getvalue()


class _CsvFile:
    def __init__(self, path: Path) -> None:
        self._path = path
        consumed: list[str] = []

        def lines() -> Iterator[str]:
            for line in split_lines(read_text(path)):
                consumed.append(line)
                yield line

        # The reader pulls one physical line at a time (more for a quoted field spanning
        # lines), so what it consumed for a record is that record's exact text.
        self._records: list[tuple[list[str], str]] = []
        for values in csv.reader(lines()):
            self._records.append((values, "".join(consumed)))
            consumed.clear()
        if not self._records:
            raise RunFailed(f"{path}: empty CSV file (no header)")
        self._header = self._records[0][0]
        self._row_of: list[int] = []  # row index -> record index (blank lines are not rows)
        self.rows: list[dict[str, Any]] = []
        for number, (values, _) in enumerate(self._records[1:], 1):
            if values:
                # An empty cell is how a CSV holds null (clipserve writes a null score so).
                self.rows.append({name: value if value != "" else None for name, value in zip(self._header, values)})
                self._row_of.append(number)

    def save(self, updates: Updates, types: dict[str, str]) -> None:
        added = list(
            dict.fromkeys(name for columns in updates.values() for name in columns if name not in self._header)
        )
        header = self._header + added
        changed = {self._row_of[i]: columns for i, columns in updates.items()}

        def lines() -> Iterator[str]:
            for number, (values, raw) in enumerate(self._records):
                ending = _ending(raw)
                body = raw[: len(raw) - len(ending)]
                if number in changed:
                    cells = dict(zip(header, values)) | {k: "" if v is None else v for k, v in changed[number].items()}
                    yield _csv_text([cells.get(name, "") for name in header], ending)
                elif added and number == 0:
                    yield body + "," + _csv_text(added, ending)
                elif added and values:
                    # A new column: kept rows get an empty cell for it, nothing else changes.
                    yield body + "," * (len(header) - len(values)) + ending
                else:
                    yield raw

        replace_atomically(self._path, lambda temporary: _write_text(temporary, lines()))


class _ParquetFile:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._table = pyarrow().parquet.read_table(path)
        self.rows = self._table.to_pylist()

    def save(self, updates: Updates, types: dict[str, str]) -> None:
        pa = pyarrow()
        table = self._table
        for name in dict.fromkeys(name for columns in updates.values() for name in columns):
            index = table.schema.get_field_index(name)
            values = table.column(index).to_pylist() if index >= 0 else [None] * table.num_rows
            for i, columns in updates.items():
                if name in columns:
                    values[i] = columns[name]
            # Keep the column's type (a float32 score stays float32) unless it only held nulls.
            kept = index >= 0 and not pa.types.is_null(table.schema.field(index).type)
            array = pa.array(values, type=table.schema.field(index).type if kept else pa.type_for_alias(types[name]))
            table = table.set_column(index, name, array) if index >= 0 else table.append_column(name, array)
        replace_atomically(self._path, lambda temporary: pyarrow().parquet.write_table(table, temporary))
