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
from typing import Any

import ray
from tqdm import tqdm

from cema_ray.results import RunRecorder
from cema_ray.runtime.fleet import DataContext, EdgePlan, edge_plans
from cema_ray.runtime.ray_actors import CloudActor, EdgeHost

NAMESPACE = "cema"


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


def split_hosts(plans: list[EdgePlan], per_host: int, hosts: int | None) -> list[list[EdgePlan]]:
    """Contiguous ranges of edges, `per_host` each (or spread over `hosts` when given)."""
    n = len(plans)
    count = hosts or math.ceil(n / per_host)
    size = math.ceil(n / count)
    return [plans[i : i + size] for i in range(0, n, size)]


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
        ).remote(i, cfg, plans, clean_ref, 1)
        for i, plans in enumerate(groups)
    ]
    ray.get([cloud.ping.remote(), *[h.ping.remote() for h in hosts]])
    return cloud, hosts


def run_sync(cloud: Any, hosts: list[Any], recorder: RunRecorder, total: int, cfg: dict[str, Any]) -> None:
    t0 = time.perf_counter()
    edge_ids = [p for ids in ray.get([h.pending.remote() for h in hosts]) for p in ids]
    seen = correct = uploaded = 0
    with tqdm(total=total, desc=f"{cfg['name']} [ray sync]", unit="batch", disable=not cfg["output"]["progress"],
              mininterval=2) as bar:
        while edge_ids:
            newest = ray.get(cloud.newest_versions.remote(edge_ids))
            outs = [h.step_round.options(num_returns=2).remote(newest) for h in hosts]
            record_refs, upload_refs = [o[0] for o in outs], [o[1] for o in outs]
            steps_ref = cloud.receive_round.remote(*upload_refs)  # uploads go host -> cloud via the store
            steps = ray.get(steps_ref)
            pubs = ray.get(cloud.end_round.remote(edge_ids))
            if pubs:
                pubs_ref = ray.put(pubs)  # put once, every host gets the same reference
                ray.get([h.apply.remote(pubs_ref) for h in hosts])
            for records in ray.get(record_refs):
                for rec in records:
                    rec["cloud_steps"] = steps.get(rec["edge_id"], 0)
                    rec["t_wall"] = time.perf_counter() - t0
                    recorder.add(rec)
                    seen += rec["samples"]
                    correct += rec["correct"]
                    uploaded += rec["uploaded"]
                    bar.update(1)
            bar.set_postfix(acc=f"{correct / max(seen, 1):.3f}", up=f"{uploaded / max(seen, 1):.2f}")
            edge_ids = [p for ids in ray.get([h.pending.remote() for h in hosts]) for p in ids]


def run_ray(cfg: dict[str, Any]) -> tuple[RunRecorder, dict[str, Any]]:
    """Run the fleet on Ray; returns the per-batch records and run facts."""
    if cfg["mode"] != "sync":
        raise NotImplementedError("mode 'async' is not implemented yet; use mode=sync")
    started = init_ray(cfg)
    try:
        t_start = time.perf_counter()
        data = DataContext(cfg["data"])
        clean_ref = ray.put(data.clean) if data.clean is not None else None
        plans = edge_plans(cfg)
        groups = split_hosts(plans, cfg["edges"]["per_host"], cfg["edges"].get("hosts"))
        cloud, hosts = start_actors(cfg, groups, clean_ref)
        startup = time.perf_counter() - t_start
        total = sum(len(data.stream(p)) for p in plans)
        recorder = RunRecorder()
        t0 = time.perf_counter()
        run_sync(cloud, hosts, recorder, total, cfg)
        stats = ray.get(cloud.stats.remote())
        facts = {"wall_seconds": time.perf_counter() - t0, "startup_seconds": startup, "num_hosts": len(hosts),
                 "dropped": stats["dropped"], "cloud_steps": stats["steps"], "publications": stats["publications"]}
        for actor in [cloud, *hosts]:
            ray.kill(actor)
        return recorder, facts
    finally:
        if started:
            ray.shutdown()
