"""SAR (Niu et al., ICLR 2023): sharpness-aware, reliable entropy minimisation, in the cloud.

Every sample is uploaded. Per edge batch the cloud (on its copy of the edge model, BN in
batch-statistics mode) runs: forward, keep H < E0 = ``e_max_factor`` * ln C, backward, SAM ascent
to theta + eps (``rho`` = 0.05); second forward at theta + eps, keep the first filter's samples
whose new entropy is still below E0, backward, SGD-momentum descent from theta. The EMA (0.9,
``loss_ema``) of the second loss tracks collapse: when it falls below ``reset_constant`` (0.2)
the model and optimiser go back to the source (model recovery). As in the authors' code the EMA
value itself survives that recovery. It publishes the trained norm affine parameters.

Trainable parameters: norm affine weight/bias except the top of the network (SAR leaves ResNet's
``layer4`` and ViT's last blocks and final norm untouched). Generic rule used here: find the
modules named ``layer<k>`` nearest the root, take the one with the largest k, and exclude the norm
layers inside it and every norm layer registered after it (for our small ResNets: ``layer3`` and
anything after; for torchvision/timm ResNets: ``layer4``). A model without ``layer<k>`` modules
trains all its norm affine parameters.

Deviations: a batch with no sample under E0 takes no step (the original still applies SGD
momentum with zero gradients), and likewise if no sample survives the second filter the ascent is
undone and no descent is taken (the original's loss is NaN there).

Settings: ``lr`` (1e-3, mariodoebler's CIFAR config; SAR's ImageNet R50: 2.5e-4), ``momentum``
(0.9), ``rho`` (0.05), ``e_max_factor`` (0.4), ``reset_constant`` (0.2), ``loss_ema`` (0.9).
"""
from __future__ import annotations

import copy
import re
from typing import Any

import torch
from torch import nn

from cema_ray.algorithms.entropy import e0, entropy
from cema_ray.methods.base import NormState, register_method
from cema_ray.methods.common import SharedModelCloud, student_cloud, uploading_edge, use_norm_stats
from cema_ray.models.norm import freeze_all_but_norm_affine, norm_affine_parameters, norm_state
from cema_ray.schema import Settings, setting

SETTINGS = {
    "lr": setting(1e-3, "SGD learning rate (mariodoebler's CIFAR config; SAR's ImageNet R50: 2.5e-4)", lo=0,
                  lo_open=True),
    "momentum": setting(0.9, "SGD momentum", lo=0, hi=1, hi_open=True),
    "rho": setting(0.05, "SAM neighbourhood radius", lo=0, lo_open=True),
    "e_max_factor": setting(0.4, "reliable samples: entropy below E0 = factor * ln C", lo=0, lo_open=True),
    "reset_constant": setting(0.2, "model recovery when the loss EMA falls below this", lo=0),
    "loss_ema": setting(0.9, "decay of the second loss's moving average", lo=0, hi=1, hi_open=True),
}
_STAGE = re.compile(r"layer(\d+)")


def top_block_start(model: nn.Module) -> int | None:
    """Index (in ``named_modules`` order) of the last ``layer<k>`` stage nearest the root, if any."""
    stages = [
        (name.count("."), -int(m.group(1)), i)
        for i, (name, _) in enumerate(model.named_modules())
        if (m := _STAGE.fullmatch(name.rsplit(".", 1)[-1]))
    ]
    if not stages:
        return None
    return min(stages)[2]


