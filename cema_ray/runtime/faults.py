"""Fault injection as a setting: which actors to kill, and when, so a user can rehearse failures.

The schedule is a pure function of the config (counts and seed) and the run's length, so the same
config always kills the same hosts at the same rounds, in every runtime that honours it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class FaultSchedule:
    """Round -> host indices to kill during that round."""

    host_kills: dict[int, list[int]] = field(default_factory=dict)
    seen: int = 0
    recovered: int = 0

    @classmethod
    def plan(cls, kill_hosts: int, rounds: int, hosts: int, seed: int) -> "FaultSchedule":
        """Spread `kill_hosts` kills evenly over the run's rounds, victims drawn with `seed`."""
        rng = np.random.default_rng(seed)
        kills: dict[int, list[int]] = {}
        for i in range(kill_hosts):
            at = max(1, int((i + 1) * rounds / (kill_hosts + 1)))  # never before the first snapshot
            kills.setdefault(min(at, max(rounds - 1, 0)), []).append(int(rng.integers(hosts)))
        return cls(kills)

    def victims(self, round_index: int) -> list[int]:
        return self.host_kills.get(round_index, [])

    @property
    def planned(self) -> int:
        return sum(len(v) for v in self.host_kills.values())

    def report(self) -> dict[str, int]:
        return {"host_kills_planned": self.planned, "host_failures_seen": self.seen,
                "host_recoveries": self.recovered}
