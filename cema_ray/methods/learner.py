"""One edge architecture's side of cema-fleet's cloud: its student and, with a bank, its bank of domain entries.

A fleet of one architecture has one `Learner`; a mixed fleet (`edges.groups[i].model`) has one per architecture.
The teacher labels each chunk once (methods/cema_fleet.py) and every learner learns from that chunk, so uploads from
every architecture teach every student.

A domain key is made from the statistics of the edge model's stem (algorithms/domain_key.py). Each architecture's
keys therefore live in their own space, and so does its bank:
- its own edges send keys in that space with their uploads, and those uploads wait in its queues, one per entry;
- a chunk made from another architecture's uploads is keyed here by this architecture's stem on the chunk's images.
  That costs one stem forward per chunk, and no second teacher forward.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from cema_ray.algorithms.domain_bank import DomainBank, bank_wire
from cema_ray.algorithms.domain_key import batch_keys, key_scale, normalise
from cema_ray.methods.base import NormState
from cema_ray.methods.common import model_device, use_norm_stats
from cema_ray.methods.student import Chunk, Gain, GroupLoss, Residual, Student
from cema_ray.methods.upload_queue import UploadQueue
from cema_ray.models.preprocess import to_input


class Learner:
    """A student of one edge architecture, and with ``bank_size`` > 1 a bank keyed in that architecture's stem
    space: an offset to the student per domain entry (`Residual`), the uploads waiting per entry, and the gains
    that gate what is sent (``bank_gate``)."""

    def __init__(self, template: nn.Module, settings: Mapping[str, Any], generator: torch.Generator) -> None:
        self.settings = s = settings
        self.student = Student(template, s, generator)
        size = int(s["bank_size"])
        self.bank = DomainBank(size, float(s["bank_radius"]), evict=s["bank_evict"]) if size > 1 else None
        self.residuals: list[Residual] = []  # a bank entry's offset to the student, by slot
        self.queues: list[UploadQueue] = [UploadQueue()]  # by slot (one without a bank)
        self.base_gain = Gain()  # the student against the deployed weights (`bank_gate`)
        if self.bank is not None:
            self.keyer = copy.deepcopy(template).eval()  # the deployed model: the edges' key, and the
            use_norm_stats(self.keyer, "batch")  # weights an edge runs without the cloud (BN adapt)
            self.scale = key_scale(self.keyer)

    # the bank ----------------------------------------------------------------------------------
    def slot_for(self, images: np.ndarray, key: np.ndarray | None = None) -> int:
        """The bank entry these images teach (0 without a bank). The entry is routed by ``key``, the domain key
        of the edge batch the images came from. When none came with them (uploads from another architecture, or
        from an older edge), the key is computed here from the images themselves, which is noisier because it
        uses only a few images. A new entry starts at zero offset (the student). A full bank first merges its
        two nearest entries, offsets and waiting uploads, into one."""
        if self.bank is None:
            return 0
        if key is None:
            key = normalise(batch_keys(self.keyer, to_input(images).to(model_device(self.keyer)))[0], self.scale)
        route = self.bank.route(np.asarray(key, np.float32))
        if route.new:
            if route.merged_into is not None:  # a full bank: the freed entry's offset and uploads join its neighbour
                kept, freed = route.merged_into, route.slot
                self.residuals[kept].merge(self.residuals[freed], *route.weights)
                self.queues[kept].extend(self.queues[freed])
                self.residuals[freed] = self._residual()
            else:
                self.residuals.append(self._residual())
                if route.slot >= len(self.queues):
                    self.queues.append(UploadQueue())
        return route.slot

    def _residual(self) -> Residual:
        s = self.settings
        return Residual(self.student.model, s["train_scope"], s["bank_lr"], s["momentum"], s["student_ema"])

    # learning ----------------------------------------------------------------------------------
    def learn(self, chunk: Chunk, slot: int, loss_of: GroupLoss) -> float:
        """One student step on a labelled chunk, through entry ``slot``'s offset when there is a bank. With
        ``bank_gate`` on, the chunk is scored before the step."""
        residual = self.residuals[slot] if self.bank is not None else None
        if residual is not None and self.settings["bank_gate"]:
            self._score(chunk[0], chunk[1].argmax(axis=1), residual)
        return self.student.learn(chunk, loss_of, residual)

    def _score(self, images: np.ndarray, teacher: np.ndarray, residual: Residual) -> None:
        """Before the step, three agreement rates with the teacher on this chunk: the student's, its entry's
        (student + offset), and the deployed weights' (BN adapt, what an edge runs without the cloud). The gains
        record the first two against the third."""
        model = self.student.model
        x = to_input(images).to(model_device(model))
        with torch.no_grad():
            deployed = float((self.keyer(x).argmax(1).cpu().numpy() == teacher).mean())
            base = float((model(x).argmax(1).cpu().numpy() == teacher).mean())
            with residual.added(model, self.settings["train_scope"]):
                entry = float((model(x).argmax(1).cpu().numpy() == teacher).mean())
        self.base_gain.add(base - deployed)
        residual.gain.add(entry - deployed)

    # publishing --------------------------------------------------------------------------------
    def export(self) -> NormState:
        """The student's scope parameters (the EMA's, if on). With a bank, every entry that has trained, each
        with its key, and the student as the base."""
        base = self.student.export()
        if self.bank is None:
            return base
        gate = bool(self.settings["bank_gate"])
        entries: dict[int, tuple[np.ndarray, NormState | None]] = {}
        for j, r in enumerate(self.residuals):
            if not r.steps:
                continue
            if gate and not r.gain.earns:
                entries[j] = (self.bank.keys[j], None)  # its domain runs the deployed weights
                continue
            offset = r.published()
            entries[j] = (self.bank.keys[j], {n: base[n] + offset[n].cpu().float().numpy() for n in base})
        steps = {j: r.steps for j, r in enumerate(self.residuals)} if self.settings["bank_sure_steps"] else None
        return bank_wire(entries, base if not gate or self.base_gain.earns else None, steps)

    def queued(self) -> int:
        return sum(q.size for q in self.queues)

    def reset(self) -> None:
        """The deployed student and no waiting uploads (a fleet without a bank; a bank is never reset)."""
        self.student.reset()
        for queue in self.queues:
            queue.clear()

    def state_dict(self) -> dict[str, Any]:
        return {"student": self.student.state_dict(), "residuals": [r.state_dict() for r in self.residuals],
                "queues": [q.state_dict() for q in self.queues],
                "bank": None if self.bank is None else self.bank.state_dict(),
                "base_gain": self.base_gain.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.student.load_state_dict(state["student"])
        self.residuals = []
        for r_state in state["residuals"]:
            self.residuals.append(self._residual())
            self.residuals[-1].load_state_dict(r_state)
        self.queues = [UploadQueue() for _ in state["queues"]]
        for q, q_state in zip(self.queues, state["queues"]):
            q.load_state_dict(q_state)
        if self.bank is not None:
            self.bank.load_state_dict(state["bank"])
        self.base_gain.load_state_dict(state["base_gain"])
