"""Run outputs: batches.parquet (one row per edge batch), summary.json and report.md with plots."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from cema_ray.results.records import RECORD_KEYS, RECORD_SCHEMA, RunRecorder, read_batches, write_batches
from cema_ray.results.report import write_report
from cema_ray.results.summary import summarize, write_summary

__all__ = [
    "RECORD_KEYS", "RECORD_SCHEMA", "RunRecorder", "read_batches", "summarize", "write_batches",
    "write_outputs", "write_report", "write_summary",
]


def write_outputs(out_dir: str | Path, recorder: RunRecorder, meta: Mapping[str, Any] | None = None,
                  report: bool = True) -> dict[str, Any]:
    """batches.parquet, summary.json and (unless `report` is False) report.md + PNGs; returns the summary."""
    out = Path(out_dir)
    table = recorder.to_table()
    write_batches(table, out / "batches.parquet")
    summary = summarize(table, meta)
    write_summary(summary, out / "summary.json")
    if report:
        write_report(out, table, summary)
    return summary
