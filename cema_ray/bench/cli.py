"""`cema-ray bench ...`: the command line of every benchmark."""
from __future__ import annotations

import argparse
import os
import shlex
import time
from pathlib import Path
from typing import Sequence


from cema_ray.names import PROTOCOLS
from cema_ray.errors import ConfigError
from cema_ray.threads import apply_threads
from cema_ray.bench.common import _out_dir, _split_names, _write_table, bench_config
from cema_ray.bench.methods import DEFAULT_METHODS, DEFAULT_PROTOCOLS, cmd_methods
from cema_ray.bench.fleet import add_parser as add_fleet_parser
from cema_ray.bench.models import ROLES, cmd_models


# ------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cema-ray bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="bench", required=True, metavar="{models,methods,fleet,scale,cloud,corruptions}")
    mod = sub.add_parser("models", help="source accuracy of the edge and foundation checkpoints per corruption")
    mod.add_argument("config", type=Path, help="run config naming models.edge / models.foundation")
    mod.add_argument("--severity", type=int, default=5, help="corruption severity 1..5 (default 5)")
    mod.add_argument("--samples", type=int, default=None,
                     help="samples per corruption, a seeded subset of the test split (default: all)")
    mod.add_argument("--roles", default=",".join(ROLES),
                     help="which checkpoints to evaluate, comma-separated (default: edge,foundation)")
    mod.add_argument("--override", action="append", default=[], metavar="key=value",
                     help="config override, repeatable (e.g. --override data.root=/data/fmnist)")
    mod.add_argument("--out", type=Path, default=None, help="output folder (default: runs/bench-models-<time>)")
    mod.set_defaults(func=cmd_models)
    met = sub.add_parser("methods", help="every method on one edge under each protocol: accuracy and uploads")
    met.add_argument("config", type=Path, help="run config (see configs/bench_*.yaml)")
    met.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                     help=f"comma-separated methods (default: {','.join(DEFAULT_METHODS)})")
    met.add_argument("--protocols", default=",".join(DEFAULT_PROTOCOLS),
                     help=f"comma-separated stream protocols (default: {','.join(DEFAULT_PROTOCOLS)}; "
                          f"allowed: {', '.join(PROTOCOLS)})")
    met.add_argument("--override", action="append", default=[], metavar="key=value",
                     help="config override applied to every run, repeatable (e.g. --override seed=1)")
    met.add_argument("--seeds", default=None,
                     help="comma-separated seeds; each row becomes the mean +- std over them (default: the config's)")
    met.add_argument("--ablations", action="store_true",
                     help="add cema-fleet's ablation rows (each lever turned off in turn, methods/cema_fleet.py "
                          "ABLATIONS)")
    met.add_argument("--serial", action="store_true",
                     help="run one run after another in this process (default: every run a Ray task, as many at "
                          "once as the CPUs admit)")
    met.add_argument("--cpus-per-run", type=float, default=1.0,
                     help="CPUs each run's Ray task reserves (default 1), and its torch threads (rounded up)")
    met.add_argument("--resume", action="store_true",
                     help="reuse every run whose summary.json is already in --out (a long table survives a restart)")
    met.add_argument("--quick", action="store_true",
                     help="a short stream (64 samples x 4 corruptions) for smoke tests")
    met.add_argument("--out", type=Path, default=None, help="output folder (default: runs/bench-methods-<time>)")
    met.set_defaults(func=cmd_methods)
    add_fleet_parser(sub)
    sca = sub.add_parser("scale", help="Ray runtime throughput, cloud steps/s, worker memory vs fleet size")
    sca.add_argument("config", type=Path, help="run config (e.g. configs/scale.yaml)")
    sca.add_argument("--edges", default="1,16,64,256,1024", help="fleet sizes, comma-separated")
    sca.add_argument("--hosts", type=int, default=None,
                     help="at most this many EdgeHost actors (default: as many as the CPUs left after the cloud's "
                          "reservation admit, at ray.host_num_cpus each)")
    sca.add_argument("--modes", default="sync,async", help="Ray modes to measure (default sync,async)")
    sca.add_argument("--local-up-to", type=int, default=64,
                     help="also run the single-process runner for fleets up to this size (ratio Ray/local)")
    sca.add_argument("--override", action="append", default=[], metavar="key=value",
                     help="config override applied to every run, repeatable")
    sca.add_argument("--local-threads", type=int, default=None,
                     help="torch threads of the local runner (default: torch's, one per core)")
    sca.add_argument("--repeat", type=int, default=1,
                     help="run the whole sequence N times, runtimes interleaved; tables quote medians (default 1)")
    sca.add_argument("--limit-seconds", type=float, default=1.5,
                     help="seconds of forwards per batch size when measuring the edge model's forward limit")
    sca.add_argument("--limit-batches", default="32,128,512,2048",
                     help="batch sizes the forward limit tries, comma-separated (the fastest counts; default "
                          "32,128,512,2048)")
    sca.add_argument("--out", type=Path, default=None, help="output folder (default: runs/bench-scale-<time>)")
    sca.set_defaults(func=cmd_scale)
    clo = sub.add_parser("cloud", help="the cloud's step in this process, in concurrent processes and in a Ray task")
    clo.add_argument("config", type=Path, help="run config whose models and method the cloud uses")
    clo.add_argument("--threads", type=int, default=os.cpu_count(),
                     help="threads of the multi-threaded placements and number of concurrent processes "
                          "(default: the machine's cores)")
    clo.add_argument("--steps", type=int, default=20, help="timed steps per placement (default 20)")
    clo.add_argument("--fill", type=int, default=288,
                     help="uploads in the replay buffer before timing (default 288, just past CEMA's warm-up; a "
                          "run's replay holds thousands)")
    clo.add_argument("--override", action="append", default=[], metavar="key=value",
                     help="config override, repeatable")
    clo.add_argument("--out", type=Path, default=None, help="output folder (default: runs/bench-cloud-<time>)")
    clo.set_defaults(func=cmd_cloud)
    cor = sub.add_parser("corruptions", help="milliseconds per batch of each corruption at each image size")
    cor.add_argument("--names", default="all", help="comma-separated corruptions (default: all 15)")
    cor.add_argument("--sizes", default="32,224", help="square image sizes in px, comma-separated (default 32,224)")
    cor.add_argument("--batch", type=int, default=64, help="images per batch (default 64)")
    cor.add_argument("--severity", type=int, default=5, help="corruption severity 1..5 (default 5)")
    cor.add_argument("--repeat", type=int, default=5, help="timed calls per cell; the table quotes the median")
    cor.add_argument("--threads", type=int, default=None,
                     help="torch threads (default: as the `threads` setting: $OMP_NUM_THREADS, else the usable cores)")
    cor.add_argument("--out", type=Path, default=None, help="output folder (default: runs/bench-corruptions-<time>)")
    cor.set_defaults(func=cmd_corruptions)
    return parser


