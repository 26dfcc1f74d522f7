"""Prediction entropy and the EATA-style reweighting every CEMA loss and filter is built on."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample Shannon entropy (natural log) of softmax(logits); shape (N,).

    Uses log_softmax so confident logits give 0 rather than 0 * log 0 = nan.
    """
    log_p = F.log_softmax(logits, dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


def e0(num_classes: int, factor: float = 0.4) -> float:
    """E0 = factor * ln C: the unreliable-sample threshold and the reweighting pivot."""
    if int(num_classes) < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes!r}")
    return float(factor) * math.log(int(num_classes))


def reweight(ent: torch.Tensor, e0_value: float) -> torch.Tensor:
    """w = exp(E0 - H), a constant: confident samples count more, and the weight never trains."""
    return torch.exp(e0_value - ent.detach())
