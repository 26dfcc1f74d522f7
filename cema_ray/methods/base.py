"""The two halves every method is made of: a forward-only edge policy and a cloud trainer.

The split mirrors the deployment: whatever needs gradients lives in the cloud, so a method's
upload cost is visible in its edge policy (what `EdgeResult.upload` marks) and its download
cost in what `CloudTrainer.export` returns. Runtimes (local or Ray) only call these methods.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from cema_ray.errors import BatchRejected, ConfigError
from cema_ray.models.norm import load_norm_state, norm_state
from cema_ray.registry import Registry
from cema_ray.schema import Field, Section, Settings, fail, join_key, suggest, validate_section

NormState = dict[str, np.ndarray]


@dataclass
class EdgeResult:
    """What an edge decides for one batch: the predictions it reports and what it uploads."""

    predictions: np.ndarray  # int64 (N,)
    upload: np.ndarray  # bool (N,)
    entropy: np.ndarray  # float32 (N,)
    e_max: float = float("nan")  # the unreliable-sample threshold in force, nan if none
    skipped: dict[str, int] | None = None  # samples each upload filter turned away (EntropyFilter.last_skipped)
    domain_key: np.ndarray | None = None  # the batch's domain key, sent with its uploads (a bank's routing)


class EdgePolicy:
    """Runs on an edge device: forward passes only, never an autograd graph."""

    def process(self, x: torch.Tensor) -> EdgeResult:
        raise NotImplementedError

    def prepare(self, x: torch.Tensor) -> None:
        """Called with a batch before its forward (and before `fuse_key`): a policy that picks its weights per
        batch (cema-fleet's bank) picks them here, so edges that picked alike can share a forward."""

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

    def fork(self) -> "EdgePolicy":
        """Another edge's policy, as this one was built: a private copy of everything (a policy that trains on
        the edge owns its weights). Forward-only policies share their process's model instead (`ForwardEdge`)."""
        return copy.deepcopy(self)

    def fuse_key(self) -> Any:
        """Edges whose policies return one key may run their batches as one forward; None: never."""
        return None


def check_edge_input(x: Any) -> None:
    """An edge policy takes the float (N, C, H, W) tensor `to_input` makes; anything else is a bad batch."""
    if not torch.is_tensor(x) or not torch.is_floating_point(x) or x.dim() != 4:
        raise BatchRejected(f"edge input must be a float (N, C, H, W) tensor from to_input, got "
                            f"{getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}")


def check_uploads(edge_id: int, images: Any) -> np.ndarray:
    """What every trainer's `ingest` accepts: uint8 (N, H, W, C) pixels, as the edges send them."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"uploads from edge {edge_id} must be uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    return images


class CloudTrainer:
    """Runs in the cloud: receives uploads, trains, and says what each edge must load."""

    needs_labels = False  # True: ingest must be given the uploads' true labels (references only)
    takes_keys = False  # True: ingest takes ``key=``, the domain key of the edge batch the uploads came from

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

    def shared_state(self) -> NormState | None:
        """What the shards of a sharded cloud average to stay one model: the foundation's norm layers (the part
        it adapts); None for a trainer without a foundation (each shard's model is its own)."""
        foundation = getattr(self, "foundation", None)
        return None if foundation is None else norm_state(foundation)

    def load_shared_state(self, state: NormState) -> None:
        load_norm_state(self.foundation, state)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


EdgeFactory = Callable[[nn.Module, Settings], EdgePolicy]
CloudFactory = Callable[[nn.Module | None, "nn.Module | Mapping[int, nn.Module]", Settings, torch.Generator],
                        CloudTrainer]
SettingsHook = Callable[[dict[str, Any], str], None]


def infer_num_classes(model: nn.Module, setting: int | None = None) -> int:
    """The explicit setting, else the last Linear layer's width."""
    if setting is not None:
        return int(setting)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError("setting 'num_classes' is needed: the model has no Linear layer to read it from")
    return int(linears[-1].out_features)


@dataclass(frozen=True)
class MethodSpec:
    """A named method: its settings (declared once, as `Field`s), how to build its edge half and its cloud half.

    `resolve` is the only place settings are merged and checked: the config calls it at load (so a bad value is
    one line naming `method.settings.<key>` before anything runs), and `make_edge`/`make_cloud` call it on what
    they are given (a resolved `Settings` passes through unchanged), so the factories receive every key, checked.
    """

    name: str
    edge_factory: EdgeFactory
    cloud_factory: CloudFactory
    uses_foundation: bool
    settings: Mapping[str, Field]
    description: str
    forward_only_edge: bool = True  # False for references that back-propagate on the edge
    needs_labels: bool = False  # True for references whose cloud trains on the true labels (local runs only)
    derive: SettingsHook | None = None  # fills data-dependent defaults (class count) and checks settings together
    mixed_models: bool = False  # runs a fleet of several edge architectures (its cloud, if any, takes a student
    # template per architecture: a dict index -> model)

    @property
    def defaults(self) -> dict[str, Any]:
        return {k: copy.deepcopy(f.default) for k, f in self.settings.items()}

    def resolve(self, given: Mapping[str, Any] | None = None, num_classes: int | None = None,
                prefix: str = "method.settings") -> Settings:
        """Defaults overlaid with `given`, each value type- and range-checked; `num_classes` fills a null
        `num_classes` setting, then `derive` computes what depends on it."""
        if isinstance(given, Settings):
            return given
        given = dict(given or {})
        for key in given:
            if key not in self.settings:
                fail(join_key(prefix, key), given[key], f"unknown setting of method '{self.name}'"
                     f"{suggest(key, self.settings)}; known: {', '.join(self.settings) or '(none)'}")
        values = validate_section(Section(self.settings), given, prefix)
        if values.get("num_classes", 0) is None and num_classes is not None:
            values["num_classes"] = int(num_classes)
        if self.derive is not None:
            self.derive(values, prefix)
        return Settings(values)

    def make_edge(self, model: nn.Module, settings: Mapping[str, Any] | None = None) -> EdgePolicy:
        return self.edge_factory(model, self.resolve(settings, _classes(model)))

    def make_cloud(self, foundation: nn.Module | None, student: nn.Module | Mapping[int, nn.Module],
                   settings: Mapping[str, Any] | None, generator: torch.Generator,
                   model_of: Mapping[int, int] | None = None) -> CloudTrainer:
        """``student``: the edge model, or in a mixed fleet one per architecture index (`mixed_models` only), with
        ``model_of``, every edge's architecture index."""
        first = next(iter(student.values())) if isinstance(student, Mapping) else student
        mixed = {} if model_of is None else {"model_of": model_of}
        return self.cloud_factory(foundation, student, self.resolve(settings, _classes(first)), generator, **mixed)


def _classes(model: nn.Module) -> int | None:
    return infer_num_classes(model) if any(isinstance(m, nn.Linear) for m in model.modules()) else None


def preset_settings(base: Mapping[str, Field], overrides: Mapping[str, Any]) -> dict[str, Field]:
    """A preset's declarations: the family's fields with some defaults changed."""
    unknown = set(overrides) - set(base)
    if unknown:
        raise KeyError(f"preset overrides unknown settings {sorted(unknown)}")
    return {k: dataclasses.replace(f, default=overrides[k]) if k in overrides else f for k, f in base.items()}


METHODS: Registry[MethodSpec] = Registry("method")


def register_method(name: str, edge: EdgeFactory, cloud: CloudFactory, settings: Mapping[str, Field],
                    description: str, **flags: Any) -> MethodSpec:
    """Register `name`'s MethodSpec (its name written once); `flags`: uses_foundation, derive, needs_labels..."""
    spec = MethodSpec(name=name, edge_factory=edge, cloud_factory=cloud, settings=settings, description=description,
                      uses_foundation=flags.pop("uses_foundation", False), **flags)
    return METHODS.register(name, spec)
