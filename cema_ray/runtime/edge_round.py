"""One batch for each of many virtual edges, with as few forward calls as their states allow.

At batch 32 a small edge model's forward costs more in per-call overhead than in arithmetic, so a host
that calls it once per virtual edge runs far below what its cores can do. Edges whose policies return
one `fuse_key` (the same borrowed model holding the same published state) and whose batches are equally
large run one forward over their stacked batches; grouped TBR normalises each batch with its own
statistics, so every edge gets the logits its own forward would give (tested record for record). Each
edge then decides its uploads from its slice, in edge order, with its own filters. An edge whose next
forward changes its state (it adopts its first batch's statistics) or whose policy trains on the edge
runs alone.

The single-process runner and `EdgeHost` both call `step_edges`: fusing is the same code on both.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import torch

from cema_ray.methods.base import EdgeResult
from cema_ray.methods.base import check_edge_input
from cema_ray.runtime.edge import EdgeDevice, EdgeStep, OpenBatch


def step_edges(edges: Sequence[EdgeDevice], newest: Callable[[EdgeDevice], int], fuse_samples: int = 0
               ) -> list[EdgeStep]:
    """Each edge (in the given order) predicts its next batch; ``fuse_samples`` > 0: stacked forwards of up to
    that many samples where the edges allow (0: one forward per edge)."""
    opened = [edge.open(newest(edge)) for edge in edges]
    for edge, batch in zip(edges, opened):
        if batch.x is not None:
            edge.policy.prepare(batch.x)
    results: list[tuple[EdgeResult, float] | None] = [None] * len(edges)
    if fuse_samples:
        for members in fusable_groups(edges, opened, fuse_samples):
            for i, out in zip(members, forward_group([edges[i] for i in members], [opened[i] for i in members])):
                results[i] = out
    steps = []
    for i, (edge, batch) in enumerate(zip(edges, opened)):
        if batch.x is None:
            steps.append(edge.close(batch, None, 0.0))
            continue
        if results[i] is None:
            t0 = time.perf_counter()
            results[i] = (edge.policy.process(batch.x), (time.perf_counter() - t0) * 1000)
        result, latency = results[i]
        steps.append(edge.close(batch, result, latency))
    return steps


def fusable_groups(edges: Sequence[EdgeDevice], opened: Sequence[OpenBatch], max_samples: int) -> list[list[int]]:
    """Indices of edges that can share a forward, two or more per group and at most ``max_samples`` samples
    (past the batch that runs fastest, a bigger stack only spills the caches), each group in edge order."""
    groups: dict[tuple, list[int]] = {}
    for i, (edge, batch) in enumerate(zip(edges, opened)):
        key = edge.policy.fuse_key()
        if key is not None and batch.x is not None:
            groups.setdefault((key, tuple(batch.x.shape)), []).append(i)
    chunks = []
    for (_, shape), members in groups.items():
        per = max(1, max_samples // shape[0])
        chunks += [members[a:a + per] for a in range(0, len(members), per)]
    return [c for c in chunks if len(c) > 1]


def forward_group(edges: Sequence[EdgeDevice], opened: Sequence[OpenBatch]) -> list[tuple[EdgeResult, float] | None]:
    """One forward for the group's stacked batches, then each edge's decision on its slice; the forward's
    time is shared out evenly in the records' latency. None for every edge when the state would change in
    the forward (the edges then run alone)."""
    policy = edges[0].policy
    host, state = policy.host, policy.state
    host.use(state)  # loaded first, so that `host.adopts` describes this state
    if host.adopts:
        return [None] * len(edges)
    xs = [b.x for b in opened]
    for x in xs:
        check_edge_input(x)
    t0 = time.perf_counter()
    logits, _ = host.infer(state, torch.cat(xs), groups=len(xs))
    share = (time.perf_counter() - t0) * 1000 / len(xs)
    out = []
    for edge, part in zip(edges, logits.split(len(xs[0]))):
        t1 = time.perf_counter()
        result = edge.policy.decide(part)
        out.append((result, share + (time.perf_counter() - t1) * 1000))
    return out
