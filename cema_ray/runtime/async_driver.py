"""Async mode on Ray: edges run ahead of the cloud, uploads stream through a bounded backlog."""
from __future__ import annotations

import time
from collections import deque
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from cema_ray.runtime.cloud import SHARED, Publication, track_newest
from cema_ray.runtime.cloud_link import CloudLink
from cema_ray.runtime.host_pool import HostPool
from cema_ray.runtime.journal import PartialWriter
from cema_ray.runtime.progress import RunProgress


class AsyncDriver:
    """Edges run ahead: each host keeps up to `max_in_flight` steps queued, the cloud consumes uploads
    as they come, and each publication is broadcast as soon as it exists.

    Uploads wait in a bounded backlog while the cloud is busy (at most `CLOUD_IN_FLIGHT` deliveries
    outstanding) or down; past the bound the oldest are dropped and counted, so a slow or dead cloud
    never stalls the edges nor grows memory without bound. With `ray.backlog_full: wait` a host gets its
    next step only while the deliveries the cloud has not taken (backlog plus steps in flight) are
    below the bound (backpressure): nothing is dropped, and edges stay within a few steps of the cloud.
    A dead cloud is restarted from its checkpoint in the background: the driver keeps the hosts stepping
    with the weights they have, and when the cloud answers again it replays the deliveries the checkpoint
    misses, then resends the ones that failed.
    """

    CLOUD_IN_FLIGHT = 2

    def __init__(self, link: CloudLink, pool: HostPool, progress: RunProgress, max_in_flight: int,
                 wait_when_full: bool, partial: PartialWriter | None = None) -> None:
        self.link, self.pool, self.progress, self.partial = link, pool, progress, partial
        self.max_in_flight = max_in_flight  # steps queued per host
        self.backlog_bound = max(2, 2 * len(pool))
        self.wait_when_full = wait_when_full  # ray.backlog_full: wait (backpressure) instead of drop
        self.paused: deque[int] = deque()  # hosts whose next step waits for room in the backlog (wait mode)
        self.newest: dict[int, int] = {}
        self.latest_pubs: dict[int, Publication] = {}  # per student key: what a restored host must load
        self.pub_log: list[tuple[float, int, int]] = []  # (published at, student key, version)
        self.cloud_calls: dict[Any, tuple[int, list[dict[str, Any]]]] = {}  # ref -> (seq, records)
        self.backlog: deque[tuple[Any, list[dict[str, Any]]]] = deque()
        self.redo: dict[int, list[dict[str, Any]]] = {}  # failed deliveries to resend, by seq
        self.ping: Any = None  # outstanding `position` call while the cloud is down
        self.dropped = 0
        self.max_backlog = 0

    def submit(self, i: int) -> None:
        when = self.pool.clock[i]  # the host's own step count is its fault-schedule clock
        self.pool.submit(i, self.newest, True, when, track=True)
        self.pool.inject_crashes(when, only=i)  # mid-step

    def run(self) -> int:
        for i in range(len(self.pool)):
            for _ in range(self.max_in_flight):
                self.submit(i)
        owner = self.pool.owner
        while owner or self.cloud_calls or self.backlog or self.redo or self.paused:
            waiting = [*owner, *self.cloud_calls, *([self.ping] if self.ping else [])]
            ready, _ = ray.wait(waiting, num_returns=1, timeout=1.0)
            for ref in ready:
                if ref in owner:
                    self._drain_host(owner[ref], ref)
                elif ref in self.cloud_calls:
                    self._cloud_done(ref)
                elif ref == self.ping:
                    self._cloud_back()
            self._dispatch()
            self.progress.refresh(version=max(self.newest.values(), default=0), backlog=len(self.backlog),
                                  **({"cloud": "down"} if self.ping else {}))
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

    def _host_records(self, i: int, records: list[dict[str, Any]], uploads_ref: Any) -> None:
        if not records:
            return  # the host's edges are done: no more calls to it
        self.backlog.append((uploads_ref, records))
        if self.wait_when_full and self._pending() >= self.backlog_bound:
            self.paused.append(i)  # backpressure: this host's next step waits for the cloud
            self.max_backlog = max(self.max_backlog, len(self.backlog))
            return
        while len(self.backlog) > self.backlog_bound:
            _, old = self.backlog.popleft()  # oldest first: the freshest uploads matter most
            for rec in old:
                self.dropped += rec["uploaded"]
                self.progress.add(dict(rec, cloud_steps=0, dropped=rec["uploaded"]))
        self.max_backlog = max(self.max_backlog, len(self.backlog))
        self.submit(i)

    def _dispatch(self) -> None:
        if self.ping:
            return  # the cloud is down: uploads wait in the backlog
        for seq in sorted(self.redo):
            self.cloud_calls[self.link.send(seq)] = (seq, self.redo.pop(seq))
        while self.backlog and len(self.cloud_calls) < self.CLOUD_IN_FLIGHT:
            uploads_ref, records = self.backlog.popleft()
            seq, ref = self.link.submit(None, [uploads_ref])
            self.cloud_calls[ref] = (seq, records)
        while self.paused and self._pending() < self.backlog_bound:
            self.submit(self.paused.popleft())

    def _pending(self) -> int:
        """Deliveries the cloud has not taken: waiting in the backlog, or still being stepped by a host."""
        return len(self.backlog) + len(self.pool.owner)

    def _cloud_done(self, ref: Any) -> None:
        seq, records = self.cloud_calls.pop(ref)
        try:
            delivery = ray.get(ref)
        except (RayActorError, RayTaskError) as exc:
            self.link.raise_unless_recoverable(exc)
            self.redo[seq] = records
            if self.ping is None:
                self.ping = self.link.cloud.position.remote()
            return
        self.link.delivered(seq, delivery)
        if delivery.pubs:
            track_newest(self.newest, delivery.pubs)
            self.latest_pubs.update({p.key: p for p in delivery.pubs})
            self.pub_log += [(delivery.published_at, p.key, p.version)
                             for p in delivery.pubs]
            self.pool.broadcast(ray.put(delivery.pubs))  # put once; every host gets the same reference
        for rec in records:
            self.progress.add(dict(rec, cloud_steps=delivery.steps.get(rec["edge_id"], 0),
                                   dropped=delivery.refused.get(rec["edge_id"], 0)))

    def _cloud_back(self) -> None:
        """The ping answered or failed: once every outstanding delivery has settled, replay and resend."""
        try:
            ray.get(self.ping)
        except (RayActorError, GetTimeoutError):
            time.sleep(0.2)
            self.ping = self.link.cloud.position.remote()  # still restarting
            return
        self.ping = None
        if self.cloud_calls:  # deliveries sent before the crash: each failed or was applied
            ray.wait(list(self.cloud_calls), num_returns=len(self.cloud_calls), timeout=60)
            for ref in list(self.cloud_calls):
                self._cloud_done(ref)
        if self.ping is None and self.redo:
            self.link.recover(min(self.redo))

    def fix_lags(self, records: list[dict[str, Any]]) -> None:
        """Version lag measured after the fact: versions published before the batch was predicted,
        minus the version it used (the driver's view at submission time would undercount)."""
        by_key: dict[int, list[tuple[float, int]]] = {}
        for t, key, version in sorted(self.pub_log):
            by_key.setdefault(key, []).append((t, version))
        for rec in records:
            pubs = by_key.get(rec["edge_id"], by_key.get(SHARED, []))
            newest = max((v for t, v in pubs if t <= rec["predicted_at"]), default=0)
            rec["version_lag"] = max(0, newest - rec["weight_version"])
