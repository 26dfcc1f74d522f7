"""Scaling benchmark of the Ray runtime: throughput, cloud step rate, worker memory, start-up time.

For each fleet size the same short workload runs on the Ray runtime (and, where asked, on the
single-process runner, side by side in the same invocation so the ratio is measured under the
same machine load). Memory is the unique set size (USS) of every Ray worker process, summed,
sampled once a second while the run goes: USS counts only pages a process does not share, so
the sum does not double-count torch's shared libraries or the object store.
"""
from __future__ import annotations

import copy
import json
import math
import os
import threading
import time
from pathlib import Path
from statistics import median
from typing import Any

import psutil
import pyarrow.parquet as pq
import torch

from cema_ray.bench.forward_limit import BATCHES, forward_limit
from cema_ray.runtime import run_experiment


class WorkerMemorySampler:
    """Peak summed USS of Ray worker processes (`ray::` in their command line) over a run."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.peak_bytes = 0
        self.peak_workers = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> "WorkerMemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            total, count = 0, 0
            for proc in psutil.process_iter(["cmdline"]):
                cmd = " ".join(proc.info.get("cmdline") or [])
                if not cmd.startswith("ray::"):
                    continue
                try:
                    total += proc.memory_full_info().uss
                    count += 1
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            if total > self.peak_bytes:
                self.peak_bytes, self.peak_workers = total, count
            self._stop.wait(self.interval)


def scale_config(base: dict[str, Any], edges: int, max_hosts: int | None, mode: str, runtime: str) -> dict[str, Any]:
    """The base config with `edges` edges spread over at most `max_hosts` EdgeHosts.

    ``max_hosts`` None: one host per edge asked for, which the runner caps at what the cluster's CPUs
    admit (`host_count`). On a small machine, hosts beyond its cores only time-share them.
    """
    cfg = copy.deepcopy(base)
    if max_hosts is None:
        cfg["edges"].update(count=edges, per_host=1, hosts=None, groups=[])
    else:
        hosts = min(edges, max_hosts)
        cfg["edges"].update(count=edges, per_host=math.ceil(edges / hosts), hosts=hosts, groups=[])
    cfg.update(runtime=runtime, mode=mode)
    cfg["output"].update(report=False, progress=False)
    return cfg


def measure(cfg: dict[str, Any], out: Path) -> dict[str, Any]:
    with WorkerMemorySampler() as mem:
        t0 = time.perf_counter()
        summary = run_experiment(cfg, out)
        total = time.perf_counter() - t0
    wall = summary["wall_seconds"]
    table = pq.read_table(Path(out) / "batches.parquet", columns=["predicted_at", "weight_version", "samples"])
    predicted = table.column("predicted_at").to_numpy()
    span = float(predicted.max() - predicted.min()) if len(predicted) > 1 else 0.0
    published = table.column("weight_version").to_numpy() > 0
    return {
        "runtime": cfg["runtime"], "mode": cfg["mode"], "edges": cfg["edges"]["count"],
        "hosts": summary.get("num_hosts", 0), "samples": summary["samples"], "wall_s": wall,
        "samples_per_s": summary["samples"] / wall,
        # the edges' own pace: first to last prediction (the run's wall time also waits for the cloud to drain)
        "edge_samples_per_s": summary["samples"] / span if span > 0 else None, "cloud_steps": summary.get("cloud_steps", 0),
        "cloud_steps_per_s": summary.get("cloud_steps", 0) / wall, "startup_s": summary.get("startup_seconds"),
        "total_s": total, "worker_uss_mb": mem.peak_bytes / 2**20, "workers": mem.peak_workers,
        "version_lag_median": (summary.get("version_lag") or {}).get("median"),
        "accuracy": summary["accuracy"], "upload_fraction": summary["upload_fraction"],
        "dropped": summary["dropped"], "bytes_down": summary.get("bytes_down", 0),
        # batches predicted with a version the cloud published: a fleet that never adapts measures the wrong work
        "published_fraction": float(published.mean()) if len(published) else 0.0,
        **cloud_load(cfg, summary),
    }


def cloud_load(cfg: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    """What the cloud's shards spent: ms per step (it rises when the shards and hosts contend for the cores),
    the fraction of the wall time they were stepping (near 1: the run is cloud-bound), and, in sync mode,
    the wall time of the rounds' cloud phase (the hosts wait meanwhile; a faster cloud shortens only that)."""
    shards, steps = cfg["cloud"]["shards"], summary.get("cloud_steps", 0)
    busy = summary.get("cloud_step_seconds")
    phase = (summary.get("phase_seconds") or {}).get("cloud")
    return {"shards": shards, "cloud_ms_per_step": 1000 * busy / steps if busy and steps else None,
            "cloud_busy": busy / (summary["wall_seconds"] * shards) if busy else None,
            "cloud_phase_steps_per_s": steps / phase if phase else None}


