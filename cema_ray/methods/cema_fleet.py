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
- ``bank_size`` > 1 (the ``cema-bank`` preset) adds a bank keyed by domain: per domain, an offset to the one
  student that only that domain's uploads train; the edges send each batch's domain key with its uploads and
  run, per batch, the entry nearest it (algorithms/domain_key.py, algorithms/domain_bank.py, methods/student.py).
- A mixed fleet (several edge architectures) has a student per architecture, and with a bank a bank per
  architecture, each keyed by its own stem (methods/learner.py).

Every lever is a setting, so each ablation is one override. ``teacher: labels`` replaces the
foundation by the stream's true labels (the ``oracle`` reference): it measures what the edge model
can hold at this upload budget, apart from what the teacher can tell it.

Why one module of ~500 lines: the preset's edge, its cloud (teacher, students, the bank's routing) and its
ablations are one method; each lever is a setting read in one place here. The student and a bank entry's
offset live in methods/student.py, one architecture's student with its bank in methods/learner.py, the bank's
routing and wire format in algorithms/domain_bank.py.
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
from cema_ray.algorithms.domain_bank import EVICTIONS, PublishedBank, bank_entries, nearest
from cema_ray.algorithms.domain_key import batch_keys, key_scale, normalise
from cema_ray.algorithms.distill import selective_distillation_loss
from cema_ray.algorithms.entropy import e0 as e0_of
from cema_ray.algorithms.entropy import entropy, reweight
from cema_ray.algorithms.selection import EntropyFilter
from cema_ray.errors import ConfigError
from cema_ray.methods.base import (CloudTrainer, EdgeResult, NormState, register_method,
                                   check_uploads, infer_num_classes, preset_settings)
