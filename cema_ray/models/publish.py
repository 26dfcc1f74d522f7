"""What a cloud student trains and ships: a *publish scope* names a subset of the edge model's parameters.

CEMA ships only the normalisation layers (a few KB). For a 78 k-parameter edge the whole model is
312 KB, about a hundred CIFAR uploads, so training and shipping more than the norm layers is a
trade of downlink bytes for accuracy, not a law. The scopes:

- ``norm``: affine weight and bias of every normalisation layer (the paper's choice);
- ``head``: ``norm`` plus the classifier (the model's last Linear layer);
- ``all``: every parameter.

Running statistics are not in any scope: a student trained with batch statistics never changes them.
"""
from __future__ import annotations

import numpy as np
from torch import nn

from cema_ray.errors import ConfigError
from cema_ray.models.norm import norm_affine_parameters

SCOPES = ("norm", "head", "all")


def _head_prefix(model: nn.Module) -> str:
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError("publish scope 'head' needs a Linear classifier; the model has none")
    return linears[-1]


def scope_parameters(model: nn.Module, scope: str) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of the parameters ``scope`` trains and ships, in the model's order."""
    if scope not in SCOPES:
        raise ConfigError(f"publish scope {scope!r} is unknown; allowed: {', '.join(SCOPES)}")
    if scope == "all":
        return list(model.named_parameters())
    names = {n for n, _ in norm_affine_parameters(model)}
    if scope == "head":
        head = _head_prefix(model)
        names |= {n for n, _ in model.named_parameters() if n.startswith(f"{head}.")}
    return [(n, p) for n, p in model.named_parameters() if n in names]


def train_only(model: nn.Module, scope: str) -> list[nn.Parameter]:
    """Freeze everything but ``scope``; returns its parameters, ready for an optimiser."""
    model.requires_grad_(False)
    params = [p for _, p in scope_parameters(model, scope)]
    for p in params:
        p.requires_grad_(True)
    return params


def scope_state(model: nn.Module, scope: str) -> dict[str, np.ndarray]:
    """Float32 numpy copies of the scope's parameters: exactly what goes down the wire."""
    return {n: p.detach().to("cpu").float().numpy().copy() for n, p in scope_parameters(model, scope)}


def scope_nbytes(model: nn.Module, scope: str) -> int:
    return int(sum(p.numel() * 4 for _, p in scope_parameters(model, scope)))

