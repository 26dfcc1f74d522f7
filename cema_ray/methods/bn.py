"""BN adapt: the edge normalises with its current test batch's statistics; nothing else changes.

Computing batch statistics is a forward pass, so this is the fair edge-only baseline: no
uploads, no cloud. ``alpha`` mixes the statistics as in Schneider et al. 2020 (BNAlpha):
alpha * test-batch + (1 - alpha) * source; the default 1.0 is pure test-batch statistics
(Tent's ``norm``, "BN-1").

Settings: ``alpha`` (float in [0, 1]): weight of the test batch's statistics.
"""
from __future__ import annotations

from torch import nn

from cema_ray.methods.base import EdgePolicy, register_method
from cema_ray.methods.common import BatchStatsEdge, no_cloud
from cema_ray.schema import Settings, setting

SETTINGS = {"alpha": setting(1.0, "weight of the test batch's statistics (1: pure batch statistics)", lo=0, hi=1)}


def make_edge(model: nn.Module, settings: Settings) -> EdgePolicy:
    alpha = settings["alpha"]
    mode = "batch" if alpha == 1.0 else "running" if alpha == 0.0 else "mix"
    return BatchStatsEdge(model, norm_mode=mode, alpha=alpha, upload_all=False)


register_method("bn", edge=make_edge, cloud=no_cloud, settings=SETTINGS, mixed_models=True,
                description="BN adapt: edge normalises with test-batch statistics (alpha-mixed with source); 0 uploads")
