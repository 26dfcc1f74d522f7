"""The cloud's bank of domains: which entry a batch of uploads belongs to, by its domain key.

One shared student fits one set of normalisation parameters to whatever mix of domains the fleet is in at the
moment; when edges are in different domains at once (each its own corruption order) every edge gets a student
fitted to the mix, and the more edges, the worse. The bank keeps one entry per domain instead, keyed by the
domain key of the uploads that trained it (`cema_ray.algorithms.domain_key`): uploads go to the nearest entry
when it is within ``radius``, else to a new one; when the bank is full the two entries nearest each other merge
(their keys averaged by how many keys each took) and the freed slot takes the new domain, so nothing an entry
learnt is thrown away and a domain that comes back finds what it taught, merged at worst with its nearest
neighbour. The bank is plain numpy bookkeeping: what an entry holds is its owner's business, by slot.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple

import numpy as np

from cema_ray.algorithms.domain_key import key_distance

EVICTIONS = ("pair", "smallest")


@dataclass(frozen=True)
class Route:
    """Where a key went: its slot and whether that slot was (re)started for it. A full bank merged the entry that
    held ``slot`` into ``merged_into`` first, with weights ``weights`` (the two entries' key counts: kept, freed)."""

    slot: int
    new: bool
    merged_into: int | None = None
    weights: tuple[int, int] = (0, 0)


class DomainBank:
    """Up to ``capacity`` entries, each a key (the running mean of the keys routed to it) in a fixed slot."""

    def __init__(self, capacity: int, radius: float, key_window: int = 100, evict: str = "pair") -> None:
        """``key_window``: an entry's key is the mean of its first keys, then an exponential mean of the last
        ~this many (so a slowly drifting domain keeps its entry). ``evict``: which entry a full bank frees for a
        new key: "pair" merges the two entries nearest each other; "smallest" merges the entry fewest keys
        reached into its nearest neighbour (a stray key's entry goes first, and two busy domains stay apart)."""
        if capacity < 1 or not radius > 0 or key_window < 1 or evict not in EVICTIONS:
            raise ValueError("a domain bank needs capacity >= 1, radius > 0, key_window >= 1 and evict in "
                             f"{EVICTIONS}")
        self.capacity, self.radius, self.key_window = int(capacity), float(radius), int(key_window)
        self.evict = evict
        self.keys: list[np.ndarray] = []
        self.counts: list[int] = []
        self.created = 0  # entries ever made
        self.merges = 0  # pairs merged to make room

    def __len__(self) -> int:
        return len(self.keys)

    def route(self, key: np.ndarray) -> Route:
        """The slot for uploads with ``key``: the nearest entry within the radius (its key moves towards this
        one), else a new entry, in a free slot or in the one freed by merging the two nearest entries."""
        key = np.asarray(key, np.float32)
        if self.keys:
            d = key_distance(key, np.stack(self.keys))
            j = int(np.argmin(d))
            if d[j] <= self.radius:
                self.counts[j] += 1
                rate = 1.0 / min(self.counts[j], self.key_window)
                self.keys[j] = (self.keys[j] + rate * (key - self.keys[j])).astype(np.float32)
                return Route(j, False)
        self.created += 1
        if len(self.keys) < self.capacity:
            self.keys.append(key.copy())
            self.counts.append(1)
            return Route(len(self.keys) - 1, True)
        a, b = self._closest_pair() if self.evict == "pair" else self._smallest()
        ca, cb = self.counts[a], self.counts[b]
        self.keys[a] = ((ca * self.keys[a] + cb * self.keys[b]) / (ca + cb)).astype(np.float32)
        self.counts[a] = ca + cb
        self.keys[b], self.counts[b] = key.copy(), 1
        self.merges += 1
        return Route(b, True, merged_into=a, weights=(ca, cb))

    def _smallest(self) -> tuple[int, int]:
        """(its nearest neighbour, the entry fewest keys reached): the latter is merged into the former."""
        b = int(np.argmin(self.counts))  # ties: the oldest slot
        d = key_distance(self.keys[b], np.stack(self.keys))
        d[b] = np.inf
        return int(np.argmin(d)), b

    def _closest_pair(self) -> tuple[int, int]:
        keys = np.stack(self.keys)
        d = np.mean((keys[:, None, :] - keys[None, :, :]) ** 2, axis=-1)
        d[np.tril_indices(len(keys))] = np.inf
        a, b = np.unravel_index(int(np.argmin(d)), d.shape)
        return int(a), int(b)

    def state_dict(self) -> dict[str, Any]:
        return {"keys": [k.copy() for k in self.keys], "counts": list(self.counts), "created": self.created,
                "merges": self.merges}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.keys = [np.asarray(k, np.float32).copy() for k in state["keys"]]
        self.counts = [int(c) for c in state["counts"]]
        self.created, self.merges = int(state["created"]), int(state["merges"])


def nearest(key: np.ndarray, keys: np.ndarray, reach: float) -> int | None:
    """The row of ``keys`` nearest ``key`` when within ``reach``, else None (an edge then runs the fleet's student:
    a domain nobody has taught yet)."""
    if len(keys) == 0:
        return None
    d = key_distance(key, keys)
    j = int(np.argmin(d))
    return j if d[j] <= reach else None


BANK_PREFIX, BASE_PREFIX = "bank.", "base."


State = dict[str, np.ndarray]  # an entry's parameters, as a publication carries them


def bank_wire(entries: Mapping[int, tuple[np.ndarray, State | None]], base: State | None = None,
              steps: Mapping[int, int] | None = None) -> State:
    """A bank as one flat publication: ``bank.<slot>.key`` and ``bank.<slot>.<parameter>`` per entry (no
    parameters: that domain runs the deployed weights), ``bank.<slot>.steps`` (the chunk steps that trained it, when
    given: how sure the entry is), and ``base.<parameter>`` for the fleet's student (none: batches near no entry run
    the deployed weights)."""
    flat: State = {f"{BASE_PREFIX}{n}": v for n, v in (base or {}).items()}
    for slot, (key, state) in sorted(entries.items()):
        flat[f"{BANK_PREFIX}{slot}.key"] = np.asarray(key, np.float32)
        if steps is not None:
            flat[f"{BANK_PREFIX}{slot}.steps"] = np.asarray([steps.get(slot, 0)], np.int64)
        flat.update({f"{BANK_PREFIX}{slot}.{n}": v for n, v in (state or {}).items()})
    return flat


class PublishedBank(NamedTuple):
    """A bank publication as an edge reads it."""

    keys: np.ndarray  # (M, 2C): one row per entry, in slot order
    entries: list[State | None]  # each entry's parameters (None: the deployed weights)
    base: State | None  # the fleet's student (None: the deployed weights)
    steps: np.ndarray  # (M,) chunk steps that trained each entry (0 where the publication does not say)


def bank_entries(flat: Mapping[str, np.ndarray]) -> PublishedBank:
    """The inverse of `bank_wire`."""
    by_slot: dict[int, State] = {}
    base: State = {}
    for name, value in flat.items():
        if name.startswith(BASE_PREFIX):
            base[name[len(BASE_PREFIX):]] = value
            continue
        if not name.startswith(BANK_PREFIX):
            raise ValueError(f"publication key '{name}' is not a bank entry's ({BANK_PREFIX}<slot>.<name>)")
        slot, rest = name[len(BANK_PREFIX):].split(".", 1)
        by_slot.setdefault(int(slot), {})[rest] = value
    slots = sorted(by_slot)
    keys = np.stack([np.asarray(by_slot[j].pop("key"), np.float32) for j in slots]) if slots else np.zeros((0, 0))
    steps = np.array([int(np.asarray(by_slot[j].pop("steps", [0]))[0]) for j in slots], np.int64)
    return PublishedBank(keys, [by_slot[j] or None for j in slots], base or None, steps)
