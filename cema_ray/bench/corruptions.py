"""What each corruption costs per batch: the edges corrupt their own streams on the fly, so this is a cost
every simulated edge pays per batch (and what a CIFAR-10-C-style file set would cost to regenerate).

Timed on a seeded synthetic RGB batch (gradients, a bright square and pixel noise: natural-ish content, so the
JPEG codec and the blurs see edges as well as flat areas) at each size, after one warm-up call; the table
quotes the median and the fastest of the repeats, in milliseconds per batch.
"""
from __future__ import annotations

import time
from statistics import median
from typing import Any, Sequence

import numpy as np
import torch

from cema_ray.data.corruptions import corrupt


def synthetic_batch(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """(n, size, size, 3) uint8: per-image colour gradients, a bright square, and noise of 8 levels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    out = np.empty((n, size, size, 3), np.float64)
    for i in range(n):
        a, b = rng.uniform(0.2, 0.8, (2, 3))
        out[i] = 40 + 150 * (a * xx[..., None] + b * yy[..., None]) / (a + b)
        top, left = rng.integers(0, size // 2, 2)
        out[i, top:top + size // 3, left:left + size // 3] = 230
    out += rng.integers(-8, 9, out.shape)
    return torch.from_numpy(np.clip(out, 0, 255).astype(np.uint8))


def time_corruption(images: torch.Tensor, name: str, severity: int, repeat: int) -> list[float]:
    """Seconds of each of `repeat` timed calls, after one untimed warm-up."""
    corrupt(images, name, severity, torch.Generator().manual_seed(0))
    times = []
    for r in range(repeat):
        gen = torch.Generator().manual_seed(r + 1)
        t0 = time.perf_counter()
        corrupt(images, name, severity, gen)
        times.append(time.perf_counter() - t0)
    return times


def run_corruption_bench(names: Sequence[str], sizes: Sequence[int], batch: int, repeat: int,
                         severity: int) -> list[dict[str, Any]]:
    rows = []
    for size in sizes:
        images = synthetic_batch(batch, size)
        for name in names:
            times = time_corruption(images, name, severity, repeat)
            rows.append({"corruption": name, "size": size, "batch": batch, "severity": severity,
                         "median_ms": 1e3 * median(times), "min_ms": 1e3 * min(times), "repeats": repeat,
                         "threads": torch.get_num_threads()})
            print(f"  {name} @ {size}px: {rows[-1]['median_ms']:.1f} ms per batch of {batch}", flush=True)
    return rows


def markdown(rows: Sequence[dict[str, Any]], command: str) -> str:
    sizes = sorted({r["size"] for r in rows})
    names = list(dict.fromkeys(r["corruption"] for r in rows))
    cell = {(r["corruption"], r["size"]): r for r in rows}
    head = "| corruption | " + " | ".join(f"{s} px: median (min) ms" for s in sizes) + " |"
    lines = [head, "| --- |" + " ---: |" * len(sizes)]
    for name in names:
        parts = [f"{cell[name, s]['median_ms']:.1f} ({cell[name, s]['min_ms']:.1f})" for s in sizes]
        lines.append(f"| {name} | " + " | ".join(parts) + " |")
    r0 = rows[0]
    return (f"Milliseconds per batch of {r0['batch']} RGB images, severity {r0['severity']}, {r0['threads']} torch "
            f"thread(s), median and fastest of {r0['repeats']} calls after a warm-up (`{command}`).\n\n"
            + "\n".join(lines))
