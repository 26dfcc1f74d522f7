"""Soak: the quick start in async mode for N minutes while its actors are killed from outside with SIGKILL.

    .venv/bin/python jobs/soak.py [--minutes 10] [--host-every 20] [--cloud-every 60] [--edges 32] [--out runs/soak]

The run is `configs/quickstart.yaml` with `mode: async`, its streams `--scale` times longer and every group paced
by a frame rate so that it lasts about `--minutes`. Every `--host-every` seconds one EdgeHost process, and every
`--cloud-every` seconds the CloudActor process, is sent SIGKILL (found by Ray's process titles, not through the
project's own fault settings); every 5 s the resident memory of the driver and of every Ray worker is sampled.
At the end it checks that the run finished, that every sample was predicted exactly once (the ids in
batches.parquet), and that every upload was either ingested by the cloud or counted as dropped, and writes
soak.json (every sample) and soak.md (the table). Exit 1 when a check fails.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

import psutil
import pyarrow.parquet as pq
import yaml

REPO = Path(__file__).resolve().parents[1]


def soak_config(scale: int, minutes: float, out: Path, edges: int | None = None) -> Path:
    """The quick start, async, streams `scale` x longer, each group paced to last about `minutes` (with `edges`
    edges instead of its 32, each host holding a quarter of them: the test suite's short form)."""
    cfg = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    cfg["name"], cfg["mode"] = "soak", "async"
    if edges is not None:
        cfg["edges"]["count"], cfg["edges"]["per_host"] = edges, max(1, edges // 4)
    top = cfg["stream"]
    top["samples_per_domain"] *= scale
    for group in cfg["edges"]["groups"]:
        if "samples_per_domain" in group.get("stream", {}):
            group["stream"]["samples_per_domain"] *= scale
        stream = {**top, **group.get("stream", {})}
        batches = len(stream["corruptions"]) * stream["samples_per_domain"] / stream["batch_size"]
        group["frame_rate"] = round(batches / (60 * minutes), 4)
    cfg["output"] = {"dir": str(out / "run"), "progress": False, "report": True}
    cfg.setdefault("ray", {})["include_dashboard"] = False  # a soak needs no dashboard (and no fixed port)
    path = out / "soak.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def ray_processes(title: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info.get("cmdline") or []
        if cmd and cmd[0].startswith(title):
            found.append(proc)
    return found


def memory_mb(driver: psutil.Process) -> float:
    """Resident memory of the driver and of every Ray worker process (MiB)."""
    total = 0
    for proc in [driver, *ray_processes("ray::")]:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--host-every", type=float, default=20.0)
    ap.add_argument("--cloud-every", type=float, default=60.0)
    ap.add_argument("--scale", type=int, default=5, help="streams this many times the quick start's")
    ap.add_argument("--edges", type=int, default=None, help="edges (default: the quick start's 32)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/soak"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    config = soak_config(args.scale, args.minutes, args.out, args.edges)
    rng = random.Random(args.seed)
    cmd = [sys.executable, "-m", "cema_ray.cli", "run", str(config)]
    log = open(args.out / "run.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    driver = psutil.Process(proc.pid)
    t0 = time.monotonic()
    next_host, next_cloud, next_sample = args.host_every, args.cloud_every, 0.0
    kills: list[dict] = []
    samples: list[tuple[float, float]] = []
    while proc.poll() is None:
        t = time.monotonic() - t0
        if t >= next_sample:
            samples.append((round(t, 1), round(memory_mb(driver), 1)))
            next_sample += 5.0
        for what, title, due in (("host", "ray::EdgeHost", next_host), ("cloud", "ray::CloudActor", next_cloud)):
            if t < due:
                continue
            victims = ray_processes(title)
            if victims:
                victim = rng.choice(victims)
                try:
                    os.kill(victim.pid, signal.SIGKILL)
                    kills.append({"t": round(t, 1), "what": what, "pid": victim.pid})
                except ProcessLookupError:
                    pass
            if what == "host":
                next_host += args.host_every
            else:
                next_cloud += args.cloud_every
        time.sleep(0.5)
    wall = time.monotonic() - t0
    return report(args, proc.returncode, wall, kills, samples)


def report(args: argparse.Namespace, code: int, wall: float, kills: list[dict], samples: list) -> int:
    run = args.out / "run"
    checks: dict[str, bool] = {"finished (exit 0)": code == 0}
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    checks["summary complete"] = summary.get("status") == "complete"
    if (run / "batches.parquet").is_file():
        t = pq.read_table(run / "batches.parquet").to_pydict()
        ids = [i for a, b in zip(t["first_id"], t["last_id"]) for i in range(a, b + 1)]
        checks["every sample predicted once"] = len(ids) == len(set(ids)) == summary.get("samples")
        checks["dropped column = summary"] = sum(t["dropped"]) == summary.get("dropped")
    checks["uploads ingested or counted"] = summary.get("uploaded") == summary.get("cloud_ingested", -1) + \
        summary.get("dropped", 0)
    mem = [m for _, m in samples]
    first = median(mem[1:13]) if len(mem) > 13 else None  # minute 1 (skip the start-up sample)
    last = median(mem[-12:]) if len(mem) > 13 else None
    result = {"minutes": args.minutes, "wall_s": round(wall, 1), "exit_code": code, "kills": kills,
              "host_kills": sum(k["what"] == "host" for k in kills),
              "cloud_kills": sum(k["what"] == "cloud" for k in kills), "faults": summary.get("faults"),
              "samples": summary.get("samples"), "uploaded": summary.get("uploaded"),
              "dropped": summary.get("dropped"), "published_fraction": summary.get("published_fraction"),
              "memory_mb": samples, "memory_first_minute_mb": first, "memory_last_minute_mb": last,
              "checks": checks}
    (args.out / "soak.json").write_text(json.dumps(result, indent=2))
    lines = ["| check | result |", "| --- | --- |", *[f"| {k} | {'ok' if v else 'FAILED'} |" for k, v in checks.items()]]
    lines += ["", f"{result['host_kills']} EdgeHost and {result['cloud_kills']} CloudActor processes killed with "
              f"SIGKILL in {wall:.0f} s; faults seen by the run: {json.dumps(summary.get('faults'))}; "
              f"memory (driver + Ray workers, RSS) median {first} MiB in the first minute, {last} MiB in the "
              f"last; {summary.get('samples')} samples, {summary.get('dropped')} uploads dropped, "
              f"published_fraction {summary.get('published_fraction')}."]
    (args.out / "soak.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
