"""A batch's domain key: where in input space a batch comes from, computed forward-only and cheaply.

A corruption changes the low-level statistics of an image (noise adds high-frequency energy, blur takes it
away, fog and contrast move the mean and shrink the spread), so the per-channel mean and standard deviation of
the edge model's first feature map (the input of its first normalisation layer: the stem convolution's output)
tell one domain from another. They cost the stem alone (the forward stops there), they depend only on the
deployed stem, never on the published normalisation parameters (so an edge computes its key before it knows
which parameters it will run with), and the cloud computes the same key from the same stem for the uploads
that train a bank entry (`cema_ray.algorithms.domain_bank`). The statistics are divided by the source
statistics of that layer (its running standard deviation), so every channel counts alike and a distance is in
units of the source spread: `key_distance` is the mean squared difference per channel.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from cema_ray.errors import ConfigError


class _Stop(Exception):
    """Raised by the hook once the first feature map is seen: the rest of the forward is not needed."""


def first_batch_norm(model: nn.Module) -> nn.BatchNorm2d:
    """The first BatchNorm2d of the model (the layer whose input is the key)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            return m
    raise ConfigError("a domain key needs a model with a BatchNorm2d layer (the input of the first one is the "
                      "key); this model has none")


def key_scale(model: nn.Module) -> np.ndarray:
    """Per-channel source spread of the key layer (from the deployed model's running variance)."""
    bn = first_batch_norm(model)
    return torch.sqrt(bn.running_var.detach().float().cpu() + bn.eps).numpy().astype(np.float32)


def batch_keys(model: nn.Module, x: torch.Tensor, groups: int = 1) -> np.ndarray:
    """(groups, 2C) float32: per stacked batch, the first feature map's channel means and standard deviations
    (unscaled). Runs the model only up to its first BatchNorm2d, under ``torch.no_grad``."""
    layer = first_batch_norm(model)
    seen: list[torch.Tensor] = []

    def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        h = inputs[0].detach().float()
        parts = h.reshape(groups, h.shape[0] // groups, *h.shape[1:])
        var, mean = torch.var_mean(parts, dim=(1, 3, 4), correction=0)
        seen.append(torch.cat([mean, var.clamp_min(0).sqrt()], dim=1))
        raise _Stop

    handle = layer.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            model(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not seen:
        raise ConfigError("the model's first BatchNorm2d was not reached by its forward: no domain key")
    return seen[0].cpu().numpy().astype(np.float32)


def normalise(raw: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Raw keys (..., 2C) in units of the source spread (`key_scale`)."""
    return (np.asarray(raw, np.float32) / np.concatenate([scale, scale])).astype(np.float32)


def key_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mean squared difference of normalised keys; ``b`` may be a (M, 2C) stack (one distance per row)."""
    return np.mean((np.asarray(b, np.float32) - np.asarray(a, np.float32)) ** 2, axis=-1)
