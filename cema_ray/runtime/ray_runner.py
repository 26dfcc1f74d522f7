"""The Ray runtime's entry: starts (or joins) Ray, places edge hosts and the cloud, runs a driver.

The rounds themselves are `sync_driver.SyncDriver` (the single-process runner's rounds, hosts in
parallel) and `async_driver.AsyncDriver` (edges ahead of the cloud); both step the hosts through a
`host_pool.HostPool` and talk to the cloud through a `cloud_link.CloudLink`.
"""
from __future__ import annotations

import math
import os
import re
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from cema_ray.data.streams import stream_length
from cema_ray.errors import ConfigError, RunInterrupted
from cema_ray.results import RunRecorder
from cema_ray.results.storage import is_uri
from cema_ray.runtime.actor_calls import kill_actors, project_error, wait_for_actor
from cema_ray.runtime.async_driver import AsyncDriver, fix_lags
from cema_ray.runtime.cloud_checkpoint import CloudCheckpointStore
from cema_ray.runtime.cloud_link import CloudLink
from cema_ray.runtime.faults import FaultSchedule
from cema_ray.runtime.fleet import DataContext, EdgePlan, edge_plans, method_settings, verify_models
from cema_ray.runtime.host_pool import HostPool
from cema_ray.runtime.journal import PartialWriter, ResumeJournal
from cema_ray.runtime.placement import NodeWatch, cloud_key, node_facts, preflight
from cema_ray.runtime.progress import RunProgress
from cema_ray.runtime.resume import resume_async, resume_hosts
from cema_ray.runtime.ray_actors import CloudActor, EdgeHost
from cema_ray.runtime.sync_driver import SyncDriver
from cema_ray.runtime.uplink import follows

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
    """The cloud `<prefix>-cloud` (the shards `<prefix>-cloud-<k>`) and the hosts `<prefix>-edgehost-NNN`.

    The hosts get the clean images with their first `restore` (every start and restart is followed by one),
    not as a constructor argument: an object-store reference there makes Ray print an error-level line for
    every restartable actor (ray#53727). The driver holds the reference for the whole run."""
    rcfg = cfg["ray"]
    prefix = actor_prefix(cfg["name"], run_id)
    shards = cfg["cloud"]["shards"]
    clouds = [
        ray.remote(CloudActor).options(
            name=cloud_name(prefix, k, shards), namespace=NAMESPACE, num_cpus=cfg["cloud"]["num_cpus"],
            num_gpus=cfg["cloud"]["num_gpus"] or None, resources=cfg["cloud"]["resources"] or None,
            max_restarts=cfg["cloud"]["max_restarts"] if checkpoint_dir else 0,
            max_task_retries=0,  # the driver re-delivers, in order, after a restart
        ).remote(cfg, cloud_threads(cfg["cloud"]), shard_folder(checkpoint_dir, k, shards), run_id, prefix, k)
        for k in range(shards)
    ]
    hosts = [
        ray.remote(EdgeHost).options(
            name=f"{prefix}-edgehost-{i:03d}", namespace=NAMESPACE, num_cpus=rcfg["host_num_cpus"],
            num_gpus=rcfg["host_num_gpus"] or None, resources=rcfg["host_resources"] or None,
            memory=int(rcfg["host_memory_mb"]) * 2**20 or None, scheduling_strategy="SPREAD",
            max_restarts=-1, max_task_retries=0,  # restarted by Ray, restored by the driver
        ).remote(i, cfg, range(plans[0].edge_id, plans[-1].edge_id + 1), None, 1, int(rcfg["host_nice"]), True, prefix)
        for i, plans in enumerate(groups)
    ]
    try:  # arms every host; an actor killed meanwhile is waited for (faults do not wait for the start-up)
        refs = [h.restore.remote({}, [], clean_ref) for h in hosts]  # all at once: the hosts build in parallel
        for k, cloud in enumerate(clouds):
            wait_for_actor(cloud.ping, where=cloud_key(k, shards))
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
        kill_actors([*clouds, *hosts])
        raise
    return clouds, hosts


def free_cpus(cfg: dict[str, Any]) -> float:
    """The cluster's CPUs left for hosts after the cloud shards' reservations. On a local instance (no
    `ray.address`: its CPUs are all there will be) too few for one host is a config error, where the host would
    wait for a CPU forever; a joined cluster may still be scaling up, and its hosts wait for their nodes."""
    cloud = cfg["cloud"]["shards"] * cfg["cloud"]["num_cpus"]
    free = cluster_cpus() - cloud
    if free < cfg["ray"]["host_num_cpus"] and not cfg["ray"].get("address"):
        raise ConfigError(f"cloud.shards x cloud.num_cpus = {cloud:g} CPUs leave {max(free, 0):g} of the cluster's "
                          f"{cluster_cpus():g} for edge hosts, which need ray.host_num_cpus = "
                          f"{cfg['ray']['host_num_cpus']:g} each: lower cloud.num_cpus or use more CPUs")
    return free


