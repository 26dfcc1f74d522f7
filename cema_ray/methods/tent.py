"""Tent (Wang et al., ICLR 2021): entropy minimisation of the normalisation affine parameters.

Tent needs back-propagation, so in the edge/cloud harness it has two forms:

- ``tent``: the cloud runs Tent on its copy of the edge model with **every** sample uploaded, one
  step per edge batch on the batch's mean entropy, and publishes the norm affine parameters; the
  edge loads them and normalises with its test batch's statistics. Because the edge predicts batch
  t with the parameters from after batch t-1, and normalises with the same batch statistics the
  cloud's forward uses, its predictions are exactly Tent's online predictions.
- ``tent-edge``: the same step run on the edge itself (0 uploads), a reference that breaks the
  forward-only rule (``forward_only_edge=False``).

Both use ``entropy_step``, so the two cannot drift apart. BatchNorm is in batch-statistics mode
(running statistics are never used, as Tent deletes them); only norm weight/bias are trainable.

Settings: ``optimizer`` ("adam" | "sgd"), ``lr``, ``momentum`` (SGD), ``betas`` (Adam),
``weight_decay``. Defaults follow Tent's CIFAR config (Adam 1e-3, betas 0.9/0.999); its ImageNet
config is SGD lr 2.5e-4 momentum 0.9 (set by the configs).
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from cema_ray.algorithms.entropy import entropy
from cema_ray.methods.base import CloudTrainer, EdgePolicy, EdgeResult, NormState, register_method
from cema_ray.methods.common import (
    OPTIMIZER_SETTINGS,
    LossFn,
    SharedModelCloud,
    load_arrays,
    make_optimizer,
    model_device,
    no_cloud,
    tensor_state,
    uploading_edge,
    use_norm_stats,
)
from cema_ray.models.norm import freeze_all_but_norm_affine, norm_affine_parameters, norm_state
from cema_ray.schema import Settings

SETTINGS = dict(OPTIMIZER_SETTINGS)


def mean_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Tent's loss: the batch's mean prediction entropy."""
    return entropy(logits).mean()


def configure_tent(model: nn.Module) -> list[nn.Parameter]:
    """Batch-statistics BN, only norm affine trainable; returns the parameters to optimise.

    Eval mode (as mariodoebler's port) keeps dropout/stochastic depth off; the batch-statistics
    mode is what makes BN normalise with the test batch, whatever the train flag, without
    touching the running statistics.
    """
    model.eval()
    use_norm_stats(model, "batch")
    freeze_all_but_norm_affine(model)
    return [p for _, p in norm_affine_parameters(model)]


def entropy_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, loss_fn: LossFn) -> torch.Tensor:
    """One Tent step on ``x``; returns the pre-update logits (Tent reports those as predictions)."""
    logits = model(x)
    loss = loss_fn(logits)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return logits.detach()


class EntropyCloud(SharedModelCloud):
    """The cloud half of Tent-like methods: one entropy step on each edge batch's uploads."""

    def __init__(self, student: nn.Module, settings: Settings, generator: torch.Generator, loss_fn: LossFn) -> None:
        self.settings = settings
        self.loss_fn = loss_fn
        model = copy.deepcopy(student)
        self.params = configure_tent(model)
        super().__init__(model, generator)

    def make_optimizer(self) -> torch.optim.Optimizer:
        return make_optimizer(self.params, self.settings)

    def train_step(self, x: torch.Tensor) -> bool:
        entropy_step(self.model, self.optimizer, x, self.loss_fn)
        return True

    def published(self) -> NormState:
        """Norm affine parameters only: BN runs on batch statistics, so running stats are unused."""
        return norm_state(self.model, include_stats=False)


class TentEdge(EdgePolicy):
    """Tent run on the edge itself (``tent-edge``): back-propagates, uploads nothing."""

    def __init__(self, model: nn.Module, settings: Settings) -> None:
        self.model = model
        self.settings = settings
        self.params = configure_tent(model)
        self.optimizer = make_optimizer(self.params, settings)
        self._deployed = tensor_state(model)

    def process(self, x: torch.Tensor) -> EdgeResult:
        logits = entropy_step(self.model, self.optimizer, x.to(model_device(self.model)), mean_entropy)
        preds = logits.argmax(1).cpu().numpy().astype(np.int64)
        ent = entropy(logits).float().cpu().numpy()
        return EdgeResult(predictions=preds, upload=np.zeros(len(preds), dtype=bool), entropy=ent)

    def apply_update(self, state: NormState | None) -> None:
        if state:
            load_arrays(self.model, state)

    def reset(self) -> None:
        self.model.load_state_dict(self._deployed)
        self.optimizer = make_optimizer(self.params, self.settings)


def make_cloud(foundation: nn.Module | None, student: nn.Module, settings: Settings,
               generator: torch.Generator) -> CloudTrainer:
    return EntropyCloud(student, settings, generator, mean_entropy)


register_method("tent", edge=uploading_edge, cloud=make_cloud, settings=SETTINGS,
                description="Tent in the cloud: every sample uploaded, norm affine params published; edge uses batch "
                            "stats")
register_method("tent-edge", edge=TentEdge, cloud=no_cloud, settings=SETTINGS, forward_only_edge=False,
                mixed_models=True,
                description="Tent on the edge itself (back-propagates: breaks the forward-only rule); 0 uploads, "
                            "reference")
