"""The one place uint8 pixels become model input.

Edges and the cloud exchange uint8 NHWC images (a quarter of float32's bytes); models take
float32 NCHW in [0, 1] and apply their own mean/std as their first layer, so a checkpoint
carries its normalisation and no caller can forget it.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn


def to_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W) in [0, 1]."""
    t = torch.as_tensor(images)
    if t.dtype != torch.uint8 or t.ndim != 4:
        raise ValueError(f"expected uint8 images of shape (N, H, W, C), got {t.dtype} {tuple(t.shape)}")
    return t.permute(0, 3, 1, 2).to(torch.float32).div_(255.0).contiguous()


class Normalize(nn.Module):
    """Per-channel (x - mean) / std, kept as buffers so checkpoints carry them."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class NormalizedModel(nn.Module):
    """A classifier with its input normalisation in front; `net` keeps the wrapped model's names."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))
