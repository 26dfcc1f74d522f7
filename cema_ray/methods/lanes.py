"""Lanes: one cloud trainer per edge group, so that groups never share a student, a bank or a reset.

A fleet's groups can be far apart: in the quick start a group of mild, near-clean corruptions shares the cloud with
a group under severe ones. With one trainer, the mild group's batches run a student (or bank entries) fitted mostly
to the severe group's uploads, and end below what their own BN adapt gives; a reset edge resets the student every
other group runs. With ``method.lanes: group`` the cloud holds one trainer per group (`LanedCloud`), each fed only
by its own group's uploads and reset only by its own group's edges.

The transport does not change: the lanes' exports travel as one publication, each lane's parameters under
``lane.<index>.`` (methods/parts.py), and an edge loads only its own lane's part.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from cema_ray.methods.base import CloudTrainer, NormState
from cema_ray.methods.parts import LANE, view, wire


def lane_wire(parts: Mapping[int, NormState]) -> NormState:
    """The lanes' exports as one flat publication: ``lane.<index>.<parameter>``."""
    return wire(parts, LANE)


def lane_view(state: NormState, lane: int) -> NormState | None:
    """Lane ``lane``'s part of a publication (None: nothing new for it), made once per publication and lane."""
    return view(state, LANE, lane)


class LanedCloud(CloudTrainer):
    """One trainer per lane, each seeing only its lane's edges. ``lane_of``: every edge's lane index; ``make``:
    a fresh trainer for lane i (all are made up front, so every shard of a sharded cloud holds the same lanes)."""

    def __init__(self, make: Callable[[int], CloudTrainer], lane_of: Mapping[int, int]) -> None:
        self.lane_of = {int(e): int(lane) for e, lane in lane_of.items()}
        self.trainers = [make(i) for i in range(max(self.lane_of.values(), default=0) + 1)]
        self.needs_labels = self.trainers[0].needs_labels
        self.takes_keys = self.trainers[0].takes_keys
        self._first: dict[int, int] = {}  # per lane, the first edge that delivered a batch: whom its export asks for

    def _lane(self, edge_id: int) -> int:
        """The edge's lane; a negative id (the throwaway edge `CloudService.calibrate` times with) is lane 0's."""
        return 0 if int(edge_id) < 0 else self.lane_of[int(edge_id)]

    def ingest(self, edge_id: int, images: np.ndarray, *args: Any, **kwargs: Any) -> None:
        self.trainers[self._lane(edge_id)].ingest(edge_id, images, *args, **kwargs)

    def on_edge_batch(self, edge_id: int) -> int:
        lane = self._lane(edge_id)
        self._first.setdefault(lane, int(edge_id))
        return self.trainers[lane].on_edge_batch(edge_id)

    def export(self, edge_id: int) -> NormState | None:
        """Every lane whose trainer has something new (asked for the lane's first edge: one student per lane)."""
        parts = {lane: state for lane, first in sorted(self._first.items())
                 if (state := self.trainers[lane].export(first)) is not None}
        return lane_wire(parts) if parts else None

    def reset(self, edge_id: int | None = None) -> None:
        """Only the reset edge's lane (all lanes when None)."""
        for lane in range(len(self.trainers)) if edge_id is None else [self._lane(edge_id)]:
            self.trainers[lane].reset(edge_id)

    def queued(self) -> int:
        return sum(t.queued() for t in self.trainers)

    def shared_state(self) -> NormState | None:
        parts = {lane: state for lane, t in enumerate(self.trainers) if (state := t.shared_state()) is not None}
        return lane_wire(parts) if parts else None

    def load_shared_state(self, state: NormState) -> None:
        for lane, trainer in enumerate(self.trainers):
            part = lane_view(state, lane)
            if part is not None:
                trainer.load_shared_state(part)

    def state_dict(self) -> dict[str, Any]:
        return {"lanes": [t.state_dict() for t in self.trainers], "first": dict(self._first)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for trainer, lane_state in zip(self.trainers, state["lanes"], strict=True):
            trainer.load_state_dict(lane_state)
        self._first = {int(k): int(v) for k, v in state["first"].items()}
