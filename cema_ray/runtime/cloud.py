"""The cloud side of a run: a method's `CloudTrainer` plus versioning, queue bounds and accounting.

Versions are numbered per student: one counter when all edges share a student, one per edge
otherwise. A publication is what an edge loads; its version lets every batch record which
parameters it was predicted with and how far behind the newest it was.
"""
from __future__ import annotations

import contextlib
import copy
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Mapping, TypeVar

import numpy as np

from cema_ray.methods.base import CloudTrainer, NormState
from cema_ray.models.norm import state_nbytes

SHARED = -1  # the student key when every edge shares one student (shard k's shared student: SHARED - k)


T = TypeVar("T")


def shard_of(edge_id: int, shards: int) -> int:
    """The cloud shard that serves edge ``edge_id`` (`cloud.shards`)."""
    return int(edge_id) % int(shards)


def student_key(edge_id: int | None, shard: int = 0) -> int:
    """Whose versions a publication counts: its edge's (a student per edge) or its shard's shared student."""
    return SHARED - int(shard) if edge_id is None else int(edge_id)


def for_edge(by_key: Mapping[int, T], edge_id: int, shards: int, default: T) -> T:
    """What ``by_key`` (keyed by `student_key`) holds for an edge: under its own student's key when it has one,
    else under its shard's shared student's."""
    return by_key.get(edge_id, by_key.get(student_key(None, shard_of(edge_id, shards)), default))


@dataclass
class Publication:
    """Parameters to load, the version they are, and which edges they are for (None = every edge of the shard)."""

    state: NormState
    version: int
    edge_id: int | None
    shard: int = 0  # the cloud shard that published it (`cloud.shards`; edge e belongs to shard e % shards)

    @property
    def nbytes(self) -> int:
        return state_nbytes(self.state)

    @property
    def key(self) -> int:
        return student_key(self.edge_id, self.shard)

    def reaches(self, edge_id: int, shards: int) -> bool:
        """Whether edge ``edge_id`` loads it."""
        return edge_id == self.edge_id if self.edge_id is not None else shard_of(edge_id, shards) == self.shard

    def targets(self, edges_by_id: Mapping[int, T], shards: int) -> list[T]:
        """The edges among ``edges_by_id`` that load it, in their order."""
        if self.edge_id is not None:
            return [edges_by_id[self.edge_id]] if self.edge_id in edges_by_id else []
        return [edge for edge_id, edge in edges_by_id.items() if self.reaches(edge_id, shards)]


@dataclass
class CloudStats:
    steps: int = 0
    ingested: int = 0
    dropped: int = 0
    publications: int = 0
    step_seconds: float = 0.0
    per_edge_steps: dict[int, int] = field(default_factory=dict)


