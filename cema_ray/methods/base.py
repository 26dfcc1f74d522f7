"""The two halves every method is made of: a forward-only edge policy and a cloud trainer.

The split mirrors the deployment: whatever needs gradients lives in the cloud, so a method's
upload cost is visible in its edge policy (what `EdgeResult.upload` marks) and its download
cost in what `CloudTrainer.export` returns. Runtimes (local or Ray) only call these methods.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from cema_ray.registry import Registry

NormState = dict[str, np.ndarray]


@dataclass
class EdgeResult:
    """What an edge decides for one batch: the predictions it reports and what it uploads."""

    predictions: np.ndarray  # int64 (N,)
    upload: np.ndarray  # bool (N,)
    entropy: np.ndarray  # float32 (N,)
    e_max: float = float("nan")  # the unreliable-sample threshold in force, nan if none
    skipped: dict[str, int] | None = None  # samples each upload filter turned away (EntropyFilter.last_skipped)


class EdgePolicy:
    """Runs on an edge device: forward passes only, never an autograd graph."""

    def process(self, x: torch.Tensor) -> EdgeResult:
        raise NotImplementedError

    def apply_update(self, state: NormState) -> None:
        """Load parameters published by the cloud."""
        raise NotImplementedError

    def reset(self) -> None:
        """Back to the deployed model and a fresh filter (reset-per-domain protocol)."""
        raise NotImplementedError

    def snapshot(self) -> dict[str, Any]:
        """Small, picklable state needed to resume this edge after a crash (not the model weights)."""
        return {}

    def restore(self, snap: dict[str, Any]) -> None:
        pass


class CloudTrainer:
    """Runs in the cloud: receives uploads, trains, and says what each edge must load."""

    needs_labels = False  # True: ingest must be given the uploads' true labels (references only)

    def ingest(self, edge_id: int, images: np.ndarray) -> None:
        """Queue uploaded uint8 NHWC images from ``edge_id``."""

    def on_edge_batch(self, edge_id: int) -> int:
        """Called once per edge batch after its uploads were ingested; returns steps taken."""
        return 0

    def export(self, edge_id: int) -> NormState | None:
        """Parameters ``edge_id`` must load now, or None when nothing changed for it."""
        return None

    def reset(self, edge_id: int | None = None) -> None:
        """Reset the models serving ``edge_id`` (all when None)."""

    def queued(self) -> int:
        """Uploaded samples waiting for a step (the cloud's queue depth)."""
        return 0

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


EdgeFactory = Callable[[nn.Module, dict[str, Any]], EdgePolicy]
CloudFactory = Callable[[nn.Module | None, nn.Module, dict[str, Any], torch.Generator], CloudTrainer]


@dataclass(frozen=True)
class MethodSpec:
    """A named method: how to build its edge half and its cloud half, and its default settings."""

    name: str
    make_edge: EdgeFactory
    make_cloud: CloudFactory
    uses_foundation: bool
    defaults: dict[str, Any]
    description: str
    forward_only_edge: bool = True  # False for references that back-propagate on the edge
    needs_labels: bool = False  # True for references whose cloud trains on the true labels (local runs only)
    # settings whose default is None ("decided from the data"), declared with the config's Field so a value
    # the user gives is type- and range-checked at load like every other key (others follow their default)
    nullable_settings: dict[str, Any] = field(default_factory=dict)


METHODS: Registry[MethodSpec] = Registry("method")
