"""`cema-ray`: run an experiment, pretrain a model, benchmark, or list what a config may name.

The heavy modules (runtime, pretrain, bench, Ray, torch models) are imported only by the subcommand
that needs them, so `cema-ray list` and config errors answer quickly. A config error is the user's to
fix: it prints one line naming the key and exits 2, without a traceback.
"""
from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from cema_ray.errors import CemaError, ConfigError, RunInterrupted


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cema-ray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{run,pretrain,bench,sweep,status,list}")
    run = sub.add_parser("run", help="run an adaptation experiment from a YAML config")
    run.add_argument("config", type=Path, nargs="?", help="run config (see configs/)")
    run.add_argument("overrides", nargs="*", metavar="key=value", help="dotted-key overrides, e.g. edges.count=4")
    run.add_argument("--out", default=None,
                     help="output folder or URI (s3://...; default: output.dir, else runs/<name>-<time>)")
    run.add_argument("--dry-run", action="store_true", help="validate and print the resolved config, run nothing")
    run.add_argument("--resume", type=Path, default=None, metavar="DIR",
                     help="continue the interrupted Ray run in DIR from its checkpoints (no config needed; ray.* "
                          "overrides say where, e.g. ray.address=NEW_HEAD:6379)")
    run.set_defaults(func=cmd_run)
    pre = sub.add_parser("pretrain", help="train an edge or foundation model checkpoint")
    pre.add_argument("config", type=Path, help="pretrain config (configs/pretrain_*.yaml)")
    pre.add_argument("overrides", nargs="*", metavar="key=value", help="dotted-key overrides, e.g. train.epochs=1")
    pre.add_argument("--dry-run", action="store_true", help="validate and print the resolved config, train nothing")
    pre.set_defaults(func=cmd_pretrain)
    sub.add_parser("bench", help="benchmarks; arguments go to cema_ray.bench (try: cema-ray bench --help)")
    swp = sub.add_parser("sweep", help="a grid over config keys (and seeds) as Ray Tune trials: accuracy vs uploads")
    swp.add_argument("config", type=Path, help="run config")
    swp.add_argument("--grid", action="append", default=[], metavar="KEY=[v1,v2,...]",
                     help="a dotted key and its values, repeatable (e.g. --grid method.settings.upload_budget=[0.1,0.3])")
    swp.add_argument("--seeds", default=None, help="comma-separated seeds, each point run once per seed (default 0)")
    swp.add_argument("--override", action="append", default=[], metavar="key=value",
                     help="config override applied to every trial, repeatable")
    swp.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs each trial reserves (default 1)")
    swp.add_argument("--resume", action="store_true", help="restore the sweep in --out and run what is left")
    swp.add_argument("--out", default=None, help="output folder (default: runs/sweep-<config>-<time>)")
    swp.set_defaults(func=cmd_sweep)
    sta = sub.add_parser("status", help="per edge group of every run on a Ray cluster: samples/s, accuracy, uploads, "
                                        "lag, the cloud's backlog (refreshing)")
    sta.add_argument("address", nargs="?", default="auto",
                     help="the cluster's address (default: auto, the cluster on this machine or $RAY_ADDRESS)")
    sta.add_argument("--metrics", default=None, metavar="HOST:PORT[,HOST:PORT...]",
                     help="read these metrics export ports instead of asking the cluster for its nodes")
    sta.add_argument("--interval", type=float, default=5.0, help="seconds between refreshes (default 5)")
    sta.add_argument("--run", default="", help="show only runs whose label contains this text")
    sta.add_argument("--once", action="store_true", help="print one table (rates over one interval) and exit")
    sta.set_defaults(func=cmd_status)
    lst = sub.add_parser("list", help="methods, models, corruptions and data sources a config may name")
    lst.add_argument("method", nargs="?", default=None, help="a method: list its settings (default, allowed, meaning)")
    lst.set_defaults(func=cmd_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["bench"]:  # bench parses its own arguments, --help included
            return cmd_bench(argv[1:])
        args = build_parser().parse_args(argv)
        args.command_line = "cema-ray " + shlex.join(argv)
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"cema-ray: config error: {exc}", file=sys.stderr)
        return 2
    except RunInterrupted as stop:
        where = f"; the {stop.batches} batches predicted so far are in {stop.out} (summary.json: interrupted)" \
            if stop.batches else "; nothing was predicted yet"
        print(f"cema-ray: interrupted{where}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # Ctrl-C before a runner's loop (Ray starting, actors being built): nothing to write
        print("cema-ray: interrupted while starting; nothing was predicted yet", file=sys.stderr)
        return 130
    except CemaError as exc:
        print(f"cema-ray: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        return 1


def _print_config(cfg: dict[str, Any]) -> None:
    import yaml

    print(yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None), end="")


def cmd_run(args: argparse.Namespace) -> int:
    from cema_ray.config import load_config, resolve_output_dir

    if args.resume is not None:
        return _resume(args)
    if args.config is None:
        raise ConfigError("cema-ray run needs a config file (or --resume DIR)")
    cfg = load_config(args.config, args.overrides)
    out_dir = args.out or resolve_output_dir(cfg)
    cfg["output"]["dir"] = str(out_dir)
    if args.dry_run:
        _print_config(cfg)
        return 0
    from cema_ray.runtime import run_experiment

    print(f"outputs will go to {_where(out_dir)}", file=sys.stderr, flush=True)
    summary = run_experiment(cfg, out_dir)
    print(format_summary(summary))
    if cfg["output"]["report"]:
        print(f"report: {_where(out_dir).split('?')[0].rstrip('/')}/report.md")
    print(f"outputs: {_where(out_dir)}")
    return 0


def _where(target: str | Path) -> str:
    from cema_ray.results.storage import _redact, is_uri

    return _redact(str(target)) if is_uri(target) else str(Path(target).resolve())


def _resume(args: argparse.Namespace) -> int:
    """`run --resume DIR`: the run's own config from DIR/resume/run.json, validated again, same folder."""
    from cema_ray.config import RUN_SCHEMA, validate_run_config
    from cema_ray.runtime import run_experiment
    from cema_ray.runtime.journal import ResumeJournal
    from cema_ray.schema import apply_overrides

    # the config positional takes the first override when no config is given
    overrides = [str(args.config), *args.overrides] if args.config is not None else list(args.overrides)
    if args.out is not None or any(not re.match(r"^ray\.[a-z_]+=", o) for o in overrides):
        raise ConfigError("--resume DIR continues the run with its own config and folder: give no config or --out, "
                          "and overrides of ray.* keys only (where it continues, e.g. ray.address=NEW_HEAD:6379)")
    raw, _ = ResumeJournal.read(args.resume)
    cfg = validate_run_config(apply_overrides(raw, overrides, RUN_SCHEMA) if overrides else raw)
    cfg["output"]["dir"] = str(args.resume)
    if args.dry_run:
        _print_config(cfg)
        return 0
    summary = run_experiment(cfg, args.resume, resume=True)
    print(format_summary(summary))
    print(f"outputs: {args.resume}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from cema_ray.config import load_pretrain_config

    cfg = load_pretrain_config(args.config, args.overrides)
    if args.dry_run:
        _print_config(cfg)
        return 0
    from cema_ray.pretrain import run_pretrain

    run_pretrain(cfg)
    print(f"checkpoint: {cfg['output']['checkpoint']}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from cema_ray.sweep import main as sweep_main

    return sweep_main(args)


def cmd_status(args: argparse.Namespace) -> int:
    from cema_ray.status import cluster_targets, watch

    if args.interval <= 0:
        raise ConfigError(f"--interval must be > 0, got {args.interval:g}")
    targets = args.metrics.split(",") if args.metrics else cluster_targets(args.address)
    try:
        watch(targets, args.interval, args.once, args.run)
    except KeyboardInterrupt:
        pass
    return 0


def cmd_bench(argv: list[str]) -> int:
    from cema_ray.bench import main as bench_main

    return int(bench_main(argv) or 0)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def format_summary(s: dict[str, Any]) -> str:
    """A few lines for the terminal; summary.json and report.md have the rest."""
    lag = s.get("version_lag") or {}
    rows = [
        ("method", f"{s.get('method')}  (runtime {s.get('runtime')}, mode {s.get('mode')}, "
                   f"{s.get('num_edges')} edges)"),
        ("edge accuracy", f"{_pct(s.get('accuracy'))} over {s.get('samples', 0):,} samples"),
        ("uploaded", f"{s.get('uploaded', 0):,} ({_pct(s.get('upload_fraction'))}), "
                     f"{s.get('bytes_up', 0):,} B up, {s.get('bytes_down', 0):,} B down"),
        ("wall time", f"{s.get('wall_seconds') or 0:.1f} s"),
        ("version lag", f"median {lag.get('median')}, p95 {lag.get('p95')}, max {lag.get('max')}"),
        ("dropped / rejected", f"{s.get('dropped', 0)} / {s.get('rejected', 0)}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _section(title: str, load: Callable[[], list[tuple[str, str]]]) -> list[str]:
    lines = [f"{title}:"]
    try:
        items = load()
    except ImportError as exc:  # a part of the package that is not installed or not built
        return lines + [f"  (not available: {exc})"]
    width = max((len(n) for n, _ in items), default=0)
    return lines + [f"  {name:<{width}}  {text}".rstrip() for name, text in items]


def _methods() -> list[tuple[str, str]]:
    from cema_ray.config import method_registry

    reg = method_registry()
    return [(n, reg.get(n).description) for n in reg.names()]


def _models() -> list[tuple[str, str]]:
    from cema_ray.models.factory import MODELS

    doc = lambda f: ((getattr(f, "__doc__", None) or "").strip().splitlines() or [""])[0]  # noqa: E731
    return [(n, doc(MODELS.get(n))) for n in MODELS.names()] + [("timm:<name>", "any timm model")]


def _corruptions() -> list[tuple[str, str]]:
    from cema_ray.data.corruptions import CORRUPTIONS

    return [(n, "") for n in CORRUPTIONS] + [("clean", "no corruption")]


def _sources() -> list[tuple[str, str]]:
    from cema_ray.config import source_root_info
    from cema_ray.data.sources import DATA_SOURCES

    out = []
    for name in DATA_SOURCES:
        env, default = source_root_info(name)
        where = " or ".join(x for x in (f"${env}" if env else None, default) if x)
        text = getattr(DATA_SOURCES.get(name), "description", "")
        out.append((name, f"{text} (root: data.root, {where})" if where else text))
    return out


def cmd_list(args: argparse.Namespace) -> int:
    if args.method is not None:
        from cema_ray.config import method_registry
        from cema_ray.methods.tables import settings_text

        reg = method_registry()
        if args.method not in reg:
            raise ConfigError(f"unknown method {args.method!r}; known: {', '.join(reg.names())}")
        print(settings_text(args.method))
        return 0
    sections = [("methods", _methods), ("models", _models), ("corruptions", _corruptions),
                ("data sources", _sources)]
    print("\n\n".join("\n".join(_section(t, f)) for t, f in sections))
    return 0


if __name__ == "__main__":
    sys.exit(main())
