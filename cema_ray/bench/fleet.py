"""`bench fleet`: the fleet's learning curve, accuracy per edge against fleet size, stream order and budget.

Every accuracy table of `bench methods` is one edge; a fleet's point is that many edges share one cloud's
knowledge. Each cell (edges, order, budget) runs the learning methods at that upload budget, and each (edges,
order) runs two references once: `bn` (the edge model BN-adapting alone) and `foundation-bn` (`bn` with the
foundation as the edge model: the ceiling a cloud can hand down). "Gap closed" is (method - bn) /
(foundation-bn - bn) on the same streams. Orders: ``same`` (every edge the config's corruption order),
``permute`` (each edge its own order of the same corruptions), ``recurring`` (the order twice: domains come
back), ``groups`` (the config's own edge groups, each with its streams, as in the quick start: each group's
accuracy is compared with its own under `bn`, and the row gives the worst group's difference). Modes: ``sync``
runs use the single-process runner in sync rounds (the reference semantics) and are fanned out as Ray tasks as
in `bench methods`; ``async`` runs use the Ray runtime (edges never wait for the cloud, the uplink follows the
cloud's capacity: runtime/uplink.py) on ``ASYNC_HOSTS`` EdgeHosts, one run at a time after the sync ones, alone
on the machine, since what they measure is how the edges and the cloud share it. The references run once per
(edges, order): without uploads, BN adapt is the same in both modes. Each run is written to
``<out>/e<edges>-<order>[-b<budget>][-async]/<method>/`` by the ordinary runner.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from cema_ray.bench.common import _markdown_page, _out_dir, _pct, _split_names, bench_config
from cema_ray.bench.methods import MethodRow, gap_closed, run_one
from cema_ray.config import method_registry, read_yaml
from cema_ray.errors import ConfigError

ORDERS = ("same", "permute", "recurring", "groups")
MODES = ("sync", "async")
ASYNC_HOSTS = 2  # EdgeHosts of an async run: they and the cloud share the machine's cores
DEFAULT_METHODS = ("cema-fleet", "cema-bank")
QUICK_OVERRIDES = ("stream.samples_per_domain=64", "stream.corruptions=[gaussian_noise, fog]")
REFERENCES = {"bn": "bn", "foundation-bn": "bn"}  # row -> method; foundation-bn runs the foundation as the edge


@dataclass(frozen=True)
class Cell:
    """One point of the curve: a fleet size, a stream order and (for learning methods) an upload budget."""

    edges: int
    order: str
    budget: float | None  # None: a reference (no uploads)
    mode: str = "sync"

    @property
    def label(self) -> str:
        return (f"e{self.edges}-{self.order}" + ("" if self.budget is None else f"-b{self.budget:g}")
                + ("" if self.mode == "sync" else f"-{self.mode}"))


@dataclass
class FleetRow:
    cell: Cell
    method: str
    run: MethodRow
    edge_accuracy: list[float]  # per edge, in edge id order
    cloud_step_seconds: float | None
    dropped: int | None = None  # uploads the cloud never trained on (async: the backlog's drops)
    visits: list[float] | None = None  # recurring order: [accuracy, uploads] of the first visit, then the second
    group_accuracy: dict[str, float] | None = None  # groups order: each edge group's accuracy


def parse_list(text: str, flag: str, kind: type, lo: float, hi: float | None = None) -> list:
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag} = {text!r}: give comma-separated {kind.__name__}s") from None
    if not values or min(values) < lo or (hi is not None and max(values) > hi) or len(set(values)) != len(values):
        raise ConfigError(f"{flag} = {text!r}: give distinct values in [{lo}, {hi if hi is not None else 'inf'}]")
    return values


def _order_overrides(order: str, corruptions: Sequence[str]) -> list[str]:
    if order == "permute":
        return [f"edges.distributions={{corruptions: {{permute: [{', '.join(corruptions)}]}}}}"]
    if order == "recurring":
        return [f"stream.corruptions=[{', '.join([*corruptions, *corruptions])}]"]
    return []


def _mode_overrides(mode: str, edges: int) -> list[str]:
    if mode == "async":
        return ["runtime=ray", "mode=async", f"edges.hosts={min(edges, ASYNC_HOSTS)}", "output.progress=false"]
    return ["runtime=local", f"edges.per_host={edges}", "edges.hosts=null"]


def plan_fleet_runs(config: Path, overrides: Sequence[str], sizes: Sequence[int], orders: Sequence[str],
                    budgets: Sequence[float], methods: Sequence[str], out: Path, modes: Sequence[str] = ("sync",)
                    ) -> tuple[list[tuple[str, str, dict[str, Any]]], dict[str, Cell]]:
    """(cell label, row, validated config) per run: the references once per (edges, order), then each method
    at each budget and mode. Checked whole before anything runs."""
    base = read_yaml(config).get("name", config.stem)
    given = bench_config(config, overrides)
    corruptions = given["stream"]["corruptions"]
    if "groups" in orders and not given["edges"]["groups"]:
        raise ConfigError(f"--orders groups: {config} has no edges.groups to keep")
    plan, cells = [], {}
    for edges in sizes:
        for order in orders:
            runs = [(Cell(edges, order, None), r) for r in REFERENCES]
            runs += [(Cell(edges, order, b, mode), m) for mode in modes for b in budgets for m in methods]
            for cell, row in runs:
                method = REFERENCES.get(row, row)
                own = [] if order == "groups" else ["edges.groups=[]", "edges.distributions={}"]
                fixed = [*_mode_overrides(cell.mode, edges), f"edges.count={edges}",
                         *own, f"method.name={method}", "output.report=false",
                         *_order_overrides(order, corruptions),
                         *([] if cell.budget is None else [f"method.settings.upload_budget={cell.budget}"])]
                cfg = bench_config(config, overrides, fixed)
                if row == "foundation-bn":  # every edge on the foundation, a mixed fleet's groups included
                    cfg["models"]["edge"] = dict(cfg["models"]["foundation"])
                    for group in cfg["edges"]["groups"]:
                        group["model"] = {**group["model"], "name": None, "checkpoint": None}
                cfg["name"] = f"{base}-{cell.label}-{row}"
                cfg["output"]["dir"] = str(out / cell.label / row)
                cells[cell.label] = cell
                plan.append((cell.label, row, cfg))
    return plan, cells


def per_edge_accuracy(out_dir: str) -> list[float]:
    """Each edge's online accuracy over its whole stream, from the run's batches.parquet."""
    import pyarrow.parquet as pq

    path = Path(out_dir) / "batches.parquet"
    if not path.is_file():
        return []
    t = pq.read_table(path, columns=["edge_id", "correct", "samples"]).to_pydict()
    correct: dict[int, int] = {}
    samples: dict[int, int] = {}
    for e, c, n in zip(t["edge_id"], t["correct"], t["samples"]):
        correct[e] = correct.get(e, 0) + c
        samples[e] = samples.get(e, 0) + n
    return [correct[e] / samples[e] for e in sorted(samples) if samples[e]]


def group_accuracy(out_dir: str) -> dict[str, float] | None:
    """Each edge group's online accuracy (its samples over all its edges), from the run's batches.parquet."""
    import pyarrow.parquet as pq

    path = Path(out_dir) / "batches.parquet"
    if not path.is_file():
        return None
    t = pq.read_table(path, columns=["group", "correct", "samples"]).to_pydict()
    sums: dict[str, list[int]] = {}
    for g, c, n in zip(t["group"], t["correct"], t["samples"]):
        acc = sums.setdefault(g, [0, 0])
        acc[0], acc[1] = acc[0] + c, acc[1] + n
    return {g: c / n for g, (c, n) in sorted(sums.items()) if n}


def worst_group(groups: dict[str, float] | None, bn: dict[str, float] | None) -> float | None:
    """The smallest (group's accuracy - that group's under `bn`): below 0, some group lost to its own BN."""
    if not groups or not bn or set(groups) != set(bn):
        return None
    return min(groups[g] - bn[g] for g in groups)


def visit_split(out_dir: str) -> list[float] | None:
    """A recurring stream's two visits (each edge's first and second half of its batches): [accuracy of the
    first, uploads of the first, accuracy of the second, uploads of the second], from the run's batches.parquet."""
    import pyarrow.parquet as pq

    path = Path(out_dir) / "batches.parquet"
    if not path.is_file():
        return None
    t = pq.read_table(path, columns=["edge_id", "batch_index", "correct", "samples", "uploaded"]).to_pydict()
    length: dict[int, int] = {}
    for e, b in zip(t["edge_id"], t["batch_index"]):
        length[e] = max(length.get(e, 0), b + 1)
    sums = [[0, 0, 0], [0, 0, 0]]  # per visit: correct, samples, uploaded
    for e, b, c, n, u in zip(t["edge_id"], t["batch_index"], t["correct"], t["samples"], t["uploaded"]):
        visit = sums[int(2 * b >= length[e])]
        visit[0], visit[1], visit[2] = visit[0] + c, visit[1] + n, visit[2] + u
    if not sums[0][1] or not sums[1][1]:
        return None
    return [sums[0][0] / sums[0][1], sums[0][2], sums[1][0] / sums[1][1], sums[1][2]]


