"""The Ray runtime's driver: starts (or joins) Ray, places edge hosts and the cloud, runs rounds.

Sync mode runs the single-process runner's rounds with the edges spread over hosts: all hosts
predict in parallel, the cloud ingests the uploads in ascending edge id, publishes once, and
the driver puts each publication into the object store once and hands every host the same
reference. The driver owns those objects, so they outlive a cloud actor's failure.
"""
from __future__ import annotations

import functools
import math
import os
import re
import sys
import tempfile
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from cema_ray.errors import ConfigError, RunInterrupted
from cema_ray.results import RunRecorder
from cema_ray.results.storage import is_uri
from cema_ray.runtime.cloud import SHARED, Publication
from cema_ray.runtime.actor_calls import (MAX_RECOVERIES_PER_ROUND, kill_actors, project_error,
                                           wait_for_actor)
from cema_ray.runtime.cloud_link import CloudLink
from cema_ray.runtime.faults import FaultSchedule
from cema_ray.runtime.host_pool import HostPool
from cema_ray.runtime.fleet import DataContext, EdgePlan, edge_plans, verify_models
from cema_ray.runtime.journal import PartialWriter, ResumeJournal
from cema_ray.runtime.progress import RunProgress
from cema_ray.runtime.ray_actors import CloudActor, Delivery, EdgeHost

NAMESPACE = "cema"


def init_ray(cfg: dict[str, Any]) -> bool:
    """Join the cluster named by RAY_ADDRESS or `ray.address` (`auto`: the one running on this machine),
    else start a new local instance, even when a cluster already runs here.

    Returns True when this call started Ray (and so must shut it down). Resource arguments are
    passed only to an instance we start: Ray refuses them when connecting to a cluster. A plain
    `ray.init()` would join a running local cluster and then fail on those arguments; "local" is
    Ray's documented way to start a fresh instance whatever runs beside it.
    """
    if ray.is_initialized():
        return False
    rcfg = cfg["ray"]
    address = os.environ.get("RAY_ADDRESS") or rcfg.get("address")
    env = {"env_vars": {"OMP_NUM_THREADS": "1", "RAY_DEDUP_LOGS": os.environ.get("RAY_DEDUP_LOGS", "1")}}
    if address:
        ray.init(address=address, namespace=NAMESPACE, runtime_env=env, log_to_driver=True)
        return True
    # RAY_AUTH_MODE is left to the user: unset, Ray 2.60 turns token authentication on for an
    # instance it starts (making ~/.ray/auth_token if needed). It must be set before `import ray`.
    store = rcfg.get("object_store_memory_mb")
    ray.init(
        "local",
        num_cpus=rcfg.get("num_cpus") or os.cpu_count(),
        object_store_memory=int(store) * 2**20 if store else None,
        include_dashboard=rcfg.get("include_dashboard", True),
        dashboard_host=rcfg.get("dashboard_host", "127.0.0.1"),
        namespace=NAMESPACE,
        runtime_env=env,
    )
    return True


