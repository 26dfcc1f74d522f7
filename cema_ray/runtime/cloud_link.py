"""The driver's side of the cloud actor: numbered deliveries, the log since the last checkpoint, recovery."""
from __future__ import annotations

import time
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from cema_ray.runtime.actor_calls import (MAX_RECOVERIES_PER_ROUND, OutOfOrderDelivery, backoff_s, project_error,
                                          raised_inside, wait_for_actor)
from cema_ray.runtime.faults import FaultSchedule
from cema_ray.runtime.placement import NodeWatch
from cema_ray.runtime.ray_actors import Delivery


class CloudLink:
    """The driver's side of the cloud: numbered deliveries, the log since the last checkpoint, recovery.

    The driver owns every upload it delivers (they are its tasks' return values), so after a cloud
    restart it re-delivers, in order, whatever the restored checkpoint does not cover; publications
    those replays produce were broadcast the first time and are dropped.
    """

    def __init__(self, cloud: Any, faults: FaultSchedule, checkpointing: bool, kills: bool = True,
                 watch: NodeWatch | None = None, label: str = "the cloud") -> None:
        """``kills``: this link's cloud is the one `faults.kill_cloud` kills (the first shard's); ``watch``
        names a lost node when the cloud fails with it; ``label``: the cloud or shard, as messages name it."""
        self.cloud, self.faults, self.checkpointing, self.kills = cloud, faults, checkpointing, kills
        self.watch, self.label = watch, label
        # seq -> (edge ids, upload refs, the shards' averaged foundation to load first or None)
        self.log: dict[int, tuple[list[int] | None, list[Any], Any]] = {}
        self.next_seq = 0
        self.kills_done: set[int] = set()

    def submit(self, edge_ids: list[int] | None, uploads: list[Any], merge: Any = None) -> tuple[int, Any]:
        """Send the next delivery; returns its number and the reference of its result."""
        seq, self.next_seq = self.next_seq, self.next_seq + 1
        self.log[seq] = (edge_ids, uploads, merge)
        return seq, self.send(seq)

    def _call(self, seq: int) -> Any:
        edge_ids, uploads, merge = self.log[seq]
        return self.cloud.deliver.remote(seq, edge_ids, *uploads, merge=merge)

    def send(self, seq: int) -> Any:
        ref = self._call(seq)
        if self.kills and self.faults.kill_cloud_at(seq) and seq not in self.kills_done:
            self.kills_done.add(seq)
            ray.kill(self.cloud, no_restart=False)  # injected crash, mid-delivery
        return ref

    def delivered(self, seq: int, delivery: Delivery) -> None:
        """Forget what no recovery can need: deliveries the newest checkpoint covers, and, without
        checkpoints (nothing to recover from), every delivery up to this one, so the driver's memory
        does not grow with the run."""
        keep_from = delivery.checkpoint if self.checkpointing else seq + 1
        for s in [s for s in self.log if s < keep_from]:
            del self.log[s]

    def raise_unless_recoverable(self, exc: Exception) -> None:
        """Re-raise what a cloud restart cannot fix: the project's own errors (in their own words) and any
        error that is not the cloud failing; return for a dead or restarting cloud."""
        err = project_error(exc, "the cloud")
        if err is not None:
            raise err from None
        if not self.is_cloud_failure(exc):
            raise exc

    def is_cloud_failure(self, exc: Exception) -> bool:
        if isinstance(exc, RayActorError):
            return True
        return raised_inside(exc, OutOfOrderDelivery)

    def recover(self, first_undone: int) -> None:
        """Wait for Ray to restart the cloud, then replay the log from its checkpoint up to `first_undone`.

        Faults come in bursts: a cloud that dies again during its replay is waited for and replayed
        again, from whatever checkpoint it then restores, up to MAX_RECOVERIES_PER_ROUND attempts."""
        self.faults.cloud_seen += 1
        if not self.checkpointing:
            raise RuntimeError("the cloud actor died and cloud.checkpoint_every is 0: there is no checkpoint to "
                               "restart it from (set cloud.checkpoint_every > 0)")
        for attempt in range(MAX_RECOVERIES_PER_ROUND):
            try:
                restored = self._replay(first_undone)
            except (RayActorError, RayTaskError) as exc:
                self.raise_unless_recoverable(exc)
                self.faults.cloud_retry()
                time.sleep(backoff_s(attempt))
                continue
            self.faults.cloud_recovered += 1
            if self.watch is not None:
                self.watch.moved(self.label, wait_for_actor(self.cloud.node_id, where=self.label))
            self.faults.restored_from.append(-1 if restored is None else restored)
            return
        raise RuntimeError(f"the cloud kept failing while it recovered: gave up after {MAX_RECOVERIES_PER_ROUND} "
                           "attempts")

    def _replay(self, first_undone: int) -> int | None:
        """One recovery attempt: the restarted cloud's position, then the deliveries it misses, in order."""
        position, restored = wait_for_actor(self.cloud.position, where="the cloud", on_retry=self.faults.cloud_retry)
        if position < first_undone and position not in self.log:
            raise RuntimeError(f"the restarted cloud resumed at delivery {position}, which the driver no longer holds")
        for seq in range(position, first_undone):
            self.before_replay(seq)
            ray.get(self._call(seq))  # its publications went out already
            self.faults.replayed += 1
        return restored

    def before_replay(self, seq: int) -> None:
        """Hook called before each replayed delivery (tests kill the cloud here: a fault during recovery)."""