def _fleet_row(run: MethodRow, cells: dict[str, Cell]) -> FleetRow:
    path = Path(run.out_dir) / "summary.json"
    summary = json.loads(path.read_text()) if path.is_file() else {}
    cell = cells[run.protocol]
    visits = visit_split(run.out_dir) if cell.order == "recurring" and run.status == "ok" else None
    groups = group_accuracy(run.out_dir) if cell.order == "groups" and run.status == "ok" else None
    return FleetRow(cell, run.method, run, per_edge_accuracy(run.out_dir), summary.get("cloud_step_seconds"),
                    summary.get("dropped"), visits, groups)


COLUMNS = ("edges", "order", "budget", "mode", "method", "accuracy (%)", "edge min / max (%)", "gap closed (%)",
           "uploads (%)", "dropped (% of uploads)", "bytes down / edge", "cloud s / 1k samples",
           "visit 1 → 2: accuracy (%), uploads", "worst group - its bn (points)", "status")


def fleet_markdown(rows: Sequence[FleetRow]) -> str:
    """One line per run: the fleet's accuracy (mean over samples), its spread over edges and the gap it closed
    between `bn` and `foundation-bn` on the same streams."""
    refs = {(r.cell.edges, r.cell.order, r.method): r.run.accuracy for r in rows
            if r.cell.budget is None and r.run.status == "ok"}
    bn_groups = {(r.cell.edges, r.cell.order): r.group_accuracy for r in rows
                 if r.method == "bn" and r.cell.budget is None and r.run.status == "ok"}
    lines = ["| " + " | ".join(COLUMNS) + " |",
             "| ---: | --- | ---: | --- | --- |" + " ---: |" * (len(COLUMNS) - 6) + " --- |"]
    for r in rows:
        run = r.run
        head = [str(r.cell.edges), r.cell.order, "-" if r.cell.budget is None else f"{100 * r.cell.budget:g} %",
                "-" if r.cell.budget is None else r.cell.mode, r.method]
        if run.status != "ok":
            lines.append("| " + " | ".join(head + [""] * 9 + ["failed: " + run.error.replace("|", "/")]) + " |")
            continue
        bn, top = refs.get((r.cell.edges, r.cell.order, "bn")), refs.get((r.cell.edges, r.cell.order, "foundation-bn"))
        gap = None if r.cell.budget is None else gap_closed(run.accuracy, bn, top)
        spread = f"{_pct(min(r.edge_accuracy))} / {_pct(max(r.edge_accuracy))}" if r.edge_accuracy else ""
        cloud = "" if not r.cloud_step_seconds else f"{1000 * r.cloud_step_seconds / run.samples:.2f}"
        dropped = "" if r.dropped is None or not run.uploaded else _pct(r.dropped / run.uploaded)
        v = r.visits
        visits = "" if v is None else f"{_pct(v[0])} → {_pct(v[2])}, {int(v[1]):,} → {int(v[3]):,}"
        own_bn = bn_groups.get((r.cell.edges, r.cell.order))
        worst = None if r.method == "bn" else worst_group(r.group_accuracy, own_bn)
        lines.append("| " + " | ".join(head + [_pct(run.accuracy), spread, _pct(gap), _pct(run.upload_fraction),
                                              dropped, f"{run.bytes_down // max(r.cell.edges, 1):,}", cloud, visits,
                                              "" if worst is None else f"{100 * worst:+.2f}", "ok"]) + " |")
    return "\n".join(lines)


