"""Experiment (docs/BENCHMARKS.md, section 1): glass blur with a *true* swap instead of the reference's one-way copy.

The reference's ``x[h, w], x[h', w'] = x[h', w'], x[h, w]`` on an (H, W, 3) numpy array copies one way (both
right-hand sides are views); on a 2-D array it would swap. This evaluates both checkpoints of a run config on
glass blur, severity 5, with the true swap in the same scan order and the same draws as
`cema_ray.data.corruptions`, to see which of the two a CIFAR-10-C-style set was made with.

    CEMA_CIFAR10_ROOT=../shared/data/cifar10-jpeg .venv/bin/python docs/experiments/glass_blur_swap.py \
        configs/bench_cifar10.yaml 1000
"""
import sys
from pathlib import Path

import torch

from cema_ray.bench import bench_config, evaluate_models
from cema_ray.data import corruptions as C


def true_swap_glass_blur(x, c, gen, small):
    sigma, delta, iterations = c
    n, ch, h, w = x.shape
    x = torch.floor(C._gaussian_blur(x, sigma).clamp(0, 1) * 255.0 + 1e-3) / 255.0
    flat = x.reshape(n, ch, h * w)
    rows = torch.arange(n)
    for sweep in C.glass_offsets(n, h, w, delta, iterations, gen):
        perm = torch.arange(h * w).repeat(n, 1)
        for i, hh in enumerate(range(h - delta, delta, -1)):
            for j, ww in enumerate(range(w - delta, delta, -1)):
                dx, dy = sweep[:, i, j, 0], sweep[:, i, j, 1]
                p, q = hh * w + ww, (hh + dy) * w + ww + dx
                a, b = perm[:, p].clone(), perm[rows, q].clone()
                perm[:, p], perm[rows, q] = b, a
        flat = flat.gather(2, perm[:, None, :].expand(n, ch, h * w))
    return C._gaussian_blur(flat.reshape(n, ch, h, w), sigma)


if __name__ == "__main__":
    torch.set_num_threads(1)
    cfg = bench_config(Path(sys.argv[1]), [])
    C.CORRUPTIONS = ("glass_blur",)
    C._FUNCTIONS["glass_blur"] = true_swap_glass_blur
    result = evaluate_models(cfg, ["edge", "foundation"], 5, int(sys.argv[2]))
    print({role: round(100 * result.accuracy[role]["glass_blur"], 2) for role in result.roles})