from cema_ray.methods.common import d_margin_setting, load_arrays, model_device, tensor_state, use_norm_stats
from cema_ray.methods.exports import ExportTracker
from cema_ray.methods.host_model import ForwardEdge, HostModel
from cema_ray.methods.learner import Learner
from cema_ray.methods.parts import MODEL, wire
from cema_ray.methods.student import Student
from cema_ray.models.norm import freeze_all_but_norm_affine
from cema_ray.models.preprocess import to_input
from cema_ray.models.publish import SCOPES
from cema_ray.schema import Field, fail, join_key, setting

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
    "d_margin": d_margin_setting(0.4, "redundancy margin"),
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
    # the bank: a per-domain offset to the fleet's student (algorithms/domain_bank.py, methods/student.py)
    "bank_size": setting(1, "entries of the cloud's domain bank; 1 = one student for the fleet, no bank", lo=1,
                         hi=256),
    "bank_radius": setting(0.004, "uploads whose domain key is farther than this from every entry start a new one "
                                  "(mean squared difference per channel, in source-spread units)", lo=0,
                           lo_open=True),
    "bank_reach": setting(2.0, "an edge batch farther than reach x radius from every entry runs the fleet's "
                               "student", lo=0),
    "bank_lr": setting(0.01, "SGD learning rate of each entry's offset to the fleet's student (momentum: the "
                             "student's)", lo=0),
    "bank_gate": setting(False, "send an entry (and the fleet's student) only while it agrees with the teacher more "
                               "often than the deployed weights on chunks it has not trained on; else its domain "
                               "runs the deployed weights (BN adapt)"),
    "bank_evict": setting("pair", "a full bank frees a slot for a new key by merging the two entries nearest each "
                                  "other (pair) or the entry fewest keys reached into its nearest (smallest)",
                          choices=EVICTIONS),
    "bank_key_samples": setting(0, "images of an edge batch its domain key is computed on (0: all)", lo=0),
    "bank_sure_steps": setting(0, "an entry trained by at least this many chunks is sure: an edge batch whose nearest "
                                  "entry (within reach) is sure uploads bank_sure_budget x upload_budget, so the uplink "
                                  "goes where the bank is least sure; 0 = off", lo=0),
    "bank_sure_budget": setting(0.5, "the share of upload_budget a batch near a sure entry uploads", lo=0, hi=1),
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
        self.banked = int(s["bank_size"]) > 1
        self.bank: NormState | None = None  # the newest bank publication (flat, shared with the host's edges)
        self.scale = key_scale(model) if self.banked else None
        self._chosen = False  # `prepare` picked this batch's entry; `decide` closes the batch
        self._key: np.ndarray | None = None  # the current batch's domain key
        self._sure = False  # the current batch's entry is sure (bank_sure_steps): it uploads less

    # the bank: an entry per batch, by its domain key -------------------------------------------
    def prepare(self, x: torch.Tensor) -> None:
        """With a bank: the batch's domain key, computed forward-only from the stem on its first
        ``bank_key_samples`` images (it goes up with the uploads), and the entry nearest it to run with (the
        fleet's student when none is within reach; the deployed weights where the publication has neither)."""
        if not self.banked:
            return
        k = int(self.settings["bank_key_samples"]) or len(x)
        self._key = normalise(batch_keys(self.host.model, x[:k].to(self.host.device))[0], self.scale)
        self._chosen, self._sure = True, False
        if self.bank is None:
            return
        pub = self._entries()
        reach = float(self.settings["bank_radius"]) * float(self.settings["bank_reach"])
        j = nearest(self._key, pub.keys, reach)
        self.state = pub.base if j is None else pub.entries[j]
        sure = int(self.settings["bank_sure_steps"])
        self._sure = j is not None and sure > 0 and int(pub.steps[j]) >= sure

    def process(self, x: torch.Tensor) -> EdgeResult:
        if not self._chosen:
            self.prepare(x)
        return super().process(x)

    def _entries(self) -> PublishedBank:
        """The bank's keys and entries, parsed once per publication and host: every edge on one publication
        holds the same entry objects, so edges that pick one entry share a stacked forward."""
        memo = self.host.memo
        hit = memo.get(id(self.bank))
        if hit is None or hit[0] is not self.bank:
            pub = bank_entries(self.bank)
            for entry in [e for e in [*pub.entries, pub.base] if e is not None]:
                self.host.use(entry)  # a state the model refuses fails here, naming the key
            hit = memo[id(self.bank)] = (self.bank, pub)
            while len(memo) > 8:
                memo.pop(next(iter(memo)))
        return hit[1]

    def apply_update(self, state: NormState | None) -> None:
        if not self.banked:
            super().apply_update(state)
        elif state:
            self.bank = state
            self._entries()

    def _make_filter(self) -> EntropyFilter:
        s = self.settings
        return EntropyFilter(self.num_classes, e_max_factor=s["e_max_factor"], d_margin=s["d_margin"],
                             redundancy=s["redundancy"])

    def decide(self, logits: torch.Tensor) -> EdgeResult:
        self._chosen = False
        with torch.inference_mode():
            ent = entropy(logits)
            passed = self.filter.select(logits.softmax(dim=1), ent).cpu().numpy()
        preds = logits.argmax(dim=1).cpu().numpy().astype(np.int64)
        ent_np = ent.float().cpu().numpy()
        budget = float(self.settings["upload_budget"])
        cap = budget_cap(len(preds), budget * float(self.settings["bank_sure_budget"]) if self._sure else budget)
        upload = apply_budget(passed, preds, ent_np, cap, self.settings["upload_priority"],
                              bool(self.settings["upload_balance"]))
        skipped = {**self.filter.last_skipped, "budget": int(passed.sum() - upload.sum())}
        return EdgeResult(predictions=preds, upload=upload, entropy=ent_np, e_max=float(self.filter.e_max),
                          skipped=skipped, domain_key=self._key if self.banked else None)

    def fresh_state(self) -> None:
        self.filter = self._make_filter()

    def snapshot(self) -> dict[str, Any]:
        """The filter's state and the weights it runs with (the publication it holds, shared with the host's
        other edges on that version; the device reloads its last publication on restore, but a reset since
        may have brought back the deployed weights)."""
        return {**super().snapshot(), "filter": self.filter.snapshot(), "bank": self.bank}

    def restore(self, snap: dict[str, Any]) -> None:
        super().restore(snap)
        self.filter.restore(snap["filter"])
        self.bank = snap.get("bank")


# --- cloud ---------------------------------------------------------------------------------

