"""`bench models`: source accuracy of a run config's edge and foundation checkpoints per corruption (eval mode).

It tells whether the checkpoints are fit for the method comparison before an hour is spent on it: CEMA needs a
foundation model clearly better than the edge model under shift.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from cema_ray.errors import ConfigError
from cema_ray.threads import apply_threads
from cema_ray.bench.common import _progress, _split_names, _out_dir, _pct, _markdown_page, _environment, bench_config


ROLES = ("edge", "foundation")


EVAL_BATCH = 500


CLEAN = "clean"


MEAN_ROW = "mean (15 corruptions)"


# ---------------------------------------------------------------------------------- bench models
@dataclass
class ModelsResult:
    """Source accuracy (fraction, or None where not measured) per domain and role."""

    config: str
    severity: int
    samples: int
    roles: list[str]
    domains: list[str]
    accuracy: dict[str, dict[str, float | None]]  # role -> domain -> accuracy
    checkpoints: dict[str, dict[str, Any]] = field(default_factory=dict)
    command: str = ""
    seconds: float = 0.0


def cmd_models(args: argparse.Namespace) -> int:
    if args.severity not in range(1, 6):
        raise ConfigError(f"--severity = {args.severity}: must be an integer from 1 to 5")
    if args.samples is not None and args.samples < 1:
        raise ConfigError(f"--samples = {args.samples}: must be a positive integer (or omitted for all)")
    roles = _split_names(args.roles, "role", ROLES, "--roles")
    cfg = bench_config(args.config, args.override)
    out = _out_dir(args.out, "models", args.config)
    apply_threads(cfg["threads"])
    result = evaluate_models(cfg, roles, args.severity, args.samples)
    result.config, result.command = str(args.config), args.command_line
    table = models_markdown(result)
    write_models(result, table, out)
    print(table)
    print(f"outputs: {out}")
    return 0


def evaluate_models(cfg: dict[str, Any], roles: Sequence[str], severity: int,
                    samples: int | None) -> ModelsResult:
    """Accuracy of each role's checkpoint on clean + 15 corrupted copies of one seeded subset.

    Both models see the very same corrupted images (corrupted once per batch), so their difference
    is the models', not the corruption draws'.
    """
    from cema_ray.data.corruptions import CORRUPTIONS
    from cema_ray.runtime.fleet import DataContext, load_model

    t0 = time.perf_counter()
    models = {r: load_model(cfg["models"][r], cfg["data"], r).eval() for r in roles}
    data = DataContext(cfg["data"])
    domains = ([CLEAN] if data.clean is not None else []) + list(CORRUPTIONS)
    correct = {r: {} for r in roles}
    count = 0
    for d, domain in enumerate(domains):
        t = time.perf_counter()
        hits, count = _domain_hits(models, data, domain, d, severity, samples, cfg["seed"])
        for r in roles:
            correct[r][domain] = hits[r] / count
        accs = "  ".join(f"{r} {100 * correct[r][domain]:.2f}%" for r in roles)
        _progress(f"[{d + 1}/{len(domains)}] {domain}: {accs}  ({count} samples, {time.perf_counter() - t:.1f} s)")
    cards = {r: _card_facts(cfg["models"][r]) for r in roles}
    return ModelsResult("", severity, count, list(roles), domains, correct, cards,
                        seconds=time.perf_counter() - t0)


def _domain_hits(models: dict[str, nn.Module], data: Any, domain: str, d: int, severity: int,
                 samples: int | None, seed: int) -> tuple[dict[str, int], int]:
    """Correct predictions per role on one domain, in batches of EVAL_BATCH."""
    from cema_ray.data.corruptions import corrupt
    from cema_ray.models.preprocess import to_input
    from cema_ray.runtime.fleet import make_generator

    pool, on_the_fly = _domain_pool(data, domain, severity)
    idx = subset_indices(len(pool), samples, seed)
    hits = {r: 0 for r in models}
    for b, start in enumerate(range(0, len(idx), EVAL_BATCH)):
        part = pool.take(idx[start:start + EVAL_BATCH])
        images = torch.from_numpy(np.ascontiguousarray(part.images))
        if on_the_fly:  # one generator per (domain, batch): results do not depend on batch order
            images = corrupt(images, domain, severity, make_generator(seed, 0xBE, d, b))
        x = to_input(images)
        labels = torch.from_numpy(part.labels)
        with torch.inference_mode():
            for r, model in models.items():
                hits[r] += int((model(x).argmax(1) == labels).sum())
    return hits, len(idx)


def _domain_pool(data: Any, domain: str, severity: int) -> tuple[Any, bool]:
    """The images of one domain and whether they still need corrupting."""
    if data.clean is not None:
        return data.clean, domain != CLEAN
    return data.corrupted(domain, severity), False


def subset_indices(n: int, samples: int | None, seed: int) -> np.ndarray:
    """All of 0..n-1, or a seeded sorted subset of `samples` of them (sorted: sequential reads)."""
    if samples is None or samples >= n:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng([seed, 0xBE])
    return np.sort(rng.choice(n, size=samples, replace=False)).astype(np.int64)


def _card_facts(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """Which checkpoint was measured: name, path and the card's hash (provenance of the numbers)."""
    facts: dict[str, Any] = {"name": model_cfg["name"], "checkpoint": model_cfg.get("checkpoint")}
    from cema_ray.models.checkpoint import card_path

    path = model_cfg.get("checkpoint")
    if path and card_path(path).is_file():
        try:
            facts["sha256"] = json.loads(card_path(path).read_text()).get("sha256")
        except (OSError, json.JSONDecodeError):
            pass  # load_model already verified the checkpoint; provenance is best effort
    return facts


def _corruption_mean(acc: dict[str, float | None]) -> float | None:
    values = [v for k, v in acc.items() if k != CLEAN and v is not None]
    return float(np.mean(values)) if values else None


def models_markdown(result: ModelsResult) -> str:
    lines = [f"Source accuracy (%), eval mode, no adaptation; severity {result.severity}, "
             f"{result.samples:,} samples per domain.", "",
             "| domain | " + " | ".join(result.roles) + " |",
             "| --- |" + " ---: |" * len(result.roles)]
    for domain in result.domains:
        lines.append(f"| {domain} | " + " | ".join(_pct(result.accuracy[r][domain]) for r in result.roles) + " |")
    means = [_pct(_corruption_mean(result.accuracy[r])) for r in result.roles]
    lines.append(f"| **{MEAN_ROW}** | " + " | ".join(f"**{m}**" for m in means) + " |")
    return "\n".join(lines)


def write_models(result: ModelsResult, table: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    data = asdict(result)
    data["mean_corruption_accuracy"] = {r: _corruption_mean(result.accuracy[r]) for r in result.roles}
    data["environment"] = _environment()
    (out / "models.json").write_text(json.dumps(data, indent=2) + "\n")
    (out / "models.md").write_text(_markdown_page("Source accuracy of the checkpoints", table, result.command,
                                                  result.seconds))
