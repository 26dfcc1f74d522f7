"""`cema-ray sweep`: a grid over dotted config keys (and seeds), every point a Ray Tune trial.

Ray Tune is the experiment runner made for Ray: it places each trial with the CPUs it asks for, as many at once
as the cluster admits (on this machine too), keeps a results table, and restores an interrupted sweep. Each trial
is an ordinary local run (`runtime=local`, one torch thread per CPU it holds) written to
`<out>/trials/<trial>/`, so every point traces back to its `summary.json` and `batches.parquet`.

What a user tunes is a trade-off: accuracy against the uplink. The sweep writes `sweep.json` (every trial),
`sweep.md` (per grid point the mean and std over the seeds) and `sweep.png` (accuracy against upload fraction,
the Pareto front marked: the points no other point beats on both).
"""
from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from statistics import mean, stdev
from typing import Any, Sequence

from cema_ray.config import load_config
from cema_ray.schema import parse_override
from cema_ray.errors import ConfigError

FIXED = ("runtime=local", "output.report=false", "output.progress=false")


def parse_grid(items: Sequence[str]) -> dict[str, list[Any]]:
    """`KEY=[v1,v2,...]` flags -> {key: values}; one line for a malformed flag."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, values = parse_override(item)
        if not isinstance(values, list) or not values:
            raise ConfigError(f"--grid {item!r}: give KEY=[v1,v2,...] (a non-empty list)")
        if key in grid or key == "seed":
            raise ConfigError(f"--grid {key}: given twice (seeds go in --seeds)")
        grid[key] = values
    if not grid:
        raise ConfigError("sweep needs at least one --grid KEY=[v1,v2,...]")
    return grid


def points(grid: dict[str, list[Any]], seeds: Sequence[int]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, once per seed."""
    keys = list(grid)
    return [{**dict(zip(keys, combo)), "seed": s} for combo in itertools.product(*grid.values()) for s in seeds]


def _overrides(point: dict[str, Any]) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in point.items()]


def check_points(config: Path, overrides: Sequence[str], grid_points: list[dict[str, Any]]) -> None:
    """Every trial's config validated before any trial starts (one line names the bad value)."""
    for point in grid_points:
        load_config(config, [*overrides, *_overrides(point), *FIXED])


def trial(params: dict[str, Any]) -> None:
    """One Tune trial: the run config with this point's values, run locally; reports the run's numbers."""
    from ray import tune

    from cema_ray.runtime import run_experiment

    point = params["point"]
    cfg = load_config(params["config"], [*params["overrides"], *_overrides(point), *FIXED])
    out = Path(params["out"]) / "trials" / trial_name(point)
    summary = run_experiment(cfg, out)
    tune.report({"accuracy": summary["accuracy"], "upload_fraction": summary["upload_fraction"],
                 "bytes_up": summary["bytes_up"], "bytes_down": summary["bytes_down"],
                 "wall_seconds": summary["wall_seconds"], "out_dir": str(out)})


def trial_name(point: dict[str, Any]) -> str:
    text = "_".join(f"{k.split('.')[-1]}-{v}" for k, v in point.items())
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text)[:120]


def run_sweep(config: Path, grid: dict[str, list[Any]], seeds: Sequence[int], overrides: Sequence[str], out: Path,
              cpus_per_trial: float, resume: bool) -> list[dict[str, Any]]:
    """Run every point as a Tune trial (restoring the sweep in `out` when asked) and return one row per trial."""
    import ray
    from ray import tune

    grid_points = points(grid, seeds)
    check_points(config, overrides, grid_points)
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = not ray.is_initialized()
    if started:
        ray.init(include_dashboard=False, log_to_driver=False)
    try:
        trainable = tune.with_resources(trial, {"cpu": cpus_per_trial})
        storage = out / "tune"
        if resume and tune.Tuner.can_restore(str(storage / "sweep")):
            tuner = tune.Tuner.restore(str(storage / "sweep"), trainable, resume_errored=True)
        else:
            space = {"point": tune.grid_search(grid_points), "config": str(Path(config).resolve()),
                     "overrides": list(overrides), "out": str(out)}
            tuner = tune.Tuner(trainable, param_space=space,
                               run_config=tune.RunConfig(name="sweep", storage_path=str(storage), verbose=0))
        results = tuner.fit()
    finally:
        if started:
            ray.shutdown()
    rows = []
    for result in results:
        point = result.config["point"]
        metrics = result.metrics or {}
        rows.append({**point, "status": "ok" if result.error is None else f"failed: {result.error}",
                     **{k: metrics.get(k) for k in ("accuracy", "upload_fraction", "bytes_up", "bytes_down",
                                                     "wall_seconds", "out_dir")}})
    order = {trial_name(p): i for i, p in enumerate(grid_points)}
    return sorted(rows, key=lambda r: order.get(trial_name({k: r[k] for k in (*grid, "seed")}), 0))