class FleetCloud(CloudTrainer):
    """Teacher labels at arrival, chunk-wise replay, a scoped student per edge architecture (methods/learner.py),
    EMA/anchor; with ``bank_size`` > 1 each student has a bank of per-domain offsets, keyed by the domain keys its
    architecture's edges send."""

    needs_labels = False

    def __init__(self, foundation: nn.Module | None, student_template: nn.Module | Mapping[int, nn.Module],
                 settings: Mapping[str, Any], generator: torch.Generator, method: str = "cema-fleet",
                 model_of: Mapping[int, int] | None = None) -> None:
        """``student_template``: the edge model, or in a mixed fleet one per architecture index. The teacher labels
        each chunk once and every architecture's student learns from it (from every edge's uploads). Each student
        publishes to its own edges under ``model.<index>.`` (methods/parts.py). ``model_of``: in a mixed fleet
        with a bank, every edge's architecture index, so that an edge's domain key routes its uploads in its own
        architecture's bank."""
        self.settings = s = settings
        templates = dict(student_template) if isinstance(student_template, Mapping) else None
        self.models = None if templates is None else list(templates)  # architecture indices, in learner order
        student_template = student_template if templates is None else templates[self.models[0]]
        self.method = method
        self.needs_labels = s["teacher"] == "labels"
        if foundation is None and not self.needs_labels:
            raise ConfigError(f"method '{method}' needs a foundation model (config key 'models.foundation')")
        self.generator = generator
        self.num_classes = infer_num_classes(student_template, s["num_classes"])
        self.e0 = e0_of(self.num_classes, s["e_max_factor"])
        self.foundation = None
        if not self.needs_labels:
            self.foundation = copy.deepcopy(foundation).eval()
            use_norm_stats(self.foundation, "batch")
            self.f_opt = torch.optim.SGD(freeze_all_but_norm_affine(self.foundation), lr=float(s["lr_foundation"]),
                                         momentum=float(s["momentum"]))
            self._f_source = tensor_state(self.foundation)
        self.banked = int(s["bank_size"]) > 1
        if self.banked and templates is not None and len(templates) > 1 and model_of is None:
            raise ConfigError(f"method '{method}': a bank in a fleet of several edge architectures needs every "
                              "edge's architecture (model_of), to route each edge's key in its own bank")
        self.model_of = {int(e): int(k) for e, k in (model_of or {}).items()}
        self.takes_keys = self.banked
        self.learners = [Learner(t, s, generator) for t in  # one per architecture
                         ([student_template] if templates is None else templates.values())]
        self.version = 0
        self.exports = ExportTracker(int(s["publish_every"]))
        self.counters = {"chunk_steps": 0}

    @property
    def students(self) -> list[Student]:
        """Every architecture's student, in learner order."""
        return [learner.student for learner in self.learners]

    @property
    def student(self) -> nn.Module:
        """The first student's model (the only one in a fleet of one architecture)."""
        return self.learners[0].student.model

    def _learner_of(self, edge_id: int) -> int:
        """Which learner an edge's uploads wait in. Without a bank, every upload waits in the first learner's one
        queue, so chunks mix every architecture's uploads. With a bank, uploads wait in their own architecture's
        learner, routed by their own key (the throwaway edge `CloudService.calibrate` times with: the first)."""
        if not self.banked or self.models is None or len(self.models) == 1 or int(edge_id) < 0:
            return 0
        return self.models.index(self.model_of[int(edge_id)])

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
    def _group_loss(self, student: nn.Module, images: np.ndarray, targets: np.ndarray) -> torch.Tensor:
        s = self.settings
        logits = student(to_input(images).to(model_device(student)))
        t = torch.as_tensor(targets).to(logits)
        if s["student_loss"] == "sed":
            tau = float(s["temperature"])
            teacher_logits = torch.log(t.clamp_min(1e-8)) * tau  # probabilities at tau -> logits at 1
            loss, _ = selective_distillation_loss(logits, teacher_logits, self.e0, s["alpha"], s["beta"], s["gamma"],
                                                  1.0)
            return loss
        if s["student_loss"] == "ce":
            return F.cross_entropy(logits, t.argmax(dim=1))
        tau = 1.0 if self.needs_labels else float(s["temperature"])
        log_p = F.log_softmax(logits / tau, dim=1)
        return -(t * log_p).sum(dim=1).mean() * tau ** 2  # KL up to the teacher's (constant) entropy

    def _chunk_step(self, owner: int, slot: int, images: np.ndarray, labels: np.ndarray | None) -> None:
        """One teacher labelling of a chunk from learner ``owner``'s entry ``slot``; every learner learns from
        it, each through its own bank's entry for it (the owner's: ``slot``; another's: keyed by its own stem)."""
        chunk = (images, self._targets(images, labels))
        for i, learner in enumerate(self.learners):
            learner_slot = slot if i == owner else learner.slot_for(images)
            learner.learn(chunk, learner_slot, self._group_loss)
        self.version += 1
        self.counters["chunk_steps"] += 1

    # the CloudTrainer contract ---------------------------------------------------------------
    def ingest(self, edge_id: int, images: np.ndarray, labels: np.ndarray | None = None,
               key: np.ndarray | None = None) -> None:
        images = check_uploads(edge_id, images)
        if self.needs_labels and labels is None:
            raise ConfigError(f"method '{self.method}' trains on the stream's true labels (a reference): "
                              "it runs with runtime=local only")
        if len(images):
            learner = self.learners[self._learner_of(edge_id)]
            learner.queues[learner.slot_for(images, key)].add(images, labels)

    def on_edge_batch(self, edge_id: int) -> int:
        self.exports.batch(edge_id)
        steps, n = 0, int(self.settings["chunk_size"])
        for owner, learner in enumerate(self.learners):
            for slot, queue in enumerate(learner.queues):
                while queue.size >= n:
                    self._chunk_step(owner, slot, *queue.pop(n))
                    steps += 1
        return steps

    def queued(self) -> int:
        return sum(learner.queued() for learner in self.learners)

    def export(self, edge_id: int) -> NormState | None:
        """The scope's parameters (the EMA's, if on) when they changed since ``edge_id`` last got them; with a
        bank, every entry that has trained, each with its key; in a mixed fleet, each architecture's part."""
        if not self.exports.due(edge_id, self.version):
            return None
        if self.models is not None:
            return wire({k: learner.export() for k, learner in zip(self.models, self.learners)}, MODEL)
        return self.learners[0].export()

    def reset(self, edge_id: int | None = None) -> None:
        """Reset-per-domain. Without a bank: the deployed students, source foundation, no waiting uploads and no
        replay (for the whole fleet). A bank: nothing the other edges use is touched (the edge itself went back to
        its deployed weights, and picks its entry again by its next batch's key)."""
        if self.banked:
            return
        for learner in self.learners:
            learner.reset()
        if self.foundation is not None:
            self.foundation.load_state_dict(self._f_source)
            self.f_opt.state.clear()
        self.exports.hold(self.exports.edges(), self.version)  # the reset edge already runs the deployed model

    def state_dict(self) -> dict[str, Any]:
        return {"learners": [learner.state_dict() for learner in self.learners],
                "foundation": None if self.foundation is None else tensor_state(self.foundation),
                "f_opt": None if self.foundation is None else copy.deepcopy(self.f_opt.state_dict()),
                "version": self.version, **self.exports.state_dict(),
                "counters": dict(self.counters), "generator": self.generator.get_state().clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for learner, learner_state in zip(self.learners, state["learners"], strict=True):
            learner.load_state_dict(learner_state)
        if self.foundation is not None:
            self.foundation.load_state_dict(state["foundation"])
            self.f_opt.load_state_dict(copy.deepcopy(state["f_opt"]))
        self.version = int(state["version"])
        self.exports.load_state_dict(state)
        self.counters = {**self.counters, **state["counters"]}
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


def check_settings(values: dict[str, Any], prefix: str) -> None:
    """Settings that only fail together: a bank keys domains by the deployed stem, which scope 'all' trains."""
    if int(values["bank_size"]) > 1 and values["train_scope"] == "all":
        fail(join_key(prefix, "train_scope"), "all", "a bank (bank_size > 1) keys domains by the deployed stem, "
             "which scope 'all' would train; use 'norm' or 'head'")


PRESETS: dict[str, tuple[dict[str, Any], str, bool]] = {
    "cema-fleet": ({}, "CEMA for small edges under continual shift: edge BN adapt, teacher labels at arrival, "
                       "a scoped student with chunk-wise replay, a hard upload budget", True),
    "oracle": ({"teacher": "labels"}, "reference: cema-fleet's student trained on the uploads' true labels "
                                      "(what the edge model can hold at this budget); runtime=local only", False),
    "cema-bank": ({"bank_size": 16, "lr_foundation": 0.0, "bank_sure_steps": 16, "bank_sure_budget": 0.25},
                  "cema-fleet with a bank keyed by domain: each entry the fleet's student plus an offset only its "
                  "domain's uploads train; each edge batch runs the entry nearest its own domain key and uploads a "
                  "quarter of its budget near an entry 16 chunks have trained; the teacher only BN-adapts (its "
                  "entropy steps collapse it over a fleet's thousands of chunks)", True),
}


def _register() -> None:
    for name, (overrides, description, uses_foundation) in PRESETS.items():
        register_method(name, edge=functools.partial(FleetEdge, method=name),
                        cloud=functools.partial(FleetCloud, method=name),
                        settings=preset_settings(SETTINGS, overrides), description=description,
                        uses_foundation=uses_foundation, needs_labels=overrides.get("teacher") == "labels",
                        derive=check_settings, mixed_models=True)


_register()
