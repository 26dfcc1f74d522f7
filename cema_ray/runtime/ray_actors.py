"""The Ray actors: `EdgeHost` (K virtual edges in one process) and `CloudActor`.

Both are plain classes; `ray.remote` is applied where they are started (`ray_runner.py`), so
their logic is the same objects the single-process runner uses (`EdgeDevice`, `CloudService`)
and can be tested without Ray. Images cross processes as uint8 numpy arrays, which Ray's
object store hands to a reader on the same node without a copy.
"""
from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import torch

from cema_ray.data.catalog import LabeledImagesLike
from cema_ray.errors import CemaError, ConfigError
from cema_ray.methods.base import NormState
from cema_ray.runtime.cloud import CloudService, Publication, for_edge, shard_of
from cema_ray.runtime.cloud_checkpoint import CloudCheckpointStore
from cema_ray.runtime.actor_calls import HostNeedsRestore, InjectedFault, OutOfOrderDelivery
from cema_ray.runtime.edge import EdgeDevice
from cema_ray.runtime.edge_round import step_edges
from cema_ray.runtime.malloc import keep_freed_memory
from cema_ray.runtime.metrics import CloudMetrics, HostMetrics
from cema_ray.runtime.uplink import CloudCapacity, follows
from cema_ray.runtime.assembly import build_edges, load_cloud, load_edge_models
from cema_ray.runtime.fleet import DataContext, EdgePlan, edge_model_names, edge_plans