def aggregate(rows: list[dict[str, Any]], keys: Sequence[str]) -> list[dict[str, Any]]:
    """Per grid point: accuracy and upload fraction as mean and std over its seeds (finished trials only)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(json.dumps(row[k]) for k in keys), []).append(row)
    out = []
    for group in groups.values():
        ok = [r for r in group if r["status"] == "ok"]
        acc = [r["accuracy"] for r in ok]
        up = [r["upload_fraction"] for r in ok]
        out.append({**{k: group[0][k] for k in keys}, "seeds": [r["seed"] for r in ok],
                    "accuracy_mean": mean(acc) if acc else None,
                    "accuracy_std": stdev(acc) if len(acc) > 1 else 0.0 if acc else None,
                    "upload_fraction_mean": mean(up) if up else None, "failed": len(group) - len(ok)})
    for row in out:
        row["pareto"] = on_front(row, out)
    return out


def on_front(row: dict[str, Any], rows: list[dict[str, Any]]) -> bool:
    """No other point is at least as accurate with at most the uploads, and better on one of the two."""
    if row["accuracy_mean"] is None:
        return False
    a, u = row["accuracy_mean"], row["upload_fraction_mean"]
    for other in rows:
        if other is row or other["accuracy_mean"] is None:
            continue
        b, v = other["accuracy_mean"], other["upload_fraction_mean"]
        if b >= a and v <= u and (b > a or v < u):
            return False
    return True


def markdown(points_: list[dict[str, Any]], keys: Sequence[str], command: str) -> str:
    head = "| " + " | ".join(keys) + " | accuracy (%) | uploads (%) | seeds | Pareto |"
    lines = [head, "|" + " --- |" * len(keys) + " ---: | ---: | ---: | --- |"]
    for p in points_:
        acc = "n/a" if p["accuracy_mean"] is None else f"{100 * p['accuracy_mean']:.2f} ± {100 * p['accuracy_std']:.2f}"
        up = "n/a" if p["upload_fraction_mean"] is None else f"{100 * p['upload_fraction_mean']:.2f}"
        lines.append("| " + " | ".join(json.dumps(p[k]) for k in keys) + f" | {acc} | {up} | {len(p['seeds'])} | "
                     + ("yes" if p["pareto"] else "") + " |")
    return f"Reproduce: `{command}`\n\n" + "\n".join(lines)


def plot(points_: list[dict[str, Any]], keys: Sequence[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [p for p in points_ if p["accuracy_mean"] is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([100 * p["upload_fraction_mean"] for p in done], [100 * p["accuracy_mean"] for p in done],
               c="tab:gray", label="grid point")
    front = sorted((p for p in done if p["pareto"]), key=lambda p: p["upload_fraction_mean"])
    ax.plot([100 * p["upload_fraction_mean"] for p in front], [100 * p["accuracy_mean"] for p in front], "o-",
            c="tab:red", label="Pareto front")
    for p in done:
        ax.annotate(", ".join(f"{k.split('.')[-1]}={p[k]}" for k in keys),
                    (100 * p["upload_fraction_mean"], 100 * p["accuracy_mean"]), fontsize=7)
    ax.set_xlabel("uploads (% of the stream)")
    ax.set_ylabel("edge accuracy (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(rows: list[dict[str, Any]], grid: dict[str, list[Any]], out: Path, command: str, seconds: float) -> str:
    keys = list(grid)
    agg = aggregate(rows, keys)
    (out / "sweep.json").write_text(json.dumps({"command": command, "grid": grid, "trials": rows, "points": agg,
                                                "seconds": seconds}, indent=2, default=str))
    table = markdown(agg, keys, command)
    (out / "sweep.md").write_text(f"# Sweep\n\n{table}\n\n{len(rows)} trials, {seconds:.0f} s in all.\n")
    plot(agg, keys, out / "sweep.png")
    return table


def seeds_of(text: str | None) -> list[int]:
    if not text:
        return [0]
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds = {text!r}: give comma-separated integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds = {text!r}: give distinct integers")
    return seeds


def main(args: Any) -> int:
    """`cema-ray sweep`: returns 1 when a trial failed (its row says why)."""
    grid = parse_grid(args.grid)
    seeds = seeds_of(args.seeds)
    if args.cpus_per_trial <= 0:
        raise ConfigError(f"--cpus-per-trial = {args.cpus_per_trial}: must be > 0")
    out = Path(args.out or f"runs/sweep-{Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    t0 = time.perf_counter()
    rows = run_sweep(Path(args.config), grid, seeds, args.override, out, args.cpus_per_trial, args.resume)
    print(write(rows, grid, out.resolve(), args.command_line, time.perf_counter() - t0))
    print(f"outputs: {out.resolve()}")
    return 1 if any(r["status"] != "ok" for r in rows) else 0
