"""Fault injection as a setting: which actors to kill, and when, so a user can rehearse failures.

The schedule is a pure function of the config (counts and seed) and the run's length, so the same
config always kills the same hosts at the same rounds, in every runtime that honours it. What the
drivers then see and recover from is counted here too, for the run's summary.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from cema_ray.data.streams import Batch

BAD_INPUTS = ("nan", "inf", "shape", "dtype", "labels", "empty")  # what `faults.bad_batches` cycles through


def plan_bad_batches(count: int, edges: int, seed: int) -> dict[int, list[tuple[float, str]]]:
    """`count` malformed batches over the fleet: edge id -> [(position in its stream as a fraction, kind)]."""
    rng = np.random.default_rng([seed, 7])
    plan: dict[int, list[tuple[float, str]]] = {}
    for i in range(count):
        plan.setdefault(int(rng.integers(edges)), []).append((float(rng.random()), BAD_INPUTS[i % len(BAD_INPUTS)]))
    return plan


def malform(batch: Batch, kind: str, num_classes: int) -> Batch:
    """The batch made bad in one way, keeping its ids so its samples stay accounted for (as rejected)."""
    images, labels = batch.images, batch.labels
    if kind in ("nan", "inf"):
        images = images.astype(np.float32)
        images.flat[len(images.flat) // 2] = np.nan if kind == "nan" else np.inf
    elif kind == "shape":
        images = images[:, :-1]
    elif kind == "dtype":
        images = images.astype(np.int64)
    elif kind == "labels":
        labels = labels.copy()
        labels[0] = num_classes
    elif kind == "empty":
        images, labels = images[:0], labels[:0]
    else:
        raise ValueError(f"unknown bad input kind {kind!r}; known: {', '.join(BAD_INPUTS)}")
    return replace(batch, images=images, labels=labels)


def spread(count: int, length: int) -> list[int]:
    """`count` points spread evenly over [1, length - 1]: never before the first snapshot or checkpoint."""
    return [min(max(1, int((i + 1) * length / (count + 1))), max(length - 1, 0)) for i in range(count)]


@dataclass
class FaultSchedule:
    """Round -> host indices to kill during that round; delivery numbers at which to kill the cloud."""

    host_kills: dict[int, list[int]] = field(default_factory=dict)
    cloud_kills: list[int] = field(default_factory=list)
    host_raises: dict[int, list[int]] = field(default_factory=dict)  # round -> hosts whose step raises
    seen: int = 0
    recovered: int = 0
    cloud_seen: int = 0
    cloud_recovered: int = 0
    replayed: int = 0
    restored_from: list[int] = field(default_factory=list)
    raises_seen: list[int] = field(default_factory=list)
    host_retries: int = 0  # a reviving host that failed again before its restore answered
    cloud_retries: int = 0  # a recovering cloud that failed again before or during its replay

    @classmethod
    def plan(cls, kill_hosts: int, rounds: int, hosts: int, seed: int, kill_cloud: int = 0,
             raise_in_hosts: int = 0) -> "FaultSchedule":
        """Spread the faults evenly over the run's rounds, host victims drawn with `seed`."""
        rng = np.random.default_rng(seed)
        kills: dict[int, list[int]] = {}
        for at in spread(kill_hosts, rounds):
            kills.setdefault(at, []).append(int(rng.integers(hosts)))
        raises: dict[int, list[int]] = {}
        for at in spread(raise_in_hosts, rounds):  # a third of a gap after the kills
            at = min(at + max(1, rounds // (3 * (raise_in_hosts + 1))), max(rounds - 1, 0))
            raises.setdefault(at, []).append(int(rng.integers(hosts)))
        # the cloud dies between the host kills (offset by half a gap) so each recovery is seen alone
        cloud = sorted({min(max(1, at + max(1, rounds // (2 * (kill_cloud + 1)))), max(rounds - 1, 1))
                        for at in spread(kill_cloud, rounds)})
        return cls(kills, cloud, raises)

    def victims(self, round_index: int) -> list[int]:
        return self.host_kills.get(round_index, [])

    def wants_raise(self, host: int, round_index: int) -> bool:
        """Whether host's step at this round must raise: a planned exception that has not been seen yet
        (a step discarded by another fault before it could raise keeps its exception armed)."""
        return any(at <= round_index and host in hs for at, hs in self._unraised().items())

    def raised(self, host: int) -> None:
        """The driver saw host's injected exception: disarm the earliest one planned for it."""
        self.raises_seen.append(host)

    def _unraised(self) -> dict[int, list[int]]:
        left = list(self.raises_seen)
        out: dict[int, list[int]] = {}
        for at in sorted(self.host_raises):
            for h in self.host_raises[at]:
                if h in left:
                    left.remove(h)
                else:
                    out.setdefault(at, []).append(h)
        return out

    def host_retry(self) -> None:
        self.host_retries += 1

    def cloud_retry(self) -> None:
        self.cloud_retries += 1

    def kill_cloud_at(self, delivery: int) -> bool:
        return delivery in self.cloud_kills

    @property
    def planned(self) -> int:
        return (sum(len(v) for v in self.host_kills.values()) + len(self.cloud_kills)
                + sum(len(v) for v in self.host_raises.values()))

    def report(self) -> dict[str, object]:
        return {"host_kills_planned": sum(len(v) for v in self.host_kills.values()),
                "host_exceptions_planned": sum(len(v) for v in self.host_raises.values()),
                "host_failures_seen": self.seen,
                "host_recoveries": self.recovered, "cloud_kills_planned": len(self.cloud_kills),
                "cloud_failures_seen": self.cloud_seen, "cloud_recoveries": self.cloud_recovered,
                "deliveries_replayed": self.replayed, "cloud_restored_from": list(self.restored_from),
                "host_recovery_retries": self.host_retries, "cloud_recovery_retries": self.cloud_retries}