def cmd_fleet(args: argparse.Namespace) -> int:
    from cema_ray.bench.fanout import run_on_ray, run_serial
    from cema_ray.bench.methods import _failed_row, _row_line

    sizes = parse_list(args.edges, "--edges", int, 1)
    orders = _split_names(args.orders, "order", ORDERS, "--orders")
    modes = _split_names(args.modes, "mode", MODES, "--modes")
    budgets = parse_list(args.budgets, "--budgets", float, 0.0, 1.0)
    if min(budgets) <= 0:
        raise ConfigError(f"--budgets = {args.budgets!r}: every budget must be > 0")
    methods = _split_names(args.methods, "method", method_registry().names(), "--methods")
    if args.cpus_per_run <= 0:
        raise ConfigError(f"--cpus-per-run = {args.cpus_per_run}: must be > 0")
    out = _out_dir(args.out, "fleet", args.config)
    user = [*(QUICK_OVERRIDES if args.quick else ()), *args.override]
    plan, cells = plan_fleet_runs(args.config, user, sizes, orders, budgets, methods, out, modes)
    t0 = time.perf_counter()
    local = [p for p in plan if cells[p[0]].mode == "sync"]
    alone = [p for p in plan if cells[p[0]].mode != "sync"]
    if args.serial or len(local) == 1:
        runs, how = run_serial(local, run_one, args.resume, _row_line), "one after another in one process"
    else:
        runs = run_on_ray(local, run_one, args.resume, _row_line, args.cpus_per_run, _failed_row)
        how = f"as Ray tasks of {args.cpus_per_run:g} CPU each, several at once"
    if alone:  # after the sync runs, one at a time: each starts its own Ray instance and measures the machine
        runs += run_serial(alone, run_one, args.resume, _row_line)
        how += f"; async runs one at a time on {ASYNC_HOSTS} EdgeHosts and a cloud actor"
    order = {(label, row): i for i, (label, row, _) in enumerate(plan)}
    runs = sorted(runs, key=lambda r: order[(r.protocol, r.method)])
    rows = [_fleet_row(r, cells) for r in runs]
    table = fleet_markdown(rows)
    write_fleet(rows, table, out, args.command_line, how, time.perf_counter() - t0)
    print(table)
    print(f"outputs: {out}")
    return 1 if any(r.run.status != "ok" for r in rows) else 0


