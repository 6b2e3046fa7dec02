"""Query results as files or streams: CSV, JSON Lines or zstd Parquet.

``write_result(table, target, fmt)`` takes a path or a binary stream (``sys.stdout.buffer`` for
``rollstream query --format csv`` without ``--out``). Blocking.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, BinaryIO, Literal

import msgspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

Format = Literal["csv", "json", "parquet"]
FORMATS: tuple[str, ...] = ("csv", "json", "parquet")


def plain(value: Any, arrow_type: pa.DataType) -> Any:
    """A JSON-ready value: maps become objects, NaN and infinities become null."""
    if value is None:
        return None
    if pa.types.is_map(arrow_type):
        return {k: plain(v, arrow_type.item_type) for k, v in value}
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        return [plain(v, arrow_type.value_type) for v in value]
    if pa.types.is_struct(arrow_type):
        return {f.name: plain(value[f.name], f.type) for f in arrow_type}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write_csv(table: pa.Table, sink: BinaryIO) -> None:
    """CSV has no nested values: list, map and struct cells are written as JSON text."""
    columns = []
    for field, column in zip(table.schema, table.columns, strict=True):
        if pa.types.is_nested(field.type):
            texts = [
                None if v is None else msgspec.json.encode(plain(v, field.type)).decode()
                for v in column.to_pylist()
            ]
            columns.append(pa.array(texts, pa.string()))
        else:
            columns.append(column)
    pacsv.write_csv(pa.Table.from_arrays(columns, names=table.column_names), sink)


def _write_json(table: pa.Table, sink: BinaryIO) -> None:
    """JSON Lines: one object per row."""
    encoder = msgspec.json.Encoder()
    types = {f.name: f.type for f in table.schema}
    for batch in table.to_batches(max_chunksize=4096):
        for row in batch.to_pylist():
            sink.write(encoder.encode({k: plain(v, types[k]) for k, v in row.items()}))
            sink.write(b"\n")


def write_result(table: pa.Table, target: Path | BinaryIO, fmt: Format) -> None:
    """Save a query result as CSV, JSON Lines or zstd Parquet, to a file or a binary stream."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    if isinstance(target, str | Path):
        with open(target, "wb") as fh:
            write_result(table, fh, fmt)
        return
    if fmt == "parquet":
        pq.write_table(table, target, compression="zstd")
    elif fmt == "csv":
        _write_csv(table, target)
    else:
        _write_json(table, target)
    target.flush()
