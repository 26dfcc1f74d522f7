"""One run in one JSON object: the numbers the README and the benchmarks compare.

Accuracy is over every sample (correct / samples), not a mean of per-batch accuracies, so edges with
larger batches weigh more, as in the paper's cumulative accuracy. Values are plain Python types, and
undefined ratios are null (not NaN), so the file is strict JSON.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pyarrow as pa

from cema_ray.algorithms.budget import SKIP_REASONS
from cema_ray.atomic import atomic_write

# Keys `meta` may set because the table cannot know them (or knows them less well).
META_KEYS = ("method", "runtime", "mode", "num_edges", "wall_seconds", "dropped")


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den else None


def _col(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).to_numpy(zero_copy_only=False)


# The record columns `EdgeDevice` writes for samples it did not upload (`edge.skip_columns`), and throttling.
SKIP_COLUMNS = (*(f"skipped_{reason}" for reason in SKIP_REASONS), "throttled")


def _skip_fractions(table: pa.Table, mask: np.ndarray, n: int) -> dict[str, float | None]:
    """Why samples were not uploaded, as fractions of the samples: one per filter, and the uplink's
    throttling. Tables written before a column existed simply lack it."""
    return {c: _ratio(_col(table, c)[mask].sum(), n) for c in SKIP_COLUMNS if c in table.column_names}


def _per_domain(table: pa.Table) -> dict[str, dict[str, Any]]:
    """Per domain, in order of first appearance."""
    domains = [str(d) for d in table.column("domain").to_pylist()]
    samples, correct, uploaded = (_col(table, c) for c in ("samples", "correct", "uploaded"))
    out: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(domains):
        mask = np.array([d == name for d in domains])
        n = int(samples[mask].sum())
        out[name] = {"accuracy": _ratio(correct[mask].sum(), n),
                     "upload_fraction": _ratio(uploaded[mask].sum(), n), "samples": n,
                     "skipped": _skip_fractions(table, mask, n)}
    return out


def _per_model(table: pa.Table, models: Mapping[Any, str]) -> dict[str, dict[str, Any]]:
    """A mixed fleet, per edge architecture: its edges' accuracy, uploads, bytes down, the batches that loaded a
    publication, and version lags (``models``: edge id -> architecture name)."""
    edge = _col(table, "edge_id")
    names = np.array([models.get(str(int(e)), models.get(int(e), "?")) for e in edge])
    samples, correct, uploaded, down = (_col(table, c) for c in ("samples", "correct", "uploaded", "bytes_down"))
    out: dict[str, dict[str, Any]] = {}
    for name in sorted(set(names.tolist())):
        mask = names == name
        n = int(samples[mask].sum())
        out[name] = {"edges": int(len(set(edge[mask].tolist()))), "samples": n,
                     "accuracy": _ratio(correct[mask].sum(), n), "upload_fraction": _ratio(uploaded[mask].sum(), n),
                     "bytes_down": int(down[mask].sum()), "publications_loaded": int((down[mask] > 0).sum()),
                     "version_lag": _version_lag(table.filter(pa.array(mask)))}
    return out


def _version_lag(table: pa.Table) -> dict[str, float | None]:
    lag = _col(table, "version_lag").astype(np.float64)
    if lag.size == 0:
        return {"median": None, "p95": None, "max": None}
    return {"median": float(np.median(lag)), "p95": float(np.percentile(lag, 95)), "max": float(lag.max())}


def _rejected(table: pa.Table) -> list[dict[str, Any]]:
    """Each rejected batch with the reason the edge gave, so a bad input is never only a count."""
    if "error" not in table.column_names:
        return []
    rows = table.select(["edge_id", "batch_index", "rejected", "error"]).to_pylist()
    return [r for r in rows if r["rejected"]]


def summarize(table: pa.Table, meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Summary of a per-batch table; `meta` adds run facts (method, runtime, mode, dropped...)."""
    meta = dict(meta or {})
    samples = int(_col(table, "samples").sum())
    uploaded = int(_col(table, "uploaded").sum())
    t_wall = _col(table, "t_wall")
    wall = float(meta.get("wall_seconds", t_wall.max() if t_wall.size else 0.0))
    summary: dict[str, Any] = {
        "method": meta.get("method"),
        "runtime": meta.get("runtime"),
        "mode": meta.get("mode"),
        "num_edges": int(meta.get("num_edges", len(set(_col(table, "edge_id").tolist())))),
        "samples": samples,
        "accuracy": _ratio(_col(table, "correct").sum(), samples),
        "uploaded": uploaded,
        "upload_fraction": _ratio(uploaded, samples),
        "skipped": _skip_fractions(table, np.ones(table.num_rows, bool), samples),
        "bytes_up": int(_col(table, "bytes_up").sum()),
        "bytes_down": int(_col(table, "bytes_down").sum()),
        "wall_seconds": wall,
        "samples_per_second": _ratio(samples, wall),
        "per_domain": _per_domain(table),
        "dropped": int(meta.get("dropped", 0)),
        "rejected": int(_col(table, "rejected").sum()),
        "rejected_batches": _rejected(table),
        "version_lag": _version_lag(table),
        # batches predicted with weights the cloud published: 0 means the fleet never adapted through the cloud
        "published_fraction": _ratio(int((_col(table, "weight_version") > 0).sum()), table.num_rows),
    }
    if meta.get("edge_models"):
        summary["per_model"] = _per_model(table, meta["edge_models"])
    for key, value in meta.items():
        if key in summary and key not in META_KEYS:
            raise ValueError(f"meta key '{key}' would overwrite a number computed from the records")
        summary[key] = value
    return summary


def _plain(value: Any) -> Any:
    """numpy scalars/arrays -> Python; NaN/inf -> None (strict JSON)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def write_summary(summary: Mapping[str, Any], path: str | Path) -> Path:
    path = Path(path)
    atomic_write(path, (json.dumps(_plain(summary), indent=2, allow_nan=False) + "\n").encode())
    return path
