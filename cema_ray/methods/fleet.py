"""`cema-fleet`: CEMA rebuilt so the cloud pays for its uplink on small edges under continual shift.

CEMA's structure stays: a forward-only edge uploads a selected subset, a cloud adapts a foundation
model on it and distils it into a student copy of the edge model, and publishes the student. What
changes is where the measurements showed CEMA losing the foundation's knowledge
(docs/BENCHMARKS.md, section 2):

- The edge normalises with its own test batch's statistics (forward-only BN adapt), and so do the
  student and the teacher in the cloud: the student is trained under the very normalisation the
  edge runs with, and no published statistics can lag a shift.
- The teacher labels each chunk once, when it arrives, with the foundation normalised by that
  chunk's own statistics; the label is stored with the image. Replay then teaches old samples with
  the labels of their own domain instead of re-labelling them under today's statistics.
- Replay draws whole stored chunks, each forwarded by itself, so every batch-statistics forward of
  the student sees one time window (one domain), as the edge's batches do.
- The student learns the teacher's labels (its argmax by default; soft labels at a temperature, or
  the paper's selective distillation, as settings) in a chosen *publish scope* (``norm``, ``head``
  or ``all`` weights, models/publish.py); an EMA of it and an anchor to the deployed weights are
  the stability levers for a 15,000-sample stream.
- A hard upload budget (algorithms/budget.py) caps the uplink by construction.

Every lever is a setting, so each ablation is one override. ``teacher: labels`` replaces the
foundation by the stream's true labels (the ``oracle`` reference): it measures what the edge model
can hold at this upload budget, apart from what the teacher can tell it.

Why one module of ~430 lines: the preset's edge, its cloud (teacher, student, chunk replay) and its
ablations are one method; each lever is a setting read in one place here.
"""
from __future__ import annotations

import copy
import functools
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cema_ray.algorithms.budget import PRIORITIES, apply_budget, budget_cap
from cema_ray.algorithms.distill import selective_distillation_loss
from cema_ray.algorithms.entropy import e0 as e0_of
from cema_ray.algorithms.entropy import entropy, reweight
from cema_ray.algorithms.selection import EntropyFilter
from cema_ray.errors import ConfigError
from cema_ray.methods.base import (CloudTrainer, EdgeResult, NormState, register_method,
                                   check_uploads, infer_num_classes, preset_settings)
from cema_ray.methods.common import load_arrays, model_device, tensor_state, use_norm_stats
from cema_ray.methods.host_model import ForwardEdge, HostModel
from cema_ray.models.norm import freeze_all_but_norm_affine
from cema_ray.models.preprocess import to_input
from cema_ray.models.publish import SCOPES, scope_parameters, scope_state, train_only
from cema_ray.schema import Field, setting

