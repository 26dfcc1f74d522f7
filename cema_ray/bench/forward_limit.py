"""The physical limit of an edge fleet on these cores: the edge model's raw batched forward rate.

A host's edges can never predict faster than the edge model's forward in one process, in inference
mode, at the batch size that runs it fastest: no streams, no corruption, no filters, no Ray. `bench
scale` measures that rate in the same invocation as the fleet (same machine, same minute) and reports
each run's edge throughput as a fraction of it (`limit_ratio`).

Two ways to use c cores are measured and the faster taken as the limit, so the ratio is never flattered:
one thread at the best batch times c (c independent processes, as hosts run), and one process of c
threads at its best batch.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from cema_ray.data.catalog import source_info
from cema_ray.models.preprocess import to_input
from cema_ray.runtime.assembly import load_edge_model
from cema_ray.runtime.fleet import method_settings

BATCHES = (32, 128, 512, 2048)


def forward_limit(cfg: dict[str, Any], cores: int, seconds: float = 1.5,
                  batches: tuple[int, ...] = BATCHES) -> dict[str, Any]:
    """Samples/s of the method's edge model forward on ``cores`` cores (see the module's docstring)."""
    spec, settings = method_settings(cfg)
    model = spec.make_edge(load_edge_model(cfg), settings).model  # normalised as the method's edges run it
    info = source_info(cfg["data"]["source"])
    rng = np.random.default_rng(0)
    before = torch.get_num_threads()
    rates: dict[tuple[int, int], float] = {}
    try:
        for threads in sorted({1, max(1, int(cores))}):
            torch.set_num_threads(threads)
            for batch in batches:
                x = to_input(rng.integers(0, 256, (batch, info.image_size, info.image_size, info.channels), np.uint8))
                rates[threads, batch] = _rate(model, x, seconds)
    finally:
        torch.set_num_threads(before)
    (t1, b1), one = max(((k, v) for k, v in rates.items() if k[0] == 1), key=lambda kv: kv[1])
    (tc, bc), many = max(((k, v) for k, v in rates.items() if k[0] == max(1, int(cores))), key=lambda kv: kv[1])
    limit = max(one * cores, many)
    return {"forward_limit_samples_per_s": limit, "forward_cores": int(cores),
            "forward_one_thread": {"batch": b1, "samples_per_s": one},
            "forward_all_threads": {"threads": tc, "batch": bc, "samples_per_s": many}}


def _rate(model: torch.nn.Module, x: torch.Tensor, seconds: float) -> float:
    """Samples/s of repeated forwards of ``x`` (one warm-up call, then at least ``seconds`` of calls)."""
    with torch.inference_mode():
        model(x)
        calls, t0 = 0, time.perf_counter()
        while calls < 3 or time.perf_counter() - t0 < seconds:
            model(x)
            calls += 1
        return calls * len(x) / (time.perf_counter() - t0)
