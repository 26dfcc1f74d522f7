"""The edge hosts of a Ray run, apart from the drivers: handles, in-flight steps, snapshots, revival.

RLlib's FaultTolerantActorManager is the pattern: the pool knows which calls are outstanding on which
host, what state to bring a failed host back to, and how; the drivers (sync rounds, async streaming)
only decide *when* to step and what to do with the results. Both drivers step hosts through `submit`,
so the fault schedule (injected crashes and raises) applies the same way to both.
"""
from __future__ import annotations

from collections import deque
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from cema_ray.runtime.actor_calls import (MAX_RECOVERIES_PER_ROUND, HostNeedsRestore, InjectedFault, project_error,
                                          raised_inside, wait_for_actor)
from cema_ray.runtime.cloud import Publication
from cema_ray.runtime.faults import FaultSchedule
from cema_ray.runtime.placement import NodeWatch

StepCall = tuple[Any, Any, Any]  # (records ref, uploads ref, snapshot ref) of one step_and_snapshot call


class HostPool:
    """Hosts, the last snapshot each handed back, and their outstanding steps in submission order."""

    def __init__(self, hosts: list[Any], faults: FaultSchedule, clean_ref: Any = None,
                 watch: NodeWatch | None = None) -> None:
        self.hosts, self.faults, self.watch = hosts, faults, watch
        self.clean_ref = clean_ref  # what a restarted host builds its edges from
        # every host's state before its first step; a host killed since it was armed comes back at batch 0
        # too (Ray reruns its constructor), so its snapshot is the same and its first step asks to be restored
        self.snapshots = [wait_for_actor(h.snapshot, where=f"edge host {i}") for i, h in enumerate(hosts)]
        self.in_flight: list[deque[StepCall]] = [deque() for _ in hosts]
        self.owner: dict[Any, int] = {}  # records ref -> host index, for the steps in flight
        self.clock = [0] * len(hosts)  # steps submitted per host (async: the fault schedule's clock)
        self.redo_until: dict[int, int] = {}  # --resume: per edge, batches the interrupted run had recorded

    def __len__(self) -> int:
        return len(self.hosts)

    def submit(self, i: int, newest: dict[int, int], paced: bool, when: int,
               pubs_ref: Any = None, track: bool = False) -> StepCall:
        """Start host i's next step; `when` is its position in the fault schedule (a round, or the host's
        own step count). `track`: remember the call as in flight (async mode drains them in order)."""
        call = self.hosts[i].step_and_snapshot.options(num_returns=3).remote(
            newest, paced, self.faults.wants_raise(i, when), pubs_ref)
        self.clock[i] += 1
        if track:
            self.in_flight[i].append(call)
            self.owner[call[0]] = i
        return call

    def inject_crashes(self, when: int, only: int | None = None) -> None:
        """The schedule's crashes at `when`: the victims are killed mid-step (Ray restarts them)."""
        for victim in self.faults.victims(when):
            if only is None or victim == only:
                ray.kill(self.hosts[victim], no_restart=False)

    def revive(self, i: int, exc: Exception, pubs: list[Publication]) -> None:
        """Bring a failed host back at its last snapshot: whatever it did after that is discarded and redone.

        A dead process is restarted by Ray; a host whose step raised is killed first (its edges may be half
        stepped), so both come back through the same restart and restore. Its tracked steps are forgotten.
        """
        err = project_error(exc, f"edge host {i}")
        if err is not None:
            raise err from None
        for call in self.in_flight[i]:
            del self.owner[call[0]]
        self.in_flight[i].clear()
        self.faults.seen += 1
        if isinstance(exc, RayTaskError) and not raised_inside(exc, HostNeedsRestore):
            if raised_inside(exc, InjectedFault):
                self.faults.raised(i)
            ray.kill(self.hosts[i], no_restart=False)
        wait_for_actor(self.hosts[i].restore, self.snapshots[i], pubs, self.clean_ref, self.redo_until,
                       where=f"edge host {i}", on_retry=self.faults.host_retry)
        if self.watch is not None:
            self.watch.moved(f"edge host {i}", wait_for_actor(self.hosts[i].node_id, where=f"edge host {i}"))
        self.faults.recovered += 1

    def result(self, i: int, call: StepCall, pubs: list[Publication], retry: Any) -> tuple[list, Any, dict]:
        """Host i's (records, uploads ref, snapshot) of `call`; after a crash or a raise, revive the host and
        run the step again with `retry()` (which submits it anew), up to MAX_RECOVERIES_PER_ROUND times."""
        for _ in range(MAX_RECOVERIES_PER_ROUND):
            records_ref, uploads_ref, snap_ref = call
            try:
                records, snap = ray.get([records_ref, snap_ref])
                return records, uploads_ref, snap
            except (RayActorError, RayTaskError) as exc:
                error = exc
                self.revive(i, exc, pubs)
                call = retry()
        raise RuntimeError(f"edge host {i} kept failing: gave up after {MAX_RECOVERIES_PER_ROUND} restarts") from error

    def broadcast(self, pubs_ref: Any, uplink: dict[int, float] | None = None) -> None:
        """Every host loads these publications between its steps (fire and forget); ``uplink``: per shard, the
        uploads/s each edge may send (runtime/uplink.py)."""
        for host in self.hosts:
            host.apply.remote(pubs_ref, uplink)
