"""Source: the deployed edge model as it is, the floor every adaptation method must beat.

Eval mode with the source (running) statistics, no uploads, nothing in the cloud.
"""
from __future__ import annotations

from torch import nn

from cema_ray.methods.base import EdgePolicy, register_method
from cema_ray.methods.common import BatchStatsEdge, no_cloud
from cema_ray.schema import Settings


def make_edge(model: nn.Module, settings: Settings) -> EdgePolicy:
    return BatchStatsEdge(model, norm_mode="running", upload_all=False)


register_method("source", edge=make_edge, cloud=no_cloud, settings={}, mixed_models=True,
                description="no adaptation: the deployed edge model in eval mode; 0 uploads")
