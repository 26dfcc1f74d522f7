"""Progress of a run as it goes: a progress bar with samples per second, accuracy and uploads."""
from __future__ import annotations

import time
from typing import Any

from tqdm import tqdm

from cema_ray.results import RunRecorder


class RunProgress:
    """Collects per-batch records and shows one status line (a tqdm bar) while the run goes."""

    def __init__(self, name: str, total_batches: int, enabled: bool) -> None:
        self.recorder = RunRecorder()
        self.t0 = time.perf_counter()
        self.samples = self.correct = self.uploaded = 0
        self.bar = tqdm(total=total_batches, desc=name, unit="batch", disable=not enabled, mininterval=2)

    def add(self, record: dict[str, Any]) -> None:
        record.setdefault("t_wall", time.perf_counter() - self.t0)
        self.recorder.add(record)
        self.samples += record["samples"]
        self.correct += record["correct"]
        self.uploaded += record["uploaded"]
        self.bar.update(1)

    def refresh(self, **extra: Any) -> None:
        n = max(self.samples, 1)
        rate = self.samples / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix(acc=f"{self.correct / n:.3f}", up=f"{self.uploaded / n:.2f}", smp_s=f"{rate:.0f}",
                             **extra)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def close(self) -> None:
        self.bar.close()