class CloudService:
    """Receives uploads, runs the trainer, publishes versions (every `publish_every` rounds)."""

    def __init__(self, trainer: CloudTrainer, student_scope: str, publish_every: int, queue_capacity: int,
                 autocast: Callable[[], ContextManager[Any]] = contextlib.nullcontext, device: str = "cpu",
                 shard: int = 0) -> None:
        """``autocast``: the context the trainer's steps run in (`cloud.amp` on CUDA); ``device``: where they run;
        ``shard``: which shard of the cloud this is (its publications say so)."""
        self.shard = shard
        self.trainer = trainer
        self.autocast, self.device = autocast, device
        self.per_edge = student_scope == "per_edge"
        self.publish_every = publish_every
        self.queue_capacity = queue_capacity
        self.versions: dict[int, int] = {}
        self.stats = CloudStats()
        self.last_refused = 0  # samples of the last receive() the full queue refused
        self.rounds = 0
        self.shared_sent: tuple[int, NormState] | None = None  # (round, state) of a share not merged yet

    def newest_version(self, edge_id: int) -> int:
        return self.versions.get(edge_id if self.per_edge else SHARED, 0)

    def receive(self, edge_id: int, images: np.ndarray, labels: np.ndarray | None = None,
                key: np.ndarray | None = None) -> int:
        """Ingest one edge batch's uploads and run the steps they make due; returns steps taken.

        ``labels`` (the uploads' true labels) reach only a trainer that declares ``needs_labels``: the
        oracle reference of the single-process runner. No real method ever sees them. ``key``: the edge
        batch's domain key, for a trainer that ``takes_keys``."""
        room = max(0, self.queue_capacity - self.trainer.queued())
        accepted = images[:room]  # a full queue refuses the excess: counted, never silently lost
        self.last_refused = len(images) - len(accepted)  # the batch's own drops, for its record
        self.stats.dropped += self.last_refused
        self.stats.ingested += len(accepted)
        t0 = time.perf_counter()
        with self.autocast():
            if len(accepted):
                extra = {"key": key} if self.trainer.takes_keys else {}
                if self.trainer.needs_labels:
                    self.trainer.ingest(edge_id, accepted, None if labels is None else labels[:room], **extra)
                else:
                    self.trainer.ingest(edge_id, accepted, **extra)
            steps = self.trainer.on_edge_batch(edge_id)
        self.stats.step_seconds += time.perf_counter() - t0
        self.stats.steps += steps
        self.stats.per_edge_steps[edge_id] = self.stats.per_edge_steps.get(edge_id, 0) + steps
        return steps

    def reset(self, edge_id: int) -> None:
        self.trainer.reset(edge_id)

    def end_round(self, edge_ids: list[int]) -> list[Publication]:
        """Close a round; every `publish_every` rounds export what the edges must load."""
        self.rounds += 1
        if self.rounds % self.publish_every:
            return []
        keys = edge_ids if self.per_edge else [edge_ids[0]] if edge_ids else []
        pubs = []
        for edge_id in keys:
            state = self.trainer.export(edge_id)
            if state is None:
                continue
            key = edge_id if self.per_edge else SHARED
            self.versions[key] = self.versions.get(key, 0) + 1
            pubs.append(Publication(state, self.versions[key], edge_id if self.per_edge else None, self.shard))
        self.stats.publications += len(pubs)
        return pubs

    def calibrate(self, image_shape: tuple[int, ...], uploads: int = 64, repeats: int = 3) -> float | None:
        """Uploads per second this cloud trains, timed on a throwaway copy of its trainer fed random images as one
        edge batch (the median of the repeats after the first, which pays torch's warm-up): the raw compute limit,
        before any edge competes for the CPU. None for a trainer that needs the stream's labels (local only)."""
        if self.trainer.needs_labels:
            return None
        trainer = copy.deepcopy(self.trainer)
        images = np.random.default_rng(0).integers(0, 256, (uploads, *image_shape), dtype=np.uint8)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            with self.autocast():
                trainer.ingest(-1, images)
                trainer.on_edge_batch(-1)
            times.append(time.perf_counter() - t0)
        return uploads / statistics.median(times[1:] or times)

    def share(self) -> NormState | None:
        """The foundation's shared state, for the shards' average (`cloud.shards`), or None while an earlier
        share waits for its mean (one share in flight per shard) or for a trainer without a foundation."""
        if self.shared_sent is not None:
            return None
        state = self.trainer.shared_state()
        if state is not None:
            self.shared_sent = (self.rounds, {k: np.array(v, copy=True) for k, v in state.items()})
        return state

    def merge(self, mean: NormState) -> None:
        """Take the shards' mean of the states they shared. Arriving before any further delivery (sync rounds,
        the local runner) it is loaded as is; arriving later (async mode) it is applied as a correction,
        current + (mean - what this shard sent), so the deliveries made meanwhile are not rolled back."""
        if self.shared_sent is None or self.shared_sent[0] == self.rounds:
            self.trainer.load_shared_state(mean)
        else:
            sent, current = self.shared_sent[1], self.trainer.shared_state()
            self.trainer.load_shared_state({k: np.asarray(current[k], np.float32)
                                            + (np.asarray(mean[k], np.float32) - np.asarray(sent[k], np.float32))
                                            for k in mean})
        self.shared_sent = None

    def state_dict(self) -> dict[str, Any]:
        return {"trainer": self.trainer.state_dict(), "versions": dict(self.versions), "rounds": self.rounds,
                "stats": self.stats.__dict__.copy(), "shared_sent": self.shared_sent}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.trainer.load_state_dict(state["trainer"])
        self.versions = dict(state["versions"])
        self.rounds = state["rounds"]
        self.stats = CloudStats(**state["stats"])
        self.shared_sent = state.get("shared_sent")


def track_newest(newest: dict[int, int], pubs: list[Publication]) -> None:
    """Raise each student key's newest version to what these publications carry."""
    for pub in pubs:
        newest[pub.key] = max(newest.get(pub.key, 0), pub.version)
