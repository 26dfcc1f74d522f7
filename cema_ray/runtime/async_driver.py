"""Async mode on Ray: edges run ahead of the cloud, uploads stream through a bounded backlog per cloud shard."""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from cema_ray.results.records import completed, undelivered
from cema_ray.runtime.cloud import Publication, for_edge, shard_of, track_newest
from cema_ray.runtime.cloud_link import CloudLink
from cema_ray.runtime.host_pool import HostPool
from cema_ray.runtime.journal import PartialWriter, ResumeJournal
from cema_ray.runtime.progress import RunProgress
from cema_ray.runtime.shards import average_states

Records = list[dict[str, Any]]
JOURNAL_EVERY_S = 10.0
"""Async journal cadence: at the first cloud checkpoint after this many seconds (a journal writes every edge's
snapshot and the table, too much for every checkpoint of a big fleet)."""


@dataclass(frozen=True)
class AsyncStart:
    """Where a resumed async run starts: the cloud's checkpoint round, what the hosts hold, and the publication
    log so far (the version lags of the batches kept)."""

    position: int
    pubs: list[Publication]
    newest: dict[int, int]
    pub_log: list[tuple[float, int, int]]
    redo_until: dict[int, int] = field(default_factory=dict)  # per edge: batches the interrupted run had recorded


@dataclass
class Lane:
    """One cloud shard as the async driver sees it: its link, the deliveries waiting for it, its calls."""

    link: CloudLink
    backlog: deque[tuple[list[Any], Records]] = field(default_factory=deque)  # (host steps' uploads, their records)
    calls: dict[Any, tuple[int, Records]] = field(default_factory=dict)  # ref -> (seq, records)
    redo: dict[int, Records] = field(default_factory=dict)  # failed deliveries to resend, by seq
    ping: Any = None  # outstanding `position` call while this shard is down
    merge: Any = None  # the shards' averaged foundation, sent with this shard's next delivery

    @property
    def busy(self) -> bool:
        return bool(self.calls or self.backlog or self.redo)