class EdgeHost:
    """Hosts a contiguous range of virtual edges sharing one process and one torch runtime."""

    def __init__(self, host_id: int, cfg: dict[str, Any], plans: list[EdgePlan] | range,
                 clean: LabeledImagesLike | None = None, threads: int = 1, nice: int = 0,
                 clean_in_restore: bool = False, run_label: str = "") -> None:
        """``plans``: the edges' plans, or the range of edge ids whose plans the host derives from ``cfg`` itself
        (what the runner passes: a few thousand plans as a constructor argument would travel through the object
        store, and Ray prints an error-level line for such restartable actors, ray#53727).

        ``nice``: added to this process's niceness, so that a cloud on the same node gets the CPU first
        when both are busy (async mode): a starved cloud falls behind and its backlog drops uploads.

        ``clean_in_restore``: the edges are built by the first `restore`, which brings the clean images (the
        driver's object-store reference, as a method argument). Passed to the constructor instead, that
        reference makes Ray print an error-level line for every restartable actor (ray#53727); `restore` is
        the driver's first call after every start and restart anyway.

        A project error while building the edges (a bad checkpoint, an unreadable image) is kept and raised
        by `restore`: raised while constructing, Ray would report a dead actor and bury the message; raised
        by a call, it reaches the driver as itself and ends the run in one line."""
        self.host_id = host_id
        self.cfg = cfg
        self.plans = edge_plans(cfg, plans) if isinstance(plans, range) else plans
        self.edges: list[EdgeDevice] = []
        self.by_id: dict[int, EdgeDevice] = {}
        self.built = False
        self.init_error: CemaError | None = None
        # Ray reruns __init__ when it restarts a host: its edges would be back at batch 0. So a host
        # steps only after the driver has called `restore` (with nothing to restore on first start).
        self.needs_restore = True
        self.malloc_kept = keep_freed_memory(int(cfg["ray"]["malloc_keep_mb"]))
        torch.set_num_threads(threads)
        if nice:
            os.nice(nice)
        self.anchors: dict[int, float] = {}  # edge id -> when its batch 0 was due (paced async runs)
        self.redo_until: dict[int, int] = {}  # edge id -> batches below it are predicted again (--resume)
        names = edge_model_names(cfg)
        self.metrics = HostMetrics(host_id, run_label,  # run_label: the run's actor prefix
                                   {p.edge_id: names[p.model] for p in self.plans})
        if not clean_in_restore:
            self._build(clean)

    def _build(self, clean: LabeledImagesLike | None) -> None:
        try:
            data = DataContext(self.cfg["data"], clean=clean)
            self.edges = build_edges(self.cfg, data, load_edge_models(self.cfg, {p.model for p in self.plans}),
                                     self.plans)
        except CemaError as exc:
            self.init_error = exc
        self.by_id = {e.edge_id: e for e in self.edges}
        self.built = True

    def __repr__(self) -> str:  # Ray uses it as the log prefix
        ids = [e.edge_id for e in self.edges]
        return f"EdgeHost{self.host_id}[edges {ids[0]}-{ids[-1]}]" if ids else f"EdgeHost{self.host_id}[]"

    def ping(self) -> int:
        return os.getpid()

    def resource_usage(self) -> dict[str, float]:
        """This process's CPU seconds (user, kernel) and minor page faults so far, and whether
        `ray.malloc_keep_mb` took effect: what it changes is the kernel time spent handing torch fresh pages."""
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {"user_s": usage.ru_utime, "system_s": usage.ru_stime, "minor_faults": usage.ru_minflt,
                "malloc_kept": self.malloc_kept}

    def node_id(self) -> str:
        """The Ray node this host runs on (hosts are spread across nodes)."""
        return ray.get_runtime_context().get_node_id()

    def step_round(self, newest: dict[int, int], paced: bool = False
                   ) -> tuple[list[dict[str, Any]], list[tuple[int, bool, np.ndarray, np.ndarray | None]]]:
        """Every edge with data predicts its next batch; returns records and (edge, reset, uploads, domain key).

        ``paced``: edges with a frame rate wait for their next frame time (async mode runs in real
        time), and at most `ray.host_step_edges` edges run (publications arrive between steps); sync rounds
        ignore both and run every edge, as the single-process runner does.
        """
        if self.needs_restore:
            raise HostNeedsRestore(f"{self!r} was restarted and has not been restored")
        if paced:
            self._wait_for_frames()
        records, uploads = [], []
        due = [e for e in self.edges if not e.done and (not paced or self._due(e))]
        limit = self.cfg["ray"]["host_step_edges"]
        if paced and limit is not None and len(due) > limit:  # async: the least advanced edges go first
            due = sorted(sorted(due, key=lambda e: (e.cursor, e.edge_id))[:limit], key=lambda e: e.edge_id)
        shards = self.cfg["cloud"]["shards"]
        for out in step_edges(due, lambda e: for_edge(newest, e.edge_id, shards, 0), self.cfg["edges"]["fuse_samples"]):
            rec = out.record
            rec["host_id"] = self.host_id
            self.metrics.record(rec, rec["batch_index"] < self.redo_until.get(rec["edge_id"], 0))
            records.append(out.record)
            uploads.append((out.record["edge_id"], out.reset, out.upload_images, out.upload_key))
        return records, uploads

    def _due(self, edge: EdgeDevice) -> bool:
        rate = edge.profile.frame_rate
        return not rate or time.monotonic() >= self._anchor(edge) + edge.cursor / rate

    def _anchor(self, edge: EdgeDevice) -> float:
        """When the edge's batch 0 was (or would have been) due: fixed at its first paced step in this process,
        so that batch `cursor` is due now. A restored edge resumes at its own rate from where its snapshot
        left it; anchoring a restarted process at its start would make it wait as long as the run has lasted."""
        if edge.edge_id not in self.anchors:
            self.anchors[edge.edge_id] = time.monotonic() - edge.cursor / edge.profile.frame_rate
        return self.anchors[edge.edge_id]

    def _wait_for_frames(self) -> None:
        """Sleep until at least one unfinished edge has a frame due."""
        waits = [self._anchor(e) + e.cursor / e.profile.frame_rate - time.monotonic()
                 for e in self.edges if not e.done and e.profile.frame_rate]
        if waits and len(waits) == sum(not e.done for e in self.edges) and min(waits) > 0:
            time.sleep(min(waits))

    def apply(self, pubs: list[Publication], uplink: dict[int, float] | None = None) -> int:
        """Load published versions (a shard's shared one into every edge of that shard); returns how many edges
        updated. ``uplink``: per shard, the uploads/s each of its edges may send (async, `ray.uplink: follow`)."""
        shards = self.cfg["cloud"]["shards"]
        now = time.monotonic()
        for shard, rate in (uplink or {}).items():
            for edge in self.edges:
                if shard_of(edge.edge_id, shards) == shard:
                    edge.share.set_rate(rate, now)
        updated = 0
        for pub in pubs:
            for edge in pub.targets(self.by_id, shards):
                before = edge.version
                edge.apply_update(pub.state, pub.version)
                updated += edge.version != before
        return updated

    def snapshot(self) -> dict[int, dict[str, Any]]:
        return {e.edge_id: e.snapshot() for e in self.edges}

    def step_and_snapshot(self, newest: dict[int, int], paced: bool = False, fail: bool = False,
                          pubs: list[Publication] | None = None
                          ) -> tuple[list[dict[str, Any]], list[Any], dict[int, Any]]:
        """A step plus the snapshot to resume from if this host dies before its next step.

        ``pubs``: publications to load first (sync rounds send them with the next step: one call
        per host and round instead of two). ``fail``: fault injection; the step raises instead of
        running, as a bug or a torch error would.
        """
        if fail:
            raise InjectedFault(f"{self!r}: injected exception (faults.raise_in_hosts)")
        if pubs:
            self.apply(pubs)
        records, uploads = self.step_round(newest, paced)
        return records, uploads, self.snapshot()

    def restore(self, snaps: dict[int, dict[str, Any]], pubs: list[Publication],
                clean: LabeledImagesLike | None = None, redo_until: dict[int, int] | None = None) -> int:
        """Resume every edge from its snapshot, then load publications newer than what it had (building the
        edges first, from ``clean``, when this process has not built them yet). ``redo_until`` (--resume): per
        edge, the batch index up to which the interrupted run had recorded batches; the metrics count those
        batches as redone work."""
        self.redo_until.update(redo_until or {})
        if not self.built:
            self._build(clean)
        if self.init_error is not None:
            raise self.init_error
        for edge_id, snap in snaps.items():
            self.by_id[edge_id].restore(snap)
            self.anchors.pop(edge_id, None)  # paced again from its restored cursor
        self.apply(pubs)
        self.needs_restore = False
        return os.getpid()


