"""Pieces the baselines share: settings, optimisers, a batch-statistics edge and a one-model cloud.

The baselines differ only in *what* the cloud optimises and *what* it publishes; how uploads are
queued, when a step runs, when an edge must reload and how a trainer is reset or checkpointed is
the same for all of them, so it lives here once. The cloud keeps one model shared by every edge
(the baselines have no per-edge student): an edge batch from any edge moves it, and every edge
gets the newest version at its next export.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from cema_ray.algorithms.entropy import entropy
from cema_ray.errors import CheckpointError
from cema_ray.methods.base import CloudTrainer, EdgePolicy, EdgeResult, NormState, check_uploads
from cema_ray.methods.exports import ExportTracker
from cema_ray.methods.host_model import ForwardEdge, HostModel
from cema_ray.methods.upload_queue import UploadQueue
from cema_ray.models.preprocess import to_input
from cema_ray.models.tbr import set_norm_stats_mode
from cema_ray.schema import Field, setting

OPTIMIZERS = ("adam", "sgd")


def d_margin_setting(default: float | None, doc: str) -> Field:
    """The redundancy filter's margin (algorithms/selection.py), declared once for every method that has it: a
    |cos| bound, so greater than 0."""
    return setting(default, doc, kind="float", lo=0, lo_open=True)


OPTIMIZER_SETTINGS: dict[str, Field] = {
    "optimizer": setting("adam", "the cloud's optimiser", choices=OPTIMIZERS),
    "lr": setting(1e-3, "learning rate", lo=0, lo_open=True),
    "momentum": setting(0.9, "SGD momentum (SGD only)", lo=0, hi=1, hi_open=True),
    "betas": setting([0.9, 0.999], "Adam's betas (Adam only)", item=Field("float", lo=0, hi=1, hi_open=True)),
    "weight_decay": setting(0.0, "L2 weight decay", lo=0),
}


def make_optimizer(params: list[nn.Parameter], settings: Mapping[str, Any]) -> torch.optim.Optimizer:
    """SGD or Adam from the ``optimizer``/``lr``/``momentum``/``betas``/``weight_decay`` settings."""
    lr, wd = float(settings["lr"]), float(settings["weight_decay"])
    if settings["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=float(settings["momentum"]), weight_decay=wd)
    b1, b2 = (float(b) for b in settings["betas"])
    return torch.optim.Adam(params, lr=lr, betas=(b1, b2), weight_decay=wd)


def model_device(model: nn.Module) -> torch.device:
    """Where inputs must go; CPU for a parameter-free model."""
    for t in model.parameters():
        return t.device
    return torch.device("cpu")


def use_norm_stats(model: nn.Module, mode: str, alpha: float = 1.0) -> None:
    """Switch every BatchNorm2d to ``mode`` statistics (models.tbr); a model without one is left as is.

    GroupNorm/LayerNorm already normalise each sample by itself, so "batch statistics" has no
    meaning for them and a BN-free model (a ViT edge) must still run these baselines.
    """
    if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        set_norm_stats_mode(model, mode, alpha=alpha)


def full_state(model: nn.Module) -> NormState:
    """Every parameter and buffer as numpy: what an edge must download to replace the whole model."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def load_arrays(model: nn.Module, state: Mapping[str, np.ndarray]) -> None:
    """Copy named arrays into a model's parameters/buffers; unknown names are an error.

    Accepts any subset of the state dict, so one loader serves norm-only publications (Tent,
    EATA, SAR) and whole-model ones (CoTTA).
    """
    own = model.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise CheckpointError(f"published state key '{unknown[0]}' is not a parameter/buffer of the model "
                              f"({len(unknown)} unknown key(s))")
    with torch.no_grad():
        for k, v in state.items():
            value = torch.tensor(np.asarray(v))  # a copy: arrays from the object store are read-only
            if tuple(value.shape) != tuple(own[k].shape):
                raise CheckpointError(f"published state key '{k}' has shape {tuple(value.shape)}, "
                                      f"the model expects {tuple(own[k].shape)}")
            own[k].copy_(value.to(device=own[k].device, dtype=own[k].dtype))


def tensor_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the state dict, so resets are immune to later in-place training."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class BatchStatsEdge(ForwardEdge):
    """An edge that normalises with its test batch's statistics and loads what the cloud publishes.

    ``norm_mode`` is "running" for the source model, "batch" for Tent-like methods (the model
    they were adapted with never saw running statistics), "mix" for BN adapt with alpha < 1.
    ``upload_all`` is the whole upload policy of the cloud-side baselines (Tent, CoTTA, SAR).
    """

    def __init__(self, model: nn.Module, norm_mode: str = "batch", alpha: float = 1.0, upload_all: bool = False) -> None:
        model.eval()
        if norm_mode != "running":
            use_norm_stats(model, norm_mode, alpha=alpha)
        super().__init__(HostModel(model, load_arrays))
        self.upload_all = upload_all

    def decide(self, logits: torch.Tensor) -> EdgeResult:
        with torch.inference_mode():
            ent = entropy(logits).float().cpu().numpy()
        preds = logits.argmax(1).cpu().numpy().astype(np.int64)
        return EdgeResult(predictions=preds, upload=np.full(len(preds), self.upload_all, dtype=bool), entropy=ent)


