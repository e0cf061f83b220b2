"""Parquet I/O for the stage models, with Arrow schemas derived from the pydantic models, and the
JSONL files users hand in (a model's answers, generated reports).

Deriving the schema keeps it explicit (every column typed, nothing inferred from data) while
leaving a single definition to maintain.
"""
from __future__ import annotations

import json
import types
import typing
from pathlib import Path
from typing import Iterable, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel

M = TypeVar("M", bound=BaseModel)

_SCALARS = {str: pa.string(), int: pa.int64(), float: pa.float64(), bool: pa.bool_()}


def _arrow_type(annotation) -> pa.DataType:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported union {annotation}")
        return _arrow_type(args[0])
    if origin is typing.Literal:
        return pa.string() if isinstance(typing.get_args(annotation)[0], str) else pa.int64()
    if origin is list:
        return pa.list_(_arrow_type(typing.get_args(annotation)[0]))
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return pa.struct(_fields(annotation))
    if annotation in _SCALARS:
        return _SCALARS[annotation]
    raise TypeError(f"no Arrow type for {annotation!r}")


def _fields(model: type[BaseModel]) -> list[pa.Field]:
    fields = []
    for name, info in model.model_fields.items():
        fields.append(pa.field(info.alias or name, _arrow_type(info.annotation), nullable=not info.is_required()
                               or type(None) in typing.get_args(info.annotation)))
    return fields


def arrow_schema(model: type[BaseModel]) -> pa.Schema:
    return pa.schema(_fields(model))


def write_rows(path: Path, rows: Iterable[BaseModel], model: type[BaseModel]) -> Path:
    """Write atomically, so a killed run never leaves a half-written shard that looks complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = table_of(rows, model)
    tmp = path.with_suffix(path.suffix + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return path


def read_rows(path: Path | Iterable[Path], model: type[M]) -> list[M]:
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    rows: list[M] = []
    for p in paths:
        for row in read_table(p, model).to_pylist():
            rows.append(model.model_validate(row))
    return rows


def read_table(path: Path, model: type[BaseModel], columns: list[str] | None = None) -> pa.Table:
    """One Parquet file as an Arrow table with the model's schema (or only some of its columns):
    what the end of a run reads, one shard at a time, where whole rows are not needed."""
    schema = arrow_schema(model)
    if columns is not None:
        schema = pa.schema([schema.field(c) for c in columns])
    return pq.read_table(path, columns=columns, schema=schema)


def read_ipc(path: Path) -> pa.Table:
    """An Arrow stream file (a temporary of the end of a run) as a table."""
    with pa.OSFile(str(path), "rb") as source:
        return pa.ipc.open_stream(source).read_all()


def rows_of(table: pa.Table, model: type[M]) -> list[M]:
    """Validated rows of an Arrow table read with `read_table`."""
    return [model.model_validate(row) for row in table.to_pylist()]


def table_of(rows: Iterable[BaseModel], model: type[BaseModel]) -> pa.Table:
    return pa.Table.from_pylist([r.model_dump(mode="json", by_alias=True) for r in rows], schema=arrow_schema(model))


class RollingWriter:
    """`{prefix}-NNNNN.parquet` files of at most `rows_per_file` rows each, written as Arrow
    tables arrive (`pyarrow.parquet.ParquetWriter`, one row group per piece), so a dataset larger
    than memory is written in pieces. Each file is written under a temporary name and renamed
    when full or closed; no file is made for no rows."""

    def __init__(self, folder: Path, prefix: str, schema: pa.Schema, rows_per_file: int):
        self.folder, self.prefix, self.schema, self.rows_per_file = Path(folder), prefix, schema, rows_per_file
        self.files: list[Path] = []
        self._writer: pq.ParquetWriter | None = None
        self._tmp: Path | None = None
        self._rows = 0

    def write(self, table: pa.Table) -> None:
        start = 0
        while start < table.num_rows:
            if self._writer is None:
                self.files.append(self.folder / f"{self.prefix}-{len(self.files):05d}.parquet")
                self._tmp = self.files[-1].with_suffix(".parquet.tmp")
                self._writer = pq.ParquetWriter(self._tmp, self.schema)
                self._rows = 0
            take = min(self.rows_per_file - self._rows, table.num_rows - start)
            self._writer.write_table(table.slice(start, take))
            start += take
            self._rows += take
            if self._rows >= self.rows_per_file:
                self._seal()

    def _seal(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._tmp.replace(self.files[-1])
            self._writer = None

    def close(self) -> list[Path]:
        self._seal()
        return self.files

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._tmp.unlink(missing_ok=True)
            self._writer = None


def json_lines(path: Path, required: tuple[str, ...]) -> Iterable[tuple[str, dict]]:
    """(path:line, object) for each non-blank line, each object holding the `required` keys."""
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{n}: not JSON: {exc}") from None
        if not isinstance(row, dict) or not all(k in row for k in required):
            raise ValueError(f"{path}:{n}: needs " + " and ".join(repr(k) for k in required))
        yield f"{path}:{n}", row
