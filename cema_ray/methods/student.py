"""cema-fleet's student: a copy of the edge model trained in a publish scope, with its optimiser, EMA and replay.

Every cema-fleet cloud holds one `Student`, trained on every upload. A cloud with a domain bank adds a
`Residual` per bank entry: the domain's offset to the student in the publish scope, trained by the same gradient
on that domain's chunks. An entry is the student plus its offset, so every domain keeps what the whole fleet
taught the student (one shared student's strength: most of what a corruption needs is common to all) and adds
what only its own uploads taught; a new entry starts at zero offset, exactly where one shared student would be,
and the cloud still takes one student step per chunk.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable, Iterator, Mapping

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

    def learn(self, chunk: Chunk, loss_of: GroupLoss, residual: "Residual | None" = None) -> float:
        """One step on a new chunk (with replayed ones, when on): ``student_steps`` SGD steps, then the EMA.

        ``residual``: the forward runs with it added to the scope's parameters, and one gradient trains both
        (this student, shared by every domain, and the domain's own residual)."""
        s = self.settings
        if s["replay_chunks"] > 0:  # without replay, keeping the uploads would only cost memory
            self.replay.add(*chunk)
        groups = [chunk, *self.replay.draw(int(s["replay_chunks"]), int(s["replay_window"]))]
        self.model.train()
        for _ in range(int(s["student_steps"])):
            self.opt.zero_grad(set_to_none=True)
            with contextlib.nullcontext() if residual is None else residual.added(self.model, self.scope):
                loss = sum(loss_of(self.model, i, t) for i, t in groups) / len(groups)
                if s["anchor"] > 0:
                    loss = loss + float(s["anchor"]) * sum(((p - self.deployed[n]) ** 2).sum()
                                                           for n, p in scope_parameters(self.model, self.scope))
                loss.backward()
            if residual is not None:
                residual.step(self.model, self.scope)
            self.opt.step()
        self.model.eval()
        if residual is not None:
            residual.average()
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


class Residual:
    """One domain's offset to the fleet's student, in the publish scope: what a bank entry adds to the student
    every domain trains. A new entry starts at zero (it is the fleet's student), so an entry can only start where
    one shared student is; the same gradient that trains the shared student on a chunk of this domain trains the
    offset (SGD with momentum at ``lr``), and an EMA of it is what goes down the wire."""

    def __init__(self, model: nn.Module, scope: str, lr: float, momentum: float, ema: float) -> None:
        self.lr, self.momentum, self.decay = float(lr), float(momentum), float(ema)
        self.delta = {n: torch.zeros_like(p.detach()) for n, p in scope_parameters(model, scope)}
        self.buf = {n: torch.zeros_like(v) for n, v in self.delta.items()}
        self.ema = {n: torch.zeros_like(v) for n, v in self.delta.items()}
        self.steps = 0
        self.gain = Gain()

    @contextlib.contextmanager
    def added(self, model: nn.Module, scope: str) -> Iterator[None]:
        """The model's scope parameters plus this offset, for the forward and backward inside."""
        params = dict(scope_parameters(model, scope))
        with torch.no_grad():
            for n, d in self.delta.items():
                params[n].add_(d)
        try:
            yield
        finally:
            with torch.no_grad():
                for n, d in self.delta.items():
                    params[n].sub_(d)

    def step(self, model: nn.Module, scope: str) -> None:
        """SGD with momentum on the offset, from the gradient the shared student's parameters hold."""
        with torch.no_grad():
            for n, p in scope_parameters(model, scope):
                if p.grad is not None:
                    self.buf[n].mul_(self.momentum).add_(p.grad)
                    self.delta[n].sub_(self.lr * self.buf[n])
        self.steps += 1

    def average(self) -> None:
        with torch.no_grad():
            for n, d in self.delta.items():
                self.ema[n].mul_(self.decay).add_(d, alpha=1 - self.decay)

    def merge(self, other: "Residual", w_self: int, w_other: int) -> None:
        """Become the weighted mean of this offset and ``other`` (two bank entries merged into one)."""
        a, b = w_self / (w_self + w_other), w_other / (w_self + w_other)
        with torch.no_grad():
            for mine, theirs in ((self.delta, other.delta), (self.buf, other.buf), (self.ema, other.ema)):
                for n in mine:
                    mine[n].mul_(a).add_(theirs[n], alpha=b)
        self.steps += other.steps
        self.gain.merge(other.gain)

    def published(self) -> dict[str, torch.Tensor]:
        return self.ema if self.decay > 0 else self.delta

    def state_dict(self) -> dict[str, Any]:
        return {"delta": copy.deepcopy(self.delta), "buf": copy.deepcopy(self.buf), "ema": copy.deepcopy(self.ema),
                "steps": self.steps, "gain": self.gain.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.delta, self.buf = copy.deepcopy(state["delta"]), copy.deepcopy(state["buf"])
        self.ema, self.steps = copy.deepcopy(state["ema"]), int(state["steps"])
        self.gain.load_state_dict(state["gain"])


class Gain:
    """How much better than the deployed weights a state agrees with the teacher on chunks it has not trained on
    yet (each chunk is scored before its step): the running mean of (its agreement - the deployed weights'),
    over the last ~``window`` chunks. A state that does not earn more than the deployed weights (a domain the
    edge's own BN adapt already handles, or one the teacher does not know better) is not worth sending."""

    def __init__(self, window: int = 50) -> None:
        self.window, self.mean, self.count = int(window), 0.0, 0

    def add(self, value: float) -> None:
        self.count += 1
        self.mean += (value - self.mean) / min(self.count, self.window)

    def merge(self, other: "Gain") -> None:
        total = self.count + other.count
        if total:
            self.mean = (self.mean * self.count + other.mean * other.count) / total
        self.count = total

    @property
    def earns(self) -> bool:
        """Better than the deployed weights so far (no evidence yet: yes, as a shared student is trusted)."""
        return self.count == 0 or self.mean > 0

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "count": self.count}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.mean, self.count = float(state["mean"]), int(state["count"])
