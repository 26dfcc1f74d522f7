"""Normalisation layers: the only part of a model CEMA trains and the only part it ships.

The cloud sends an edge nothing but these layers' affine parameters and running statistics, so
finding them, freezing everything else and moving their state as flat numpy dicts lives in one place.
Keys are the model's own ``named_parameters`` / ``named_buffers`` names, so a state taken from the
cloud's student loads into an edge's copy of the same architecture without translation.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torch import nn

from cema_ray.errors import CheckpointError

NORM_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)
AFFINE_NAMES = ("weight", "bias")
STAT_NAMES = ("running_mean", "running_var")


def is_norm_layer(m: nn.Module) -> bool:
    """BatchNorm1d/2d, GroupNorm, LayerNorm (TBRBatchNorm2d is a BatchNorm2d subclass)."""
    return isinstance(m, NORM_TYPES)


def norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every normalisation layer, in registration order."""
    return [(name, m) for name, m in model.named_modules() if is_norm_layer(m)]


def _qualify(prefix: str, leaf: str) -> str:
    return f"{prefix}.{leaf}" if prefix else leaf


def norm_affine_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every existing norm weight/bias (layers built with affine=False have none)."""
    out = []
    for name, m in norm_layers(model):
        for leaf in AFFINE_NAMES:
            p = getattr(m, leaf, None)
            if isinstance(p, nn.Parameter):
                out.append((_qualify(name, leaf), p))
    return out


def freeze_all_but_norm_affine(model: nn.Module) -> list[nn.Parameter]:
    """Make only the norm affine parameters trainable; returns them, ready for an optimiser."""
    model.requires_grad_(False)
    params = [p for _, p in norm_affine_parameters(model)]
    for p in params:
        p.requires_grad_(True)
    return params


def _stat_buffers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    out = []
    for name, m in norm_layers(model):
        for leaf in STAT_NAMES:
            b = getattr(m, leaf, None)
            if isinstance(b, torch.Tensor):
                out.append((_qualify(name, leaf), b))
    return out


def _norm_tensors(model: nn.Module, include_stats: bool) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = dict(norm_affine_parameters(model))
    if include_stats:
        tensors.update(_stat_buffers(model))
    return tensors


def norm_state(model: nn.Module, include_stats: bool = True) -> dict[str, np.ndarray]:
    """Float32 numpy copies of the norm affine parameters (and BN running statistics).

    Copies, so a published state never aliases the live student that keeps training.
    """
    return {
        k: t.detach().to("cpu", torch.float32).numpy().copy()
        for k, t in _norm_tensors(model, include_stats).items()
    }


def load_norm_state(model: nn.Module, state: Mapping[str, np.ndarray]) -> None:
    """Load a norm state strictly: every affine key, and either all or none of the statistics.

    Strict because a silently skipped layer would leave an edge running a mix of old and new
    parameters. Loading a TBR layer's running statistics also marks them as present, so the
    layer normalises with them instead of re-initialising from its next batch.
    """
    affine = dict(norm_affine_parameters(model))
    stats = dict(_stat_buffers(model))
    unknown = sorted(set(state) - set(affine) - set(stats))
    if unknown:
        raise CheckpointError(f"norm state key '{unknown[0]}' is not a norm parameter/statistic of the model "
                              f"({len(unknown)} unknown key(s))")
    missing = [k for k in affine if k not in state]
    given_stats = [k for k in stats if k in state]
    if given_stats:
        missing += [k for k in stats if k not in state]
    if missing:
        raise CheckpointError(f"norm state lacks key '{missing[0]}' ({len(missing)} missing key(s))")
    targets = {**affine, **{k: stats[k] for k in given_stats}}
    with torch.no_grad():
        for key, target in targets.items():
            value = torch.tensor(np.asarray(state[key]))  # a copy: published arrays are read-only views
            if tuple(value.shape) != tuple(target.shape):
                raise CheckpointError(f"norm state key '{key}' has shape {tuple(value.shape)}, "
                                      f"the model expects {tuple(target.shape)}")
            target.copy_(value.to(device=target.device, dtype=target.dtype))
    if given_stats:
        _mark_stats_loaded(model, {k.rsplit(".", 1)[0] if "." in k else "" for k in given_stats})


def _mark_stats_loaded(model: nn.Module, layer_names: set[str]) -> None:
    for name, m in norm_layers(model):
        flag = getattr(m, "stats_ready", None)
        if name in layer_names and isinstance(flag, torch.Tensor):
            flag.fill_(True)


def state_nbytes(state: Mapping[str, np.ndarray]) -> int:
    """Bytes on the wire for a norm state (array payload only)."""
    return int(sum(np.asarray(v).nbytes for v in state.values()))
