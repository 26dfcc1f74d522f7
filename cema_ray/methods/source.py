"""Source: the deployed edge model as it is, the floor every adaptation method must beat.

Eval mode with the source (running) statistics, no uploads, nothing in the cloud.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cema_ray.methods.base import METHODS, CloudTrainer, EdgePolicy, MethodSpec
from cema_ray.methods.common import BatchStatsEdge, resolve_settings

DEFAULTS: dict[str, Any] = {}


def make_edge(model: nn.Module, settings: dict[str, Any]) -> EdgePolicy:
    resolve_settings("source", DEFAULTS, settings)
    return BatchStatsEdge(model, norm_mode="running", upload_all=False)


def make_cloud(
    foundation: nn.Module | None, student: nn.Module, settings: dict[str, Any], generator: torch.Generator
) -> CloudTrainer:
    resolve_settings("source", DEFAULTS, settings)
    return CloudTrainer()


SPEC = METHODS.register(
    "source",
    MethodSpec(
        name="source",
        make_edge=make_edge,
        make_cloud=make_cloud,
        uses_foundation=False,
        defaults=DEFAULTS,
        description="no adaptation: the deployed edge model in eval mode; 0 uploads",
    ),
)
