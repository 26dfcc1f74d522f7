"""`cema-ray status`: a terminal view of the runs on a Ray cluster, for users without Grafana.

It reads the same series Prometheus and Grafana show (`runtime/metrics.py`), straight from every
node's metrics export port, rather than asking a run's driver: it sees every run on the cluster,
submitted jobs included, needs no Prometheus, and shows the numbers a dashboard would. Rates are
differences between two scrapes. Counters count work done: a batch redone after a host restart is
counted again here, once in `summary.json`.
"""
from __future__ import annotations

import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Iterable

from prometheus_client.parser import text_string_to_metric_families

from cema_ray.errors import CemaError
from cema_ray.runtime.metrics import METRICS

Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]  # (sample name, project labels) -> value
EDGE_KEYS = {key: METRICS[f"cema_edge_{key}"].exported for key in ("samples", "correct", "uploads", "bytes_up",
                                                                   "bytes_down")}
CLOUD_KEYS = {key: METRICS[f"cema_cloud_{key}"].exported for key in ("steps", "ingested", "refused", "publications")}
LAG, BACKLOG = METRICS["cema_edge_version_lag"].exported, METRICS["cema_cloud_queue_depth"].exported
KEPT_LABELS = ("run", "group", "host")
GAUGES = {spec.exported for spec in METRICS.values() if spec.kind == "gauge"}


def _combine(name: str, a: float | None, b: float) -> float:
    """Counters add up over workers and nodes; gauges keep the largest (lag, backlog: the worst matters)."""
    if a is None:
        return b
    return max(a, b) if name in GAUGES else a + b


class StatusError(CemaError):
    """No cluster or no metrics endpoint to read."""


def parse(text: str) -> Series:
    """The project's samples in one Prometheus text page, summed over Ray's own labels (worker, node...)."""
    out: Series = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("ray_cema_"):
            continue
        for s in family.samples:
            key = (s.name, tuple((k, s.labels[k]) for k in KEPT_LABELS if k in s.labels))
            out[key] = _combine(s.name, out.get(key), s.value)
    return out


def scrape(targets: Iterable[str], timeout: float = 5.0) -> Series:
    """Every target's page, merged (targets are host:port of nodes' metrics export ports)."""
    merged: Series = {}
    for target in targets:
        try:
            with urllib.request.urlopen(f"http://{target}/metrics", timeout=timeout) as resp:
                page = parse(resp.read().decode())
        except (urllib.error.URLError, OSError) as exc:
            raise StatusError(f"cannot read metrics at http://{target}/metrics: {exc}") from None
        for key, value in page.items():
            merged[key] = _combine(key[0], merged.get(key), value)
    return merged


@dataclass
class GroupRow:
    run: str
    group: str
    totals: dict[str, float] = field(default_factory=dict)
    rate: float = 0.0  # samples/s between the two scrapes
    lag: float = 0.0


def rows(now: Series, before: Series | None = None, seconds: float = 0.0) -> list[GroupRow]:
    """Per (run, edge group): totals, samples/s since `before`, the largest version lag."""
    table: dict[tuple[str, str], GroupRow] = {}
    for (name, labels), value in now.items():
        lab = dict(labels)
        if "group" not in lab:
            continue
        row = table.setdefault((lab["run"], lab["group"]), GroupRow(lab["run"], lab["group"]))
        for key, series in EDGE_KEYS.items():
            if name == series:
                row.totals[key] = row.totals.get(key, 0.0) + value
                if key == "samples" and before is not None and seconds > 0:
                    row.rate += (value - before.get((name, labels), 0.0)) / seconds
        if name == LAG:
            row.lag = max(row.lag, value)
    return [table[k] for k in sorted(table)]


def cloud(now: Series, run: str) -> dict[str, float]:
    """The cloud's totals and backlog for one run."""
    out = {key: now.get((series, (("run", run),)), 0.0) for key, series in CLOUD_KEYS.items()}
    out["backlog"] = now.get((BACKLOG, (("run", run),)), 0.0)
    return out


def render(now: Series, before: Series | None, seconds: float, run_filter: str = "") -> str:
    """The table a person reads: one line per edge group, the cloud's line under each run."""
    lines, last_run = [], None
    head = f"{'run / group':<42} {'samples':>9} {'samples/s':>10} {'accuracy':>9} {'uploaded':>9} {'lag':>4}"
    for row in rows(now, before, seconds):
        if run_filter and run_filter not in row.run:
            continue
        if row.run != last_run:
            if last_run is not None:
                lines.append(_cloud_line(now, last_run))
            lines += ["", f"{row.run}", head]
            last_run = row.run
        t = row.totals
        n = t.get("samples", 0.0)
        acc = f"{100 * t.get('correct', 0.0) / n:8.2f}%" if n else f"{'-':>9}"
        up = f"{100 * t.get('uploads', 0.0) / n:8.1f}%" if n else f"{'-':>9}"
        lines.append(f"  {row.group:<40} {int(n):>9} {row.rate:>10.1f} {acc} {up} {int(row.lag):>4}")
    if last_run is None:
        return "no cema_ray series on this cluster yet (a run's first numbers appear about 10 s after it starts)"
    lines.append(_cloud_line(now, last_run))
    return "\n".join(lines).lstrip("\n")


def _cloud_line(now: Series, run: str) -> str:
    c = cloud(now, run)
    return (f"  cloud: {int(c['steps'])} steps, {int(c['publications'])} publications, backlog {int(c['backlog'])} "
            f"samples, {int(c['ingested'])} received, {int(c['refused'])} refused")


def cluster_targets(address: str) -> list[str]:
    """host:port of every alive node's metrics export port, asked of the cluster at `address`."""
    import ray

    try:
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise StatusError(f"no Ray cluster at {address!r}: {str(exc).splitlines()[0]}") from None
    try:
        return [f"{n['NodeManagerAddress']}:{n['MetricsExportPort']}" for n in ray.nodes() if n.get("Alive")]
    finally:
        ray.shutdown()


def watch(targets: list[str], interval: float, once: bool, run_filter: str = "") -> None:
    """Print the table every `interval` seconds (once: after one interval, for scripts)."""
    before, t_before = scrape(targets), time.monotonic()
    while True:
        time.sleep(interval)
        now, t_now = scrape(targets), time.monotonic()
        text = render(now, before, t_now - t_before, run_filter)
        if once:
            print(text)
            return
        stamp = time.strftime("%H:%M:%S")
        sys.stdout.write(("\x1b[2J\x1b[H" if sys.stdout.isatty() else "\n") + f"cema-ray status {stamp} "
                         f"(every {interval:g} s; Ctrl-C stops)\n{text}\n")
        sys.stdout.flush()
        before, t_before = now, t_now