def cmd_corruptions(args: argparse.Namespace) -> int:
    from cema_ray.bench.corruptions import markdown, run_corruption_bench
    from cema_ray.data.corruptions import CORRUPTIONS

    names = list(CORRUPTIONS) if args.names == "all" else _split_names(args.names, "corruption", CORRUPTIONS,
                                                                         "--names")
    try:
        sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--sizes = {args.sizes!r}: give comma-separated integers, e.g. 32,224") from None
    if not sizes or min(sizes) < 8 or args.batch < 1 or args.repeat < 1 or args.severity not in range(1, 6):
        raise ConfigError("--sizes >= 8 px, --batch >= 1, --repeat >= 1 and --severity 1..5, please")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads = {args.threads}: must be >= 1")
    apply_threads(args.threads)
    out = _out_dir(args.out, "corruptions", Path("synthetic"))
    t0 = time.perf_counter()
    rows = run_corruption_bench(names, sizes, args.batch, args.repeat, args.severity)
    return _write_table(out, "corruptions", "Corruption cost per batch", rows, markdown(rows, args.command_line),
                        args.command_line, t0)


def cmd_cloud(args: argparse.Namespace) -> int:
    from cema_ray.bench.cloud import markdown, run_cloud_bench

    if args.threads < 1 or args.steps < 1:
        raise ConfigError(f"--threads {args.threads} and --steps {args.steps}: both must be >= 1")
    if args.fill < 0:
        raise ConfigError(f"--fill {args.fill}: must be >= 0")
    cfg = bench_config(args.config, args.override)
    out = _out_dir(args.out, "cloud", args.config)
    t0 = time.perf_counter()
    rows = run_cloud_bench(cfg, args.threads, args.steps, fill=args.fill)
    return _write_table(out, "cloud", "The cloud's step by placement", rows, markdown(rows, args.command_line),
                        args.command_line, t0)


def cmd_scale(args: argparse.Namespace) -> int:
    from cema_ray.bench.scale import markdown, run_scale

    try:
        counts = [int(x) for x in args.edges.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--edges = {args.edges!r}: give comma-separated integers, e.g. 1,16,64") from None
    if not counts or min(counts) < 1 or (args.hosts is not None and args.hosts < 1):
        raise ConfigError("--edges needs fleet sizes >= 1 and --hosts >= 1")
    modes = _split_names(args.modes, "mode", ("sync", "async"), "--modes")
    cfg = bench_config(args.config, args.override)
    out = _out_dir(args.out, "scale", args.config)
    t0 = time.perf_counter()
    if args.local_threads is not None and args.local_threads < 1:
        raise ConfigError(f"--local-threads = {args.local_threads}: must be >= 1")
    if args.repeat < 1:
        raise ConfigError(f"--repeat = {args.repeat}: must be >= 1")
    if not args.limit_seconds > 0:
        raise ConfigError(f"--limit-seconds = {args.limit_seconds}: must be > 0")
    try:
        batches = tuple(int(x) for x in args.limit_batches.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"--limit-batches = {args.limit_batches!r}: give comma-separated integers") from None
    if not batches or min(batches) < 1:
        raise ConfigError(f"--limit-batches = {args.limit_batches!r}: needs batch sizes >= 1")
    rows = run_scale(cfg, counts, out, args.hosts, modes, args.local_up_to, args.local_threads, args.repeat,
                     args.limit_seconds, batches)
    return _write_table(out, "scale", "Ray runtime scaling", rows, markdown(rows, args.command_line),
                        args.command_line, t0)


def main(argv: Sequence[str]) -> int:
    """`cema-ray bench ...`; returns the exit code (1 when a method run failed, its row says why)."""
    argv = list(argv)
    args = build_parser().parse_args(argv)
    args.command_line = "cema-ray bench " + shlex.join(argv)
    return int(args.func(args) or 0)
