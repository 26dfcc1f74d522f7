"""Which published version each edge holds, so that a cloud sends an edge only what changed, at its cadence.

Every cloud trainer that publishes keeps a version counter. An edge downloads only when the version moved since it
last got one, and with ``publish_every`` K only after every K-th of its batches. One `ExportTracker` keeps that
bookkeeping for every trainer (cema, cema-fleet and the shared-model clouds), with its state for checkpoints.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping


class ExportTracker:
    """Per edge: the edge batches the cloud has seen and the version it last sent.

    ``publish_every``: K > 0 sends news only after every K-th batch of the edge (and never before its first);
    0 sends news whenever it is asked and the version moved."""

    def __init__(self, publish_every: int = 0) -> None:
        self.every = int(publish_every)
        self.batches: dict[int, int] = {}
        self.sent: dict[int, int] = {}

    def batch(self, edge_id: int) -> None:
        """The cloud has seen one more batch of ``edge_id``."""
        self.batches[int(edge_id)] = self.batches.get(int(edge_id), 0) + 1

    def due(self, edge_id: int, version: int) -> bool:
        """Whether ``edge_id`` gets ``version`` now. When it does, the version is recorded as sent."""
        edge_id = int(edge_id)
        if self.every:
            count = self.batches.get(edge_id, 0)
            if count == 0 or count % self.every:
                return False
        if self.sent.get(edge_id, 0) == version:
            return False
        self.sent[edge_id] = version
        return True

    def hold(self, edges: Iterable[int], version: int) -> None:
        """These edges already hold ``version`` (a reset edge runs the deployed model: nothing to send)."""
        for e in edges:
            self.sent[int(e)] = version

    def edges(self) -> set[int]:
        """Every edge seen, by a batch or an export."""
        return set(self.batches) | set(self.sent)

    def state_dict(self) -> dict[str, Any]:
        return {"batches": dict(self.batches), "sent": dict(self.sent)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.batches = {int(k): int(v) for k, v in state.get("batches", {}).items()}
        self.sent = {int(k): int(v) for k, v in state["sent"].items()}
