"""A cloud that scales out: `cloud.shards` cloud services, each serving a fixed subset of the edges.

Edge e belongs to shard e % N. Each shard has its own upload queue, replay, student(s), versions and
checkpoints, so N shards train on N cores at once. The foundation must stay one model, not N models that
drift apart: every `cloud.sync_every` rounds the shards' foundations are averaged (their norm layers'
affine parameters and statistics, the only part the foundation adapts; each shard keeps its optimiser's
momentum), which is federated averaging of the adapted part. Students are per shard by design: a shard's
publication (`Publication.shard`) reaches only its own edges.

`CloudShards` is the single-process form the local runner drives; on Ray each shard is its own actor and
the drivers do the same averaging through the deliveries (`Delivery.shared` out, the next delivery's
``merge`` in), so a local run and a sync Ray run with the same shards give the same records.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from cema_ray.methods.base import NormState
from cema_ray.runtime.cloud import CloudService, Publication, shard_of

__all__ = ["CloudShards", "average_states", "shard_of"]


def average_states(states: Sequence[NormState]) -> NormState:
    """The element-wise mean, summed in shard order in float32: the same bits on every runtime."""
    n = np.float32(len(states))
    out = {}
    for key in states[0]:
        total = np.asarray(states[0][key], np.float32).copy()
        for s in states[1:]:
            total += np.asarray(s[key], np.float32)
        out[key] = total / n
    return out


class CloudShards:
    """N `CloudService`s behind the one interface the local runner uses."""

    def __init__(self, services: list[CloudService], sync_every: int) -> None:
        self.services, self.sync_every = services, int(sync_every)
        self.last_refused = 0

    def _of(self, edge_id: int) -> CloudService:
        return self.services[shard_of(edge_id, len(self.services))]

    @property
    def device(self) -> str:
        return self.services[0].device

    def newest_version(self, edge_id: int) -> int:
        return self._of(edge_id).newest_version(edge_id)

    def receive(self, edge_id: int, images: np.ndarray, labels: np.ndarray | None = None,
                key: np.ndarray | None = None) -> int:
        service = self._of(edge_id)
        steps = service.receive(edge_id, images, labels, key)
        self.last_refused = service.last_refused
        return steps

    def reset(self, edge_id: int) -> None:
        self._of(edge_id).reset(edge_id)

    def end_round(self, edge_ids: list[int]) -> list[Publication]:
        """Every shard closes the round on its own edges; then, every `sync_every` rounds, the foundations
        are averaged (after the round's publications, as the Ray drivers do)."""
        n = len(self.services)
        pubs = [p for k, s in enumerate(self.services) for p in s.end_round([e for e in edge_ids if shard_of(e, n) == k])]
        if n > 1 and self.services[0].rounds % self.sync_every == 0:
            states = [s.share() for s in self.services]
            if states[0] is not None:
                merged = average_states(states)
                for s in self.services:
                    s.merge(merged)
        return pubs

    @property
    def stats(self) -> Any:
        """The shards' counters added up (the first shard's object when there is one)."""
        if len(self.services) == 1:
            return self.services[0].stats
        total = type(self.services[0].stats)()
        for s in self.services:
            for key, value in s.stats.__dict__.items():
                if key == "per_edge_steps":
                    total.per_edge_steps.update(value)
                else:
                    setattr(total, key, getattr(total, key) + value)
        return total
