"""`bench methods`: every method on the paper's setting (one edge, local runtime) under each stream protocol.

Each run is written to ``<out>/<protocol>/<method>/`` by the ordinary runner, so a row of the table can always be
traced back to its ``summary.json`` and ``batches.parquet``; a run that fails is a row marked failed with its error.
"""
from __future__ import annotations

import argparse
import csv
import json
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cema_ray.config import method_registry, read_yaml
from cema_ray.names import PROTOCOLS
from cema_ray.errors import ConfigError
from cema_ray.bench.common import _split_names, _out_dir, _pct, _markdown_page, _environment, bench_config


# References first: the foundation run as if it were the edge (no cloud, no uploads; the ceiling a cloud can
# hand down) and the oracle (cema-fleet's student trained on true labels: what the edge model can hold).
REFERENCES = {"foundation-source": "source", "foundation-bn": "bn"}  # row -> method run on the foundation


DEFAULT_METHODS = ("foundation-source", "foundation-bn", "oracle", "source", "bn", "tent", "eata", "cotta", "sar",
                   "upload-all", "cema", "cema-paper", "cema-edgebn", "cema-fleet")


DEFAULT_PROTOCOLS = ("continual", "reset")


# --quick: a stream that exercises every code path in seconds. One corruption of each family
# (noise, blur, weather, digital), all cheap to compute.
QUICK_OVERRIDES = ("stream.samples_per_domain=64",
                   "stream.corruptions=[gaussian_noise, defocus_blur, fog, pixelate]")


# --------------------------------------------------------------------------------- bench methods
@dataclass
class MethodRow:
    """One (protocol, method) run: the numbers of its summary.json, or the error that stopped it."""

    protocol: str
    method: str  # the row's label: a method, a reference or an ablation
    status: str  # "ok" or "failed"
    accuracy: float | None = None
    upload_fraction: float | None = None
    uploaded: int | None = None
    samples: int | None = None
    bytes_up: int | None = None
    bytes_down: int | None = None
    wall_seconds: float | None = None
    total_seconds: float | None = None
    out_dir: str = ""
    error: str = ""
    seed: int | None = None


def _row_names(args: argparse.Namespace) -> list[str]:
    from cema_ray.methods.cema_fleet import ABLATIONS

    known = [*REFERENCES, *method_registry().names()]
    names = _split_names(args.methods, "method", known, "--methods")
    return names + ([a for a in ABLATIONS if a not in names] if args.ablations else [])


def _seeds(text: str | None) -> list[int | None]:
    if text is None:
        return [None]
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--seeds = {text!r}: give comma-separated integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ConfigError(f"--seeds = {text!r}: give distinct integers >= 0")
    return seeds


def cmd_methods(args: argparse.Namespace) -> int:
    methods = _row_names(args)
    protocols = _split_names(args.protocols, "protocol", PROTOCOLS, "--protocols")
    out = _out_dir(args.out, "methods", args.config)
    user = [*(QUICK_OVERRIDES if args.quick else ()), *args.override]
    from cema_ray.bench.fanout import run_on_ray, run_serial

    if args.cpus_per_run <= 0:
        raise ConfigError(f"--cpus-per-run = {args.cpus_per_run}: must be > 0")
    plan = plan_method_runs(args.config, user, methods, protocols, out, _seeds(args.seeds))  # all checked first
    if args.serial or len(plan) == 1:
        rows, how = run_serial(plan, run_one, args.resume, _row_line), "one after another in one process"
    else:
        rows = run_on_ray(plan, run_one, args.resume, _row_line, args.cpus_per_run, _failed_row)
        how = f"as Ray tasks of {args.cpus_per_run:g} CPU each, several at once (wall times of a shared machine)"
    table = methods_markdown(rows)
    write_methods(rows, table, out, args.command_line, plan, how)
    print(table)
    print(f"outputs: {out}")
    return 1 if any(r.status != "ok" for r in rows) else 0


def _failed_row(protocol: str, method: str, cfg: dict[str, Any], error: str) -> MethodRow:
    return MethodRow(protocol, method, "failed", out_dir=cfg["output"]["dir"], error=error, seed=cfg["seed"])


def _row_overrides(row: str) -> list[str]:
    """The fixed keys that turn a row label into a run: a method, a reference or an ablation."""
    from cema_ray.methods.cema_fleet import ABLATIONS

    if row in REFERENCES:
        return [f"method.name={REFERENCES[row]}", "method.settings={}"]
    if row in ABLATIONS:
        return ["method.name=cema-fleet", *(f"method.settings.{k}={v}" for k, v in ABLATIONS[row].items())]
    return [f"method.name={row}"]


