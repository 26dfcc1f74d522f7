"""Per-batch records: one row per edge batch, collected in memory and written as Parquet.

A row per batch (not per sample) keeps a 40,000-sample run to a few thousand rows while still
allowing every figure of the report (accuracy over time, uploads over time, per-domain numbers)
to be recomputed from `batches.parquet` alone.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from cema_ray.atomic import replacing

# Column name -> Arrow type, in the order they are written.
RECORD_SCHEMA = pa.schema([
    ("edge_id", pa.int64()),
    ("host_id", pa.int64()),
    ("domain", pa.string()),
    ("batch_index", pa.int64()),
    ("samples", pa.int64()),
    ("correct", pa.int64()),
    ("uploaded", pa.int64()),
    ("bytes_up", pa.int64()),
    ("bytes_down", pa.int64()),
    ("weight_version", pa.int64()),
    ("version_lag", pa.int64()),
    ("latency_ms", pa.float64()),
    ("e_max", pa.float64()),
    ("mean_entropy", pa.float64()),
    ("cloud_steps", pa.int64()),
    ("t_wall", pa.float64()),  # seconds since the run started
    ("rejected", pa.int64()),  # samples rejected as bad input
])
RECORD_KEYS = tuple(RECORD_SCHEMA.names)


def completed(record: Mapping[str, Any], cloud_steps: int, dropped: int) -> dict[str, Any]:
    """An edge's batch record completed by the cloud's answer: the cloud steps its uploads made due, and its
    uploads dropped (refused by a full queue). Every runtime completes its records here, so that the two columns
    mean the same in every runtime."""
    return dict(record, cloud_steps=int(cloud_steps), dropped=int(dropped))


def undelivered(record: Mapping[str, Any]) -> dict[str, Any]:
    """A record whose uploads never reached the cloud (dropped from a full backlog, or lost with a dead driver):
    no cloud steps, every upload dropped."""
    return completed(record, 0, record["uploaded"])


class RunRecorder:
    """Collects per-batch record dicts; extra keys become extra columns."""

    def __init__(self) -> None:
        self._rows: list[dict[str, Any]] = []

    def add(self, record: Mapping[str, Any]) -> None:
        missing = [k for k in RECORD_KEYS if k not in record]
        if missing:
            raise ValueError(f"batch record lacks {', '.join(missing)}; every record needs {', '.join(RECORD_KEYS)}")
        self._rows.append(dict(record))

    def extend(self, records: Iterable[Mapping[str, Any]]) -> None:
        for record in records:
            self.add(record)

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def rows(self) -> list[dict[str, Any]]:
        """The records themselves (a driver may correct a column measured after the fact)."""
        return self._rows

    def to_table(self) -> pa.Table:
        """All records as an Arrow table with RECORD_SCHEMA's columns first."""
        extra = sorted({k for row in self._rows for k in row} - set(RECORD_KEYS))
        columns = {k: [row.get(k) for row in self._rows] for k in (*RECORD_KEYS, *extra)}
        arrays = [pa.array(columns[f.name], type=f.type) for f in RECORD_SCHEMA]
        arrays += [pa.array(columns[k]) for k in extra]
        return pa.Table.from_arrays(arrays, names=[*RECORD_KEYS, *extra])


def write_batches(table: pa.Table, path: str | Path) -> Path:
    """Write the per-batch table as Parquet, atomically: a reader (or a kill) never meets half a file."""
    path = Path(path)
    with replacing(path) as tmp:
        pq.write_table(table, tmp)
    return path


def read_batches(path: str | Path) -> pa.Table:
    return pq.read_table(path)