def run_scale(base: dict[str, Any], edge_counts: list[int], out: Path, max_hosts: int | None,
              modes: list[str], local_up_to: int, local_threads: int | None = None,
              repeats: int = 1, limit_seconds: float = 1.5,
              limit_batches: tuple[int, ...] = BATCHES) -> list[dict[str, Any]]:
    """Measure every (edges, mode) on Ray, and the local runner for fleets up to `local_up_to` edges.

    ``local_threads``: torch threads of the local runner (None: torch's default, one per core). On a
    machine where other work holds cores, more threads than free cores make every parallel op wait
    for a descheduled thread: measure the local runner with the threads the Ray actors get, too.
    ``repeats``: the whole sequence runs this many times, the runtimes interleaved, so that a shared
    machine's slow minutes hit both sides of a ratio alike (`summary_markdown` quotes medians).
    Each row is appended to ``out/scale.jsonl`` as it is measured, with the edge model's forward limit on
    the cores the run's hosts had, measured right after the run (`bench.forward_limit`).
    """
    rows: list[dict[str, Any]] = []
    out.mkdir(parents=True, exist_ok=True)
    for rep in range(repeats):
        suffix = f"-r{rep}" if repeats > 1 else ""
        for edges in edge_counts:
            for mode in modes:
                cfg = scale_config(base, edges, max_hosts, mode, "ray")
                row = dict(measure(cfg, out / f"ray-{mode}-{edges}{suffix}"), repeat=rep)
                _add(rows, row, base, out, limit_seconds, limit_batches)
            if edges <= local_up_to:
                cfg = scale_config(base, edges, max_hosts, "sync", "local")
                threads = torch.get_num_threads()
                torch.set_num_threads(local_threads or threads)
                try:
                    row = dict(measure(cfg, out / f"local-{edges}{suffix}"), repeat=rep)
                finally:
                    torch.set_num_threads(threads)
                row["threads"] = local_threads or threads
                _add(rows, row, base, out, limit_seconds, limit_batches)
    return rows


def _add(rows: list[dict[str, Any]], row: dict[str, Any], base: dict[str, Any], out: Path,
         limit_seconds: float, limit_batches: tuple[int, ...]) -> None:
    """The row with its forward limit and limit ratio, kept, printed and appended to scale.jsonl."""
    cores = max(1, min(row["hosts"] or 1, os.cpu_count() or 1)) if row["runtime"] == "ray" else row.get("threads", 1)
    # right after the run: a shared machine's speed drifts
    row.update(forward_limit(base, cores, limit_seconds, limit_batches))
    edge_rate = row.get("edge_samples_per_s")
    row["limit_ratio"] = edge_rate / row["forward_limit_samples_per_s"] if edge_rate else None
    rows.append(row)
    line = json.dumps(row)
    print(line, flush=True)
    with open(out / "scale.jsonl", "a") as f:
        f.write(line + "\n")


def bytes_per_edge(rows: list[dict[str, Any]]) -> dict[int, float | None]:
    """Per row (by index): worker memory added per virtual edge against the smallest fleet run with as many
    hosts, in the same mode and repeat (the hosts' own cost, model and data, cancels out)."""
    out: dict[int, float | None] = {}
    for i, r in enumerate(rows):
        peers = [p for p in rows if (p["runtime"], p["mode"], p["hosts"], p.get("repeat", 0))
                 == (r["runtime"], r["mode"], r["hosts"], r.get("repeat", 0))]
        small = min(peers, key=lambda p: p["edges"])
        out[i] = (None if small["edges"] == r["edges"] else
                  (r["worker_uss_mb"] - small["worker_uss_mb"]) * 2**20 / (r["edges"] - small["edges"]))
    return out