@dataclass
class Delivery:
    """What the cloud returns for one delivery of uploads."""

    steps: dict[int, int]  # cloud steps the delivery made due, per edge
    pubs: list[Publication]  # versions published at its end
    checkpoint: int  # deliveries the newest checkpoint on disk covers: the driver may forget older ones
    published_at: float  # wall clock (time.time) when the publications were made
    refused: dict[int, int] = field(default_factory=dict)  # uploads the full queue refused, per edge (one batch each)
    item_steps: list[int] = field(default_factory=list)  # per upload item (one edge batch), in the order sent:
    item_refused: list[int] = field(default_factory=list)  # what `steps`/`refused` say when an edge sent several
    shared: NormState | None = None  # a shard's foundation state at a `cloud.sync_every` round, for the average
    uplink: float | None = None  # async, `ray.uplink: follow`: uploads/s each of the shard's edges may send


class CloudActor:
    """The foundation model, the student(s), the replay buffer and the publication counter.

    Deliveries are numbered by the driver and must arrive in order: delivery ``seq`` is accepted only
    when the cloud has applied exactly ``seq`` before it. Every ``checkpoint_every`` deliveries the
    state goes to disk before the delivery is applied. When Ray restarts a dead cloud, ``__init__``
    runs again, finds the run's newest checkpoint and resumes at its position; the driver re-delivers
    what came after (it holds those uploads), so the restarted cloud reaches the very state it had.
    """

    def __init__(self, cfg: dict[str, Any], threads: int = 1, checkpoint_dir: str | None = None,
                 run_id: str = "", run_label: str = "", shard: int = 0) -> None:
        """A project error while building (a bad checkpoint) is kept and raised by `ping` and `position`,
        the driver's first calls after a start or a restart, as EdgeHost does. ``shard``: which of the
        `cloud.shards` clouds this is; it takes only its own edges' uploads from every delivery."""
        keep_freed_memory(int(cfg["ray"]["malloc_keep_mb"]))
        torch.set_num_threads(threads)
        self.init_error: CemaError | None = None
        self.shard, self.shards = shard, int(cfg["cloud"]["shards"])
        self.sync_every = int(cfg["cloud"]["sync_every"])
        self.built_with = (cfg, checkpoint_dir, run_id, run_label)
        try:
            self._build(*self.built_with)
        except CemaError as exc:
            self.init_error = exc

    def _build(self, cfg: dict[str, Any], checkpoint_dir: str | None, run_id: str, run_label: str,
               position: int | None = None) -> None:
        """A fresh service, then the run's newest checkpoint (or the one at ``position``) loaded into it."""
        self.service: CloudService = load_cloud(cfg, self.shard)
        self.metrics = CloudMetrics(run_label)
        self.every = int(cfg["cloud"]["checkpoint_every"])
        self.delay_s = float(cfg["faults"]["slow_cloud_s"])
        self.capacity = CloudCapacity(float(cfg["ray"]["uplink_headroom"])) if follows(cfg) else None
        self.store = CloudCheckpointStore(checkpoint_dir, run_id) if checkpoint_dir and self.every else None
        self.checkpointed = 0
        self.restored_from: int | None = None
        if position is not None:
            state = self.store.at(position) if self.store else None
            if state is None:
                raise ConfigError(f"cannot resume: cloud shard {self.shard} has no checkpoint of round {position} "
                                  f"(the other shards' newest)")
            found: tuple[dict[str, Any], int] | None = (state, position)
        else:
            found = self.store.latest() if self.store else None
        if found is not None:
            state, position = found
            self.service.load_state_dict(state)
            self.checkpointed = self.restored_from = position

    def restore_at(self, position: int) -> None:
        """Go back to the checkpoint of round ``position`` (`--resume` of a sharded run: the driver died while
        the shards were checkpointing one round, so they resume at the oldest newest checkpoint among them)."""
        self._build(*self.built_with, position=position)

    def calibrate(self, image_shape: tuple[int, ...]) -> tuple[float | None, float | None]:
        """(uploads/s this shard trains on random images, the share each of its edges starts with): the raw
        compute limit, reported beside what the run then measures (`stats`), and the uplink's first share."""
        rate = self.service.calibrate(tuple(image_shape))
        count = int(self.built_with[0]["edges"]["count"])
        mine = sum(1 for e in range(count) if shard_of(e, self.shards) == self.shard)
        return rate, None if self.capacity is None else self.capacity.calibrated(rate, mine)

    def pending_share(self) -> NormState | None:
        """The foundation state this shard shared and whose mean it has not received: what a resumed driver
        averages to send the mean the dead driver would have sent with the next delivery."""
        sent = self.service.shared_sent
        return None if sent is None else sent[1]

    def __repr__(self) -> str:
        return "CloudActor" if self.shards == 1 else f"CloudActor{self.shard}"

    def ping(self) -> int:
        if self.init_error is not None:
            raise self.init_error
        return os.getpid()

    def node_id(self) -> str:
        """The Ray node this cloud (shard) runs on (`cloud.resources` places it)."""
        return ray.get_runtime_context().get_node_id()

    def position(self) -> tuple[int, int | None]:
        """(deliveries applied, the checkpoint position this instance was restored from or None)."""
        if self.init_error is not None:
            raise self.init_error
        return self.service.rounds, self.restored_from

    def deliver(self, seq: int, edge_ids: list[int] | None, *host_uploads: list[tuple[int, bool, np.ndarray]],
                merge: NormState | None = None) -> Delivery:
        """Ingest this shard's uploads in ascending edge id (the reference order), then publish what falls due.

        ``edge_ids``: the edges taking part (sync: the whole round's, uploads or not); None means the
        edges in the uploads (async: one host's call). ``merge``: the shards' averaged foundation, loaded
        first (the driver averaged what the last sync round returned in `Delivery.shared`).
        """
        if seq != self.service.rounds:
            raise OutOfOrderDelivery(f"cloud expects delivery {self.service.rounds}, got {seq}")
        started = time.perf_counter()  # the capacity counts all of the delivery's time, checkpoint and delays too
        if self.store and seq and seq % self.every == 0 and seq > self.checkpointed:
            self.store.save(self.service.state_dict(), seq)
            self.checkpointed = seq
        if self.delay_s:
            time.sleep(self.delay_s)
        if merge is not None:
            self.service.merge(merge)
        sent = [item for uploads in host_uploads for item in uploads if shard_of(item[0], self.shards) == self.shard]
        order = sorted(range(len(sent)), key=lambda i: sent[i][0])  # stable: an edge's batches stay in their order
        items = [sent[i] for i in order]
        t0, trained = time.perf_counter(), self.service.stats.step_seconds
        steps, refused = {}, {}
        item_steps, item_refused = [0] * len(sent), [0] * len(sent)
        for i, (edge_id, reset, images, key) in zip(order, items):
            if reset:
                self.service.reset(edge_id)
            item_steps[i] = self.service.receive(edge_id, images, key=key)
            item_refused[i] = self.service.last_refused
            steps[edge_id] = steps.get(edge_id, 0) + item_steps[i]
            refused[edge_id] = refused.get(edge_id, 0) + item_refused[i]
        mine = steps if edge_ids is None else [e for e in edge_ids if shard_of(e, self.shards) == self.shard]
        pubs = self.service.end_round(sorted(mine))
        uploads = sum(len(it[2]) for it in items)
        self.metrics.record(uploads, sum(refused.values()), sum(steps.values()),
                            self.service.stats.step_seconds - trained, len(pubs), self.service.trainer.queued(),
                            time.perf_counter() - t0)
        shared = self.service.share() if self.shards > 1 and self.service.rounds % self.sync_every == 0 else None
        uplink = None
        if self.capacity is not None:
            self.capacity.record(uploads - sum(refused.values()), time.perf_counter() - started, steps.keys(),
                                 time.monotonic())
            uplink = self.capacity.per_edge()
        return Delivery(steps, pubs, self.checkpointed, time.time(), refused, item_steps, item_refused, shared, uplink)

    def stats(self) -> dict[str, Any]:
        s = self.service.stats
        return {"steps": s.steps, "ingested": s.ingested, "dropped": s.dropped, "publications": s.publications,
                "step_seconds": s.step_seconds, "deliveries": self.service.rounds, "device": self.service.device,
                "uploads_per_busy_s": None if self.capacity is None else self.capacity.rate(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}
