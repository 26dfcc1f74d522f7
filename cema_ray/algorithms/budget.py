"""A hard upload budget: at most a fixed share of every edge batch goes up, the most useful first.

The entropy filters decide which samples *may* be uploaded; the budget decides how many *are*,
by construction, so the uplink cost is a setting instead of an outcome. Among the candidates:

- ``confident``: lowest entropy first (the samples the teacher is likeliest to label right);
- ``uncertain``: highest entropy first (below E_max: where the edge has most to learn).

With ``balanced``, the order is applied within each of the edge's predicted classes and the classes
take turns, so a chunk covers the label space instead of the one class a shifted edge over-predicts
(as CAA, CVPR 2026, balances uploads under a communication budget).

Ties break by position in the batch, so the choice is deterministic.
"""
from __future__ import annotations

import math

import numpy as np

from cema_ray.algorithms.selection import SKIP_REASONS as FILTER_REASONS

PRIORITIES = ("confident", "uncertain")
SKIP_REASONS = (*FILTER_REASONS, "budget")  # why a sample stayed off the uplink: a filter, then the budget


def budget_cap(batch_size: int, budget: float) -> int:
    """Samples a batch may upload: floor(budget * N), so the share never exceeds ``budget``."""
    return int(math.floor(float(budget) * int(batch_size) + 1e-9))


def apply_budget(candidates: np.ndarray, predictions: np.ndarray, entropy: np.ndarray, cap: int,
                 priority: str, balanced: bool) -> np.ndarray:
    """Bool mask: the ``cap`` best of the candidate samples (a bool mask) in ``priority`` order."""
    if priority not in PRIORITIES:
        raise ValueError(f"upload priority {priority!r} is unknown; allowed: {', '.join(PRIORITIES)}")
    idx = np.flatnonzero(candidates)
    if len(idx) <= cap:
        return candidates.copy()
    ent = np.asarray(entropy, dtype=np.float64)[idx]
    order = np.lexsort((idx, -ent if priority == "uncertain" else ent))
    if balanced:
        preds = np.asarray(predictions)[idx][order]
        rank = np.empty(len(idx), np.int64)  # position of each sample within its predicted class
        for c in np.unique(preds):
            members = np.flatnonzero(preds == c)
            rank[members] = np.arange(len(members))
        order = order[np.lexsort((np.arange(len(idx)), rank))]
    mask = np.zeros_like(candidates)
    mask[idx[order[:cap]]] = True
    return mask
