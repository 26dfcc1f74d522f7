"""Source: the deployed edge model as it is, the floor every adaptation method must beat.

Eval mode with the source (running) statistics, no uploads, nothing in the cloud.
"""
from __future__ import annotations

import torch
from torch import nn

from cema_ray.methods.base import METHODS, CloudTrainer, EdgePolicy, MethodSpec
from cema_ray.methods.common import BatchStatsEdge
from cema_ray.schema import Settings


def make_edge(model: nn.Module, settings: Settings) -> EdgePolicy:
    return BatchStatsEdge(model, norm_mode="running", upload_all=False)


def make_cloud(foundation: nn.Module | None, student: nn.Module, settings: Settings,
               generator: torch.Generator) -> CloudTrainer:
    return CloudTrainer()


SPEC = METHODS.register(
    "source",
    MethodSpec(
        name="source",
        edge_factory=make_edge,
        cloud_factory=make_cloud,
        uses_foundation=False,
        settings={},
        description="no adaptation: the deployed edge model in eval mode; 0 uploads",
    ),
)
