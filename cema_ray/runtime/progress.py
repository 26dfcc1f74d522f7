"""Progress of a run as it goes: a progress bar with samples per second, accuracy and uploads."""
from __future__ import annotations

import time
from typing import Any

from tqdm import tqdm

from cema_ray.results import RunRecorder


class RunProgress:
    """Collects per-batch records and shows one status line (a tqdm bar) while the run goes.

    The bar counts batches the edges have predicted. In sync runs a batch is recorded in the round it is
    predicted; in async runs it is recorded only once the cloud has taken (or dropped) its uploads, which can
    be long after, so the async driver reports predictions as they come (`predicted`) and the line shows
    the batches still waiting for the cloud apart (`cloud_todo`)."""

    def __init__(self, name: str, total_batches: int, enabled: bool, count_predictions: bool = False) -> None:
        self.recorder = RunRecorder()
        self.t0 = time.perf_counter()
        self.samples = self.correct = self.uploaded = 0
        self.count_predictions = count_predictions
        self.predicted_batches = 0
        self.bar = tqdm(total=total_batches, desc=name, unit="batch", disable=not enabled, mininterval=2)

    def add(self, record: dict[str, Any]) -> None:
        record.setdefault("t_wall", time.perf_counter() - self.t0)
        self.recorder.add(record)
        self.samples += record["samples"]
        self.correct += record["correct"]
        self.uploaded += record["uploaded"]
        if not self.count_predictions:
            self.bar.update(1)

    def predicted(self, batches: int) -> None:
        """Batches the edges predicted just now (async runs: before the cloud has seen their uploads)."""
        self.predicted_batches += batches
        self.bar.update(batches)

    def refresh(self, **extra: Any) -> None:
        n = max(self.samples, 1)
        rate = self.samples / max(time.perf_counter() - self.t0, 1e-9)
        if self.count_predictions:
            extra = {"cloud_todo": self.predicted_batches - len(self.recorder), **extra}
        self.bar.set_postfix(acc=f"{self.correct / n:.3f}", up=f"{self.uploaded / n:.2f}", smp_s=f"{rate:.0f}",
                             **extra)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def close(self) -> None:
        self.bar.close()
