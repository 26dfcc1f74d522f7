"""One edge device: its stream cursor, its method's edge policy, its weight version, its uplink.

`EdgeDevice` is plain Python so the single-process runner and the Ray `EdgeHost` run the very
same code; the Ray layer only decides where it lives. Everything it needs to resume after a
crash (cursor, version, filter state, uplink credit) is in `snapshot()`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cema_ray.algorithms.budget import SKIP_REASONS, apply_budget
from cema_ray.data.streams import Batch, EdgeStream
from cema_ray.errors import BatchRejected
from cema_ray.methods.base import EdgePolicy, EdgeResult, NormState
from cema_ray.methods.parts import LANE, MODEL, view
from cema_ray.models.norm import state_nbytes
from cema_ray.models.preprocess import to_input
from cema_ray.runtime.faults import malform
from cema_ray.runtime.uplink import ShareBucket


@dataclass
class EdgeProfile:
    """What makes edges heterogeneous beyond their stream."""

    group: str = "default"
    frame_rate: float | None = None  # batches per second; None = as fast as possible
    uplink_samples_per_s: float | None = None
    uplink_bytes_per_s: float | None = None


@dataclass
class EdgeStep:
    """The outcome of one batch: a per-batch record and the samples to upload."""

    record: dict[str, Any]
    upload_images: np.ndarray  # uint8 NHWC
    upload_labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # for reference methods only
    reset: bool = False  # the batch opened a new domain under the reset-per-domain protocol
    upload_key: np.ndarray | None = None  # the batch's domain key (EdgeResult.domain_key), travels with the uploads


@dataclass
class OpenBatch:
    """A batch an edge has taken but not yet predicted: its record so far and its model input."""

    batch: Batch
    record: dict[str, Any]
    x: torch.Tensor | None  # float NCHW; None: the batch was rejected (its record is complete)


def validate_batch(batch: Batch, image_shape: tuple[int, ...], num_classes: int) -> None:
    """Reject what an edge cannot predict on; the message names the fault."""
    imgs = batch.images
    if not isinstance(imgs, np.ndarray):
        raise BatchRejected(f"batch {batch.index}: images must be a numpy array, got {type(imgs).__name__}")
    if len(imgs) == 0:
        raise BatchRejected(f"batch {batch.index}: empty batch")
    if np.issubdtype(imgs.dtype, np.floating) and not np.isfinite(imgs).all():
        raise BatchRejected(f"batch {batch.index}: images contain NaN or Inf")
    if imgs.dtype != np.uint8:
        raise BatchRejected(f"batch {batch.index}: images must be uint8 pixels, got {imgs.dtype}")
    if imgs.ndim != 4 or tuple(imgs.shape[1:]) != tuple(image_shape):
        raise BatchRejected(f"batch {batch.index}: images of shape {imgs.shape[1:]}, expected {tuple(image_shape)}")
    if len(batch.labels) != len(imgs) or len(batch.ids) != len(imgs):
        raise BatchRejected(f"batch {batch.index}: {len(imgs)} images but {len(batch.labels)} labels, {len(batch.ids)} ids")
    if len(batch.labels) and (batch.labels.min() < 0 or batch.labels.max() >= num_classes):
        raise BatchRejected(f"batch {batch.index}: labels outside 0..{num_classes - 1}")


def skip_columns(skipped: dict[str, int] | None) -> dict[str, int]:
    """One record column per upload filter (``skipped_unreliable``...), 0 where a method has none, so
    samples = uploaded + throttled + the skipped columns (+ rejected) holds for every selecting method."""
    return {f"skipped_{reason}": int((skipped or {}).get(reason, 0)) for reason in SKIP_REASONS}


class EdgeDevice:
    """A virtual edge: predicts every batch at once, uploads what its policy selects."""

    def __init__(
        self,
        edge_id: int,
        stream: EdgeStream,
        policy: EdgePolicy,
        profile: EdgeProfile,
        image_shape: tuple[int, ...],
        num_classes: int,
        bad_batches: tuple[tuple[float, str], ...] = (),
        lane: int | None = None,
        model: int | None = None,
    ) -> None:
        """``bad_batches``: fault injection, (position in the stream as a fraction, kind) pairs; ``lane``: the cloud
        trainer that serves this edge (`method.lanes: group`; None: the fleet's one), and ``model``: its
        architecture's index in a fleet of several (None: one architecture), which say the part of a publication
        it loads (methods/parts.py)."""
        self.edge_id = edge_id
        self.parts = [(kind, index) for kind, index in ((LANE, lane), (MODEL, model)) if index is not None]
        self.stream = stream
        self.policy = policy
        self.profile = profile
        self.image_shape = image_shape
        self.num_classes = num_classes
        self.cursor = 0
        self.version = 0
        self.uplink_credit = 0.0  # samples (or bytes) the uplink may still send
        self.share = ShareBucket()  # async: the cloud's advertised share of what it can train (runtime/uplink.py)
        self.pending_bytes_down = 0
        self.last_state: NormState | None = None  # what it loaded last: a restarted edge reloads it
        self.bad_batches = {int(f * len(stream)): kind for f, kind in bad_batches}

    def __len__(self) -> int:
        return len(self.stream)

    @property
    def done(self) -> bool:
        return self.cursor >= len(self.stream)

    def step(self, newest_version: int) -> EdgeStep:
        """Predict the next batch of the stream and decide its uploads (one forward of its own)."""
        return self._run(self.open(newest_version))

    def process(self, batch: Batch, newest_version: int) -> EdgeStep:
        """`step` on a given batch (the cursor does not move)."""
        return self._run(self._open(batch, newest_version))

    def _run(self, opened: "OpenBatch") -> EdgeStep:
        if opened.x is None:
            return self.close(opened, None, 0.0)
        t0 = time.perf_counter()
        result = self.policy.process(opened.x)
        return self.close(opened, result, (time.perf_counter() - t0) * 1000)

    def open(self, newest_version: int) -> "OpenBatch":
        """Take the next batch: its record so far and its model input (None when the batch is rejected).

        `open`, the policy's forward and `close` are `step` in three parts, so that a host can run many edges'
        forwards as one (`runtime.edge_round`)."""
        batch = self.stream.batch(self.cursor)
        if self.cursor in self.bad_batches:
            batch = malform(batch, self.bad_batches[self.cursor], self.num_classes)
        self.cursor += 1
        return self._open(batch, newest_version)

    def _open(self, batch: Batch, newest_version: int) -> "OpenBatch":
        record = {
            "edge_id": self.edge_id, "group": self.profile.group, "domain": batch.domain,
            "batch_index": batch.index, "samples": len(batch.ids), "weight_version": self.version,
            "first_id": int(batch.ids[0]) if len(batch.ids) else -1, "last_id": int(batch.ids[-1]) if len(batch.ids) else -1,
            "version_lag": max(0, newest_version - self.version), "bytes_down": self.pending_bytes_down,
            "predicted_at": time.time(),  # wall clock: async lag is measured against publication times
        }
        self.pending_bytes_down = 0
        try:
            validate_batch(batch, self.image_shape, self.num_classes)
        except BatchRejected as exc:
            record.update(correct=0, uploaded=0, bytes_up=0, latency_ms=0.0, e_max=float("nan"),
                          mean_entropy=float("nan"), rejected=len(batch.ids), error=str(exc), throttled=0,
                          **skip_columns(None))
            return OpenBatch(batch, record, None)
        if batch.reset:
            self.policy.reset()
        return OpenBatch(batch, record, to_input(batch.images))

    def close(self, opened: "OpenBatch", result: EdgeResult | None, latency_ms: float) -> EdgeStep:
        """The batch's record and uploads from the policy's result (None: the batch was rejected)."""
        batch, record = opened.batch, opened.record
        if result is None:
            return EdgeStep(record, np.zeros((0, *self.image_shape), np.uint8), reset=batch.reset)
        kept = self._kept(result)
        images = batch.images[kept]
        record.update(
            correct=int((result.predictions == batch.labels).sum()), uploaded=int(len(kept)),
            bytes_up=int(images.nbytes) + (int(result.domain_key.nbytes) if len(kept) and result.domain_key is not None
                                           else 0), latency_ms=latency_ms, e_max=float(result.e_max),
            mean_entropy=float(np.mean(result.entropy)), rejected=0, error="",
            throttled=int(result.upload.sum() - len(kept)), **skip_columns(result.skipped),
        )
        return EdgeStep(record, images, batch.labels[kept], reset=batch.reset,
                        upload_key=result.domain_key)

    def _kept(self, result: EdgeResult) -> np.ndarray:
        """Indices of the selected samples the uplink lets through: all of them, or where the edge's own uplink
        (`uplink_samples_per_s`) or the cloud's advertised share (async) allows fewer, the most uncertain first,
        class by class (the budget's order, algorithms/budget.py): what teaches most, not what came first."""
        selected = np.flatnonzero(result.upload)
        allowed = self.share.allow(self._uplink_allowance(len(selected)), time.monotonic())
        if self.profile.uplink_samples_per_s is not None or self.profile.uplink_bytes_per_s is not None:
            self.uplink_credit -= allowed
        if allowed >= len(selected):
            return selected
        return np.flatnonzero(apply_budget(result.upload, result.predictions, result.entropy, allowed,
                                           "uncertain", balanced=True))

    def _uplink_allowance(self, wanted: int) -> int:
        """Token bucket in stream time (1 / frame_rate per batch), so it is the same in every runtime; refilled
        here, debited by `_kept` with what finally goes up."""
        p = self.profile
        rate = p.uplink_samples_per_s
        if rate is None and p.uplink_bytes_per_s is not None:
            rate = p.uplink_bytes_per_s / float(np.prod(self.image_shape))
        if rate is None:
            return wanted
        period = 1.0 / p.frame_rate if p.frame_rate else 1.0
        self.uplink_credit = min(self.uplink_credit + rate * period, max(rate * period, 1.0) * 4)
        return min(wanted, int(self.uplink_credit))

    def apply_update(self, state: NormState, version: int) -> None:
        """Load published parameters unless they are older than what this edge already has."""
        if version <= self.version:
            return
        for kind, index in self.parts:
            state = view(state, kind, index)
            if state is None:  # another part's news: this edge already holds its own part's newest
                self.version = version
                return
        with torch.inference_mode():
            self.policy.apply_update(state)
        self.version = version
        self.last_state = state
        self.pending_bytes_down += state_nbytes(state)

    def snapshot(self) -> dict[str, Any]:
        """Everything needed to resume exactly here after a crash: small and picklable."""
        return {"cursor": self.cursor, "version": self.version, "uplink_credit": self.uplink_credit,
                "pending_bytes_down": self.pending_bytes_down, "last_state": self.last_state,
                "policy": self.policy.snapshot()}

    def restore(self, snap: dict[str, Any]) -> None:
        """Back to a snapshot: the published parameters it ran with, then the policy's own state."""
        self.cursor = snap["cursor"]
        self.version = snap["version"]
        self.uplink_credit = snap["uplink_credit"]
        self.pending_bytes_down = snap["pending_bytes_down"]
        self.last_state = snap["last_state"]
        if self.last_state is not None:
            with torch.inference_mode():
                self.policy.apply_update(self.last_state)
        self.policy.restore(snap["policy"])
