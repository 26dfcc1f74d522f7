"""The edge's upload decision (METHOD.md, edge steps 2-3): which samples are worth the uplink.

Step 2 drops unreliable samples (entropy at or above E_max, static or dynamic); an optional
entropy floor drops samples the model is already sure of. Step 3's redundancy filter (as in EATA)
drops samples whose prediction looks like the recent average prediction. All state is small and
picklable (``snapshot``/``restore``) so a restarted edge resumes with the same thresholds.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cema_ray.algorithms.entropy import e0 as e0_of
from cema_ray.errors import ConfigError

MOVING_AVERAGE = 0.9  # m <- 0.9 m + 0.1 mean(p kept), EATA's constant
SKIP_REASONS = ("unreliable", "confident", "redundant")  # in the order the filters apply


def default_d_margin(num_classes: int) -> float:
    """0.05 as in the ImageNet configs; 0.4 for small label sets, where 0.05 lets almost nothing through."""
    return 0.4 if num_classes <= 100 else 0.05


class EntropyFilter:
    """Stateful selection of the samples to upload, one edge batch at a time.

    Settings: ``e_max_factor`` (E0 = factor * ln C), ``dynamic`` with ``dynamic_lambda`` and
    ``warmup_samples`` (paper Eqn. 2), ``redundancy`` with ``d_margin`` (None: by class count),
    ``entropy_floor`` (e_min factor, paper Eqn. 3; None = off).
    """

    def __init__(self, num_classes: int, e_max_factor: float = 0.4, dynamic: bool = False,
                 dynamic_lambda: float = 0.6, warmup_samples: int = 256, d_margin: float | None = None,
                 redundancy: bool = True, entropy_floor: float | None = None) -> None:
        if int(warmup_samples) < 1:
            raise ConfigError(f"setting 'warmup_samples' must be >= 1, got {warmup_samples!r}")
        self.num_classes = int(num_classes)
        self.e0 = e0_of(self.num_classes, e_max_factor)
        self.dynamic = bool(dynamic)
        self.dynamic_lambda = float(dynamic_lambda)
        self.warmup_samples = int(warmup_samples)
        self.d_margin = default_d_margin(self.num_classes) if d_margin is None else float(d_margin)
        self.redundancy = bool(redundancy)
        self.e_min = None if entropy_floor is None else float(entropy_floor) * math.log(self.num_classes)
        self.last_skipped: dict[str, int] = dict.fromkeys(SKIP_REASONS, 0)
        self._reset_state()

    def _reset_state(self) -> None:
        self.m: torch.Tensor | None = None
        self.ent_sum = 0.0  # entropy sum over every sample seen
        self.ent_count = 0
        self.warm_sum = 0.0  # entropy sum over the first warmup_samples samples
        self.warm_count = 0

    @property
    def warmed_up(self) -> bool:
        return self.warm_count >= self.warmup_samples

    @property
    def e_max(self) -> float:
        """The threshold in force: E0, or E0 * lambda * mean(all seen) / mean(first N_w) once warmed up."""
        if not (self.dynamic and self.warmed_up):
            return self.e0
        warm_mean = self.warm_sum / self.warm_count
        if warm_mean <= 0.0:
            return self.e0 * self.dynamic_lambda
        return self.e0 * self.dynamic_lambda * (self.ent_sum / self.ent_count) / warm_mean

    def _observe(self, ent: torch.Tensor) -> None:
        values = ent.detach().double().cpu()
        self.ent_sum += float(values.sum())
        self.ent_count += int(values.numel())
        take = min(self.warmup_samples - self.warm_count, int(values.numel()))
        if take > 0:
            self.warm_sum += float(values[:take].sum())
            self.warm_count += take

    def select(self, probs: torch.Tensor, ent: torch.Tensor) -> torch.Tensor:
        """Bool mask (N,) of samples to upload; updates the running entropy and the moving average m.

        The entropy statistics include this batch before the threshold is computed, as in the
        authors' code; comparisons are strict. ``last_skipped`` counts, per filter, the samples it
        turned away that the filters before it let through: when uploads collapse, it tells an
        entropy threshold that rejects everything from a redundancy filter that does.
        """
        probs, ent = probs.detach(), ent.detach()
        if probs.dim() != 2 or ent.shape != probs.shape[:1]:
            raise ValueError(f"select expects probs (N, C) and entropies (N,), got {tuple(probs.shape)} and {tuple(ent.shape)}")
        self._observe(ent)
        mask = ent < self.e_max
        skipped = {"unreliable": int((~mask).sum())}
        if self.e_min is not None:
            reliable = int(mask.sum())
            mask &= ent > self.e_min
            skipped["confident"] = reliable - int(mask.sum())
        if self.redundancy:
            candidates = int(mask.sum())
            mask = self._non_redundant(probs, mask)
            skipped["redundant"] = candidates - int(mask.sum())
        self.last_skipped = {reason: skipped.get(reason, 0) for reason in SKIP_REASONS}
        return mask

    def _non_redundant(self, probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.m is not None:
            m = self.m.to(probs.device, probs.dtype)
            cos = F.cosine_similarity(m.unsqueeze(0), probs, dim=1)
            mask = mask & (cos.abs() < self.d_margin)
        if bool(mask.any()):
            mean = probs[mask].mean(dim=0)
            self.m = mean if self.m is None else MOVING_AVERAGE * self.m.to(mean) + (1 - MOVING_AVERAGE) * mean
        return mask

    def snapshot(self) -> dict[str, Any]:
        return {
            "m": None if self.m is None else self.m.detach().cpu().numpy().copy(),
            "ent_sum": self.ent_sum, "ent_count": self.ent_count,
            "warm_sum": self.warm_sum, "warm_count": self.warm_count,
        }

    def restore(self, snap: dict[str, Any]) -> None:
        m = snap["m"]
        self.m = None if m is None else torch.as_tensor(np.array(m))  # a copy: arrays from the object store are read-only
        self.ent_sum, self.ent_count = float(snap["ent_sum"]), int(snap["ent_count"])
        self.warm_sum, self.warm_count = float(snap["warm_sum"]), int(snap["warm_count"])
