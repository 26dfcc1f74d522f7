"""Where `bench methods` runs its runs: one after another in this process, or as Ray tasks at once.

A table is many independent single-edge runs (protocol x row x seed). Each is a plain local run, so
it can be a Ray task with a stated CPU share: as many run at once as the cluster (or this machine)
admits, and a 2-core machine does two at a time. Each task runs with one torch thread, so its numbers
are those of the serial path; the rows come back in plan order whatever order the tasks finish in. A
task whose worker dies is a failed row, like a run that raises.
"""
from __future__ import annotations

import math
import os
from typing import Any, Callable, Sequence

from cema_ray.bench.common import _progress

Plan = Sequence[tuple[str, str, dict[str, Any]]]
RunOne = Callable[..., Any]  # bench.run_one(cfg, protocol, method, resume=...) -> MethodRow


def run_serial(plan: Plan, run_one: RunOne, resume: bool, describe: Callable[[Any], str]) -> list[Any]:
    rows = []
    for i, (protocol, method, cfg) in enumerate(plan):
        _progress(f"[{i + 1}/{len(plan)}] {protocol}/{method} seed {cfg['seed']} -> {cfg['output']['dir']}")
        rows.append(run_one(cfg, protocol, method, resume=resume))
        _progress(f"  {describe(rows[-1])}")
    return rows


def _task(run_one: RunOne, cfg: dict[str, Any], protocol: str, method: str, resume: bool) -> Any:
    return run_one(cfg, protocol, method, resume=resume)  # its local run sets `threads` (Ray's CPUs for the task)


def run_on_ray(plan: Plan, run_one: RunOne, resume: bool, describe: Callable[[Any], str], cpus_per_run: float,
               failed_row: Callable[[str, str, dict[str, Any], str], Any]) -> list[Any]:
    """Every run as a Ray task of ``cpus_per_run`` CPUs, on this process's Ray if it has one, else on the cluster
    of ``RAY_ADDRESS`` (a Ray job), else on a new local instance the size of this machine."""
    import ray

    started = not ray.is_initialized()
    if started:
        env = {"env_vars": {"OMP_NUM_THREADS": str(max(1, math.ceil(cpus_per_run)))}}
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, runtime_env=env, log_to_driver=False)
        else:
            ray.init("local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, runtime_env=env)
    try:
        task = ray.remote(num_cpus=cpus_per_run, max_retries=0)(_task)
        quiet = [(p, m, {**cfg, "output": {**cfg["output"], "progress": False}}) for p, m, cfg in plan]
        pending = {task.remote(run_one, cfg, p, m, resume): i for i, (p, m, cfg) in enumerate(quiet)}
        _progress(f"{len(plan)} runs as Ray tasks of {cpus_per_run:g} CPU(s), "
                  f"{int(ray.cluster_resources().get('CPU', 0) // cpus_per_run)} at once")
        rows: list[Any] = [None] * len(plan)
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(ref)
            protocol, method, cfg = plan[i]
            try:
                rows[i] = ray.get(ref)
            except Exception as exc:  # noqa: BLE001  a dead worker is a failed row, never a missing one
                rows[i] = failed_row(protocol, method, cfg, f"{type(exc).__name__}: {exc}".splitlines()[0])
            _progress(f"[{len(plan) - len(pending)}/{len(plan)}] {protocol}/{method} seed {cfg['seed']}: "
                      f"{describe(rows[i])}")
        return rows
    finally:
        if started:
            ray.shutdown()
