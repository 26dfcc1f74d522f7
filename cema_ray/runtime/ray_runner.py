"""The Ray runtime's driver: starts (or joins) Ray, places edge hosts and the cloud, runs rounds.

Sync mode runs the single-process runner's rounds with the edges spread over hosts: all hosts
predict in parallel, the cloud ingests the uploads in ascending edge id, publishes once, and
the driver puts each publication into the object store once and hands every host the same
reference. The driver owns those objects, so they outlive a cloud actor's failure.
"""
from __future__ import annotations

import math
import os
import time
from collections import deque
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from cema_ray.results import RunRecorder
from cema_ray.runtime.cloud import SHARED, Publication
from cema_ray.runtime.faults import FaultSchedule
from cema_ray.runtime.fleet import DataContext, EdgePlan, edge_plans
from cema_ray.runtime.progress import RunProgress
from cema_ray.runtime.ray_actors import CloudActor, EdgeHost

NAMESPACE = "cema"
MAX_RECOVERIES_PER_ROUND = 5
RESTART_TIMEOUT_S = 180.0


def init_ray(cfg: dict[str, Any]) -> bool:
    """Join the cluster named by RAY_ADDRESS or `ray.address`, else start a local instance.

    Returns True when this call started Ray (and so must shut it down). Resource arguments are
    passed only to an instance we start: Ray refuses them when connecting to a cluster.
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


def start_actors(cfg: dict[str, Any], groups: list[list[EdgePlan]], clean_ref: Any) -> tuple[Any, list[Any]]:
    rcfg = cfg["ray"]
    cloud = ray.remote(CloudActor).options(
        name="cema-cloud", namespace=NAMESPACE, num_cpus=cfg["cloud"]["num_cpus"], max_restarts=0,
        lifetime=None,
    ).remote(cfg, threads=max(1, int(cfg["cloud"]["num_cpus"])))
    hosts = [
        ray.remote(EdgeHost).options(
            name=f"cema-edgehost-{i:03d}", namespace=NAMESPACE, num_cpus=rcfg["host_num_cpus"],
            memory=int(rcfg["host_memory_mb"]) * 2**20 or None, scheduling_strategy="SPREAD",
            max_restarts=-1, max_task_retries=0,  # restarted by Ray, restored by the driver
        ).remote(i, cfg, plans, clean_ref, 1)
        for i, plans in enumerate(groups)
    ]
    ray.get([cloud.ping.remote(), *[h.restore.remote({}, []) for h in hosts]])  # arms every host
    return cloud, hosts


class SyncDriver:
    """Reference rounds on Ray: hosts predict in parallel, the cloud ingests in edge order, one publication.

    After every round each host hands back a snapshot of its edges. A host that dies (a crash, an
    OOM kill, `ray.kill`) is restarted by Ray (`max_restarts=-1`); the driver restores its edges from
    the previous round's snapshot, re-sends the newest publication and reruns its step, so every
    batch is predicted exactly once and the run goes on.
    """

    def __init__(self, cloud: Any, hosts: list[Any], progress: RunProgress, faults: FaultSchedule,
                 lengths: dict[int, int]) -> None:
        self.cloud, self.hosts, self.progress, self.faults = cloud, hosts, progress, faults
        self.lengths = lengths  # batches per edge: edge e takes part in rounds 0 .. lengths[e] - 1
        self.snapshots = ray.get([h.snapshot.remote() for h in hosts])
        self.latest_pubs: list[Publication] = []

    def run(self) -> None:
        for round_index in range(max(self.lengths.values(), default=0)):
            edge_ids = sorted(e for e, n in self.lengths.items() if n > round_index)
            newest = ray.get(self.cloud.newest_versions.remote(edge_ids))
            calls = [h.step_and_snapshot.options(num_returns=3).remote(newest) for h in self.hosts]
            for victim in self.faults.victims(round_index):
                ray.kill(self.hosts[victim], no_restart=False)  # injected crash, mid-step
            outs = [self._result(i, call, newest) for i, call in enumerate(calls)]
            steps = ray.get(self.cloud.receive_round.remote(*[o[1] for o in outs]))
            pubs = ray.get(self.cloud.end_round.remote(edge_ids))
            if pubs:
                self.latest_pubs = pubs
                pubs_ref = ray.put(pubs)  # put once, every host gets the same reference
                for host in self.hosts:
                    try:
                        ray.get(host.apply.remote(pubs_ref))
                    except RayActorError:
                        pass  # restarting: its restore re-sends these publications
            for i, (records, _, snap) in enumerate(outs):
                self.snapshots[i] = snap
                for rec in records:
                    self.progress.add(dict(rec, cloud_steps=steps.get(rec["edge_id"], 0)))
            self.progress.refresh()

    def _result(self, i: int, call: list[Any], newest: dict[int, int]) -> tuple[list, Any, dict]:
        """This host's round output; after a crash, restore it and run its step again."""
        records_ref, uploads_ref, snap_ref = call
        for _ in range(MAX_RECOVERIES_PER_ROUND):
            try:
                records, snap = ray.get([records_ref, snap_ref])
                return records, uploads_ref, snap
            except (RayActorError, RayTaskError) as exc:
                if isinstance(exc, RayTaskError) and "HostNeedsRestore" not in str(exc):
                    raise
                self.faults.seen += 1
                self._restore(i)
                records_ref, uploads_ref, snap_ref = self.hosts[i].step_and_snapshot.options(
                    num_returns=3).remote(newest)
        raise RuntimeError(f"edge host {i} kept failing: gave up after {MAX_RECOVERIES_PER_ROUND} restarts")

    def _restore(self, i: int) -> None:
        deadline = time.monotonic() + RESTART_TIMEOUT_S
        while True:  # Ray restarts the actor; calls fail until its __init__ has run again
            try:
                ray.get(self.hosts[i].restore.remote(self.snapshots[i], self.latest_pubs), timeout=60)
                self.faults.recovered += 1
                return
            except (RayActorError, GetTimeoutError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)