def summary_markdown(rows: list[dict[str, Any]]) -> str:
    """Medians over repeats per (runtime, mode, edges); Ray/local is the median of the ratios of runs
    made in the same repeat (side by side), not a ratio of medians."""
    keys = list(dict.fromkeys((r["runtime"], r["mode"], r["edges"], r.get("shards", 1)) for r in rows))
    local = {(r["repeat"], r["edges"]): r["samples_per_s"] for r in rows if r["runtime"] == "local"}
    head = ("| runtime | mode | edges | shards | runs | samples/s (median) | min - max | limit ratio (median) | "
            "cloud steps/s (median) | Ray/local (median of paired ratios) |\n" + "|---" * 10 + "|\n")
    lines = []
    for runtime, mode, edges, shards in keys:
        runs = [r for r in rows if (r["runtime"], r["mode"], r["edges"], r.get("shards", 1)) == (runtime, mode, edges,
                                                                                                  shards)]
        rates = [r["samples_per_s"] for r in runs]
        ratios = [r["samples_per_s"] / local[r["repeat"], edges] for r in runs
                  if runtime == "ray" and (r["repeat"], edges) in local]
        limit_ratios = [r["limit_ratio"] for r in runs if r.get("limit_ratio") is not None]
        cells = [runtime, mode, edges, shards, len(runs), f"{median(rates):.0f}", f"{min(rates):.0f} - {max(rates):.0f}",
                 _fmt(median(limit_ratios) if limit_ratios else None, ".2f"),
                 f"{median([r['cloud_steps_per_s'] for r in runs]):.2f}",
                 f"{median(ratios):.2f}" if ratios else ""]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return head + "\n".join(lines) + "\n"


def markdown(rows: list[dict[str, Any]], command: str) -> str:
    head = ("| run | runtime | mode | edges | hosts | shards | samples | samples/s | edge samples/s | forward limit | "
            "limit ratio | cloud steps/s | cloud ms/step | cloud busy | start-up s | worker USS MB (workers) | "
            "bytes/edge | on a published version | lag median | accuracy | uploads | dropped | Ray/local |\n"
            + "|---" * 23 + "|\n")
    local = {(r.get("repeat", 0), r["edges"]): r["samples_per_s"] for r in rows if r["runtime"] == "local"}
    per_edge = bytes_per_edge(rows)
    lines = []
    for i, r in enumerate(rows):
        key = (r.get("repeat", 0), r["edges"])
        ratio = r["samples_per_s"] / local[key] if r["runtime"] == "ray" and key in local else None
        cells = [
            r.get("repeat", 0), r["runtime"], r["mode"], r["edges"], r["hosts"], r.get("shards", 1), r["samples"],
            f"{r['samples_per_s']:.0f}", _fmt(r.get("edge_samples_per_s"), ".0f"),
            _fmt(r.get("forward_limit_samples_per_s"), ".0f"), _fmt(r.get("limit_ratio"), ".2f"),
            f"{r['cloud_steps_per_s']:.2f}", _fmt(r.get("cloud_ms_per_step"), ".0f"),
            _pct(r.get("cloud_busy"), ".0f"), _fmt(r["startup_s"], ".1f"),
            f"{r['worker_uss_mb']:.0f} ({r['workers']})", _fmt(per_edge[i], ".0f"),
            _pct(r.get("published_fraction"), ".1f"),
            _fmt(r["version_lag_median"], ".0f"),
            f"{100 * r['accuracy']:.1f}%", f"{100 * r['upload_fraction']:.1f}%", r["dropped"], _fmt(ratio, ".2f"),
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    table = head + "\n".join(lines) + "\n"
    if max((r.get("repeat", 0) for r in rows), default=0) > 0:
        table = summary_markdown(rows) + "\nEvery run:\n\n" + table
    return f"Reproduce: `{command}`\n\n" + table


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _pct(fraction: float | None, spec: str) -> str:
    return "" if fraction is None else format(100 * fraction, spec) + "%"
