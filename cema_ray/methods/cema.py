"""CEMA (Chen et al., ICLR 2024): a forward-only edge that uploads selected samples, and a cloud that
adapts a foundation model on them and distils it into the edge model's normalisation layers.

Every formula and default follows /work/shared/docs/METHOD.md; each paper-vs-code difference is a
setting, and the presets below pick the combinations ("cema" = the authors' code).

Why one module of ~470 lines: CEMA's edge, cloud and presets follow METHOD.md step by step; the cloud's
steps 1-6 share the lanes' state, and splitting them would scatter one algorithm over files.
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from cema_ray.algorithms.distill import selective_distillation_loss
from cema_ray.algorithms.entropy import e0 as e0_of
from cema_ray.algorithms.entropy import entropy, reweight
from cema_ray.algorithms.replay import ReplayBuffer
from cema_ray.algorithms.selection import EntropyFilter, default_d_margin
from cema_ray.errors import ConfigError
from cema_ray.methods.common import d_margin_setting, model_device
from cema_ray.methods.exports import ExportTracker
from cema_ray.methods.host_model import ForwardEdge, HostModel
from cema_ray.methods.base import (CloudTrainer, EdgeResult, NormState, register_method,
                                   check_uploads, infer_num_classes, preset_settings)
from cema_ray.methods.upload_queue import UploadQueue
from cema_ray.models.norm import freeze_all_but_norm_affine, load_norm_state, norm_layers, norm_state
from cema_ray.models.preprocess import to_input
from cema_ray.models.tbr import convert_bn_to_tbr, set_norm_stats_mode
from cema_ray.schema import Field, setting

EDGE_STATS = ("published", "batch", "mix")
SCOPES = ("shared", "per_edge")
CADENCES = ("edge_batch", "fleet_round")
SETTINGS: dict[str, Field] = {
    "num_classes": setting(None, "classes (null: data.num_classes, else the model's last Linear layer)", kind="int",
                           lo=1),
    # models
    "tbr": setting(True, "TBR forward in edge, student and foundation (authors' is_tbr)"),
    "discard_source_stats": setting(True, "running statistics start from the first batch (authors)"),
    "edge_stats": setting("published", "edge normalisation: the cloud's published statistics (TBR, eval), the "
                                       "test batch's, or a mix", choices=EDGE_STATS),
    "edge_stats_alpha": setting(0.5, "weight of the batch statistics in 'mix'", lo=0, hi=1),
    # edge selection (steps 2-3)
    "select": setting(True, "false: upload every sample (the upload-all baseline)"),
    "e_max_factor": setting(0.4, "E0 = factor * ln C: upload threshold and reweighting pivot", lo=0, lo_open=True),
    "dynamic_e_max": setting(False, "the paper's dynamic threshold (Eqn. 2; authors' config: off)"),
    "dynamic_lambda": setting(0.6, "lambda of the dynamic threshold", lo=0, hi=1),
    "warmup_samples": setting(256, "N_w of the dynamic threshold (METHOD.md gives none)", lo=1),
    "redundancy": setting(True, "the redundancy filter (|cos| to the moving average)"),
    "d_margin": d_margin_setting(None, "redundancy margin (null: 0.4 up to 100 classes, else 0.05)"),
    "entropy_floor": setting(None, "uploads need entropy >= floor * ln C (paper Eqn. 3; null: none)", kind="float",
                             lo=0),
    # cloud (steps 1-6)
    "chunk_size": setting(32, "B_c: uploads per cloud step", lo=1),
    "replay_capacity": setting(10000, "samples kept for replay", lo=1),
    "replay_warmup": setting(256, "below: distil on the chunk alone; above: replay-only steps allowed", lo=0),
    "replay_ratio": setting(3, "replayed samples per chunk = ratio * B_c", lo=0),
    "replay_only_step": setting(True, "replay-only steps between chunks"),
    "replay_only_ratio": setting(4, "replay-only step size = ratio * B_c", lo=0),
    "replay_only_cadence": setting("edge_batch", "when replay-only steps run (authors: every edge batch)",
                                   choices=CADENCES),
    "lr_foundation": setting(2.5e-4, "foundation SGD learning rate", lo=0),
    "lr_student": setting(2.5e-3, "student SGD learning rate", lo=0),
    "momentum": setting(0.9, "SGD momentum", lo=0, hi=1, hi_open=True),
    "weight_decay": setting(0.0, "SGD weight decay", lo=0),
    "alpha": setting(3.0, "weight of the student's reweighted entropy term (distillation loss)", lo=0),
    "beta": setting(3.0, "weight of the KL term to the teacher", lo=0),
    "gamma": setting(1.0, "weight of the cross-entropy to the teacher's argmax", lo=0),
    "tau": setting(1.0, "distillation temperature", lo=0, lo_open=True),
    "publish_every": setting(1, "K: publish every K edge batches (mirrors method.publish_every)", lo=1),
    "student_scope": setting("shared", "one student for the fleet, or one per edge (mirrors method.student_scope)",
                             choices=SCOPES),
    "reset_foundation_with_edge": setting(True, "reset(edge) also resets the foundation (single-edge protocol)"),
}


def derive_settings(values: dict[str, Any], prefix: str) -> None:
    """The redundancy margin depends on the class count: computed here, once, when the count is known."""
    if values["d_margin"] is None and values["num_classes"] is not None:
        values["d_margin"] = default_d_margin(values["num_classes"])


# --- small helpers ----------------------------------------------------------------------------

def set_norm_training(model: nn.Module, mode: bool) -> None:
    """Train/eval only the normalisation layers; dropout and the rest stay in eval mode."""
    for _, m in norm_layers(model):
        m.train(mode)


def capture_norm_modules(model: nn.Module) -> dict[str, torch.Tensor]:
    """Everything the norm layers hold (affine, statistics, counters, TBR flags), cloned to CPU.

    More than ``norm_state``: it also keeps the TBR "statistics present" flags, so a parked
    student or a restored edge behaves exactly as before.
    """
    out = {}
    for name, m in norm_layers(model):
        for key, value in m.state_dict().items():
            out[f"{name}.{key}" if name else key] = value.detach().to("cpu").clone()
    return out


def restore_norm_modules(model: nn.Module, state: Mapping[str, torch.Tensor | np.ndarray]) -> None:
    own = model.state_dict()
    with torch.no_grad():
        for key, value in state.items():
            own[key].copy_(torch.as_tensor(np.asarray(value) if not torch.is_tensor(value) else value))


def prepare_model(model: nn.Module, s: Mapping[str, Any], trainable: bool) -> nn.Module:
    """Copy, TBR-convert when asked, eval mode; trainable: only norm affine parameters need grad."""
    model = copy.deepcopy(model)
    if s["tbr"]:
        model = convert_bn_to_tbr(model, discard_running_stats=bool(s["discard_source_stats"]))
    model.eval()
    if trainable:
        freeze_all_but_norm_affine(model)
    else:
        model.requires_grad_(False)
    return model


def make_filter(s: Mapping[str, Any], num_classes: int) -> EntropyFilter:
    return EntropyFilter(num_classes, e_max_factor=s["e_max_factor"], dynamic=s["dynamic_e_max"],
                         dynamic_lambda=s["dynamic_lambda"], warmup_samples=s["warmup_samples"],
                         d_margin=s["d_margin"], redundancy=s["redundancy"], entropy_floor=s["entropy_floor"])


# --- edge ----------------------------------------------------------------------------------

class CemaEdge(ForwardEdge):
    """Forward-only edge: predict, filter, and mark the samples worth uploading.

    With ``edge_stats`` "published" the edge normalises with the statistics the cloud last sent
    (TBR in eval mode, the authors' behaviour); "batch"/"mix" use the test batch's own statistics,
    which keeps up with abrupt shifts without waiting for the cloud.
    """

    def __init__(self, model: nn.Module, settings: Mapping[str, Any], method: str = "cema") -> None:
        self.settings = s = settings
        model = prepare_model(model, s, trainable=False)
        if s["edge_stats"] != "published":
            set_norm_stats_mode(model, "batch" if s["edge_stats"] == "batch" else "mix", alpha=s["edge_stats_alpha"])
        super().__init__(HostModel(model, load_norm_state))
        self.num_classes = infer_num_classes(model, s["num_classes"])
        self.filter = make_filter(s, self.num_classes)

    def decide(self, logits: torch.Tensor) -> EdgeResult:
        with torch.inference_mode():
            ent = entropy(logits)
            if self.settings["select"]:
                upload = self.filter.select(logits.softmax(dim=1), ent)
                e_max, skipped = self.filter.e_max, dict(self.filter.last_skipped)
            else:
                upload, e_max, skipped = torch.ones_like(ent, dtype=torch.bool), float("nan"), None
        return EdgeResult(predictions=logits.argmax(dim=1).cpu().numpy().astype(np.int64),
                          upload=upload.cpu().numpy().astype(bool),
                          entropy=ent.float().cpu().numpy(), e_max=float(e_max), skipped=skipped)

    def fresh_state(self) -> None:
        self.filter = make_filter(self.settings, self.num_classes)

    def snapshot(self) -> dict[str, Any]:
        """Filter state plus the few KB of norm state the edge runs with (the cloud re-sends only changes)."""
        return {**super().snapshot(), "filter": self.filter.snapshot()}

    def restore(self, snap: dict[str, Any]) -> None:
        super().restore(snap)
        self.filter.restore(snap["filter"])


# --- cloud ---------------------------------------------------------------------------------

@dataclass
class _Lane:
    """What one student serves: its upload queue, replay buffer and (when parked) its state."""

    buffer: ReplayBuffer
    student: dict[str, torch.Tensor]
    opt: dict[str, Any]
    queue: UploadQueue = field(default_factory=UploadQueue)
    version: int = 0  # student steps taken: tells export whether an edge is up to date
    idle_batches: int = 0  # edge batches since this lane's last step (replay-only cadence)
    served: set[int] = field(default_factory=set)  # edges whose batches this lane has seen

    def push(self, images: np.ndarray) -> None:
        self.queue.add(images, None)
        self.buffer.add(images)


class CemaCloud(CloudTrainer):
    """Foundation adaptation, selective distillation with replay, and publication of norm states.

    ``student_scope`` "shared": one student for the fleet; "per_edge": one lane per edge (queue,
    replay buffer, norm state and optimiser state) swapped into a single student module, so the
    cloud holds a few KB of parameters per edge and the frozen weights once.
    """

    def __init__(self, foundation: nn.Module | None, student_template: nn.Module, settings: Mapping[str, Any],
                 generator: torch.Generator, method: str = "cema") -> None:
        if foundation is None:
            raise ConfigError(f"method '{method}' needs a foundation model (config key 'foundation')")
        self.settings = s = settings
        self.generator = generator
        self.foundation = prepare_model(foundation, s, trainable=True)
        self.student = prepare_model(student_template, s, trainable=True)
        self.num_classes = infer_num_classes(self.student, s["num_classes"])
        f_classes = infer_num_classes(self.foundation, s["num_classes"])
        if f_classes != self.num_classes:
            raise ConfigError(f"foundation predicts {f_classes} classes, the edge model {self.num_classes}")
        self.e0 = e0_of(self.num_classes, s["e_max_factor"])
        self.f_opt = self._sgd(self.foundation, s["lr_foundation"])
        self.s_opt = self._sgd(self.student, s["lr_student"])
        self._f_init, self._f_opt_init = capture_norm_modules(self.foundation), copy.deepcopy(self.f_opt.state_dict())
        self._s_init, self._s_opt_init = capture_norm_modules(self.student), copy.deepcopy(self.s_opt.state_dict())
        self._lanes: dict[int, _Lane] = {}
        self._active: int | None = None  # lane whose state is loaded in self.student
        self.exports = ExportTracker(int(s["publish_every"]))  # per edge: batches seen, lane version sent
        self.counters = {"chunk_steps": 0, "replay_only_steps": 0}

    def _sgd(self, model: nn.Module, lr: float) -> torch.optim.SGD:
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.SGD(params, lr=float(lr), momentum=float(self.settings["momentum"]),
                               weight_decay=float(self.settings["weight_decay"]))

    # lanes ------------------------------------------------------------------------------------
    def _key(self, edge_id: int) -> int:
        return int(edge_id) if self.settings["student_scope"] == "per_edge" else 0

    def _lane(self, edge_id: int) -> _Lane:
        key = self._key(edge_id)
        if key not in self._lanes:
            self._lanes[key] = _Lane(buffer=ReplayBuffer(self.settings["replay_capacity"], self.generator),
                                     student=copy.deepcopy(self._s_init), opt=copy.deepcopy(self._s_opt_init))
        return self._lanes[key]

    def _park(self) -> None:
        if self._active is not None and self._active in self._lanes:
            lane = self._lanes[self._active]
            lane.student = capture_norm_modules(self.student)
            lane.opt = copy.deepcopy(self.s_opt.state_dict())

    def _activate(self, key: int) -> None:
        if self._active == key:
            return
        self._park()
        lane = self._lanes[key]
        restore_norm_modules(self.student, lane.student)
        self.s_opt.load_state_dict(copy.deepcopy(lane.opt))
        self._active = key

    # steps ------------------------------------------------------------------------------------
    def _input(self, images: np.ndarray) -> torch.Tensor:
        return to_input(images).to(model_device(self.foundation))

    def _foundation_step(self, x: torch.Tensor) -> None:
        """Step 1: reweighted entropy minimisation, norm layers in training mode."""
        set_norm_training(self.foundation, True)
        ent = entropy(self.foundation(x))
        loss = (reweight(ent, self.e0) * ent).mean()
        self.f_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.f_opt.step()
        set_norm_training(self.foundation, False)

    def _distill_step(self, lane: _Lane, x: torch.Tensor) -> None:
        """Steps 3-4: teacher in eval mode (after its update), student in training mode."""
        s = self.settings
        with torch.no_grad():
            teacher = self.foundation(x)
        set_norm_training(self.student, True)
        student = self.student(x.to(model_device(self.student)))
        loss, _ = selective_distillation_loss(student, teacher.to(student.device), self.e0, s["alpha"], s["beta"],
                                              s["gamma"], s["tau"])
        self.s_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.s_opt.step()
        set_norm_training(self.student, False)
        lane.version += 1

    def _chunk_step(self, lane: _Lane, chunk: np.ndarray) -> None:
        s = self.settings
        x = self._input(chunk)
        self._foundation_step(x)
        if len(lane.buffer) >= s["replay_warmup"] and s["replay_ratio"] > 0:
            x = torch.cat([x, self._input(lane.buffer.sample(s["replay_ratio"] * s["chunk_size"]))])
        self._distill_step(lane, x)
        self.counters["chunk_steps"] += 1

    def _replay_step(self, lane: _Lane) -> None:
        s = self.settings
        self._distill_step(lane, self._input(lane.buffer.sample(s["replay_only_ratio"] * s["chunk_size"])))
        self.counters["replay_only_steps"] += 1

    # the CloudTrainer contract ---------------------------------------------------------------
    def ingest(self, edge_id: int, images: np.ndarray) -> None:
        images = check_uploads(edge_id, images)
        if len(images):
            self._lane(edge_id).push(images.copy())

    def on_edge_batch(self, edge_id: int) -> int:
        """Cloud steps 1-5 for whatever the queue of ``edge_id``'s lane holds; returns steps taken.

        Step 5's cadence: the authors' code ("edge_batch") takes a replay-only step after every edge
        batch that brought no full chunk. One edge is their setting; a student shared by E edges would
        then take E replay steps per round whatever the uploads, so the cloud's work grows with the
        fleet rather than with what the edges send. "fleet_round" takes one replay-only step once the
        lane has seen as many step-less edge batches as it serves edges (one per round in sync mode),
        which is the authors' cadence for a single edge.
        """
        s = self.settings
        edge_id = int(edge_id)
        self.exports.batch(edge_id)
        lane, key = self._lane(edge_id), self._key(edge_id)
        lane.served.add(edge_id)
        lane.idle_batches += 1
        steps = 0
        while lane.queue.size >= s["chunk_size"]:
            self._activate(key)
            self._chunk_step(lane, lane.queue.pop(s["chunk_size"])[0])
            steps += 1
        replay_n = s["replay_only_ratio"] * s["chunk_size"]
        every = 1 if s["replay_only_cadence"] == "edge_batch" else len(lane.served)
        if (steps == 0 and s["replay_only_step"] and lane.idle_batches >= every
                and len(lane.buffer) > s["replay_warmup"] and len(lane.buffer) >= replay_n):
            self._activate(key)
            self._replay_step(lane)
            steps += 1
        if steps:
            lane.idle_batches = 0
        return steps

    def queued(self) -> int:
        return sum(lane.queue.size for lane in self._lanes.values())

    def export(self, edge_id: int) -> NormState | None:
        """Every ``publish_every`` edge batches, the student's norm state (affine + running statistics)
        if it changed since this edge last received it; otherwise None."""
        lane = self._lanes.get(self._key(edge_id))
        if lane is None or not self.exports.due(edge_id, lane.version):
            return None
        self._activate(self._key(edge_id))
        return norm_state(self.student, include_stats=True)

    def _reset_foundation(self) -> None:
        restore_norm_modules(self.foundation, self._f_init)
        self.f_opt.load_state_dict(copy.deepcopy(self._f_opt_init))

    def _reset_lane(self, key: int) -> None:
        lane = self._lanes[key]
        lane.queue.clear()
        lane.idle_batches = 0
        lane.buffer.clear()
        lane.student, lane.opt = copy.deepcopy(self._s_init), copy.deepcopy(self._s_opt_init)
        if self._active == key:
            self._active = None
            self._activate(key)
        # the reset lane's edges already run the deployed model
        self.exports.hold([e for e in self.exports.edges() if self._key(e) == key], lane.version)

    def reset(self, edge_id: int | None = None) -> None:
        """Reset-per-domain: back to the deployed student and source foundation, empty queue and buffer.

        ``edge_id`` None resets everything; otherwise the lane serving it (the whole fleet's, when the
        student is shared) and, with ``reset_foundation_with_edge``, the foundation.
        """
        if edge_id is None:
            self._reset_foundation()
            for key in self._lanes:
                self._reset_lane(key)
            return
        key = self._key(edge_id)
        if key in self._lanes:
            self._reset_lane(key)
        if self.settings["reset_foundation_with_edge"]:
            self._reset_foundation()

    def state_dict(self) -> dict[str, Any]:
        """Everything the next step depends on: norm states, optimisers, lanes, counters, RNG state."""
        self._park()
        lanes = {
            key: {"queue": l.queue.state_dict(), "buffer": l.buffer.state_dict(),
                  "student": copy.deepcopy(l.student), "opt": copy.deepcopy(l.opt), "version": l.version,
                  "idle_batches": l.idle_batches, "served": sorted(l.served)}
            for key, l in self._lanes.items()
        }
        return {"foundation": capture_norm_modules(self.foundation), "foundation_opt": copy.deepcopy(self.f_opt.state_dict()),
                "lanes": lanes, **self.exports.state_dict(),
                "counters": dict(self.counters), "generator": self.generator.get_state().clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        restore_norm_modules(self.foundation, state["foundation"])
        self.f_opt.load_state_dict(copy.deepcopy(state["foundation_opt"]))
        self._lanes, self._active = {}, None
        for key, d in state["lanes"].items():
            lane = _Lane(buffer=ReplayBuffer(self.settings["replay_capacity"], self.generator),
                         student=copy.deepcopy(d["student"]), opt=copy.deepcopy(d["opt"]), version=int(d["version"]),
                         idle_batches=int(d.get("idle_batches", 0)), served={int(e) for e in d.get("served", ())})
            lane.buffer.load_state_dict(d["buffer"])
            lane.queue.load_state_dict(d["queue"])
            self._lanes[int(key)] = lane
        self.exports.load_state_dict(state)
        self.counters = dict(state["counters"])
        self.generator.set_state(state["generator"].clone())


# --- presets -------------------------------------------------------------------------------

PRESETS: dict[str, tuple[dict[str, Any], str]] = {
    "cema": ({}, "CEMA as in the authors' code: static E_max, redundancy filter, TBR with published statistics"),
    "cema-paper": ({"dynamic_e_max": True, "dynamic_lambda": 0.6, "entropy_floor": 0.02},
                   "CEMA as in the paper: dynamic E_max (lambda 0.6) and an entropy floor of 0.02 ln C"),
    "cema-edgebn": ({"edge_stats": "batch"},
                    "CEMA whose edge normalises with its own test-batch statistics (continual streams)"),
    "upload-all": ({"select": False}, "CEMA's cloud with every sample uploaded: what the selection saves"),
}


def _register() -> None:
    for name, (overrides, description) in PRESETS.items():
        register_method(name, edge=functools.partial(CemaEdge, method=name),
                        cloud=functools.partial(CemaCloud, method=name),
                        settings=preset_settings(SETTINGS, overrides), description=description, uses_foundation=True,
                        derive=derive_settings)


_register()
