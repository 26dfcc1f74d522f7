"""How many torch threads a process should run: the cores it may use, not the machine's.

torch defaults to one thread per core of the machine. On a shared machine, in a container with a CPU quota,
or in a Ray task that reserved one CPU, that oversubscribes the cores: runs side by side slow each other
down and their timings mean nothing. The `threads` setting fixes the count for the local runtime and for
`bench`; left at null it is, in order, the user's `$OMP_NUM_THREADS`, the CPUs Ray assigned to this task or
actor, or the cores the OS lets this process run on (its CPU affinity and cgroup quota).
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import torch

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def os_cores() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(cores, quota) if quota else cores)


def _cgroup_quota() -> int | None:
    """ceil(quota / period) of /sys/fs/cgroup/cpu.max ("max 100000" means no quota)."""
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
        return None if quota == "max" else max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        return None


def ray_assigned_cpus() -> int | None:
    """The CPUs Ray reserved for the task or actor this code runs in (None outside one, or Ray not loaded)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    try:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:  # noqa: BLE001 - a driver has no assignment; any failure means "not in a task"
        return None
    return max(1, math.ceil(cpus)) if cpus else None


def resolve_threads(setting: int | None) -> tuple[int, str]:
    """(count, where it came from) for a `threads` setting."""
    if setting is not None:
        return int(setting), "threads"
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) >= 1:
        return int(env), "$OMP_NUM_THREADS"
    assigned = ray_assigned_cpus()
    if assigned is not None:
        return assigned, "Ray's CPU assignment"
    return os_cores(), "the cores this process may use"


def apply_threads(setting: int | None) -> int:
    """Set torch's intra-op thread count once, from the setting; returns the count now in use."""
    count, _ = resolve_threads(setting)
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count