def host_count(edges: int, per_host: int, hosts: int | None, free_cpus: float, host_cpus: float) -> int:
    """How many EdgeHosts: `hosts` if set, else ceil(edges / per_host), capped by what the cluster can place.

    Asking for more hosts than the cluster's CPUs (after the cloud's reservation) admit would leave
    actors pending forever; the cap puts more virtual edges on each host instead.
    """
    wanted = hosts or math.ceil(edges / per_host)
    fit = max(1, int(free_cpus // host_cpus))
    return max(1, min(wanted, fit, edges))


def split_hosts(plans: list[EdgePlan], count: int) -> list[list[EdgePlan]]:
    """`count` contiguous ranges of edges, as even as possible."""
    base, extra = divmod(len(plans), count)
    groups, start = [], 0
    for i in range(count):
        size = base + (i < extra)
        groups.append(plans[start : start + size])
        start += size
    return [g for g in groups if g]


def cluster_cpus() -> float:
    return float(ray.cluster_resources().get("CPU", 0.0))


def cloud_threads(cloud_cfg: dict[str, Any]) -> int:
    """The cloud's torch threads: `cloud.threads`, else its CPU reservation rounded up."""
    return int(cloud_cfg.get("threads") or max(1, math.ceil(cloud_cfg["num_cpus"])))


def actor_prefix(name: str, run_id: str) -> str:
    """`cema-<run name>-<6 hex>`: readable in the dashboard, unique per run, so runs sharing a cluster
    never collide on a name (Ray's names are per namespace)."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] or "run"
    return f"cema-{slug}-{run_id[:6]}"


def start_actors(cfg: dict[str, Any], groups: list[list[EdgePlan]], clean_ref: Any, checkpoint_dir: str | None,
                 run_id: str) -> tuple[Any, list[Any]]:
    """The cloud `<prefix>-cloud` and the hosts `<prefix>-edgehost-NNN` (`actor_prefix`).

    The hosts get the clean images with their first `restore` (every start and restart is followed by one),
    not as a constructor argument: an object-store reference there makes Ray print an error-level line for
    every restartable actor (ray#53727). The driver holds the reference for the whole run."""
    rcfg = cfg["ray"]
    prefix = actor_prefix(cfg["name"], run_id)
    cloud = ray.remote(CloudActor).options(
        name=f"{prefix}-cloud", namespace=NAMESPACE, num_cpus=cfg["cloud"]["num_cpus"],
        max_restarts=cfg["cloud"]["max_restarts"] if checkpoint_dir else 0,
        max_task_retries=0,  # the driver re-delivers, in order, after a restart
    ).remote(cfg, cloud_threads(cfg["cloud"]), checkpoint_dir, run_id, prefix)
    hosts = [
        ray.remote(EdgeHost).options(
            name=f"{prefix}-edgehost-{i:03d}", namespace=NAMESPACE, num_cpus=rcfg["host_num_cpus"],
            memory=int(rcfg["host_memory_mb"]) * 2**20 or None, scheduling_strategy="SPREAD",
            max_restarts=-1, max_task_retries=0,  # restarted by Ray, restored by the driver
        ).remote(i, cfg, plans, None, 1, int(rcfg["host_nice"]), True, prefix)
        for i, plans in enumerate(groups)
    ]
    try:  # arms every host; an actor killed meanwhile is waited for (faults do not wait for the start-up)
        refs = [h.restore.remote({}, [], clean_ref) for h in hosts]  # all at once: the hosts build in parallel
        wait_for_actor(cloud.ping, where="the cloud")
        for i, (h, ref) in enumerate(zip(hosts, refs)):
            try:
                ray.get(ref)
            except RayActorError:
                wait_for_actor(h.restore, {}, [], clean_ref, where=f"edge host {i}")
            except RayTaskError as exc:
                err = project_error(exc, f"edge host {i}")
                if err is not None:
                    raise err from None
                raise
    except BaseException:  # a project error while an actor was built ends the run in its own line
        kill_actors([cloud, *hosts])
        raise
    return cloud, hosts


def track_newest(newest: dict[int, int], pubs: list[Publication]) -> None:
    for pub in pubs:
        key = SHARED if pub.edge_id is None else pub.edge_id
        newest[key] = max(newest.get(key, 0), pub.version)


class SyncDriver:
    """Reference rounds on Ray: hosts predict in parallel, the cloud ingests in edge order, one publication.

    After every round each host hands back a snapshot of its edges. A host that dies (a crash, an
    OOM kill, `ray.kill`) is restarted by Ray (`max_restarts=-1`); the driver restores its edges from
    the previous round's snapshot, re-sends the newest publication and reruns its step, so every
    batch is predicted exactly once and the run goes on. A dead cloud is restarted from its
    checkpoint and replayed up to the round it died in (`CloudLink`), so a run with faults gives the
    records an undisturbed run gives.
    """

    def __init__(self, link: CloudLink, pool: HostPool, progress: RunProgress, lengths: dict[int, int],
                 journal: ResumeJournal | None = None, every: int = 0, partial: PartialWriter | None = None,
                 start: ResumePoint | None = None) -> None:
        self.link, self.pool, self.progress = link, pool, progress
        self.lengths = lengths  # batches per edge: edge e takes part in rounds 0 .. lengths[e] - 1
        self.journal, self.every, self.partial = journal, every, partial
        self.latest_pubs: list[Publication] = []
        self.pubs_ref: Any = None  # the last round's publications, sent with the next round's steps
        self.newest: dict[int, int] = {}
        self.first_round = 0
        if start is not None:  # a resumed run: the hosts hold round `start.position`'s state already
            self.first_round = self.link.next_seq = start.position
            self.latest_pubs, self.newest = start.pubs, dict(start.newest)

    def run(self) -> None:
        for round_index in range(self.first_round, max(self.lengths.values(), default=0)):
            self._journal(round_index)
            edge_ids = sorted(e for e, n in self.lengths.items() if n > round_index)
            newest, pubs_ref = dict(self.newest), self.pubs_ref
            steps = [functools.partial(self.pool.submit, i, newest, False, round_index, pubs_ref)
                     for i in range(len(self.pool))]  # each host's step, again after a revival
            calls = [step() for step in steps]
            self.pool.inject_crashes(round_index)  # mid-step
            outs = [self.pool.result(i, call, self.latest_pubs, steps[i]) for i, call in enumerate(calls)]
            delivery = self._deliver(edge_ids, [o[1] for o in outs])
            self.pubs_ref = None
            if delivery.pubs:
                self.latest_pubs = delivery.pubs
                track_newest(self.newest, delivery.pubs)
                self.pubs_ref = ray.put(delivery.pubs)  # put once; every host loads it with its next step
            for i, (records, _, snap) in enumerate(outs):
                self.pool.snapshots[i] = snap
                for rec in records:
                    self.progress.add(dict(rec, cloud_steps=delivery.steps.get(rec["edge_id"], 0),
                                           dropped=delivery.refused.get(rec["edge_id"], 0)))
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
        seq, ref = self.link.submit(edge_ids, uploads)
        for _ in range(MAX_RECOVERIES_PER_ROUND):
            try:
                delivery = ray.get(ref)
                self.link.delivered(seq, delivery)
                return delivery
            except (RayActorError, RayTaskError) as exc:
                self.link.raise_unless_recoverable(exc)
                self.link.recover(seq)
                ref = self.link.send(seq)
        raise RuntimeError(f"the cloud kept failing: gave up after {MAX_RECOVERIES_PER_ROUND} restarts")


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
            self.latest_pubs.update({SHARED if p.edge_id is None else p.edge_id: p for p in delivery.pubs})
            self.pub_log += [(delivery.published_at, SHARED if p.edge_id is None else p.edge_id, p.version)
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


def checkpoint_folder(cfg: dict[str, Any], out: str | Path) -> str:
    """Where the cloud checkpoints: `cloud.checkpoint_dir`, else `<out>/cloud_checkpoints`. The folder must be
    readable from whichever node Ray restarts the cloud on: on a multi-node cluster only an absolute path the
    user chose (a shared file system) can promise that; a relative or default folder is refused in one line."""
    chosen = cfg["cloud"].get("checkpoint_dir")
    folder = Path(chosen).expanduser() if chosen else Path(out) / "cloud_checkpoints"
    alive = [n for n in ray.nodes() if n.get("Alive")]
    out_dir = cfg["output"].get("dir")
    given = chosen or (None if is_uri(out_dir or "") else out_dir)
    if len(alive) > 1 and not (given and Path(given).expanduser().is_absolute()):
        raise ConfigError(f"this cluster has {len(alive)} nodes and the cloud may restart on any of them: its "
                          f"checkpoints need a folder every node reads; set cloud.checkpoint_dir (or output.dir) to "
                          f"an absolute path on a shared file system, or cloud.checkpoint_every=0 (no recovery)")
    return str(folder.resolve())


@dataclass
class ResumePoint:
    """Where a resumed sync run continues: the round, and the publications and versions the hosts hold."""

    position: int
    pubs: list[Publication]
    newest: dict[int, int]


def resume_hosts(cloud: Any, hosts: list[Any], groups: list[list[EdgePlan]], journal: ResumeJournal, out: Path,
                 lengths: dict[int, int], progress: RunProgress, clean_ref: Any) -> ResumePoint:
    """The cloud restored its newest checkpoint (round P): restore every edge from its round-P snapshot and
    take back the recorded batches of the rounds before P."""
    position, restored = wait_for_actor(cloud.position, where="the cloud")
    if restored is None:
        raise ConfigError(f"cannot resume: no cloud checkpoint of this run in {out / 'cloud_checkpoints'}")
    snapshots, pubs, newest = journal.load_round(position)
    rows = journal.rows_before(out, position)
    expected = sum(min(n, position) for n in lengths.values())
    if len(rows) != expected:
        raise ConfigError(f"cannot resume: {out / 'batches.parquet'} holds {len(rows)} batches of the rounds before "
                          f"{position}, the run had {expected}")
    ray.get([h.restore.remote({p.edge_id: snapshots[p.edge_id] for p in group}, pubs, clean_ref)
             for h, group in zip(hosts, groups)])
    for row in sorted(rows, key=lambda r: (r["batch_index"], r["edge_id"])):
        progress.add(row)
    print(f"resumed at round {position}: {len(rows)} batches kept, the cloud restored from its checkpoint",
          file=sys.stderr, flush=True)
    return ResumePoint(position, pubs, newest)


def run_ray(cfg: dict[str, Any], out_dir: str | Path | None = None, partial: PartialWriter | None = None,
            resume: bool = False) -> tuple[RunRecorder, dict[str, Any]]:
    """Run the fleet on Ray; returns the per-batch records and run facts.

    Cloud checkpoints go to ``<out_dir>/cloud_checkpoints`` (a temporary folder without one): on a
    cluster that folder must be reachable from the cloud actor's node.
    """
    t_data = time.perf_counter()
    verify_models(cfg)  # everything that can be checked before Ray starts is checked before it starts
    data = DataContext(cfg["data"])
    data.image_shape  # noqa: B018 - a lazy folder reads its first image now, so a bad one fails here
    t_data = time.perf_counter() - t_data
    started = init_ray(cfg)
    tmp = None
    try:
        t_start = time.perf_counter() - t_data  # start-up: data and actors (not Ray's own start)
        clean_ref = ray.put(data.clean) if data.clean is not None else None
        plans = edge_plans(cfg)
        count = host_count(len(plans), cfg["edges"]["per_host"], cfg["edges"].get("hosts"),
                           cluster_cpus() - cfg["cloud"]["num_cpus"], cfg["ray"]["host_num_cpus"])
        groups = split_hosts(plans, count)
        checkpointing = cfg["cloud"]["checkpoint_every"] > 0
        if out_dir is None and checkpointing:
            tmp = tempfile.TemporaryDirectory(prefix="cema-cloud-")
        ckpt_dir = checkpoint_folder(cfg, out_dir or tmp.name) if checkpointing else None
        run_id = ResumeJournal.read(Path(out_dir))[1] if resume else uuid.uuid4().hex
        journal = None
        if out_dir is not None and checkpointing and cfg["mode"] == "sync":
            journal = ResumeJournal(Path(out_dir), run_id)
            if not resume:
                journal.start(cfg)
        if resume and journal is None:
            raise ConfigError("--resume continues sync-mode Ray runs with cloud.checkpoint_every > 0")
        if cfg["output"]["progress"]:
            print(f"ray: actors {actor_prefix(cfg['name'], run_id)}-cloud and -edgehost-000..{len(groups) - 1:03d} "
                  f"in namespace '{NAMESPACE}' (dashboard: Actors page)", file=sys.stderr, flush=True)
        cloud, hosts = start_actors(cfg, groups, clean_ref, ckpt_dir, run_id)
        startup = time.perf_counter() - t_start
        host_nodes = len({wait_for_actor(h.node_id, where=f"edge host {i}") for i, h in enumerate(hosts)})
        lengths = {p.edge_id: len(data.stream(p)) for p in plans}
        total = sum(lengths.values())
        progress = RunProgress(f"{cfg['name']} [ray {cfg['mode']}]", total, cfg["output"]["progress"],
                               count_predictions=cfg["mode"] == "async")
        fcfg = cfg["faults"]
        faults = FaultSchedule.plan(fcfg["kill_hosts"], max(lengths.values()), len(hosts), fcfg["seed"],
                                    fcfg["kill_cloud"], fcfg["raise_in_hosts"])
        extra: dict[str, Any] = {}
        try:
            link, pool = CloudLink(cloud, faults, checkpointing), HostPool(hosts, faults, clean_ref)
            if cfg["mode"] == "sync":
                start = (resume_hosts(cloud, hosts, groups, journal, Path(out_dir), lengths, progress, clean_ref)
                         if resume else None)
                SyncDriver(link, pool, progress, lengths, journal, cfg["cloud"]["checkpoint_every"], partial,
                           start).run()
                dropped = 0
                if journal is not None:
                    journal.finish()
            else:
                driver = AsyncDriver(link, pool, progress, cfg["ray"]["max_in_flight_per_host"],
                                     cfg["ray"]["backlog_full"] == "wait", partial)
                dropped = driver.run()
                driver.fix_lags(progress.recorder.rows)
                extra = {"max_backlog": driver.max_backlog, "backlog_bound": driver.backlog_bound}
        except KeyboardInterrupt:  # the records the driver has are whole batches: write them, then stop
            progress.close()
            kill_actors([cloud, *hosts])
            raise RunInterrupted(progress.recorder, {"wall_seconds": progress.elapsed, "num_hosts": len(hosts),
                                                     "faults": faults.report()}) from None
        except BaseException:
            progress.close()
            kill_actors([cloud, *hosts])  # on a shared cluster nobody else would stop them
            raise
        progress.close()
        stats = wait_for_actor(cloud.stats)
        facts = {"wall_seconds": progress.elapsed, "startup_seconds": startup, "num_hosts": len(hosts),
                 "host_nodes": host_nodes, "ray_run": actor_prefix(cfg["name"], run_id),
                 "dropped": stats["dropped"] + dropped, "cloud_steps": stats["steps"],
                 "publications": stats["publications"], "cloud_step_seconds": stats["step_seconds"],
                 "cloud_deliveries": stats["deliveries"], "cloud_ingested": stats["ingested"], "faults": faults.report(),
                 "threads": {"cloud": cloud_threads(cfg["cloud"]), "edge_host": 1}, **extra}
        kill_actors([cloud, *hosts])
        return progress.recorder, facts
    finally:
        if started:
            ray.shutdown()
        if tmp is not None:
            tmp.cleanup()
