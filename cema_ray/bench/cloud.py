"""What bounds Ray against the single process on one machine: the cloud's step, timed where each runs it.

A CEMA run is cloud-bound (the cloud's steps take over 90 % of the wall time in `bench scale`), so the
Ray runtime can only beat the single-process runner if the machine runs the cloud's work faster in
separate processes than in one process's threads, or if the cloud's step runs faster in an actor.
This benchmark measures both on real images, with the run config's models and method:

- the cloud's step in this process at 1 thread and at N threads (the local runner's cloud);
- N concurrent 1-thread processes, each stepping its own cloud (how well the cores run separate
  processes: what Ray's hosts and cloud share);
- the step inside a Ray task with N threads (the cloud actor's, beside Ray's own daemons).

One step is the cloud's work for one chunk of uploads: `CloudService.receive` with `chunk` images,
which for CEMA is the foundation's update, the teacher's forward on the chunk plus replay, and the
student's distillation step.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import time
from statistics import median
from typing import Any

import numpy as np
import torch

from cema_ray.errors import ConfigError

FILL = 288  # uploads before timing (default): past CEMA's replay warm-up (256), so every timed step replays


def _probe(cfg: dict[str, Any], chunk: int, fill: int = FILL) -> tuple[Any, np.ndarray]:
    """A fresh cloud for the config, its replay buffer filled with ``fill`` uploads, and the images to feed it."""
    from cema_ray.runtime.assembly import load_cloud
    from cema_ray.runtime.fleet import DataContext, method_settings

    data = DataContext(cfg["data"])
    if data.clean is None:
        raise ConfigError(f"bench cloud needs a clean-split data source, not '{cfg['data']['source']}'")
    spec, _ = method_settings(cfg)
    if not spec.uses_foundation:
        raise ConfigError(f"bench cloud times a cloud that trains: method '{spec.name}' has none")
    cloud = load_cloud(cfg)
    images = data.clean.take(np.arange(min(len(data.clean), fill + 4096))).images
    if len(images) < fill + chunk:
        raise ConfigError(f"bench cloud --fill {fill} needs at least {fill + chunk} clean images, the split has "
                          f"{len(images)}")
    cloud.receive(0, images[:fill])
    return cloud, images


def time_steps(cfg: dict[str, Any], threads: int, steps: int, chunk: int, ready: Any = None,
               fill: int = FILL) -> list[float]:
    """Seconds per cloud step, `steps` of them after one untimed warm-up step, at `threads` torch threads.

    ``ready``: a barrier to wait at once the cloud is built, so that concurrent processes step together.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cloud, images = _probe(cfg, chunk, fill)
        if ready is not None:
            ready.wait(timeout=600)
        offset, times = fill, []
        for k in range(steps + 1):
            batch = images[offset:offset + chunk]
            offset = offset + chunk if offset + 2 * chunk <= len(images) else fill
            t0 = time.perf_counter()
            taken = cloud.receive(0, batch)
            if k:
                times.append(time.perf_counter() - t0)
            if taken < 1:
                raise RuntimeError(f"a delivery of {chunk} uploads made no cloud step (chunk_size above {chunk}?)")
        return times
    finally:
        torch.set_num_threads(before)


def _worker(cfg: dict[str, Any], steps: int, chunk: int, fill: int, barrier: Any, results: Any) -> None:
    cloud_times: list[float] = []
    try:
        cloud_times = time_steps(cfg, 1, steps, chunk, ready=barrier, fill=fill)
    finally:
        results.put(cloud_times)


def concurrent_processes(cfg: dict[str, Any], processes: int, steps: int, chunk: int,
                         fill: int = FILL) -> list[list[float]]:
    """Each of `processes` spawned 1-thread processes times its own cloud's steps, all at once."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(cfg, steps, chunk, fill, barrier, results)) for _ in range(processes)]
    for p in procs:
        p.start()
    out = [results.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    if any(p.exitcode for p in procs) or any(not t for t in out):
        raise RuntimeError("a timing process failed; its traceback is above")
    return out


def in_ray_task(cfg: dict[str, Any], threads: int, steps: int, chunk: int, fill: int = FILL) -> list[float]:
    """The same timing inside a Ray task (a Ray worker process, as the cloud actor runs in)."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})  # as the runner's workers get
    try:
        task = ray.remote(num_cpus=1)(time_steps)
        return ray.get(task.remote(cfg, threads, steps, chunk, fill=fill))
    finally:
        if started:
            ray.shutdown()


def run_cloud_bench(cfg: dict[str, Any], threads: int, steps: int, chunk: int | None = None,
                    fill: int = FILL) -> list[dict[str, Any]]:
    """The four placements, one after the other; a row each with the median step and the aggregate rate.

    ``fill``: uploads in the replay buffer before timing. A run's replay grows to thousands of samples; the
    default 288 keeps it just past the warm-up, so compare concurrent processes at a run's size too."""
    chunk = int(chunk or (cfg["method"].get("settings") or {}).get("chunk_size", 32))
    one = time_steps(cfg, 1, steps, chunk, fill=fill)
    many = time_steps(cfg, threads, steps, chunk, fill=fill)
    procs = concurrent_processes(cfg, threads, steps, chunk, fill)
    ray_times = in_ray_task(cfg, threads, steps, chunk, fill)
    base = median(one)
    rows = [_row("this process", 1, 1, [one], base), _row("this process", 1, threads, [many], base),
            _row("concurrent processes", threads, 1, procs, base), _row("Ray task", 1, threads, [ray_times], base)]
    return [dict(r, fill=fill) for r in rows]


def _row(where: str, processes: int, threads: int, times: list[list[float]], base: float) -> dict[str, Any]:
    per_step = median(t for run in times for t in run)
    rate = processes / per_step
    return {"where": where, "processes": processes, "threads": threads, "ms_per_step": 1000 * per_step,
            "steps_per_s": rate, "speedup": rate * base, "steps": sum(len(t) for t in times)}


def markdown(rows: list[dict[str, Any]], command: str) -> str:
    lines = [f"Reproduce: `{command}`", "",
             "| placement | processes x threads | ms per step (median) | steps/s, all processes | speed-up over 1 thread |",
             "|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['where']} | {r['processes']} x {r['threads']} | {r['ms_per_step']:.1f} | "
                     f"{r['steps_per_s']:.2f} | {r['speedup']:.2f} |")
    return "\n".join(lines) + "\n"
