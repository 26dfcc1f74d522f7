"""cema-fleet's student: a copy of the edge model trained in a publish scope, with its optimiser, EMA and replay.

A cloud with one student for the fleet holds one; a cloud with a domain bank holds one per bank entry, each
trained only on its domain's uploads and published as that entry. Everything a student owns (its weights, SGD
momentum, EMA, replayed chunks) moves together, so an entry that is reset or evicted starts whole from the
deployed weights.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from cema_ray.methods.base import NormState
from cema_ray.methods.common import tensor_state, use_norm_stats
from cema_ray.models.publish import scope_parameters, scope_state, train_only

Chunk = tuple[np.ndarray, np.ndarray]  # (uint8 images, teacher probabilities)
GroupLoss = Callable[[nn.Module, np.ndarray, np.ndarray], torch.Tensor]


class ChunkReplay:
    """Stored (images, teacher probabilities) chunks; draws whole chunks so each replayed forward
    sees one time window. Holds at most ``capacity`` samples; the oldest chunks leave first."""

    def __init__(self, capacity: int, generator: torch.Generator) -> None:
        self.capacity, self.generator = int(capacity), generator
        self.chunks: list[Chunk] = []
        self.size = 0

    def add(self, images: np.ndarray, targets: np.ndarray) -> None:
        self.chunks.append((images, targets))
        self.size += len(images)
        while self.size > self.capacity and len(self.chunks) > 1:
            self.size -= len(self.chunks.pop(0)[0])

    def draw(self, k: int, window: int = 0) -> list[Chunk]:
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


class Student:
    """The edge model's copy trained on teacher labels in ``train_scope``; publishes its EMA (or itself)."""

    def __init__(self, template: nn.Module, settings: Mapping[str, Any], generator: torch.Generator) -> None:
        s = self.settings = settings
        self.model = copy.deepcopy(template).eval()
        use_norm_stats(self.model, "batch")
        self.scope = s["train_scope"]
        self.opt = torch.optim.SGD(train_only(self.model, self.scope), lr=float(s["lr_student"]),
                                   momentum=float(s["momentum"]), weight_decay=float(s["weight_decay"]))
        self.deployed = {n: p.detach().clone() for n, p in scope_parameters(self.model, self.scope)}
        self.init = tensor_state(self.model)
        self.ema = None if not s["student_ema"] else copy.deepcopy(self.deployed)
        self.replay = ChunkReplay(s["replay_capacity"], generator)
        self.steps = 0

    def learn(self, chunk: Chunk, loss_of: GroupLoss) -> float:
        """One step on a new chunk (with replayed ones, when on): ``student_steps`` SGD steps, then the EMA."""
        s = self.settings
        if s["replay_chunks"] > 0:  # without replay, keeping the uploads would only cost memory
            self.replay.add(*chunk)
        groups = [chunk, *self.replay.draw(int(s["replay_chunks"]), int(s["replay_window"]))]
        self.model.train()
        for _ in range(int(s["student_steps"])):
            loss = sum(loss_of(self.model, i, t) for i, t in groups) / len(groups)
            if s["anchor"] > 0:
                loss = loss + float(s["anchor"]) * sum(((p - self.deployed[n]) ** 2).sum()
                                                       for n, p in scope_parameters(self.model, self.scope))
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        self.model.eval()
        if self.ema is not None:
            d = float(s["student_ema"])
            with torch.no_grad():
                for n, p in scope_parameters(self.model, self.scope):
                    self.ema[n].mul_(d).add_(p.detach(), alpha=1 - d)
        self.steps += 1
        return float(loss.detach())

    def export(self) -> NormState:
        """What goes down the wire: the scope's parameters (the EMA's, if on) as float32 numpy."""
        if self.ema is not None:
            return {n: v.detach().cpu().float().numpy().copy() for n, v in self.ema.items()}
        return scope_state(self.model, self.scope)

    def start_from(self, other: "Student") -> None:
        """Take ``other``'s weights and EMA (a new bank entry starts from the fleet's student), with no momentum
        and no replay of its own."""
        self.model.load_state_dict(other.model.state_dict())
        self.opt.state.clear()
        self.ema = copy.deepcopy(other.ema)
        self.replay.clear()

    def reset(self) -> None:
        """The deployed weights, no momentum, no replay."""
        self.model.load_state_dict(self.init)
        self.opt.state.clear()
        self.ema = None if self.ema is None else copy.deepcopy(self.deployed)
        self.replay.clear()
        self.steps = 0

    def state_dict(self) -> dict[str, Any]:
        return {"student": tensor_state(self.model), "s_opt": copy.deepcopy(self.opt.state_dict()),
                "ema": copy.deepcopy(self.ema), "replay": self.replay.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["student"])
        self.opt.load_state_dict(copy.deepcopy(state["s_opt"]))
        self.ema = copy.deepcopy(state["ema"])
        self.replay.load_state_dict(state["replay"])
        self.steps = int(state.get("steps", 0))