def write_fleet(rows: Sequence[FleetRow], table: str, out: Path, command: str, how: str, seconds: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    data = {"command": command, "executed": how,
            "rows": [{"cell": asdict(r.cell), "method": r.method, "edge_accuracy": r.edge_accuracy,
                      "cloud_step_seconds": r.cloud_step_seconds, "dropped": r.dropped, "visits": r.visits,
                      "group_accuracy": r.group_accuracy,
                      **asdict(r.run)}
                     for r in rows]}
    (out / "fleet.json").write_text(json.dumps(data, indent=2) + "\n")
    _plot(rows, out / "fleet.png")
    intro = (f"Runs executed {how}. Accuracy: the fleet's online accuracy over every "
             f"edge's stream; edge min / max: the worst and best edge; gap closed: (method - bn) / "
             f"(foundation-bn - bn) on the same streams; cloud s / 1k samples: the cloud's training seconds per "
             f"thousand edge samples; dropped: uploads the cloud never trained on (async).\n\n![fleet](fleet.png)\n\n{table}")
    (out / "fleet.md").write_text(_markdown_page("The fleet's learning curve", intro, command, seconds))


def _plot(rows: Sequence[FleetRow], path: Path) -> None:
    """Accuracy against fleet size, one line per (order, method, budget), references dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        if r.run.status == "ok":
            name = f"{r.cell.order} {r.method}" + ("" if r.cell.budget is None else f" {100 * r.cell.budget:g}%")
            name += "" if r.cell.mode == "sync" else f" {r.cell.mode}"
            lines.setdefault(name, []).append((r.cell.edges, 100 * r.run.accuracy))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in lines.items():
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o", linestyle="--" if any(ref in name for ref in REFERENCES) else "-", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("edges")
    ax.set_ylabel("accuracy (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def add_parser(sub: Any) -> None:
    fl = sub.add_parser("fleet", help="the fleet's learning curve: accuracy per edge vs fleet size, order, budget")
    fl.add_argument("config", type=Path, help="run config (e.g. configs/bench_cifar10.yaml)")
    fl.add_argument("--edges", default="1,16,64", help="fleet sizes, comma-separated (default 1,16,64)")
    fl.add_argument("--orders", default="same,permute",
                    help=f"stream orders, comma-separated (default same,permute; allowed: {', '.join(ORDERS)})")
    fl.add_argument("--budgets", default="0.3,0.1", help="upload budgets, comma-separated (default 0.3,0.1)")
    fl.add_argument("--modes", default="sync",
                    help="sync (local runner, fanned out) and/or async (Ray, one run at a time); default sync")
    fl.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                    help=f"learning methods (default {','.join(DEFAULT_METHODS)}); bn and foundation-bn always run")
    fl.add_argument("--override", action="append", default=[], metavar="key=value",
                    help="config override applied to every run, repeatable")
    fl.add_argument("--serial", action="store_true", help="one run after another in this process")
    fl.add_argument("--cpus-per-run", type=float, default=1.0, help="CPUs each run's Ray task reserves (default 1)")
    fl.add_argument("--resume", action="store_true", help="reuse every run already complete in --out")
    fl.add_argument("--quick", action="store_true", help="a short stream (64 samples x 2 corruptions) for CI")
    fl.add_argument("--out", type=Path, default=None, help="output folder (default: runs/bench-fleet-<time>)")
    fl.set_defaults(func=cmd_fleet)