def shard_stats(stats: list[dict[str, Any]]) -> dict[str, Any]:
    """The cloud shards' counters added up (deliveries, device, GPUs and uploads per busy second are the first
    shard's)."""
    total = dict(stats[0])
    for other in stats[1:]:
        for key in ("steps", "ingested", "dropped", "publications", "step_seconds"):
            total[key] += other[key]
    return total


def cloud_name(prefix: str, shard: int, shards: int) -> str:
    """`<prefix>-cloud`, or `<prefix>-cloud-<k>` for the shards of a sharded cloud."""
    return f"{prefix}-cloud" if shards == 1 else f"{prefix}-cloud-{shard}"


def shard_folder(checkpoint_dir: str | None, shard: int, shards: int) -> str | None:
    """Each shard checkpoints into its own folder (`shard-<k>` below the run's) when there are several."""
    if checkpoint_dir is None or shards == 1:
        return checkpoint_dir
    return str(Path(checkpoint_dir) / f"shard-{shard}")


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
        checked_nodes = preflight(cfg, data.clean, method_settings(cfg)[0].uses_foundation)
        clean_ref = ray.put(data.clean) if data.clean is not None else None
        plans = edge_plans(cfg)
        count = host_count(len(plans), cfg["edges"]["per_host"], cfg["edges"].get("hosts"),
                           free_cpus(cfg), cfg["ray"]["host_num_cpus"])
        groups = split_hosts(plans, count)
        checkpointing = cfg["cloud"]["checkpoint_every"] > 0
        if out_dir is None and checkpointing:
            tmp = tempfile.TemporaryDirectory(prefix="cema-cloud-")
        ckpt_dir = checkpoint_folder(cfg, out_dir or tmp.name) if checkpointing else None
        run_id = ResumeJournal.read(Path(out_dir))[1] if resume else uuid.uuid4().hex
        journal = None
        if out_dir is not None and checkpointing and (cfg["mode"] == "sync" or cfg["cloud"]["shards"] == 1):
            journal = ResumeJournal(Path(out_dir), run_id)
            if not resume:
                journal.start(cfg)
            print(f"resumable: if this driver or the head node dies, `cema-ray run --resume {out_dir}` (on a new "
                  f"cluster add ray.address=HEAD:6379) continues from the newest cloud checkpoint", file=sys.stderr,
                  flush=True)
        if resume and journal is None:
            raise ConfigError("--resume continues Ray runs with cloud.checkpoint_every > 0 (in async mode with one "
                              "cloud shard)")
        if cfg["output"]["progress"]:
            shards = cfg["cloud"]["shards"]
            clouds_named = "-cloud" if shards == 1 else f"-cloud-0..{shards - 1}"
            print(f"ray: actors {actor_prefix(cfg['name'], run_id)}{clouds_named} and "
                  f"-edgehost-000..{len(groups) - 1:03d} in namespace '{NAMESPACE}' (dashboard: Actors page)",
                  file=sys.stderr, flush=True)
        clouds, hosts = start_actors(cfg, groups, clean_ref, ckpt_dir, run_id)
        startup = time.perf_counter() - t_start
        host_node_ids = [wait_for_actor(h.node_id, where=f"edge host {i}") for i, h in enumerate(hosts)]
        cloud_node_ids = [wait_for_actor(c.node_id, where=cloud_key(k, len(clouds))) for k, c in enumerate(clouds)]
        placement = node_facts(cloud_node_ids, host_node_ids)
        lengths = {p.edge_id: stream_length(p.spec) for p in plans}
        total = sum(lengths.values())
        progress = RunProgress(f"{cfg['name']} [ray {cfg['mode']}]", total, cfg["output"]["progress"],
                               count_predictions=cfg["mode"] == "async")
        fcfg = cfg["faults"]
        faults = FaultSchedule.plan(fcfg["kill_hosts"], max(lengths.values()), len(hosts), fcfg["seed"],
                                    fcfg["kill_cloud"], fcfg["raise_in_hosts"])
        extra: dict[str, Any] = {}
        driver: AsyncDriver | None = None
        watch = NodeWatch(host_node_ids, cloud_node_ids)
        try:
            links = [CloudLink(c, faults, checkpointing, kills=k == 0, watch=watch, label=cloud_key(k, len(clouds)))
                     for k, c in enumerate(clouds)]
            pool = HostPool(hosts, faults, clean_ref, watch)
            if cfg["mode"] == "sync":
                start = (resume_hosts(clouds, hosts, groups, journal, Path(out_dir), lengths, progress, clean_ref)
                         if resume else None)
                pool.redo_until = start.redo_until if start else {}  # a host revived later keeps them
                sync = SyncDriver(links, pool, progress, lengths, journal, cfg["cloud"]["checkpoint_every"], partial,
                                  start)
                sync.run()
                extra = {"phase_seconds": sync.phase_seconds}
                dropped = 0
                if journal is not None:
                    journal.finish()
            else:
                start, resumed = (resume_async(clouds, hosts, groups, journal, Path(out_dir), progress, clean_ref)
                                  if resume else (None, {}))
                pool.redo_until = start.redo_until if start else {}
                driver = AsyncDriver(links, pool, progress, cfg["ray"]["max_in_flight_per_host"],
                                     cfg["ray"]["backlog_full"] == "wait", partial,
                                     cfg["cloud"]["queue_capacity"] if follows(cfg) else None, journal, start,
                                     CloudCheckpointStore(ckpt_dir, run_id).pin if journal is not None else None)
                # one shard after another: timed side by side on one node, they would share its cores
                calibrated = [wait_for_actor(c.calibrate, data.image_shape) for c in clouds]
                shares = {k: share for k, (_, share) in enumerate(calibrated) if share is not None}
                dropped = driver.run(shares)
                if journal is not None:
                    journal.finish()
                fix_lags(progress.recorder.rows, driver.pub_log, len(links))
                extra = {"max_backlog": driver.max_backlog, "backlog_bound": driver.backlog_bound,
                         "uplink": "follow" if follows(cfg) else "fixed", "uplink_per_edge": driver.uplink,
                         "coalesced_deliveries": driver.coalesced,
                         "cloud_calibrated_uploads_per_s": calibrated[0][0],  # the first shard's
                         **({"shard_merges": driver.merges} if len(links) > 1 else {}),
                         **({"resumed_at": start.position, **resumed} if start else {})}
        except KeyboardInterrupt:  # the records the driver has are whole batches: write them, then stop
            salvaged = {}
            if driver is not None:  # async: batches predicted but not yet recorded (backlog, cloud calls)
                print("interrupted: recording the batches already predicted (up to 10 s)", file=sys.stderr,
                      flush=True)
                salvaged = {"dropped_at_interrupt": driver.salvage(), "dropped": driver.dropped,
                            "predicted_batches": progress.predicted_batches}
                fix_lags(progress.recorder.rows, driver.pub_log, len(links))
            progress.close()
            kill_actors([*clouds, *hosts])
            raise RunInterrupted(progress.recorder, {"wall_seconds": progress.elapsed, "num_hosts": len(hosts),
                                                     "faults": faults.report(), "placement": placement,
                                                     "nodes_lost": watch.lost, **salvaged}) from None
        except BaseException:
            progress.close()
            kill_actors([*clouds, *hosts])  # on a shared cluster nobody else would stop them
            raise
        progress.close()
        stats = shard_stats([wait_for_actor(c.stats) for c in clouds])
        facts = {"wall_seconds": progress.elapsed, "startup_seconds": startup, "num_hosts": len(hosts),
                 "host_nodes": len(set(host_node_ids)), "preflight_nodes": checked_nodes,
                 "placement": placement, "nodes_lost": watch.lost, "ray_run": actor_prefix(cfg["name"], run_id),
                 "dropped": (stats["dropped"] + dropped if "uploads_lost_in_resume" not in extra else
                             sum(r["dropped"] for r in progress.recorder.rows) + extra["uploads_lost_in_resume"]),
                 "cloud_steps": stats["steps"],
                 "publications": stats["publications"], "cloud_step_seconds": stats["step_seconds"],
                 "cloud_deliveries": stats["deliveries"], "cloud_ingested": stats["ingested"], "faults": faults.report(),
                 "threads": {"cloud": cloud_threads(cfg["cloud"]), "edge_host": 1},
                 "cloud_device": stats["device"], "cloud_gpu_ids": stats["gpu_ids"],
                 **({"cloud_uploads_per_busy_s": stats["uploads_per_busy_s"]} if stats["uploads_per_busy_s"] else {}),
                 **extra}
        kill_actors([*clouds, *hosts])
        return progress.recorder, facts
    finally:
        if started:
            ray.shutdown()
        if tmp is not None:
            tmp.cleanup()