TEACHERS = ("foundation", "labels")
LOSSES = ("kl", "ce", "sed")
SETTINGS: dict[str, Field] = {
    "num_classes": setting(None, "classes (null: data.num_classes, else the model's last Linear layer)", kind="int",
                           lo=1),
    "student_scope": setting("shared", "cema-fleet trains one student for the fleet (mirrors method.student_scope; "
                                       "per-edge students: method 'cema')", choices=("shared",)),
    "publish_every": setting(1, "K: publish every K edge batches (mirrors method.publish_every)", lo=1),
    # edge: which samples may go up (the CEMA filters), and how many do (the budget)
    "e_max_factor": setting(1.0, "samples with entropy >= factor * ln C stay (1.0: the budget decides)", lo=0),
    "redundancy": setting(False, "EATA's redundancy filter before the budget"),
    "d_margin": setting(0.4, "redundancy margin", lo=0),
    "upload_budget": setting(0.3, "at most floor(budget * batch) uploads per edge batch; 1.0 = no cap", lo=0, hi=1,
                             lo_open=True),
    "upload_priority": setting("uncertain", "which candidates go first (algorithms/budget.py)", choices=PRIORITIES),
    "upload_balance": setting(True, "take the candidates class by class (the edge's predictions) in turns"),
    # teacher
    "teacher": setting("foundation", "who labels the uploads: the foundation, or the true labels (oracle)",
                       choices=TEACHERS),
    "lr_foundation": setting(2.5e-4, "reweighted entropy minimisation of the foundation's norm affine; 0 = off",
                             lo=0),
    "foundation_restore": setting(0.0, "CoTTA's stochastic restore: per-step probability a norm weight goes back",
                                  lo=0, hi=1, hi_open=True),
    # student
    "train_scope": setting("norm", "what the student trains and the cloud publishes", choices=SCOPES),
    "student_loss": setting("ce", "kl (soft labels at a temperature), ce (the teacher's argmax), sed (the paper's)",
                            choices=LOSSES),
    "temperature": setting(2.0, "temperature of the kl loss", lo=0, lo_open=True),
    "lr_student": setting(0.01, "student SGD learning rate", lo=0, lo_open=True),
    "momentum": setting(0.9, "SGD momentum", lo=0, hi=1, hi_open=True),
    "weight_decay": setting(0.0, "SGD weight decay", lo=0),
    "student_steps": setting(1, "student SGD steps per chunk of uploads", lo=1),
    "chunk_size": setting(16, "uploads per cloud step", lo=1),
    "replay_chunks": setting(0, "stored chunks replayed with every new one (each forwarded by itself)", lo=0),
    "replay_window": setting(0, "draw replayed chunks from the newest this many (0: the whole buffer)", lo=0),
    "replay_capacity": setting(10000, "samples kept for replay (oldest chunks leave first)", lo=1),
    "student_ema": setting(0.5, "publish an EMA of the student with this decay; 0 = the student itself", lo=0, hi=1,
                           hi_open=True),
    "anchor": setting(0.0, "L2 pull of the trained parameters towards the deployed ones", lo=0),
    "alpha": setting(3.0, "sed loss: weight of the reweighted entropy term", lo=0),
    "beta": setting(3.0, "sed loss: weight of the KL term", lo=0),
    "gamma": setting(1.0, "sed loss: weight of the cross-entropy term", lo=0),
}


# --- edge ----------------------------------------------------------------------------------

class FleetEdge(ForwardEdge):
    """Forward-only: BN adapt with the published weights, CEMA's filters, then the upload budget."""

    def __init__(self, model: nn.Module, settings: Mapping[str, Any], method: str = "cema-fleet") -> None:
        model.eval().requires_grad_(False)
        use_norm_stats(model, "batch")
        super().__init__(HostModel(model, load_arrays))
        self.settings = s = settings
        self.num_classes = infer_num_classes(model, s["num_classes"])
        self.filter = self._make_filter()

    def _make_filter(self) -> EntropyFilter:
        s = self.settings
        return EntropyFilter(self.num_classes, e_max_factor=s["e_max_factor"], d_margin=s["d_margin"],
                             redundancy=s["redundancy"])

    def decide(self, logits: torch.Tensor) -> EdgeResult:
        with torch.inference_mode():
            ent = entropy(logits)
            passed = self.filter.select(logits.softmax(dim=1), ent).cpu().numpy()
        preds = logits.argmax(dim=1).cpu().numpy().astype(np.int64)
        ent_np = ent.float().cpu().numpy()
        cap = budget_cap(len(preds), self.settings["upload_budget"])
        upload = apply_budget(passed, preds, ent_np, cap, self.settings["upload_priority"],
                              bool(self.settings["upload_balance"]))
        skipped = {**self.filter.last_skipped, "budget": int(passed.sum() - upload.sum())}
        return EdgeResult(predictions=preds, upload=upload, entropy=ent_np, e_max=float(self.filter.e_max),
                          skipped=skipped)

    def fresh_state(self) -> None:
        self.filter = self._make_filter()

    def snapshot(self) -> dict[str, Any]:
        """The filter's state and the weights it runs with (the publication it holds, shared with the host's
        other edges on that version; the device reloads its last publication on restore, but a reset since
        may have brought back the deployed weights)."""
        return {**super().snapshot(), "filter": self.filter.snapshot()}

    def restore(self, snap: dict[str, Any]) -> None:
        super().restore(snap)
        self.filter.restore(snap["filter"])


# --- cloud ---------------------------------------------------------------------------------