def plan_method_runs(config: Path, overrides: Sequence[str], methods: Sequence[str], protocols: Sequence[str],
                     out: Path, seeds: Sequence[int | None] = (None,)) -> list[tuple[str, str, dict[str, Any]]]:
    """(protocol, row, validated config) per run, in table order: protocols, then rows, then seeds.

    A reference row runs its method with the foundation's checkpoint in the edge's place. With more
    than one seed each run goes to ``<protocol>/<row>/seed<k>``.
    """
    base = read_yaml(config).get("name", config.stem)
    plan = []
    for protocol in protocols:
        for method in methods:
            for seed in seeds:
                fixed = ["runtime=local", "edges.count=1", "edges.hosts=null", "edges.groups=[]",
                         *_row_overrides(method), f"stream.protocol={protocol}", "output.report=false",
                         *([f"seed={seed}"] if seed is not None else [])]
                cfg = bench_config(config, overrides, fixed)
                if method in REFERENCES:
                    cfg["models"]["edge"] = dict(cfg["models"]["foundation"])
                cfg["name"] = f"{base}-{protocol}-{method}"  # set after validation: free text, not YAML
                where = out / protocol / method
                cfg["output"]["dir"] = str(where / f"seed{seed}" if len(seeds) > 1 else where)
                plan.append((protocol, method, cfg))
    return plan


def run_one(cfg: dict[str, Any], protocol: str, method: str, resume: bool = False) -> MethodRow:
    """Run one config; any exception becomes a failed row (its traceback saved as error.txt).

    ``resume``: a run whose summary.json says it completed is read back instead of run again (a run that was
    stopped midway leaves a summary too, `status: interrupted`, and runs again from the start)."""
    from cema_ray.runtime import run_experiment

    out = Path(cfg["output"]["dir"])
    t0 = time.perf_counter()
    try:
        s = (finished_summary(out) if resume else None) or run_experiment(cfg, out)
    except Exception as exc:  # noqa: BLE001  a benchmark reports every failure and goes on
        out.mkdir(parents=True, exist_ok=True)
        (out / "error.txt").write_text(traceback.format_exc())
        return MethodRow(protocol, method, "failed", total_seconds=time.perf_counter() - t0, out_dir=str(out),
                         error=f"{type(exc).__name__}: {exc}", seed=cfg["seed"])
    return MethodRow(protocol, method, "ok", s.get("accuracy"), s.get("upload_fraction"), s.get("uploaded"),
                     s.get("samples"), s.get("bytes_up"), s.get("bytes_down"), s.get("wall_seconds"),
                     time.perf_counter() - t0, str(out), seed=cfg["seed"])


def finished_summary(out: Path) -> dict[str, Any] | None:
    """The summary of a completed run in `out`, else None (no summary, or one written while the run went)."""
    done = out / "summary.json"
    if not done.is_file():
        return None
    s = json.loads(done.read_text())
    status = s.get("status") or ("interrupted" if s.get("interrupted") else "complete")  # older runs: no status
    return s if status == "complete" else None


def _row_line(row: MethodRow) -> str:
    if row.status != "ok":
        return f"FAILED: {row.error}"
    return (f"accuracy {_pct(row.accuracy)}%, uploads {_pct(row.upload_fraction)}% ({row.uploaded:,}), "
            f"{row.wall_seconds:.1f} s")


TABLE_COLUMNS = ("protocol", "method", "accuracy (%)", "gap closed (%)", "uploads (%)", "uploads", "bytes up",
                 "bytes down", "wall s", "seeds", "status")


def _mean_std(values: Sequence[float], scale: float = 100.0) -> str:
    if len(values) == 1:
        return f"{scale * values[0]:.2f}"
    return f"{scale * float(np.mean(values)):.2f} ± {scale * float(np.std(values, ddof=1)):.2f}"


def _group(rows: Sequence[MethodRow]) -> dict[tuple[str, str], list[MethodRow]]:
    groups: dict[tuple[str, str], list[MethodRow]] = {}
    for r in rows:
        groups.setdefault((r.protocol, r.method), []).append(r)
    return groups


def gap_closed(accuracy: float, edge_bn: float | None, foundation_bn: float | None) -> float | None:
    """(method - edge BN) / (foundation BN - edge BN): the share of the foundation's lead the edge got."""
    if edge_bn is None or foundation_bn is None or foundation_bn <= edge_bn:
        return None
    return (accuracy - edge_bn) / (foundation_bn - edge_bn)


def _cells(protocol: str, method: str, runs: Sequence[MethodRow], means: dict[tuple[str, str], float]) -> list[str]:
    failed = [r for r in runs if r.status != "ok"]
    if failed:
        error = failed[0].error.replace("|", "\\|").replace("\n", " ")
        return [protocol, method, "", "", "", "", "", "", "", str(len(runs)), f"failed: {error}"]
    acc = [r.accuracy for r in runs]
    gap = gap_closed(float(np.mean(acc)), means.get((protocol, "bn")), means.get((protocol, "foundation-bn")))
    mid = lambda key: int(np.median([getattr(r, key) for r in runs]))  # noqa: E731
    return [protocol, method, _mean_std(acc), _pct(gap), _mean_std([r.upload_fraction for r in runs]),
            f"{mid('uploaded'):,}", f"{mid('bytes_up'):,}", f"{mid('bytes_down'):,}",
            f"{float(np.median([r.wall_seconds for r in runs])):.1f}", str(len(runs)), "ok"]


