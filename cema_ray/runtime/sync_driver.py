"""Sync mode on Ray: the reference rounds with the edges spread over hosts.

All hosts predict in parallel, the cloud ingests the uploads in ascending edge id, publishes once, and
the driver puts each publication into the object store once and hands every host the same reference.
The driver owns those objects, so they outlive a cloud actor's failure.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from cema_ray.results.records import completed
from cema_ray.runtime.actor_calls import MAX_RECOVERIES_PER_ROUND
from cema_ray.runtime.cloud import Publication, track_newest
from cema_ray.runtime.cloud_link import CloudLink
from cema_ray.runtime.host_pool import HostPool
from cema_ray.runtime.journal import PartialWriter, ResumeJournal
from cema_ray.runtime.progress import RunProgress
from cema_ray.runtime.ray_actors import Delivery
from cema_ray.runtime.shards import average_states


@dataclass
class ResumePoint:
    """Where a resumed sync run continues: the round, and the publications and versions the hosts hold."""

    position: int
    pubs: list[Publication]
    newest: dict[int, int]
    merge: Any = None  # a sharded cloud's averaged foundation, due with the round's delivery
    redo_until: dict[int, int] = field(default_factory=dict)  # per edge: batches the interrupted run had recorded


class SyncDriver:
    """Reference rounds on Ray: hosts predict in parallel, the cloud ingests in edge order, one publication.

    After every round each host hands back a snapshot of its edges. A host that dies (a crash, an
    OOM kill, `ray.kill`) is restarted by Ray (`max_restarts=-1`); the driver restores its edges from
    the previous round's snapshot, re-sends the newest publication and reruns its step, so every
    batch is predicted exactly once and the run goes on. A dead cloud is restarted from its
    checkpoint and replayed up to the round it died in (`CloudLink`), so a run with faults gives the
    records an undisturbed run gives.
    """

    def __init__(self, links: list[CloudLink], pool: HostPool, progress: RunProgress, lengths: dict[int, int],
                 journal: ResumeJournal | None = None, every: int = 0, partial: PartialWriter | None = None,
                 start: ResumePoint | None = None) -> None:
        """``links``: one per cloud shard (`cloud.shards`); every round goes to each, which takes its own edges."""
        self.links, self.pool, self.progress = links, pool, progress
        self.merge: Any = None  # the shards' averaged foundation, loaded with the next delivery
        self.lengths = lengths  # batches per edge: edge e takes part in rounds 0 .. lengths[e] - 1
        self.journal, self.every, self.partial = journal, every, partial
        self.latest_pubs: list[Publication] = []
        self.pubs_ref: Any = None  # the last round's publications, sent with the next round's steps
        self.newest: dict[int, int] = {}
        self.first_round = 0
        # wall seconds of the rounds' two phases: the hosts predicting, the cloud (every shard) ingesting; a
        # sync round runs them one after the other, so a faster cloud speeds up only its own phase
        self.phase_seconds = {"edges": 0.0, "cloud": 0.0}
        if start is not None:  # a resumed run: the hosts hold round `start.position`'s state already
            self.first_round = start.position
            for link in self.links:
                link.next_seq = start.position
            self.latest_pubs, self.newest, self.merge = start.pubs, dict(start.newest), start.merge

    def run(self) -> None:
        for round_index in range(self.first_round, max(self.lengths.values(), default=0)):
            self._journal(round_index)
            edge_ids = sorted(e for e, n in self.lengths.items() if n > round_index)
            newest, pubs_ref = dict(self.newest), self.pubs_ref
            steps = [functools.partial(self.pool.submit, i, newest, False, round_index, pubs_ref)
                     for i in range(len(self.pool))]  # each host's step, again after a revival
            t0 = time.perf_counter()
            calls = [step() for step in steps]
            self.pool.inject_crashes(round_index)  # mid-step
            outs = [self.pool.result(i, call, self.latest_pubs, steps[i]) for i, call in enumerate(calls)]
            t1 = time.perf_counter()
            delivery = self._deliver(edge_ids, [o[1] for o in outs])
            self.phase_seconds["edges"] += t1 - t0
            self.phase_seconds["cloud"] += time.perf_counter() - t1
            self.pubs_ref = None
            if delivery.pubs:
                self.latest_pubs = delivery.pubs
                track_newest(self.newest, delivery.pubs)
                self.pubs_ref = ray.put(delivery.pubs)  # put once; every host loads it with its next step
            for i, (records, _, snap) in enumerate(outs):
                self.pool.snapshots[i] = snap
                for rec in records:
                    self.progress.add(completed(rec, delivery.steps.get(rec["edge_id"], 0),
                                                delivery.refused.get(rec["edge_id"], 0)))
            self.progress.refresh()
            if self.partial is not None:
                self.partial.maybe(self.progress.recorder)

    def _journal(self, round_index: int) -> None:
        """At a round the cloud checkpoints at, put the hosts' state and the records so far on disk first."""
        if self.journal is None or not round_index or round_index % self.every or round_index == self.first_round:
            return
        merged = {e: snap for host in self.pool.snapshots for e, snap in host.items()}
        self.journal.save_round(round_index, merged, self.latest_pubs, self.newest)
        if self.partial is not None:
            self.partial.maybe(self.progress.recorder, force=True)

    def _deliver(self, edge_ids: list[int], uploads: list[Any]) -> Delivery:
        """The round to every shard at once; their deliveries settled one by one (each recovers by itself), then
        joined, and at a sync round the shards' foundations averaged for the next delivery."""
        sent = [link.submit(edge_ids, uploads, self.merge) for link in self.links]
        deliveries = [self._settle(link, seq, ref) for link, (seq, ref) in zip(self.links, sent)]
        if len(deliveries) == 1:
            return deliveries[0]
        shared = [d.shared for d in deliveries]
        self.merge = average_states(shared) if shared[0] is not None else None
        return Delivery(steps={e: n for d in deliveries for e, n in d.steps.items()},
                        pubs=[p for d in deliveries for p in d.pubs],
                        checkpoint=min(d.checkpoint for d in deliveries),
                        published_at=max(d.published_at for d in deliveries),
                        refused={e: n for d in deliveries for e, n in d.refused.items()})

    def _settle(self, link: CloudLink, seq: int, ref: Any) -> Delivery:
        for _ in range(MAX_RECOVERIES_PER_ROUND):
            try:
                delivery = ray.get(ref)
                link.delivered(seq, delivery)
                return delivery
            except (RayActorError, RayTaskError) as exc:
                link.raise_unless_recoverable(exc)
                link.recover(seq)
                ref = link.send(seq)
        raise RuntimeError(f"the cloud kept failing: gave up after {MAX_RECOVERIES_PER_ROUND} restarts")