class ChunkReplay:
    """Stored (images, teacher probabilities) chunks; draws whole chunks so each replayed forward
    sees one time window. Holds at most ``capacity`` samples; the oldest chunks leave first."""

    def __init__(self, capacity: int, generator: torch.Generator) -> None:
        self.capacity, self.generator = int(capacity), generator
        self.chunks: list[tuple[np.ndarray, np.ndarray]] = []
        self.size = 0

    def add(self, images: np.ndarray, targets: np.ndarray) -> None:
        self.chunks.append((images, targets))
        self.size += len(images)
        while self.size > self.capacity and len(self.chunks) > 1:
            self.size -= len(self.chunks.pop(0)[0])

    def draw(self, k: int, window: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
        """Up to ``k`` distinct chunks, uniformly from the newest ``window`` (0: all) before the last one
        added (the chunk being learnt, which the step has already)."""
        end = len(self.chunks) - 1
        start = max(0, end - window) if window > 0 else 0
        if k <= 0 or end <= start:
            return []
        picks = (start + torch.randperm(end - start, generator=self.generator)[:k]).tolist()
        return [self.chunks[i] for i in picks]

    def clear(self) -> None:
        self.chunks, self.size = [], 0

    def state_dict(self) -> dict[str, Any]:
        return {"chunks": [(i.copy(), t.copy()) for i, t in self.chunks]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.clear()
        for images, targets in state["chunks"]:
            self.add(np.asarray(images).copy(), np.asarray(targets).copy())


class FleetCloud(CloudTrainer):
    """Teacher labels at arrival, chunk-wise replay, a scoped student, EMA/anchor, one shared student."""

    needs_labels = False

    def __init__(self, foundation: nn.Module | None, student_template: nn.Module, settings: Mapping[str, Any],
                 generator: torch.Generator, method: str = "cema-fleet") -> None:
        self.settings = s = settings
        self.method = method
        self.needs_labels = s["teacher"] == "labels"
        if foundation is None and not self.needs_labels:
            raise ConfigError(f"method '{method}' needs a foundation model (config key 'models.foundation')")
        self.generator = generator
        self.student = copy.deepcopy(student_template).eval()
        use_norm_stats(self.student, "batch")
        self.num_classes = infer_num_classes(self.student, s["num_classes"])
        self.e0 = e0_of(self.num_classes, s["e_max_factor"])
        self.scope = s["train_scope"]
        self.s_opt = torch.optim.SGD(train_only(self.student, self.scope), lr=float(s["lr_student"]),
                                     momentum=float(s["momentum"]), weight_decay=float(s["weight_decay"]))
        self.foundation = None
        if not self.needs_labels:
            self.foundation = copy.deepcopy(foundation).eval()
            use_norm_stats(self.foundation, "batch")
            self.f_opt = torch.optim.SGD(freeze_all_but_norm_affine(self.foundation), lr=float(s["lr_foundation"]),
                                         momentum=float(s["momentum"]))
            self._f_source = tensor_state(self.foundation)
        self._deployed = {n: p.detach().clone() for n, p in scope_parameters(self.student, self.scope)}
        self._s_init = tensor_state(self.student)
        self.ema = None if not s["student_ema"] else copy.deepcopy(self._deployed)
        self.replay = ChunkReplay(s["replay_capacity"], generator)
        self._queue: list[tuple[np.ndarray, np.ndarray | None]] = []
        self._queued = 0
        self.version = 0
        self._batches: dict[int, int] = {}
        self._sent: dict[int, int] = {}
        self.counters = {"chunk_steps": 0}
        self.last_loss: dict[str, float] = {}

    # teacher ---------------------------------------------------------------------------------
    def _targets(self, images: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
        """Teacher probabilities for one chunk, computed once, after the foundation's step on it."""
        if self.needs_labels:
            return np.eye(self.num_classes, dtype=np.float32)[np.asarray(labels, np.int64)]
        x = to_input(images).to(model_device(self.foundation))
        if self.settings["lr_foundation"] > 0:
            ent = entropy(self.foundation(x))
            loss = (reweight(ent, self.e0) * ent).mean()
            self.f_opt.zero_grad(set_to_none=True)
            loss.backward()
            self.f_opt.step()
            self._stochastic_restore()
        with torch.no_grad():
            logits = self.foundation(x)
        return F.softmax(logits / float(self.settings["temperature"]), dim=1).float().cpu().numpy()

    def _stochastic_restore(self) -> None:
        p = float(self.settings["foundation_restore"])
        if p <= 0:
            return
        with torch.no_grad():
            for name, param in self.foundation.named_parameters():
                if param.requires_grad:
                    keep = torch.rand(param.shape, generator=self.generator) >= p
                    param.copy_(torch.where(keep, param, self._f_source[name].to(param)))

    # student ---------------------------------------------------------------------------------
    def _group_loss(self, images: np.ndarray, targets: np.ndarray) -> torch.Tensor:
        s = self.settings
        logits = self.student(to_input(images).to(model_device(self.student)))
        t = torch.as_tensor(targets).to(logits)
        if s["student_loss"] == "sed":
            tau = float(s["temperature"])
            teacher_logits = torch.log(t.clamp_min(1e-8)) * tau  # probabilities at tau -> logits at 1
            loss, self.last_loss = selective_distillation_loss(logits, teacher_logits, self.e0, s["alpha"], s["beta"],
                                                               s["gamma"], 1.0)
            return loss
        if s["student_loss"] == "ce":
            return F.cross_entropy(logits, t.argmax(dim=1))
        tau = 1.0 if self.needs_labels else float(s["temperature"])
        log_p = F.log_softmax(logits / tau, dim=1)
        return -(t * log_p).sum(dim=1).mean() * tau ** 2  # KL up to the teacher's (constant) entropy

    def _student_step(self, groups: list[tuple[np.ndarray, np.ndarray]]) -> None:
        s = self.settings
        self.student.train()
        for _ in range(int(s["student_steps"])):
            loss = sum(self._group_loss(i, t) for i, t in groups) / len(groups)
            if s["anchor"] > 0:
                loss = loss + float(s["anchor"]) * sum(((p - self._deployed[n]) ** 2).sum()
                                                       for n, p in scope_parameters(self.student, self.scope))
            self.s_opt.zero_grad(set_to_none=True)
            loss.backward()
            self.s_opt.step()
        self.student.eval()
        self.last_loss["loss"] = float(loss.detach())
        if self.ema is not None:
            d = float(s["student_ema"])
            with torch.no_grad():
                for n, p in scope_parameters(self.student, self.scope):
                    self.ema[n].mul_(d).add_(p.detach(), alpha=1 - d)
        self.version += 1

    def _chunk_step(self, images: np.ndarray, labels: np.ndarray | None) -> None:
        targets = self._targets(images, labels)
        if self.settings["replay_chunks"] > 0:  # without replay, keeping the uploads would only cost memory
            self.replay.add(images, targets)
        self._student_step([(images, targets), *self.replay.draw(int(self.settings["replay_chunks"]),
                                                                             int(self.settings["replay_window"]))])
        self.counters["chunk_steps"] += 1

    def _pop(self, n: int) -> tuple[np.ndarray, np.ndarray | None]:
        images, labels, have = [], [], 0
        while have < n:
            head_i, head_l = self._queue.pop(0)
            take = min(n - have, len(head_i))
            images.append(head_i[:take])
            labels.append(None if head_l is None else head_l[:take])
            if take < len(head_i):
                self._queue.insert(0, (head_i[take:], None if head_l is None else head_l[take:]))
            have += take
        self._queued -= n
        return np.concatenate(images), (None if labels[0] is None else np.concatenate(labels))

    # the CloudTrainer contract ---------------------------------------------------------------
    def ingest(self, edge_id: int, images: np.ndarray, labels: np.ndarray | None = None) -> None:
        images = check_uploads(edge_id, images)
        if self.needs_labels and labels is None:
            raise ConfigError(f"method '{self.method}' trains on the stream's true labels (a reference): "
                              "it runs with runtime=local only")
        if len(images):
            self._queue.append((images.copy(), None if labels is None else np.asarray(labels).copy()))
            self._queued += len(images)

    def on_edge_batch(self, edge_id: int) -> int:
        self._batches[int(edge_id)] = self._batches.get(int(edge_id), 0) + 1
        steps, n = 0, int(self.settings["chunk_size"])
        while self._queued >= n:
            self._chunk_step(*self._pop(n))
            steps += 1
        return steps

    def queued(self) -> int:
        return self._queued

    def export(self, edge_id: int) -> NormState | None:
        """The scope's parameters (the EMA's, if on) when they changed since ``edge_id`` last got them."""
        edge_id = int(edge_id)
        count = self._batches.get(edge_id, 0)
        if count == 0 or count % int(self.settings["publish_every"]) or self._sent.get(edge_id, 0) == self.version:
            return None
        self._sent[edge_id] = self.version
        if self.ema is not None:
            return {n: v.detach().cpu().float().numpy().copy() for n, v in self.ema.items()}
        return scope_state(self.student, self.scope)

    def reset(self, edge_id: int | None = None) -> None:
        """Reset-per-domain: deployed student, source foundation, empty queue and replay."""
        self.student.load_state_dict(self._s_init)
        self.s_opt.state.clear()
        if self.foundation is not None:
            self.foundation.load_state_dict(self._f_source)
            self.f_opt.state.clear()
        self.ema = None if self.ema is None else copy.deepcopy(self._deployed)
        self.replay.clear()
        self._queue, self._queued = [], 0
        for e in self._batches:
            self._sent[e] = self.version  # the reset edge already runs the deployed model

    def state_dict(self) -> dict[str, Any]:
        return {"student": tensor_state(self.student), "s_opt": copy.deepcopy(self.s_opt.state_dict()),
                "foundation": None if self.foundation is None else tensor_state(self.foundation),
                "f_opt": None if self.foundation is None else copy.deepcopy(self.f_opt.state_dict()),
                "ema": copy.deepcopy(self.ema), "replay": self.replay.state_dict(),
                "queue": [(i.copy(), None if l is None else l.copy()) for i, l in self._queue],
                "version": self.version, "batches": dict(self._batches), "sent": dict(self._sent),
                "counters": dict(self.counters), "generator": self.generator.get_state().clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.student.load_state_dict(state["student"])
        self.s_opt.load_state_dict(copy.deepcopy(state["s_opt"]))
        if self.foundation is not None:
            self.foundation.load_state_dict(state["foundation"])
            self.f_opt.load_state_dict(copy.deepcopy(state["f_opt"]))
        self.ema = copy.deepcopy(state["ema"])
        self.replay.load_state_dict(state["replay"])
        self._queue = [(np.asarray(i).copy(), None if l is None else np.asarray(l).copy()) for i, l in state["queue"]]
        self._queued = sum(len(i) for i, _ in self._queue)
        self.version = int(state["version"])
        self._batches = {int(k): int(v) for k, v in state["batches"].items()}
        self._sent = {int(k): int(v) for k, v in state["sent"].items()}
        self.counters = dict(state["counters"])
        self.generator.set_state(state["generator"].clone())


# --- presets and ablations ----------------------------------------------------------------

# `bench methods --ablations`: each of cema-fleet's levers turned off (or swapped) in turn.
ABLATIONS: dict[str, dict[str, Any]] = {
    "fleet-no-budget": {"upload_budget": 1.0},  # every sample the filters pass goes up
    "fleet-cema-filters": {"e_max_factor": 0.4, "redundancy": True},  # CEMA's filters before the budget
    "fleet-confident-first": {"upload_priority": "confident"},
    "fleet-unbalanced": {"upload_balance": False},
    "fleet-soft-labels": {"student_loss": "kl"},  # KL to the teacher's softened probabilities
    "fleet-sed-loss": {"student_loss": "sed"},  # the paper's selective entropy distillation
    "fleet-head": {"train_scope": "head"},
    "fleet-all-weights": {"train_scope": "all", "lr_student": 0.002},
    "fleet-no-ema": {"student_ema": 0.0},
    "fleet-replay": {"replay_chunks": 3},  # 3 stored chunks replayed with each new one
    "fleet-frozen-foundation": {"lr_foundation": 0.0},  # the teacher only BN-adapts
}


PRESETS: dict[str, tuple[dict[str, Any], str, bool]] = {
    "cema-fleet": ({}, "CEMA for small edges under continual shift: edge BN adapt, teacher labels at arrival, "
                       "a scoped student with chunk-wise replay, a hard upload budget", True),
    "oracle": ({"teacher": "labels"}, "reference: cema-fleet's student trained on the uploads' true labels "
                                      "(what the edge model can hold at this budget); runtime=local only", False),
}


def _register() -> None:
    for name, (overrides, description, uses_foundation) in PRESETS.items():
        register_method(name, edge=functools.partial(FleetEdge, method=name),
                        cloud=functools.partial(FleetCloud, method=name),
                        settings=preset_settings(SETTINGS, overrides), description=description,
                        uses_foundation=uses_foundation, needs_labels=overrides.get("teacher") == "labels")


_register()
