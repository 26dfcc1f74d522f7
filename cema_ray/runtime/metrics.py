"""Ray metrics for the dashboard (and Prometheus): what the edges and the cloud are doing.

Names follow Ray's rule (`^[a-zA-Z_:][a-zA-Z0-9_:]*$`) and are exported with Ray's `ray_`
prefix. Tags are per host, not per edge, so a fleet of thousands keeps a small label set.
"""
from __future__ import annotations

from typing import Any

from ray.util import metrics


class HostMetrics:
    """Counters and gauges of one EdgeHost."""

    def __init__(self, host_id: int) -> None:
        tags = ("host",)
        self.tags = {"host": str(host_id)}
        self.samples = metrics.Counter("cema_edge_samples", "samples predicted by edges", tags)
        self.correct = metrics.Counter("cema_edge_correct", "correct predictions (where labels exist)", tags)
        self.uploads = metrics.Counter("cema_edge_uploads", "samples uploaded to the cloud", tags)
        self.bytes_up = metrics.Counter("cema_edge_bytes_up", "bytes uploaded", tags)
        self.rejected = metrics.Counter("cema_edge_rejected", "samples rejected as bad input", tags)
        self.version_lag = metrics.Gauge("cema_edge_version_lag", "versions behind the newest, last batch", tags)
        self.e_max = metrics.Gauge("cema_edge_e_max", "entropy threshold in force, last batch", tags)
        self.latency = metrics.Histogram("cema_edge_batch_ms", "edge inference time per batch (ms)",
                                         boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500], tag_keys=tags)

    def record(self, rec: dict[str, Any]) -> None:
        t = self.tags
        self.samples.inc(rec["samples"], tags=t)
        if rec["correct"]:
            self.correct.inc(rec["correct"], tags=t)
        if rec["uploaded"]:
            self.uploads.inc(rec["uploaded"], tags=t)
            self.bytes_up.inc(rec["bytes_up"], tags=t)
        if rec["rejected"]:
            self.rejected.inc(rec["rejected"], tags=t)
        self.version_lag.set(rec["version_lag"], tags=t)
        if rec["e_max"] == rec["e_max"]:  # not nan
            self.e_max.set(rec["e_max"], tags=t)
        self.latency.observe(max(rec["latency_ms"], 1e-3), tags=t)


class CloudMetrics:
    """The cloud's step rate, step time, queue depth and publications."""

    def __init__(self) -> None:
        self.steps = metrics.Counter("cema_cloud_steps", "cloud training steps")
        self.ingested = metrics.Counter("cema_cloud_ingested", "uploaded samples received")
        self.publications = metrics.Counter("cema_cloud_publications", "weight versions published")
        self.queue_depth = metrics.Gauge("cema_cloud_queue_depth", "uploaded samples waiting for a step")
        self.step_seconds = metrics.Histogram("cema_cloud_call_seconds", "cloud time per ingest call (s)",
                                              boundaries=[0.01, 0.03, 0.1, 0.3, 1, 3, 10])

    def record(self, steps: int, ingested: int, publications: int, queue_depth: int, seconds: float) -> None:
        if steps:
            self.steps.inc(steps)
        if ingested:
            self.ingested.inc(ingested)
        if publications:
            self.publications.inc(publications)
        self.queue_depth.set(queue_depth)
        self.step_seconds.observe(max(seconds, 1e-6))
