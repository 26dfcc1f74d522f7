"""CoTTA (Wang et al., CVPR 2022) in the cloud, with every sample uploaded.

All parameters of the student are trainable. A teacher (EMA of the student, ``ema`` = 0.999) gives
the target: its prediction averaged over ``n_views`` augmented views when the frozen source
anchor is unsure (anchor's mean max-probability < ``p_th``), else its plain prediction. The
student minimises the soft cross-entropy to that target (one step per edge batch), the teacher
follows by EMA of the parameters, and each student parameter element is restored to its source
value with probability ``restore_prob``. All three models normalise with the test batch's
statistics (CoTTA deletes BN running statistics). Randomness (views, restore masks) comes from the
trainer's generator.

The edge predicts with the published teacher (all of it: CoTTA changes every weight), so a
publication is the full teacher state, every parameter and buffer, and the runtime's download
bytes are those of the whole model.

Deviations: the edge reports the teacher's *plain* prediction, whereas CoTTA outputs the
augmentation-averaged one when it augments (the edge is forward-only and cheap; 32 extra forwards
per batch would defeat the point); the augmentations are cheap tensor versions of CoTTA's
(brightness/contrast/saturation/gamma jitter, edge-padded random affine +-15 deg, scale 0.9-1.1,
translation <= 1/8, horizontal flip, Gaussian noise sigma 0.005, clip), drawn once per view for the
whole batch as torchvision does, without hue jitter and Gaussian blur.

Settings: optimiser ones (Adam 1e-3 as CoTTA's CIFAR config; ImageNet: SGD 0.01), ``ema``,
``p_th`` (0.92 CIFAR-10, 0.72 CIFAR-100, 0.1 ImageNet), ``restore_prob`` (0.01 CIFAR, 0.001
ImageNet), ``n_views`` (32).
"""
from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cema_ray.methods.base import NormState, register_method
from cema_ray.methods.common import (
    OPTIMIZER_SETTINGS,
    SharedModelCloud,
    full_state,
    make_optimizer,
    student_cloud,
    tensor_state,
    uploading_edge,
    use_norm_stats,
)
from cema_ray.schema import Settings, setting

SETTINGS = {**OPTIMIZER_SETTINGS,
            "ema": setting(0.999, "teacher EMA decay", lo=0, hi=1),
            "p_th": setting(0.92, "augment when the anchor's mean max-probability is below this (0.1 ImageNet)",
                            lo=0, hi=1),
            "restore_prob": setting(0.01, "per-element probability of a stochastic restore to source", lo=0, hi=1),
            "n_views": setting(32, "augmented views averaged by the teacher", lo=1)}
_GRAY = (0.299, 0.587, 0.114)


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] != 3:
        return x.mean(1, keepdim=True)
    w = torch.tensor(_GRAY, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def colour_jitter(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    x = (x * _uniform(g, 0.6, 1.4)).clamp(0, 1)
    mean = _gray(x).mean((1, 2, 3), keepdim=True)
    x = ((x - mean) * _uniform(g, 0.7, 1.3) + mean).clamp(0, 1)
    if x.shape[1] == 3:
        gray = _gray(x)
        x = ((x - gray) * _uniform(g, 0.5, 1.5) + gray).clamp(0, 1)
    return x ** _uniform(g, 0.7, 1.3)


def random_affine(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Rotate/scale/translate with edge padding (== CoTTA's edge pad, affine, centre crop)."""
    a, s = math.radians(_uniform(g, -15.0, 15.0)), _uniform(g, 0.9, 1.1)
    tx, ty = _uniform(g, -0.25, 0.25), _uniform(g, -0.25, 0.25)  # normalised coords: 1/8 of the side
    theta = torch.tensor(
        [[math.cos(a) / s, -math.sin(a) / s, tx], [math.sin(a) / s, math.cos(a) / s, ty]], dtype=x.dtype, device=x.device
    )
    grid = F.affine_grid(theta.expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def tta_augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One random view of a [0, 1] NCHW batch; parameters drawn once for the batch."""
    x = random_affine(colour_jitter(x.clamp(0, 1), g), g)
    if float(torch.rand((), generator=g)) < 0.5:
        x = x.flip(3)
    noise = torch.randn(x.shape, generator=g, device=g.device).to(x.device, x.dtype)
    return (x + 0.005 * noise).clamp(0, 1)


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """CoTTA's loss: mean over the batch of -sum softmax(teacher) * log_softmax(student)."""
    return -(teacher_logits.softmax(1) * student_logits.log_softmax(1)).sum(1).mean()


class CottaCloud(SharedModelCloud):
    """Student, EMA teacher and frozen anchor; publishes the whole teacher."""

    def __init__(self, student: nn.Module, settings: Settings, generator: torch.Generator) -> None:
        self.settings = settings
        model = copy.deepcopy(student).eval()
        use_norm_stats(model, "batch")
        model.requires_grad_(True)
        self.teacher = copy.deepcopy(model).requires_grad_(False)
        self.anchor = copy.deepcopy(model).requires_grad_(False)
        self._source = {k: p.detach().clone() for k, p in model.named_parameters()}
        self.augmented_steps = 0
        super().__init__(model, generator)

    def make_optimizer(self) -> torch.optim.Optimizer:
        return make_optimizer(list(self.model.parameters()), self.settings)

    @torch.no_grad()
    def target(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher logits, augmentation-averaged when the anchor's confidence is below p_th."""
        confidence = self.anchor(x).softmax(1).amax(1).mean()
        if confidence >= float(self.settings["p_th"]):
            return self.teacher(x)
        self.augmented_steps += 1
        views = [self.teacher(tta_augment(x, self.generator)) for _ in range(int(self.settings["n_views"]))]
        return torch.stack(views).mean(0)

    def train_step(self, x: torch.Tensor) -> bool:
        target = self.target(x)
        loss = soft_cross_entropy(self.model(x), target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self._update_teacher()
        self._stochastic_restore()
        return True

    @torch.no_grad()
    def _update_teacher(self) -> None:
        m = float(self.settings["ema"])
        for t, s in zip(self.teacher.parameters(), self.model.parameters()):
            t.mul_(m).add_(s.detach(), alpha=1.0 - m)

    @torch.no_grad()
    def _stochastic_restore(self) -> None:
        p_restore = float(self.settings["restore_prob"])
        for name, p in self.model.named_parameters():
            mask = torch.rand(p.shape, generator=self.generator, device=self.generator.device).to(p.device) < p_restore
            p.copy_(torch.where(mask, self._source[name], p))

    def published(self) -> NormState:
        return full_state(self.teacher)

    def on_reset(self) -> None:
        self.teacher.load_state_dict(self._initial)

    def extra_state(self) -> dict[str, Any]:
        return {"teacher": tensor_state(self.teacher), "augmented_steps": self.augmented_steps}

    def load_extra_state(self, d: dict[str, Any]) -> None:
        self.teacher.load_state_dict(d["teacher"])
        self.augmented_steps = int(d["augmented_steps"])


register_method("cotta", edge=uploading_edge, cloud=student_cloud(CottaCloud), settings=SETTINGS,
                description="CoTTA in the cloud: every sample uploaded, EMA teacher + anchor; publishes the whole "
                            "teacher")
