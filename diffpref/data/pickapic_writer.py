"""Writing Pick-a-Pic v2 parquet files: the published schema and a streaming, all-or-nothing writer.

Every producer of preference data in this package (the synthetic world, the rating app's store)
writes through here, so ``read_pickapic`` and the trainers see one format whatever made the file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

# The published Pick-a-Pic v2 columns (minus pandas' index column) and their arrow types.
# Producers append their own extra columns after these; the readers ignore what they do not use.
PICKAPIC_V2_SCHEMA = pa.schema([
    ("are_different", pa.bool_()),
    ("best_image_uid", pa.string()),
    ("caption", pa.string()),
    ("created_at", pa.timestamp("ns")),
    ("has_label", pa.bool_()),
    ("image_0_uid", pa.string()),
    ("image_0_url", pa.string()),
    ("image_1_uid", pa.string()),
    ("image_1_url", pa.string()),
    ("jpg_0", pa.binary()),
    ("jpg_1", pa.binary()),
    ("label_0", pa.float64()),
    ("label_1", pa.float64()),
    ("model_0", pa.string()),
    ("model_1", pa.string()),
    ("ranking_id", pa.int64()),
    ("user_id", pa.int64()),
    ("num_example_per_prompt", pa.int64()),
])

# Rows buffered per parquet row group: memory stays flat however many pairs are written.
ROWS_PER_GROUP = 1024


def pickapic_schema(extra: pa.Schema | Iterable[pa.Field] = ()) -> pa.Schema:
    """The Pick-a-Pic v2 schema followed by a producer's ``extra`` columns."""
    extra_fields = list(extra)
    clash = sorted({f.name for f in extra_fields} & set(PICKAPIC_V2_SCHEMA.names))
    if clash:
        raise ValueError(f"extra column(s) {', '.join(clash)} would shadow Pick-a-Pic v2 columns")
    return pa.schema(list(PICKAPIC_V2_SCHEMA) + extra_fields)


def best_image_uid(label_0: float, uid_0: str, uid_1: str) -> str:
    """The uid of the preferred image; empty for a tie, as Pick-a-Pic leaves it."""
    return uid_0 if label_0 > 0.5 else uid_1 if label_0 < 0.5 else ""


class PickapicWriter:
    """Stream rows (dicts keyed by column name) into a Pick-a-Pic parquet file, one row group at a time.

    Rows go to ``<path>.tmp``, which is renamed to ``path`` only when the writer is closed
    without an error: a crash never leaves a plausible half dataset under the real name.
    Use as a context manager; ``rows`` counts the rows written so far.
    """

    def __init__(self, path: str | os.PathLike, schema: pa.Schema = PICKAPIC_V2_SCHEMA,
                 rows_per_group: int = ROWS_PER_GROUP) -> None:
        if rows_per_group < 1:
            raise ValueError(f"rows_per_group must be >= 1, got {rows_per_group}")
        missing = [name for name in PICKAPIC_V2_SCHEMA.names if name not in schema.names]
        if missing:
            raise ValueError(f"schema lacks Pick-a-Pic v2 column(s) {', '.join(missing)}; build it with pickapic_schema()")
        self.path = Path(path)
        self.tmp_path = self.path.with_name(self.path.name + ".tmp")
        self.schema = schema
        self.rows_per_group = rows_per_group
        self.rows = 0
        self._buffer: list[dict[str, Any]] = []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = pq.ParquetWriter(self.tmp_path, schema)

    def write(self, row: dict[str, Any]) -> None:
        """Add one row; it must have exactly the schema's columns."""
        if row.keys() != set(self.schema.names):
            missing = sorted(set(self.schema.names) - row.keys())
            unknown = sorted(row.keys() - set(self.schema.names))
            raise ValueError(f"row does not match the schema: missing {missing}, unknown {unknown}")
        self._buffer.append(row)
        self.rows += 1
        if len(self._buffer) >= self.rows_per_group:
            self._flush()

    def _flush(self) -> None:
        if self._buffer:
            columns = {name: [row[name] for row in self._buffer] for name in self.schema.names}
            self._writer.write_table(pa.table(columns, schema=self.schema))
            self._buffer = []

    def close(self) -> None:
        """Write what is buffered and move the finished file to its real name."""
        self._flush()
        self._writer.close()
        self.tmp_path.replace(self.path)

    def abort(self) -> None:
        """Drop the unfinished file."""
        self._buffer = []
        self._writer.close()
        self.tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> PickapicWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