class AsyncDriver:
    """Edges run ahead: each host keeps up to `max_in_flight` steps queued, the cloud consumes uploads
    as they come, and each publication is broadcast as soon as it exists.

    Uploads wait in a bounded backlog while the cloud is busy (at most `CLOUD_IN_FLIGHT` deliveries
    outstanding) or down; past the bound the oldest are dropped and counted, so a slow or dead cloud
    never stalls the edges nor grows memory without bound. With `ray.uplink: follow` (runtime/uplink.py) the
    edges already send what the cloud trains, and past the bound the two oldest deliveries merge into one cloud
    call instead (up to `cloud.queue_capacity` uploads; drops only beyond). With `ray.backlog_full: wait` a host gets its
    next step only while the deliveries the cloud has not taken (backlog plus steps in flight) are
    below the bound (backpressure): nothing is dropped, and edges stay within a few steps of the cloud.
    A dead cloud is restarted from its checkpoint in the background: the driver keeps the hosts stepping
    with the weights they have, and when the cloud answers again it replays the deliveries the checkpoint
    misses, then resends the ones that failed.

    With `cloud.shards` N > 1 every shard is a `Lane` with its own backlog, calls and recovery: a host
    step's records are split by shard (edge e is shard e % N's) and each shard takes its own edges' uploads
    from the step's one upload object. A shard shares its foundation's norm state at most once in flight;
    when every shard has shared, the driver averages the states and sends the mean with each shard's next
    delivery, which applies it as a correction (`CloudService.merge`), so no shard rolls back what it
    learnt meanwhile.
    """

    CLOUD_IN_FLIGHT = 2

    def __init__(self, links: list[CloudLink], pool: HostPool, progress: RunProgress, max_in_flight: int,
                 wait_when_full: bool, partial: PartialWriter | None = None,
                 coalesce_uploads: int | None = None, journal: ResumeJournal | None = None,
                 start: AsyncStart | None = None, pin: Callable[[int], None] | None = None) -> None:
        """``coalesce_uploads``: past the backlog's bound, merge its two oldest deliveries into one (one cloud call
        for both: a cloud that pays per call keeps up with fast hosts) while it holds at most this many uploads,
        and drop only beyond that (`ray.uplink: follow`, where the edges' uploads already follow the cloud); None:
        drop the oldest delivery at once."""
        self.lanes = [Lane(link) for link in links]
        self.pool, self.progress, self.partial = pool, progress, partial
        self.max_in_flight = max_in_flight  # steps queued per host
        self.backlog_bound = max(2, 2 * len(pool))  # per shard
        self.wait_when_full = wait_when_full  # ray.backlog_full: wait (backpressure) instead of drop
        self.coalesce_uploads = coalesce_uploads
        self.coalesced = 0  # deliveries merged into an older one instead of dropped
        self.paused: deque[int] = deque()  # hosts whose next step waits for room in the backlog (wait mode)
        self.newest: dict[int, int] = {}
        self.latest_pubs: dict[int, Publication] = {}  # per student key: what a restored host must load
        self.pub_log: list[tuple[float, int, int]] = []  # (published at, student key, version)
        self.shares: dict[int, Any] = {}  # shard -> the foundation state it shared, until all have shared
        self.merges = 0
        self.dropped = 0
        self.max_backlog = 0
        self.uplink: float | None = None  # the newest advertised share (uploads/s per edge; one shard's if sharded)
        # resumable state, saved at a new cloud checkpoint at most every JOURNAL_EVERY_S; `pin` keeps that
        # checkpoint on the cloud's disk while newer ones come and go
        self.journal, self.journaled, self.pin, self.journal_at = journal, 0, pin, float("-inf")
        if start is not None:  # a resumed run: the hosts and the cloud hold the state of round `start.position`
            self.lanes[0].link.next_seq = self.journaled = start.position
            self.newest = dict(start.newest)
            self.latest_pubs = {p.key: p for p in start.pubs}
            self.pub_log = list(start.pub_log)

    def submit(self, i: int) -> None:
        when = self.pool.clock[i]  # the host's own step count is its fault-schedule clock
        self.pool.submit(i, self.newest, True, when, track=True)
        self.pool.inject_crashes(when, only=i)  # mid-step

    def run(self, uplink: dict[int, float] | None = None) -> int:
        """Step every host until all edges are done; returns the uploads dropped. ``uplink``: per shard, the
        share each edge starts with (runtime/uplink.py), loaded before any host steps."""
        if uplink:
            self.pool.broadcast(ray.put([]), uplink)  # actor calls run in order: before the hosts' first steps
        for i in range(len(self.pool)):
            for _ in range(self.max_in_flight):
                self.submit(i)
        owner = self.pool.owner
        while owner or self.paused or any(lane.busy for lane in self.lanes):
            waiting = [*owner, *(ref for lane in self.lanes for ref in lane.calls),
                       *(lane.ping for lane in self.lanes if lane.ping)]
            ready, _ = ray.wait(waiting, num_returns=1, timeout=1.0)
            for ref in ready:
                if ref in owner:
                    self._drain_host(owner[ref], ref)
                    continue
                for lane in self.lanes:
                    if ref in lane.calls:
                        self._cloud_done(lane, ref)
                    elif ref == lane.ping:
                        self._cloud_back(lane)
            self._dispatch()
            down = sum(1 for lane in self.lanes if lane.ping)
            self.progress.refresh(version=max(self.newest.values(), default=0),
                                  backlog=sum(len(lane.backlog) for lane in self.lanes),
                                  **({"cloud": "down" if len(self.lanes) == 1 else f"{down} down"} if down else {}))
            if self.partial is not None:
                self.partial.maybe(self.progress.recorder)
        return self.dropped

    def _drain_host(self, i: int, upto: Any) -> None:
        """Take host i's finished steps in the order they ran, up to `upto`; a failed one revives the host."""
        queue = self.pool.in_flight[i]
        while queue:
            records_ref, uploads_ref, snap_ref = queue.popleft()
            del self.pool.owner[records_ref]
            try:
                records, snap = ray.get([records_ref, snap_ref])
            except (RayActorError, RayTaskError) as exc:
                self._revive(i, exc)
                return
            self.pool.snapshots[i] = snap
            self.progress.predicted(len(records))
            self._host_records(i, records, uploads_ref)
            if records_ref == upto:
                return

    def _revive(self, i: int, exc: Exception) -> None:
        """Discard the host's later steps (they ran after the failure or will not run), restore, resubmit."""
        self.paused = deque(h for h in self.paused if h != i)  # resubmitted below
        self.pool.revive(i, exc, list(self.latest_pubs.values()))
        for _ in range(self.max_in_flight):
            self.submit(i)

    def _host_records(self, i: int, records: Records, uploads_ref: Any) -> None:
        if not records:
            return  # the host's edges are done: no more calls to it
        n = len(self.lanes)
        for k, lane in enumerate(self.lanes):
            mine = records if n == 1 else [r for r in records if shard_of(r["edge_id"], n) == k]
            if mine:
                lane.backlog.append(([uploads_ref], mine))
        if self.wait_when_full and self._pending() >= self.backlog_bound:
            self.paused.append(i)  # backpressure: this host's next step waits for the cloud
            self._note_backlog()
            return
        for lane in self.lanes:
            while len(lane.backlog) > self.backlog_bound:
                if self._coalesce(lane):
                    continue
                _, old = lane.backlog.popleft()  # oldest first: the freshest uploads matter most
                for rec in old:
                    self.dropped += rec["uploaded"]
                    self.progress.add(undelivered(rec))
        self._note_backlog()
        self.submit(i)

    def _coalesce(self, lane: Lane) -> bool:
        """Merge the lane's two oldest deliveries into one, if coalescing is on and the backlog's uploads fit."""
        if self.coalesce_uploads is None:
            return False
        if sum(rec["uploaded"] for _, recs in lane.backlog for rec in recs) > self.coalesce_uploads:
            return False
        refs_a, recs_a = lane.backlog.popleft()
        refs_b, recs_b = lane.backlog.popleft()
        lane.backlog.appendleft((refs_a + refs_b, recs_a + recs_b))
        self.coalesced += 1
        return True

    def _note_backlog(self) -> None:
        self.max_backlog = max(self.max_backlog, *(len(lane.backlog) for lane in self.lanes))

    def _dispatch(self) -> None:
        for lane in self.lanes:
            if lane.ping:
                continue  # this shard is down: its uploads wait in its backlog
            for seq in sorted(lane.redo):
                lane.calls[lane.link.send(seq)] = (seq, lane.redo.pop(seq))
            while lane.backlog and len(lane.calls) < self.CLOUD_IN_FLIGHT:
                refs, records = lane.backlog.popleft()
                seq, ref = lane.link.submit(None, refs, lane.merge)
                lane.merge = None
                lane.calls[ref] = (seq, records)
        while self.paused and self._pending() < self.backlog_bound:
            self.submit(self.paused.popleft())

    def _pending(self) -> int:
        """Deliveries the slowest shard has not taken: waiting in its backlog, or still being stepped by a host."""
        return max(len(lane.backlog) for lane in self.lanes) + len(self.pool.owner)

    def _cloud_done(self, lane: Lane, ref: Any) -> None:
        seq, records = lane.calls.pop(ref)
        try:
            delivery = ray.get(ref)
        except (RayActorError, RayTaskError) as exc:
            lane.link.raise_unless_recoverable(exc)
            lane.redo[seq] = records
            if lane.ping is None:
                lane.ping = lane.link.cloud.position.remote()
            return
        lane.link.delivered(seq, delivery)
        if delivery.shared is not None:
            self._share(self.lanes.index(lane), delivery.shared)
        for rec, steps, refused in zip(records, delivery.item_steps, delivery.item_refused, strict=True):
            self.progress.add(completed(rec, steps, refused))  # per batch, as sent
        if (self.journal is not None and delivery.checkpoint > self.journaled
                and time.monotonic() - self.journal_at >= JOURNAL_EVERY_S):
            self._journal(delivery.checkpoint)  # before this delivery's publications reach any edge
        uplink = None if delivery.uplink is None else {self.lanes.index(lane): delivery.uplink}
        if delivery.pubs:
            track_newest(self.newest, delivery.pubs)
            self.latest_pubs.update({p.key: p for p in delivery.pubs})
            self.pub_log += [(delivery.published_at, p.key, p.version)
                             for p in delivery.pubs]
        if delivery.pubs or uplink:
            self.pool.broadcast(ray.put(delivery.pubs), uplink)  # put once; every host gets the same reference
        if uplink:
            self.uplink = delivery.uplink

    def _journal(self, position: int) -> None:
        """The cloud has checkpointed round `position` (its state before this delivery's publications): save
        the hosts' snapshots (their last drained steps, which ran with older publications only), the records
        those steps made that the table does not hold yet, and the table so far. A resumed run restores the
        cloud at exactly this checkpoint, so no edge holds a version newer than the cloud's."""
        merged = {e: snap for host in self.pool.snapshots for e, snap in host.items()}
        pending = [dict(rec) for lane in self.lanes
                   for recs in [*(r for _, r in lane.backlog), *(r for _, r in lane.calls.values()),
                                *lane.redo.values()]
                   for rec in recs]
        self.journal.save_round(position, merged, list(self.latest_pubs.values()), self.newest, pending,
                                self.pub_log)
        if self.pin is not None:  # before the next delivery is sent: the cloud prunes only when it checkpoints
            self.pin(position)
        if self.partial is not None:
            self.partial.maybe(self.progress.recorder, force=True)
        self.journaled, self.journal_at = position, time.monotonic()

    def _share(self, shard: int, state: Any) -> None:
        """Keep a shard's shared foundation state; once every shard has shared, average them for the next round."""
        self.shares[shard] = state
        if len(self.shares) < len(self.lanes):
            return
        mean = ray.put(average_states([self.shares[k] for k in range(len(self.lanes))]))
        for lane in self.lanes:
            lane.merge = mean
        self.shares.clear()
        self.merges += 1

    def _cloud_back(self, lane: Lane) -> None:
        """The ping answered or failed: once every outstanding delivery has settled, replay and resend."""
        try:
            ray.get(lane.ping)
        except (RayActorError, GetTimeoutError):
            time.sleep(0.2)
            lane.ping = lane.link.cloud.position.remote()  # still restarting
            return
        lane.ping = None
        if lane.calls:  # deliveries sent before the crash: each failed or was applied
            ray.wait(list(lane.calls), num_returns=len(lane.calls), timeout=60)
            for ref in list(lane.calls):
                self._cloud_done(lane, ref)
        if lane.ping is None and lane.redo:
            lane.link.recover(min(lane.redo))

    def salvage(self, timeout_s: float = 10.0) -> int:
        """After Ctrl-C: put in the table every batch the hosts predicted that it lacks; returns the uploads
        this drops.

        An async batch is recorded only once the cloud has taken its uploads, so at an interrupt the batches in
        the backlog, in a cloud call, or in a host step that finished but was not drained yet would vanish.
        Finished host steps are taken (in order, up to the first that has not finished within `timeout_s`), the
        cloud calls in flight get the same time to settle, and what never reached the cloud is recorded with its
        uploads counted as dropped."""
        deadline = time.monotonic() + timeout_s
        for i, queue in enumerate(self.pool.in_flight):
            while queue:
                records_ref, uploads_ref, snap_ref = queue[0]
                left = max(0.0, deadline - time.monotonic())
                done, _ = ray.wait([records_ref, snap_ref], num_returns=2, timeout=left)
                if len(done) < 2:
                    break
                try:
                    records, snap = ray.get([records_ref, snap_ref])
                except (RayActorError, RayTaskError):
                    break  # a failed step predicted nothing the table keeps
                queue.popleft()
                del self.pool.owner[records_ref]
                self.pool.snapshots[i] = snap
                self.progress.predicted(len(records))
                for k, lane in enumerate(self.lanes):
                    mine = [r for r in records if shard_of(r["edge_id"], len(self.lanes)) == k]
                    if mine:
                        lane.backlog.append(([uploads_ref], mine))
        before = self.dropped
        for lane in self.lanes:
            if lane.calls and lane.ping is None:
                left = max(0.0, deadline - time.monotonic())
                ray.wait(list(lane.calls), num_returns=len(lane.calls), timeout=left)
            for ref in list(lane.calls):
                if ray.wait([ref], timeout=0)[0] and lane.ping is None:
                    self._cloud_done(lane, ref)  # settled: recorded as delivered (or moved to redo if it failed)
                if ref in lane.calls:
                    self._drop(lane.calls.pop(ref)[1])
            for _, records in lane.backlog:
                self._drop(records)
            for records in lane.redo.values():
                self._drop(records)
            lane.backlog.clear()
            lane.redo.clear()
        return self.dropped - before

    def _drop(self, records: Records) -> None:
        for rec in records:
            self.dropped += rec["uploaded"]
            self.progress.add(undelivered(rec))


def fix_lags(records: Records, pub_log: list[tuple[float, int, int]], shards: int) -> None:
    """Version lag measured after the fact: versions of the batch's student key published before the batch
    was predicted, minus the version it used (the driver's view at submission time would undercount).
    ``pub_log``: (published at, student key, version); a per-edge key wins over its shard's shared one."""
    by_key: dict[int, list[tuple[float, int]]] = {}
    for t, key, version in sorted(pub_log):
        by_key.setdefault(key, []).append((t, version))
    for rec in records:
        pubs = for_edge(by_key, rec["edge_id"], shards, [])
        newest = max((v for t, v in pubs if t <= rec["predicted_at"]), default=0)
        rec["version_lag"] = max(0, newest - rec["weight_version"])
