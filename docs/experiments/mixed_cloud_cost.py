"""What a second edge architecture costs the cloud (issue 26): one cloud step, timed for three fleets side by side.

A step is `CloudService.receive` of one chunk of uploads (16 images): the foundation labels the chunk (its entropy
step and its labelling forward), then every architecture's student takes its step. The fleets are the config's
edges all on ResNet-8, all on ResNet-14, and half on each (`cema-fleet`, one lane). If the teacher labels each
chunk once, then mixed = ResNet-8 + ResNet-14 - teacher. Two separate clouds, one per architecture, would cost
ResNet-8 + ResNet-14. The teacher's part is timed on its own as well, as the cloud's `_targets` on the same chunks.

    CEMA_CIFAR10_ROOT=../shared/data/cifar10-jpeg .venv/bin/python docs/experiments/mixed_cloud_cost.py \
        configs/bench_cifar10.yaml checkpoints/cifar10/edge_m.safetensors [repeats]

The rounds alternate between the fleets (each round times every fleet once, 10 steps each) and medians are
reported, so a change in the machine's load hits every fleet alike. Run it on an idle machine at 1 thread.
"""
from __future__ import annotations

import sys
import time
from statistics import median

import torch

from cema_ray.bench.cloud import time_steps, _probe
from cema_ray.config import load_config


def fleets(config: str, medium: str) -> dict[str, dict]:
    m = f"{{name: cema_resnet_m, checkpoint: {medium}}}"
    groups = {"ResNet-8": "[{name: s, fraction: 0.5}, {name: m, fraction: 0.5}]",
              "ResNet-14": f"[{{name: s, fraction: 0.5, model: {m}}}, {{name: m, fraction: 0.5, model: {m}}}]",
              "mixed": f"[{{name: s, fraction: 0.5}}, {{name: m, fraction: 0.5, model: {m}}}]"}
    return {name: load_config(config, ["method.name=cema-fleet", "edges.count=16", "threads=1",
                                       f"edges.groups={g}"]) for name, g in groups.items()}


def teacher_seconds(cfg: dict, steps: int, chunk: int = 16) -> list[float]:
    """The teacher's part of a step alone: the foundation's entropy step and labelling forward on one chunk."""
    cloud, images = _probe(cfg, chunk)
    trainer = cloud.trainer
    times = []
    for k in range(steps + 1):
        batch = images[288 + k * chunk:288 + (k + 1) * chunk]
        t0 = time.perf_counter()
        trainer._targets(batch, None)
        if k:
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    config, medium = sys.argv[1], sys.argv[2]
    repeats = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    torch.set_num_threads(1)
    cfgs = fleets(config, medium)
    per: dict[str, list[float]] = {name: [] for name in [*cfgs, "teacher"]}
    for r in range(repeats):
        for name, cfg in cfgs.items():
            per[name].append(median(time_steps(cfg, 1, 10, 16)))
        per["teacher"].append(median(teacher_seconds(cfgs["mixed"], 10)))
        print(f"round {r + 1}/{repeats}: " + ", ".join(f"{k} {1e3 * v[-1]:.1f} ms" for k, v in per.items()),
              flush=True)
    med = {k: median(v) for k, v in per.items()}
    print("\n| fleet | ms per cloud step (median) |\n| --- | ---: |")
    for k, v in med.items():
        print(f"| {k} | {1e3 * v:.1f} |")
    print(f"\nResNet-8 + ResNet-14 (two clouds): {1e3 * (med['ResNet-8'] + med['ResNet-14']):.1f} ms; "
          f"minus the teacher once: {1e3 * (med['ResNet-8'] + med['ResNet-14'] - med['teacher']):.1f} ms; "
          f"mixed / ResNet-14: {med['mixed'] / med['ResNet-14']:.2f}")


if __name__ == "__main__":
    main()
