"""Ray metrics for the dashboard, Prometheus and Grafana: what the edges and the cloud are doing.

Every series is declared once, in `METRICS` (name, kind, tags, meaning); the README's metric table,
the Grafana dashboard and `cema-ray status` are checked against it. Names follow Ray's rule
(`^[a-zA-Z_:][a-zA-Z0-9_:]*$`); Ray exports them with a `ray_` prefix and counters with a `_total`
suffix (`ray_cema_edge_samples_total`).

Tags: `run` is the run's actor prefix (`cema-<name>-<6 hex>`, as in the dashboard's Actors page and in
`summary.json: ray_run`), so runs sharing a cluster keep apart; edge series carry the edge `group`, its
architecture (`model`, the edge model's name) and the `host`, never the edge id, so a fleet of thousands keeps a
small label set.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ray.util import metrics

EDGE_TAGS = ("run", "group", "model", "host")
EDGE_COUNTERS = (("cema_edge_samples", "samples"), ("cema_edge_correct", "correct"), ("cema_edge_uploads", "uploaded"),
                 ("cema_edge_bytes_up", "bytes_up"), ("cema_edge_bytes_down", "bytes_down"),
                 ("cema_edge_rejected", "rejected"))
"""The per-batch counters and the record field each adds up (a redone batch adds to none of them)."""
CLOUD_TAGS = ("run",)


@dataclass(frozen=True)
class MetricSpec:
    name: str  # as declared; exported as ray_<name> (+ _total for counters)
    kind: str  # counter | gauge | histogram
    tags: tuple[str, ...]
    help: str
    boundaries: tuple[float, ...] = ()  # histograms only: bucket upper bounds

    @property
    def exported(self) -> str:
        """The series name Prometheus stores (a histogram's are <exported>_bucket/_sum/_count)."""
        return f"ray_{self.name}" + ("_total" if self.kind == "counter" else "")


METRICS: dict[str, MetricSpec] = {m.name: m for m in [
    MetricSpec("cema_edge_samples", "counter", EDGE_TAGS, "samples predicted by edges"),
    MetricSpec("cema_edge_correct", "counter", EDGE_TAGS, "correct predictions (every sample has a label here)"),
    MetricSpec("cema_edge_uploads", "counter", EDGE_TAGS, "samples uploaded to the cloud"),
    MetricSpec("cema_edge_bytes_up", "counter", EDGE_TAGS, "bytes uploaded (uint8 images)"),
    MetricSpec("cema_edge_bytes_down", "counter", EDGE_TAGS, "bytes of published parameters loaded by edges"),
    MetricSpec("cema_edge_rejected", "counter", EDGE_TAGS, "samples rejected as malformed input"),
    MetricSpec("cema_edge_redone_samples", "counter", EDGE_TAGS,
               "samples predicted again after --resume (batches the interrupted run had recorded past its resume "
               "point): kept out of the edge counters above, which the interrupted run's hosts already counted"),
    MetricSpec("cema_edge_accuracy", "gauge", EDGE_TAGS,
               "accuracy so far of the host's edges in the group (correct / samples)"),
    MetricSpec("cema_edge_version_lag", "gauge", EDGE_TAGS, "versions behind the newest, last batch"),
    MetricSpec("cema_edge_e_max", "gauge", EDGE_TAGS, "entropy threshold E_max in force, last batch"),
    MetricSpec("cema_edge_batch_ms", "histogram", EDGE_TAGS, "edge inference time per batch (ms)",
               (1, 2, 5, 10, 20, 50, 100, 200, 500)),
    MetricSpec("cema_cloud_ingested", "counter", CLOUD_TAGS, "uploaded samples received by the cloud"),
    MetricSpec("cema_cloud_refused", "counter", CLOUD_TAGS, "uploads refused by a full cloud queue (dropped)"),
    MetricSpec("cema_cloud_steps", "counter", CLOUD_TAGS, "cloud training steps"),
    MetricSpec("cema_cloud_step_seconds", "counter", CLOUD_TAGS, "seconds spent in training steps"),
    MetricSpec("cema_cloud_publications", "counter", CLOUD_TAGS, "weight versions published"),
    MetricSpec("cema_cloud_queue_depth", "gauge", CLOUD_TAGS, "cloud backlog: uploaded samples waiting for a step"),
    MetricSpec("cema_cloud_call_seconds", "histogram", CLOUD_TAGS, "cloud time per delivery (s)",
               (0.01, 0.03, 0.1, 0.3, 1, 3, 10)),
]}


def _make(name: str) -> Any:
    spec = METRICS[name]
    if spec.kind == "counter":
        return metrics.Counter(name, spec.help, spec.tags)
    if spec.kind == "gauge":
        return metrics.Gauge(name, spec.help, spec.tags)
    return metrics.Histogram(name, spec.help, boundaries=list(spec.boundaries), tag_keys=spec.tags)


class HostMetrics:
    """The series of one EdgeHost, per edge group and architecture."""

    def __init__(self, host_id: int, run: str, models: dict[int, str] | None = None) -> None:
        """``models``: each edge's architecture (the edge model's name), by edge id."""
        self.host, self.run = str(host_id), run
        self.models = models or {}
        self.m = {name: _make(name) for name, spec in METRICS.items() if spec.tags == EDGE_TAGS}
        self.seen: dict[str, list[int]] = {}  # group -> [samples, correct] in this process

    def record(self, rec: dict[str, Any], redone: bool = False) -> None:
        """One batch's record. ``redone``: the interrupted run this one resumes had recorded this batch (and
        its hosts counted it): count its samples as redone work, not again in the edge counters."""
        t = {"run": self.run, "group": str(rec["group"]), "model": self.models.get(int(rec["edge_id"]), ""),
             "host": self.host}
        m = self.m
        if redone:
            m["cema_edge_redone_samples"].inc(rec["samples"], tags=t)
        else:
            for name, key in EDGE_COUNTERS:
                if rec[key]:
                    m[name].inc(rec[key], tags=t)
        seen = self.seen.setdefault(t["group"], [0, 0])  # a group runs one architecture
        seen[0] += rec["samples"]  # as summary.json counts: a rejected sample counts as wrong
        seen[1] += rec["correct"]
        if seen[0]:
            m["cema_edge_accuracy"].set(seen[1] / seen[0], tags=t)
        m["cema_edge_version_lag"].set(rec["version_lag"], tags=t)
        if rec["e_max"] == rec["e_max"]:  # not nan
            m["cema_edge_e_max"].set(rec["e_max"], tags=t)
        m["cema_edge_batch_ms"].observe(max(rec["latency_ms"], 1e-3), tags=t)


class CloudMetrics:
    """The cloud's intake, steps, step time, backlog and publications."""

    def __init__(self, run: str) -> None:
        self.t = {"run": run}
        self.m = {name: _make(name) for name, spec in METRICS.items() if spec.tags == CLOUD_TAGS}

    def record(self, ingested: int, refused: int, steps: int, step_seconds: float, publications: int,
               queue_depth: int, seconds: float) -> None:
        m, t = self.m, self.t
        for name, value in (("cema_cloud_ingested", ingested), ("cema_cloud_refused", refused),
                            ("cema_cloud_steps", steps), ("cema_cloud_step_seconds", step_seconds),
                            ("cema_cloud_publications", publications)):
            if value:
                m[name].inc(value, tags=t)
        m["cema_cloud_queue_depth"].set(queue_depth, tags=t)
        m["cema_cloud_call_seconds"].observe(max(seconds, 1e-6), tags=t)