class AsyncDriver:
    """Edges run ahead: each host keeps up to `max_in_flight` steps queued, the cloud consumes uploads
    as they come, and each publication is broadcast as soon as it exists.

    Uploads wait in a bounded backlog while the cloud is busy (at most `CLOUD_IN_FLIGHT` calls
    outstanding); past the bound the oldest are dropped and counted, so a slow cloud never stalls
    the edges nor grows memory without bound.
    """

    CLOUD_IN_FLIGHT = 2

    def __init__(self, cloud: Any, hosts: list[Any], progress: RunProgress, cfg: dict[str, Any]) -> None:
        self.cloud, self.hosts, self.progress = cloud, hosts, progress
        self.max_in_flight = cfg["ray"]["max_in_flight_per_host"]
        self.backlog_bound = max(2, 2 * len(hosts))
        self.newest: dict[int, int] = {}
        self.host_calls: dict[Any, tuple[int, Any]] = {}  # records ref -> (host index, uploads ref)
        self.cloud_calls: dict[Any, list[dict[str, Any]]] = {}  # cloud ref -> records awaiting steps
        self.backlog: deque[tuple[Any, list[dict[str, Any]]]] = deque()
        self.dropped = 0

    def submit(self, i: int) -> None:
        records_ref, uploads_ref = self.hosts[i].step_round.options(num_returns=2).remote(self.newest, True)
        self.host_calls[records_ref] = (i, uploads_ref)

    def run(self) -> int:
        for i in range(len(self.hosts)):
            for _ in range(self.max_in_flight):
                self.submit(i)
        while self.host_calls or self.cloud_calls or self.backlog:
            ready, _ = ray.wait([*self.host_calls, *self.cloud_calls], num_returns=1, timeout=1.0)
            for ref in ready:
                if ref in self.host_calls:
                    self._host_done(ref)
                else:
                    self._cloud_done(ref)
            self._dispatch()
            self.progress.refresh(version=max(self.newest.values(), default=0), backlog=len(self.backlog))
        return self.dropped

    def _host_done(self, ref: Any) -> None:
        i, uploads_ref = self.host_calls.pop(ref)
        records = ray.get(ref)
        if not records:
            return  # the host's edges are done: no more calls to it
        self.backlog.append((uploads_ref, records))
        while len(self.backlog) > self.backlog_bound:
            _, old = self.backlog.popleft()  # oldest first: the freshest uploads matter most
            for rec in old:
                self.dropped += rec["uploaded"]
                self.progress.add(dict(rec, cloud_steps=0, dropped=rec["uploaded"]))
        self.submit(i)

    def _dispatch(self) -> None:
        while self.backlog and len(self.cloud_calls) < self.CLOUD_IN_FLIGHT:
            uploads_ref, records = self.backlog.popleft()
            self.cloud_calls[self.cloud.receive_and_publish.remote(uploads_ref)] = records

    def _cloud_done(self, ref: Any) -> None:
        records = self.cloud_calls.pop(ref)
        steps, pubs = ray.get(ref)
        if pubs:
            pubs_ref = ray.put(pubs)  # put once; every host gets the same reference
            for pub in pubs:
                key = SHARED if pub.edge_id is None else pub.edge_id
                self.newest[key] = max(self.newest.get(key, 0), pub.version)
            for host in self.hosts:
                host.apply.remote(pubs_ref)  # fire and forget: applied between the host's steps
        for rec in records:
            self.progress.add(dict(rec, cloud_steps=steps.get(rec["edge_id"], 0), dropped=0))


