"""BN adapt: the edge normalises with its current test batch's statistics; nothing else changes.

Computing batch statistics is a forward pass, so this is the fair edge-only baseline: no
uploads, no cloud. ``alpha`` mixes the statistics as in Schneider et al. 2020 (BNAlpha):
alpha * test-batch + (1 - alpha) * source; the default 1.0 is pure test-batch statistics
(Tent's ``norm``, "BN-1").

Settings: ``alpha`` (float in [0, 1]): weight of the test batch's statistics.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cema_ray.errors import ConfigError
from cema_ray.methods.base import METHODS, CloudTrainer, EdgePolicy, MethodSpec
from cema_ray.methods.common import BatchStatsEdge, resolve_settings

DEFAULTS: dict[str, Any] = {"alpha": 1.0}


def make_edge(model: nn.Module, settings: dict[str, Any]) -> EdgePolicy:
    s = resolve_settings("bn", DEFAULTS, settings)
    alpha = float(s["alpha"])
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"method 'bn': setting 'alpha' must be in [0, 1], got {s['alpha']!r}")
    mode = "batch" if alpha == 1.0 else "running" if alpha == 0.0 else "mix"
    return BatchStatsEdge(model, norm_mode=mode, alpha=alpha, upload_all=False)


def make_cloud(
    foundation: nn.Module | None, student: nn.Module, settings: dict[str, Any], generator: torch.Generator
) -> CloudTrainer:
    resolve_settings("bn", DEFAULTS, settings)
    return CloudTrainer()


SPEC = METHODS.register(
    "bn",
    MethodSpec(
        name="bn",
        make_edge=make_edge,
        make_cloud=make_cloud,
        uses_foundation=False,
        defaults=DEFAULTS,
        description="BN adapt: edge normalises with test-batch statistics (alpha-mixed with source); 0 uploads",
    ),
)
