"""An uplink that follows the cloud: in async mode the edges send what the cloud can train on, not what it drops.

Unpaced async edges predict far faster than one cloud core trains (the Fashion-MNIST stream of issue 23 on 2
cores: ~2,000 edge samples/s against ~130 uploads/s trained), so a fixed upload budget fills the backlog and the
driver drops most uploads unread (79 % of them on that stream): uplink spent on nothing. Here the cloud measures what
it trains per second of its own busy time (`CloudCapacity`), divides it among the edges it has heard from lately,
and sends that share with every publication; each edge spends it through a wall-clock token bucket (`ShareBucket`)
on top of its method's budget, keeping the samples its policy ranks first. The cloud then runs just below its
capacity (``headroom``), the backlog stays short, and the uplink carries only uploads that will be trained on.

Why busy time: it is what one upload costs the cloud, whatever the edges send. Uploads per busy second times the
headroom is the rate at which the cloud is that busy, so the share converges on a cloud that is ``headroom`` busy
(a rate measured per wall second would only echo what the edges already send). Sync rounds never drop (the round
waits for the cloud) and stay deterministic: they do not use it.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Iterable


def follows(cfg: dict[str, Any]) -> bool:
    """Whether a run's uplink follows its cloud: async, `ray.uplink: follow`, and a backlog that drops (with
    `ray.backlog_full: wait` the hosts pause instead and nothing is dropped)."""
    ray_cfg = cfg["ray"]
    return cfg["mode"] == "async" and ray_cfg["uplink"] == "follow" and ray_cfg["backlog_full"] != "wait"


class CloudCapacity:
    """Uploads the cloud (one shard) trains per busy second, and each active edge's share of them."""

    def __init__(self, headroom: float, window: int = 16, active_s: float = 10.0) -> None:
        """``headroom``: the fraction of its measured capacity the cloud hands out; ``window``: deliveries the rate
        is measured over; ``active_s``: an edge counts as active this long after its last delivery."""
        self.headroom = float(headroom)
        self.recent: deque[tuple[int, float]] = deque(maxlen=window)  # (uploads, busy seconds) per delivery
        self.seen: dict[int, float] = {}  # edge id -> when its last delivery arrived
        self.active_s = float(active_s)
        self.prior: float | None = None  # uploads/s per edge before any delivery was measured (`calibrated`)

    def calibrated(self, rate: float | None, edges: int) -> float | None:
        """The cloud's raw rate (`CloudService.calibrate`) shared among all ``edges`` it serves: the share the
        edges start with, so that the first deliveries do not flood a cloud that has measured nothing yet."""
        self.prior = None if rate is None or edges < 1 else self.headroom * rate / edges
        return self.prior

    def record(self, uploads: int, busy_s: float, edge_ids: Iterable[int], now: float) -> None:
        """One delivery: how many uploads it carried, how long the cloud was busy with it, whose they were."""
        self.recent.append((int(uploads), max(float(busy_s), 0.0)))
        for e in edge_ids:
            self.seen[int(e)] = now
        self.seen = {e: t for e, t in self.seen.items() if now - t <= self.active_s}

    def rate(self) -> float | None:
        """Uploads per busy second over the window; None until a delivery with uploads was measured."""
        uploads = sum(u for u, _ in self.recent)
        busy = sum(b for _, b in self.recent)
        return uploads / busy if uploads and busy > 0 else None

    def per_edge(self) -> float | None:
        """Uploads per second each active edge may send (the headroom applied); None while unmeasured."""
        rate = self.rate()
        return self.prior if rate is None or not self.seen else self.headroom * rate / len(self.seen)


class ShareBucket:
    """An edge's token bucket in wall-clock time at the rate the cloud last advertised (None: no limit yet)."""

    BURST_S = 2.0  # credit an edge may save up: two seconds of its share (at least one upload)

    def __init__(self) -> None:
        self.rate: float | None = None
        self.credit = 0.0
        self.last: float | None = None

    def set_rate(self, rate: float | None, now: float) -> None:
        self._refill(now)
        self.rate = None if rate is None else max(float(rate), 0.0)

    def _refill(self, now: float) -> None:
        if self.rate is not None and self.last is not None:
            cap = max(self.rate * self.BURST_S, 1.0)
            self.credit = min(self.credit + self.rate * max(now - self.last, 0.0), cap)
        self.last = now

    def allow(self, wanted: int, now: float) -> int:
        """How many of ``wanted`` uploads may go now; they are debited."""
        self._refill(now)
        if self.rate is None:
            return wanted
        allowed = min(int(wanted), int(self.credit))
        self.credit -= allowed
        return allowed
