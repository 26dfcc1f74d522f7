"""Helpers shared by the runner tests: the columns two runs must agree on, and a run's table in a fixed order."""
from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

# What "the same predictions, uploads and versions" means, column by column (timings and hosts may differ).
COMPARED = ("edge_id", "batch_index", "domain", "samples", "correct", "uploaded", "bytes_up", "bytes_down",
            "weight_version", "version_lag", "cloud_steps", "first_id", "last_id",
            "skipped_unreliable", "skipped_confident", "skipped_redundant", "skipped_budget", "throttled",
            "dropped")


def batch_table(out: Path) -> dict[str, list]:
    """A run's batches.parquet as columns, sorted by (edge, batch) so runs compare row by row."""
    t = pq.read_table(Path(out) / "batches.parquet").sort_by([("edge_id", "ascending"), ("batch_index", "ascending")])
    return t.to_pydict()