def sar_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Norm affine parameters outside the top block (see the module docstring)."""
    start = top_block_start(model)
    modules = [name for name, _ in model.named_modules()]
    excluded = set() if start is None else set(modules[start:])
    return [(n, p) for n, p in norm_affine_parameters(model) if n.rsplit(".", 1)[0] not in excluded]


class SAM:
    """Sharpness-aware minimisation (Foret et al.) over SGD with momentum, as SAR's ``sam.py``."""

    def __init__(self, params: list[nn.Parameter], lr: float, momentum: float, rho: float) -> None:
        self.params = params
        self.rho = rho
        self.base = torch.optim.SGD(params, lr=lr, momentum=momentum)
        self._old: list[torch.Tensor] = []

    def zero_grad(self) -> None:
        self.base.zero_grad(set_to_none=True)

    @torch.no_grad()
    def first_step(self) -> None:
        """Ascend to theta + rho * g / ||g||, remembering theta."""
        grads = [p.grad for p in self.params if p.grad is not None]
        scale = self.rho / (torch.norm(torch.stack([g.norm(2) for g in grads]), 2) + 1e-12)
        self._old = [p.detach().clone() for p in self.params]
        for p in self.params:
            if p.grad is not None:
                p.add_(p.grad * scale)
        self.zero_grad()

    @torch.no_grad()
    def undo(self) -> None:
        for p, old in zip(self.params, self._old):
            p.copy_(old)
        self._old = []

    def second_step(self) -> None:
        """Back to theta, then the base optimiser's step with the gradient taken at theta + eps."""
        self.undo()
        self.base.step()
        self.zero_grad()

    def state_dict(self) -> dict[str, Any]:
        return self.base.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base.load_state_dict(state)


class SarCloud(SharedModelCloud):
    """SAR on the cloud's copy of the edge model; publishes the trainable norm affine parameters."""

    def __init__(self, student: nn.Module, settings: Settings, generator: torch.Generator) -> None:
        self.settings = settings
        model = copy.deepcopy(student).eval()
        use_norm_stats(model, "batch")
        freeze_all_but_norm_affine(model)
        trainable = sar_parameters(model)
        model.requires_grad_(False)
        for _, p in trainable:
            p.requires_grad_(True)
        self.trainable_names = [n for n, _ in trainable]
        self.params = [p for _, p in trainable]
        self.ema: float | None = None
        self.model_resets = 0
        super().__init__(model, generator)

    def make_optimizer(self) -> SAM:  # type: ignore[override]
        s = self.settings
        return SAM(self.params, float(s["lr"]), float(s["momentum"]), float(s["rho"]))

    def train_step(self, x: torch.Tensor) -> bool:
        logits = self.model(x)
        ent = entropy(logits)
        margin = e0(logits.shape[1], float(self.settings["e_max_factor"]))
        keep = ent < margin
        if not bool(keep.any()):
            return False
        self.optimizer.zero_grad()
        ent[keep].mean().backward()
        self.optimizer.first_step()
        ent2 = entropy(self.model(x))[keep]
        keep2 = ent2 < margin
        if not bool(keep2.any()):
            self.optimizer.undo()
            return False
        loss2 = ent2[keep2].mean()
        loss2.backward()
        self.optimizer.second_step()
        self._track(float(loss2.detach()))
        return True

    def _track(self, loss: float) -> None:
        """EMA of the second loss; below ``reset_constant`` the model collapsed: recover."""
        d = float(self.settings["loss_ema"])
        self.ema = loss if self.ema is None else d * self.ema + (1.0 - d) * loss
        if self.ema < float(self.settings["reset_constant"]):
            self.model.load_state_dict(self._initial)
            self.optimizer = self.make_optimizer()
            self.model_resets += 1

    def published(self) -> NormState:
        state = norm_state(self.model, include_stats=False)
        return {k: state[k] for k in self.trainable_names}

    def on_reset(self) -> None:
        self.ema = None

    def extra_state(self) -> dict[str, Any]:
        return {"ema": self.ema, "model_resets": self.model_resets}

    def load_extra_state(self, d: dict[str, Any]) -> None:
        self.ema = d["ema"]
        self.model_resets = int(d["model_resets"])


register_method("sar", edge=uploading_edge, cloud=student_cloud(SarCloud), settings=SETTINGS,
                description="SAR in the cloud: every sample uploaded, SAM + reliable entropy on norm affine (top block "
                            "frozen)")
