"""EdgeDevice: bad batches are rejected, counted and survived; uplink budgets; version handling."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cema_ray.data.streams import Batch
from cema_ray.methods.base import EdgePolicy, EdgeResult
from cema_ray.runtime.edge import EdgeDevice, EdgeProfile


class FixedPolicy(EdgePolicy):
    """Predicts class 0 and wants to upload every sample; records what it was given."""

    def __init__(self) -> None:
        self.loaded: list[dict] = []
        self.resets = 0

    def process(self, x: torch.Tensor) -> EdgeResult:
        n = len(x)
        return EdgeResult(np.zeros(n, np.int64), np.ones(n, bool), np.full(n, 0.5, np.float32), 0.9)

    def apply_update(self, state) -> None:
        self.loaded.append(state)

    def reset(self) -> None:
        self.resets += 1


def _batch(images, labels=None, index=0, reset=False) -> Batch:
    n = len(images)
    labels = np.zeros(n, np.int64) if labels is None else labels
    return Batch(edge_id=0, index=index, images=images, labels=labels, ids=np.arange(n, dtype=np.int64),
                 domain="fog-5", reset=reset)


def _edge(profile: EdgeProfile | None = None) -> EdgeDevice:
    return EdgeDevice(0, stream=None, policy=FixedPolicy(), profile=profile or EdgeProfile(),
                      image_shape=(4, 4, 1), num_classes=10)


GOOD = np.zeros((3, 4, 4, 1), np.uint8)


@pytest.mark.parametrize("images,labels,text", [
    (np.full((3, 4, 4, 1), np.nan, np.float32), None, "NaN or Inf"),
    (np.full((3, 4, 4, 1), np.inf, np.float64), None, "NaN or Inf"),
    (np.zeros((3, 4, 4, 1), np.float32), None, "uint8"),
    (np.zeros((3, 5, 4, 1), np.uint8), None, "shape"),
    (np.zeros((0, 4, 4, 1), np.uint8), None, "empty"),
    (GOOD, np.array([0, 10, 1]), "labels outside 0..9"),
    (GOOD, np.array([0, -1, 1]), "labels outside 0..9"),
    (GOOD, np.array([0, 1]), "3 images but 2 labels"),
])
def test_bad_batches_are_rejected_counted_and_the_edge_keeps_going(images, labels, text):
    edge = _edge()
    out = edge.process(_batch(images, labels), newest_version=0)
    assert out.record["rejected"] == len(images) and out.record["uploaded"] == 0
    assert text in out.record["error"]
    ok = edge.process(_batch(GOOD, index=1), newest_version=0)  # the next good batch still runs
    assert ok.record["rejected"] == 0 and ok.record["correct"] == 3 and ok.record["uploaded"] == 3


def test_uplink_budget_caps_uploads_and_counts_the_rest():
    edge = _edge(EdgeProfile(frame_rate=1.0, uplink_samples_per_s=2.0))
    ups = [edge.process(_batch(GOOD, index=k), 0).record for k in range(3)]
    assert [r["uploaded"] for r in ups] == [2, 2, 2]
    assert [r["throttled"] for r in ups] == [1, 1, 1]


def test_stale_versions_are_ignored_and_bytes_down_are_counted_once():
    edge = _edge()
    state = {"bn.weight": np.ones(4, np.float32)}
    edge.apply_update(state, 2)
    edge.apply_update(state, 1)  # older than what it has: ignored
    assert edge.version == 2 and len(edge.policy.loaded) == 1
    rec = edge.process(_batch(GOOD), newest_version=5).record
    assert rec["weight_version"] == 2 and rec["version_lag"] == 3 and rec["bytes_down"] == 16
    assert edge.process(_batch(GOOD, index=1), newest_version=5).record["bytes_down"] == 0


def test_reset_flag_resets_the_policy():
    edge = _edge()
    edge.process(_batch(GOOD, reset=True), 0)
    assert edge.policy.resets == 1
