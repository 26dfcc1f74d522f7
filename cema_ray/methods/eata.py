"""EATA as the CEMA authors ran it, i.e. ETA (Niu et al., ICML 2022) without the Fisher term.

The edge runs EATA's two sample filters forward-only and uploads what passes them: reliable
(H < E0 = ``e_max_factor`` * ln C) and non-redundant (|cos(p, m)| < ``d_margin`` against the moving
average m of kept probability vectors). The cloud runs reweighted entropy minimisation on the
uploads -- loss = mean over uploaded samples of exp(E0 - H) * H, the weight a constant -- one step
per edge batch that uploaded anything (none uploaded: no step, as EATA skips the update), on its
copy of the edge model (norm affine only, batch-statistics BN), and publishes the norm affine
parameters. The samples that pass both filters are exactly EATA's backward samples, which is
what CEMA counts as EATA's uploads.

Deviation from the original: EATA's forward normalises with the statistics of the *full* batch
and only the loss is restricted to the kept samples; here the cloud only ever sees the uploaded
samples, so its forward (and therefore its gradient) uses the batch statistics of the kept subset.

Settings: the optimiser ones of Tent (defaults Adam 1e-3 as in mariodoebler's CIFAR config;
ImageNet: SGD 2.5e-4 momentum 0.9), ``e_max_factor`` (E0 = factor * ln C, 0.4), ``d_margin``
(redundancy threshold: 0.4 for 10 classes, 0.05 for ImageNet).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from cema_ray.algorithms.entropy import e0, entropy, reweight
from cema_ray.algorithms.selection import EntropyFilter
from cema_ray.methods.base import CloudTrainer, EdgeResult, register_method
from cema_ray.methods.common import OPTIMIZER_SETTINGS, LossFn, d_margin_setting, load_arrays, use_norm_stats
from cema_ray.methods.host_model import ForwardEdge, HostModel
from cema_ray.methods.tent import EntropyCloud
from cema_ray.schema import Settings, setting

SETTINGS = {**OPTIMIZER_SETTINGS,
            "e_max_factor": setting(0.4, "reliable samples: entropy below E0 = factor * ln C", lo=0, lo_open=True),
            "d_margin": d_margin_setting(0.4, "redundancy: |cos| to the moving average below this (0.05 for "
                                              "ImageNet)")}


def reweighted_entropy(e_max_factor: float) -> LossFn:
    """EATA's loss: mean of exp(E0 - H) * H, the weight detached (CEMA's and EATA's 1/exp(H - E0))."""

    def loss(logits: torch.Tensor) -> torch.Tensor:
        ent = entropy(logits)
        return (reweight(ent, e0(logits.shape[1], e_max_factor)) * ent).mean()

    return loss


class EataEdge(ForwardEdge):
    """Forward-only edge: batch-statistics predictions and EATA's two filters decide the uploads."""

    def __init__(self, model: nn.Module, settings: Settings) -> None:
        model.eval()
        use_norm_stats(model, "batch")
        super().__init__(HostModel(model, load_arrays))
        self.settings = settings
        self.filter: EntropyFilter | None = None  # built on the first batch, when C is known
        self._num_classes = 0

    def _make_filter(self, num_classes: int) -> EntropyFilter:
        self._num_classes = num_classes
        return EntropyFilter(
            num_classes,
            e_max_factor=float(self.settings["e_max_factor"]),
            dynamic=False,
            d_margin=float(self.settings["d_margin"]),
            redundancy=True,
            entropy_floor=None,
        )

    def decide(self, logits: torch.Tensor) -> EdgeResult:
        if self.filter is None:
            self.filter = self._make_filter(logits.shape[1])
        with torch.inference_mode():
            ent = entropy(logits)
            mask = self.filter.select(logits.softmax(1), ent)
        upload = np.asarray(torch.as_tensor(mask).cpu(), dtype=bool)
        return EdgeResult(predictions=logits.argmax(1).cpu().numpy().astype(np.int64), upload=upload,
                          entropy=ent.float().cpu().numpy(), e_max=float(self.filter.e_max),
                          skipped=dict(self.filter.last_skipped))

    def fresh_state(self) -> None:
        self.filter = None

    def snapshot(self) -> dict[str, Any]:
        snap = super().snapshot()
        if self.filter is not None:
            snap.update(num_classes=self._num_classes, filter=self.filter.snapshot())
        return snap

    def restore(self, snap: dict[str, Any]) -> None:
        super().restore(snap)
        self.filter = None
        if "filter" in snap:
            self.filter = self._make_filter(int(snap["num_classes"]))
            self.filter.restore(snap["filter"])


def make_cloud(foundation: nn.Module | None, student: nn.Module, settings: Settings,
               generator: torch.Generator) -> CloudTrainer:
    return EntropyCloud(student, settings, generator, reweighted_entropy(settings["e_max_factor"]))


register_method("eata", edge=EataEdge, cloud=make_cloud, settings=SETTINGS,
                description="ETA (EATA without Fisher): edge uploads reliable, non-redundant samples; cloud reweighted "
                            "entropy min")