def methods_markdown(rows: Sequence[MethodRow]) -> str:
    """One line per (protocol, row): accuracy and uploads as mean ± std over seeds, counts as medians."""
    groups = _group(rows)
    means = {k: float(np.mean([r.accuracy for r in v])) for k, v in groups.items()
             if all(r.status == "ok" for r in v)}
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |",
             "| --- | --- |" + " ---: |" * (len(TABLE_COLUMNS) - 3) + " --- |"]
    lines += ["| " + " | ".join(_cells(p, m, runs, means)) + " |" for (p, m), runs in groups.items()]
    return "\n".join(lines)


def domains_markdown(rows: Sequence[MethodRow]) -> str:
    """Accuracy per domain (rows) and method (columns), one table per protocol, from each run's summary.json
    (the first seed's, when there are several).

    The whole-stream column hides where a method wins or loses; on a continual stream a method whose
    edge lags every shift loses on the domains that differ most from the one before.
    """
    tables = []
    for protocol in dict.fromkeys(r.protocol for r in rows):
        runs = {m: _per_domain(g[0]) for (p, m), g in _group(rows).items() if p == protocol and g[0].status == "ok"}
        runs = {m: d for m, d in runs.items() if d}
        if not runs:
            continue
        domains = list(dict.fromkeys(d for per in runs.values() for d in per))
        lines = [f"{protocol}: accuracy (%) per domain", "", "| domain | " + " | ".join(runs) + " |",
                 "| --- |" + " ---: |" * len(runs)]
        for d in domains:
            lines.append(f"| {d} | " + " | ".join(_pct(per.get(d, {}).get("accuracy")) for per in runs.values()) + " |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def _per_domain(row: MethodRow) -> dict[str, dict[str, Any]]:
    path = Path(row.out_dir) / "summary.json"
    return json.loads(path.read_text()).get("per_domain", {}) if path.is_file() else {}


def _stream_text(cfg: dict[str, Any]) -> str:
    s = cfg["stream"]
    n = len(s["corruptions"])
    return (f"one edge, runtime local, {n} corruption(s) x {s['samples_per_domain']:,} samples at severity "
            f"{s['severity']} ({n * s['samples_per_domain']:,} per run), batch {s['batch_size']}, seed {cfg['seed']}, "
            f"data {cfg['data']['source']}; edge {cfg['models']['edge']['name']}, foundation "
            f"{cfg['models']['foundation']['name']}")


def aggregates(rows: Sequence[MethodRow]) -> list[dict[str, Any]]:
    """Per (protocol, row): accuracy and upload fraction as mean and sample std over its seeds (ok runs only)."""
    out = []
    for (protocol, method), runs in _group(rows).items():
        ok = [r for r in runs if r.status == "ok"]
        acc, up = [r.accuracy for r in ok], [r.upload_fraction for r in ok]
        std = (lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)  # noqa: E731
        out.append({"protocol": protocol, "method": method, "seeds": [r.seed for r in runs], "ok": len(ok),
                    "accuracy_mean": float(np.mean(acc)) if ok else None, "accuracy_std": std(acc) if ok else None,
                    "upload_fraction_mean": float(np.mean(up)) if ok else None})
    return out


def write_methods(rows: Sequence[MethodRow], table: str, out: Path, command: str,
                  plan: Sequence[tuple[str, str, dict[str, Any]]], how: str = "") -> None:
    out.mkdir(parents=True, exist_ok=True)
    plain = [cfg for _, row, cfg in plan if row not in REFERENCES]  # a reference row runs the foundation as edge
    setting = _stream_text((plain or [p[2] for p in plan])[0]) if plan else ""
    data = {"command": command, "setting": setting, "executed": how, "environment": _environment(),
            "rows": [asdict(r) for r in rows], "aggregates": aggregates(rows)}
    (out / "methods.json").write_text(json.dumps(data, indent=2) + "\n")
    with open(out / "methods.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0]) if rows else asdict(MethodRow("", "", ""))))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    seconds = sum(r.total_seconds or 0.0 for r in rows)
    intro = (f"{setting}; runs executed {how or 'one after another'}.\n\nAccuracy is the edge's online accuracy "
             f"over the whole stream; uploads are the samples the edge sent to the cloud. Each run's outputs: "
             f"`<protocol>/<method>/`.\n\n{table}\n\n"
             f"{domains_markdown(rows)}")
    (out / "methods.md").write_text(_markdown_page("Method comparison", intro, command, seconds))
