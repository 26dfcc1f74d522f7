"""Model registry: our small ResNets by name, and any timm model as ``timm:<name>``.

Every model comes wrapped in `NormalizedModel`, so it takes float [0, 1] NCHW input.
timm weights are read from a local file through timm's own pretrained path
(``pretrained_cfg_overlay={"file": ...}``): the hub is never contacted.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from torch import nn

from cema_ray.errors import CheckpointError, ConfigError
from cema_ray.models import resnet
from cema_ray.models.preprocess import NormalizedModel
from cema_ray.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")
MODELS.register("cema_resnet_s", resnet.resnet_s)
MODELS.register("cema_resnet_m", resnet.resnet_m)
MODELS.register("cema_resnet_l", resnet.resnet_l)

TIMM_PREFIX = "timm:"


def create_model(
    name: str,
    num_classes: int,
    in_chans: int,
    mean: Sequence[float],
    std: Sequence[float],
    weights: str | Path | None = None,
) -> NormalizedModel:
    """Build ``name``; ``weights`` (timm models only) is a local file with the network's weights."""
    if name.startswith(TIMM_PREFIX):
        net = _create_timm(name[len(TIMM_PREFIX):], num_classes, in_chans, weights)
    else:
        if weights is not None:
            raise ConfigError(f"model '{name}': load its weights with load_checkpoint, not create_model")
        net = MODELS.get(name)(num_classes=num_classes, in_chans=in_chans)
    return NormalizedModel(net, mean, std)


def _create_timm(name: str, num_classes: int, in_chans: int, weights: str | Path | None) -> nn.Module:
    import timm

    if not timm.is_model(name):
        raise ConfigError(f"unknown timm model '{name}' (see timm.list_models())")
    if weights is None:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans)
    path = Path(weights)
    if not path.is_file():
        raise CheckpointError(f"timm weights for '{name}' not found: {path}")
    try:
        return timm.create_model(
            name,
            pretrained=True,
            pretrained_cfg_overlay={"file": str(path)},
            num_classes=num_classes,
            in_chans=in_chans,
        )
    except (RuntimeError, ValueError, OSError) as exc:
        raise CheckpointError(f"cannot load timm weights {path} into '{name}': {exc}") from exc