def run_ray(cfg: dict[str, Any]) -> tuple[RunRecorder, dict[str, Any]]:
    """Run the fleet on Ray; returns the per-batch records and run facts."""
    started = init_ray(cfg)
    try:
        t_start = time.perf_counter()
        data = DataContext(cfg["data"])
        clean_ref = ray.put(data.clean) if data.clean is not None else None
        plans = edge_plans(cfg)
        count = host_count(len(plans), cfg["edges"]["per_host"], cfg["edges"].get("hosts"),
                           cluster_cpus() - cfg["cloud"]["num_cpus"], cfg["ray"]["host_num_cpus"])
        groups = split_hosts(plans, count)
        cloud, hosts = start_actors(cfg, groups, clean_ref)
        startup = time.perf_counter() - t_start
        host_nodes = len(set(ray.get([h.node_id.remote() for h in hosts])))
        lengths = {p.edge_id: len(data.stream(p)) for p in plans}
        total = sum(lengths.values())
        if cfg["faults"]["kill_cloud"]:
            raise NotImplementedError("faults.kill_cloud needs cloud checkpoints, not implemented yet")
        progress = RunProgress(f"{cfg['name']} [ray {cfg['mode']}]", total, cfg["output"]["progress"])
        dropped = 0
        faults = FaultSchedule.plan(cfg["faults"]["kill_hosts"], max(lengths.values()), len(hosts), cfg["faults"]["seed"])
        if cfg["mode"] == "sync":
            SyncDriver(cloud, hosts, progress, faults, lengths).run()
        else:
            if faults.planned or cfg["faults"]["kill_cloud"]:
                raise NotImplementedError("fault injection runs in mode 'sync' only for now")
            dropped = AsyncDriver(cloud, hosts, progress, cfg).run()
        progress.close()
        stats = ray.get(cloud.stats.remote())
        facts = {"wall_seconds": progress.elapsed, "startup_seconds": startup, "num_hosts": len(hosts),
                 "host_nodes": host_nodes,
                 "dropped": stats["dropped"] + dropped, "cloud_steps": stats["steps"],
                 "publications": stats["publications"], "cloud_step_seconds": stats["step_seconds"],
                 "faults": faults.report()}
        for actor in [cloud, *hosts]:
            ray.kill(actor)
        return progress.recorder, facts
    finally:
        if started:
            ray.shutdown()
