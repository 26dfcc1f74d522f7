"""One prepared edge model per process, borrowed by every virtual edge it hosts.

A virtual edge differs from its neighbours only by the few parameters the cloud published to it (norm
layers' affine parameters and statistics: a few KB), its filter state and its cursor, so an edge keeps
exactly that and borrows the process's one model for its forwards: `HostModel.use` loads an edge's state
into the model when the model holds another one. Edges that loaded the same publication hold the same
state object, so a host whose edges share a student switches only when a new version arrives, and a host
can run many such edges' batches as one forward (`HostModel.infer` with ``groups``, grouped TBR: every
batch normalised with its own statistics, bit for bit what separate forwards give).

`ForwardEdge` is the forward-only edge policy built on it: the methods say what to decide from the
logits (`decide`) and how a published state loads (`load`); borrowing, resets, snapshots and `fork`
(the next virtual edge of the host) are here once.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from cema_ray.methods.base import EdgePolicy, EdgeResult, NormState, check_edge_input
from cema_ray.models.norm import norm_state
from cema_ray.models.tbr import grouped_norm, tbr_layers

Loader = Callable[[nn.Module, Mapping[str, np.ndarray]], None]
_UNKNOWN: Mapping[str, np.ndarray] = {}  # `HostModel.loaded` while a load is under way


class HostModel:
    """The model every edge of a host borrows, and which edge state it holds right now."""

    def __init__(self, model: nn.Module, load: Loader) -> None:
        self.model = model
        self.load = load
        self.deployed = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.loaded: Mapping[str, np.ndarray] | None = None  # the state in the model (identity); None: deployed
        self.device = next((t.device for t in model.parameters()), torch.device("cpu"))
        self.adopts = _adopts(model)  # its next forward takes a batch's statistics as its running ones
        self.memo: dict[int, tuple[Any, Any]] = {}  # id(publication) -> (publication, what a policy derived once)

    def use(self, state: Mapping[str, np.ndarray] | None) -> nn.Module:
        """The model holding ``state`` (the deployed weights overlaid with it; None: the deployed weights)."""
        if state is not self.loaded:
            if self.loaded is not None:
                self.model.load_state_dict(self.deployed)
            self.loaded = _UNKNOWN  # until the load below succeeds (a refused state loads nothing next time)
            if state is not None:
                self.load(self.model, state)
            self.loaded = state
            self.adopts = _adopts(self.model)
        return self.model

    def infer(self, state: Mapping[str, np.ndarray] | None, x: torch.Tensor, groups: int = 1
              ) -> tuple[torch.Tensor, Mapping[str, np.ndarray] | None]:
        """Logits of ``x`` (``groups`` equal stacked batches, each normalised by itself) under ``state``, and
        the state to keep: a forward that adopted batch statistics changed the model, and the edge keeps what
        it now holds (one edge's batch only: an adopting state never runs grouped)."""
        model = self.use(state)
        adopting = self.adopts
        if adopting and groups > 1:
            raise ValueError("a state that adopts its first batch's statistics runs one edge at a time")
        with torch.inference_mode(), grouped_norm(model, groups):
            logits = model(x.to(self.device))
        if adopting:  # the norm layers' affine parameters and statistics: a publication's keys, so the next
            state = norm_state(model)  # publication replaces it whole and edges on it share one object again
            self.loaded, self.adopts = state, _adopts(model)
        return logits, state


def _adopts(model: nn.Module) -> bool:
    return any(not bool(m.stats_ready) for _, m in tbr_layers(model))


def overlay(current: Mapping[str, np.ndarray] | None, update: Mapping[str, np.ndarray]
            ) -> Mapping[str, np.ndarray]:
    """``current`` with ``update`` loaded on top: ``update`` itself (shared, not copied) when it covers every
    key of ``current``, which is what lets all edges on one publication hold one object."""
    if current is None or set(current) <= set(update):
        return update
    return {**current, **update}


class ForwardEdge(EdgePolicy):
    """A forward-only edge policy on a borrowed `HostModel`: subclasses provide `decide` and `fresh_state`."""

    def __init__(self, host: HostModel) -> None:
        self.host = host
        self.state: Mapping[str, np.ndarray] | None = None  # what this edge runs with on top of the deployed model

    @property
    def model(self) -> nn.Module:
        """The host's model, holding this edge's state."""
        return self.host.use(self.state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits, self.state = self.host.infer(self.state, x)
        return logits

    def decide(self, logits: torch.Tensor) -> EdgeResult:
        """Predictions and uploads from this edge's logits (its filters' state moves on)."""
        raise NotImplementedError

    def fresh_state(self) -> None:
        """Back to a new edge's own state (filters, counters): what `reset` and `fork` start from."""

    def process(self, x: torch.Tensor) -> EdgeResult:
        check_edge_input(x)
        return self.decide(self.forward(x))

    def fuse_key(self) -> tuple[int, int]:
        """Edges with equal keys run one forward together: same host model, same state object."""
        return id(self.host), id(self.state)

    def apply_update(self, state: NormState | None) -> None:
        """Keep the publication (loaded at once into the host's model: a state the model refuses fails here,
        naming the key, and the edges that take the same publication next find it loaded)."""
        if state:
            merged = overlay(self.state, state)
            self.host.use(merged)
            self.state = merged

    def reset(self) -> None:
        self.state = None
        self.fresh_state()

    def fork(self) -> "ForwardEdge":
        twin = copy.copy(self)
        twin.reset()
        return twin

    def snapshot(self) -> dict[str, Any]:
        return {"state": self.state}

    def restore(self, snap: dict[str, Any]) -> None:
        self.state = snap["state"]