class UploadQueues:
    """An upload queue (methods/upload_queue.py) per edge, of uint8 NHWC images, drained one edge batch at a
    time."""

    def __init__(self) -> None:
        self._q: dict[int, UploadQueue] = {}

    def put(self, edge_id: int, images: np.ndarray) -> None:
        images = check_uploads(edge_id, images)
        if len(images):
            self._q.setdefault(int(edge_id), UploadQueue()).add(images, None)

    def take(self, edge_id: int) -> np.ndarray | None:
        queue = self._q.pop(int(edge_id), None)
        return queue.pop(queue.size)[0] if queue is not None else None

    def clear(self, edge_id: int | None = None) -> None:
        if edge_id is None:
            self._q.clear()
        else:
            self._q.pop(int(edge_id), None)

    def state_dict(self) -> dict[int, list]:
        return {e: q.state_dict() for e, q in self._q.items()}

    def load_state_dict(self, d: Mapping[int, list]) -> None:
        self._q = {}
        for e, items in d.items():
            self._q[int(e)] = queue = UploadQueue()
            queue.load_state_dict(items)


class SharedModelCloud(CloudTrainer):
    """One cloud model for the whole fleet, one step per edge batch that uploaded anything.

    Subclasses say how to train (``train_step``), what to publish (``published``) and what to
    optimise (``make_optimizer``). A version counter tells ``export`` whether an edge already holds
    the newest parameters, so an edge downloads only when something changed. ``reset`` restores the
    model the trainer was built with: with a shared model that resets it for every edge.
    """

    def __init__(self, model: nn.Module, generator: torch.Generator) -> None:
        self.model = model
        self.generator = generator
        self._initial = tensor_state(model)
        self.optimizer = self.make_optimizer()
        self._queues = UploadQueues()
        self.version = 0
        self.exports = ExportTracker()  # no cadence: news whenever the version moved

    # --- what subclasses provide -------------------------------------------------------------
    def make_optimizer(self) -> torch.optim.Optimizer:
        raise NotImplementedError

    def train_step(self, x: torch.Tensor) -> bool:
        """One update on the batch ``x`` (float NCHW); returns whether the model changed."""
        raise NotImplementedError

    def published(self) -> NormState:
        raise NotImplementedError

    def on_reset(self) -> None:
        """Extra models or counters to restore besides ``self.model`` and the optimiser."""

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, d: dict[str, Any]) -> None:
        pass

    # --- the CloudTrainer contract -----------------------------------------------------------
    def ingest(self, edge_id: int, images: np.ndarray) -> None:
        self._queues.put(edge_id, images)

    def on_edge_batch(self, edge_id: int) -> int:
        images = self._queues.take(edge_id)
        if images is None:
            return 0
        stepped = self.train_step(to_input(images).to(model_device(self.model)))
        self.version += int(stepped)
        return int(stepped)

    def export(self, edge_id: int) -> NormState | None:
        if not self.exports.due(edge_id, self.version):
            return None
        return self.published()

    def reset(self, edge_id: int | None = None) -> None:
        self.model.load_state_dict(self._initial)
        self.optimizer = self.make_optimizer()
        self._queues.clear(edge_id)
        self.on_reset()
        self.version += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": tensor_state(self.model),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "queues": self._queues.state_dict(),
            "version": self.version,
            "sent": self.exports.state_dict()["sent"],
            "generator": self.generator.get_state(),
            "extra": self.extra_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer = self.make_optimizer()
        self.optimizer.load_state_dict(state["optimizer"])
        self._queues.load_state_dict(state["queues"])
        self.version = int(state["version"])
        self.exports.load_state_dict({"sent": state["sent"]})
        self.generator.set_state(state["generator"])
        self.load_extra_state(state["extra"])


LossFn = Callable[[torch.Tensor], torch.Tensor]


def uploading_edge(model: nn.Module, settings: Mapping[str, Any]) -> EdgePolicy:
    """The baselines' edge: batch-statistics BN, every sample uploaded (the cloud method does the rest)."""
    return BatchStatsEdge(model, norm_mode="batch", upload_all=True)


def no_cloud(foundation: nn.Module | None, student: nn.Module, settings: Mapping[str, Any],
             generator: torch.Generator, model_of: Mapping[int, int] | None = None) -> CloudTrainer:
    """For methods whose cloud does nothing (edge-only ones)."""
    return CloudTrainer()


def student_cloud(trainer: Callable[..., CloudTrainer]) -> Callable[..., CloudTrainer]:
    """A cloud factory for a trainer built from the student copy, the settings and the generator."""
    def make(foundation: nn.Module | None, student: nn.Module, settings: Mapping[str, Any],
             generator: torch.Generator) -> CloudTrainer:
        return trainer(student, settings, generator)
    return make
