"""The stream of batches one edge sees, as a random-access sequence.

``EdgeStream.batch(k)`` is a pure function of (spec, edge_id, k): the whole sample plan (which source
sample goes to which position, in which domain) is derived once from seeded numpy generators, and the
corruption randomness of batch k comes from a generator seeded by (seed, edge_id, k, domain). An edge
restarted after a crash resumes at cursor k, and a single-process runner and a distributed one produce
byte-identical batches.

Protocols (mariodoebler/test-time-adaptation and TTAB names in brackets):

- ``continual``: the domains in the given order, no reset [continual].
- ``reset``: the same order, ``reset=True`` on the first batch of every domain [reset_each_shift].
- ``mixed``: all domains' samples pooled and shuffled, ``domain="mixed"`` [mixed_domains].
- ``gradual``: each corruption at severities 1-2-3-4-5-4-3-2-1 ("clean" once) [gradual].
- ``label_shift``: per domain, samples ordered by a Dirichlet(alpha) class mixture (NOTE's
  ``sort_by_dirichlet``) [correlated; TTAB label skew].

Domain names are ``"<corruption>-<severity>"``; the pseudo-corruption ``"clean"`` (identity) is named
``"clean"``. Each domain draws ``samples_per_domain`` source indices without replacement; when it asks
for more than the source holds, whole shuffled passes over the source are concatenated (so every sample
appears once before any appears twice).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch

from cema_ray.data.corruptions import CORRUPTIONS, corrupt
from cema_ray.errors import ConfigError
from cema_ray.names import PROTOCOLS

GRADUAL_SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5, 4, 3, 2, 1)
CLEAN = "clean"
MIXED = "mixed"

# Stream tags keep the seed streams of different purposes apart.
_TAG_SELECT, _TAG_ORDER, _TAG_MIX, _TAG_CORRUPT = 1, 2, 3, 4
_DIRICHLET_MIN_CHUNK = 10
_DIRICHLET_MAX_TRIES = 1000


class ImageSet(Protocol):
    """What a stream needs from a source: ``len`` and ``take(indices) -> LabeledImages``."""

    def __len__(self) -> int: ...

    def take(self, indices: np.ndarray) -> Any: ...


@dataclass
class Batch:
    edge_id: int
    index: int  # batch index in this edge's stream (0, 1, ...)
    images: np.ndarray  # uint8 (N, H, W, C), already corrupted
    labels: np.ndarray  # int64 (N,)
    ids: np.ndarray  # int64 (N,), unique across the fleet
    domain: str  # "gaussian_noise-5", "clean", "mixed"
    reset: bool  # first batch of a domain under the "reset" protocol


@dataclass(frozen=True)
class StreamSpec:
    protocol: str = "continual"
    corruptions: tuple[str, ...] = CORRUPTIONS
    severity: int = 5
    batch_size: int = 64
    samples_per_domain: int = 1000
    dirichlet_alpha: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "corruptions", tuple(self.corruptions))
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"stream.protocol: unknown protocol '{self.protocol}'; allowed: {', '.join(PROTOCOLS)}")
        if not self.corruptions:
            raise ConfigError("stream.corruptions: empty; give at least one corruption (or 'clean')")
        for name in self.corruptions:
            if name != CLEAN and name not in CORRUPTIONS:
                raise ConfigError(f"stream.corruptions: unknown corruption '{name}'; "
                                  f"allowed: {CLEAN}, {', '.join(CORRUPTIONS)}")
        _check_int("stream.severity", self.severity, 1, 5)
        _check_int("stream.batch_size", self.batch_size, 1)
        _check_int("stream.samples_per_domain", self.samples_per_domain, 1)
        _check_int("stream.seed", self.seed, 0)
        if not (isinstance(self.dirichlet_alpha, (int, float)) and self.dirichlet_alpha > 0):
            raise ConfigError(f"stream.dirichlet_alpha: {self.dirichlet_alpha!r} must be a number > 0")


def _check_int(field: str, value: Any, low: int, high: int | None = None) -> None:
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not ok or value < low or (high is not None and value > high):
        allowed = f"an integer in {low}..{high}" if high is not None else f"an integer >= {low}"
        raise ConfigError(f"{field}: {value!r} is not allowed; allowed: {allowed}")


@dataclass(frozen=True)
class Domain:
    corruption: str
    severity: int

    @property
    def name(self) -> str:
        return CLEAN if self.corruption == CLEAN else f"{self.corruption}-{self.severity}"


def plan_domains(spec: StreamSpec) -> list[Domain]:
    """The domain segments of a stream, in order (for "mixed": the pooled components)."""
    if spec.protocol == "gradual":  # "clean" has no severities: it stays one domain
        return [Domain(c, s) for c in spec.corruptions for s in (GRADUAL_SEVERITIES if c != CLEAN else (1,))]
    return [Domain(c, spec.severity) for c in spec.corruptions]


def stream_length(spec: StreamSpec) -> int:
    """Batches in a stream of this spec, which is `len(EdgeStream)` without drawing its sample plan (a driver
    counts a fleet's work without building every edge's stream a second time)."""
    domains, per, bs = len(plan_domains(spec)), spec.samples_per_domain, spec.batch_size
    if spec.protocol == MIXED:
        return -(-domains * per // bs)
    return domains * -(-per // bs)


class EdgeStream:
    """Random-access stream of one edge: ``len(stream)`` batches, ``stream.batch(k)`` for any k.

    ``source`` is a clean image set corrupted on the fly. Data sets that ship their corrupted domains
    (CIFAR-10-C, ImageNet-C) pass ``corrupted_source(corruption, severity) -> image set`` instead; it is
    called once per domain and its result kept (use memory-mapped or lazy sets). ``source`` may then be
    None unless the stream has a "clean" domain.
    """

    def __init__(self, source: ImageSet | None, spec: StreamSpec, edge_id: int, id_stride: int = 10 ** 9,
                 corrupted_source: Callable[[str, int], ImageSet] | None = None) -> None:
        _check_int("edge_id", edge_id, 0)
        _check_int("id_stride", id_stride, 1)
        if source is None and corrupted_source is None:
            raise ConfigError("EdgeStream needs a clean source or a corrupted_source callable")
        self.spec, self.edge_id, self.id_stride = spec, int(edge_id), int(id_stride)
        self._source, self._corrupted_source = source, corrupted_source
        self._pools: dict[Domain, ImageSet] = {}
        self._segments = plan_domains(spec)
        self._sample_domain, self._sample_index, self._bounds, self._batch_segment = self._plan()
        if self.total_samples > self.id_stride:
            raise ConfigError(f"id_stride {self.id_stride} is smaller than this stream's {self.total_samples} "
                              f"samples; ids would collide across edges")

    # ------------------------------------------------------------------------------- public API
    def __len__(self) -> int:
        return len(self._bounds)

    @property
    def total_samples(self) -> int:
        return int(len(self._sample_index))

    def domains(self) -> list[str]:
        """Domain names in stream order (for "mixed": the pooled domains, in the given order)."""
        return [d.name for d in self._segments]

    def sample_domains(self, k: int) -> list[str]:
        """Per-sample domain names of batch k: what a "mixed" batch's single label hides."""
        start, stop = self._bounds[self._check_index(k)]
        return [self._segments[d].name for d in self._sample_domain[start:stop]]

    def batch(self, k: int) -> Batch:
        """Batch k, a pure function of (spec, edge_id, k)."""
        start, stop = self._bounds[self._check_index(k)]
        seg_of = self._sample_domain[start:stop]
        src = self._sample_index[start:stop]
        images: np.ndarray | None = None
        labels = np.empty(stop - start, dtype=np.int64)
        for seg in np.unique(seg_of):
            rows = np.flatnonzero(seg_of == seg)
            part_images, part_labels = self._load(int(seg), src[rows], k)
            if images is None:
                images = np.empty((stop - start,) + part_images.shape[1:], dtype=np.uint8)
            images[rows] = part_images
            labels[rows] = part_labels
        seg = self._batch_segment[k]
        first_of_segment = k == 0 or self._batch_segment[k - 1] != seg
        return Batch(
            edge_id=self.edge_id, index=k, images=images, labels=labels,
            ids=self.edge_id * self.id_stride + np.arange(start, stop, dtype=np.int64),
            domain=MIXED if seg < 0 else self._segments[seg].name,
            reset=self.spec.protocol == "reset" and first_of_segment,
        )

    def __iter__(self):
        return (self.batch(k) for k in range(len(self)))

    # ------------------------------------------------------------------------------- the plan
    def _rng(self, *keys: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.spec.seed, self.edge_id, *keys]))

    def _plan(self) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]], list[int]]:
        """Per stream position: (segment, source index); then batch bounds and each batch's segment."""
        seg_parts, idx_parts = [], []
        for s, dom in enumerate(self._segments):
            pool = self._pool(dom)
            chosen = _select(len(pool), self.spec.samples_per_domain, self._rng(_TAG_SELECT, s))
            if self.spec.protocol == "label_shift":
                labels = _pool_labels(pool, dom)[chosen]
                chosen = chosen[dirichlet_order(labels, self.spec.dirichlet_alpha, self._rng(_TAG_ORDER, s))]
            seg_parts.append(np.full(len(chosen), s, dtype=np.int64))
            idx_parts.append(chosen)
        seg_of, idx = np.concatenate(seg_parts), np.concatenate(idx_parts)
        bs = self.spec.batch_size
        if self.spec.protocol == MIXED:
            perm = self._rng(_TAG_MIX).permutation(len(idx))
            seg_of, idx = seg_of[perm], idx[perm]
            bounds = [(a, min(a + bs, len(idx))) for a in range(0, len(idx), bs)]
            return seg_of, idx, bounds, [-1] * len(bounds)
        bounds, batch_seg, offset = [], [], 0
        for s, part in enumerate(idx_parts):  # never mix two domains in one batch
            for a in range(0, len(part), bs):
                bounds.append((offset + a, offset + min(a + bs, len(part))))
                batch_seg.append(s)
            offset += len(part)
        return seg_of, idx, bounds, batch_seg

    def _pool(self, dom: Domain) -> ImageSet:
        if dom not in self._pools:
            if dom.corruption == CLEAN or self._corrupted_source is None:
                if self._source is None:
                    raise ConfigError(f"domain '{dom.name}' needs a clean source, but source is None")
                self._pools[dom] = self._source
            else:
                self._pools[dom] = self._corrupted_source(dom.corruption, dom.severity)
            if len(self._pools[dom]) == 0:
                raise ConfigError(f"the source for domain '{dom.name}' is empty")
        return self._pools[dom]

    def _load(self, seg: int, indices: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        dom = self._segments[seg]
        part = self._pool(dom).take(indices)
        images = np.asarray(part.images)
        if dom.corruption != CLEAN and self._corrupted_source is None:
            gen = torch.Generator().manual_seed(self._torch_seed(_TAG_CORRUPT, k, seg))
            images = corrupt(torch.from_numpy(np.ascontiguousarray(images)), dom.corruption, dom.severity,
                             gen).numpy()
        return images, np.asarray(part.labels, dtype=np.int64)

    def _torch_seed(self, *keys: int) -> int:
        words = np.random.SeedSequence([self.spec.seed, self.edge_id, *keys]).generate_state(2, np.uint32)
        return (int(words[0]) << 31) ^ int(words[1])

    def _check_index(self, k: int) -> int:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k < len(self):
            raise IndexError(f"batch index {k!r} out of range; this stream has {len(self)} batches")
        return int(k)


def _select(n: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` indices without replacement; beyond ``n``, whole shuffled passes are concatenated."""
    passes = [rng.permutation(n) for _ in range(-(-count // n))]
    return np.concatenate(passes)[:count].astype(np.int64)


def _pool_labels(pool: ImageSet, dom: Domain) -> np.ndarray:
    labels = getattr(pool, "labels", None)
    if labels is None:
        raise ConfigError(f"protocol 'label_shift' needs labels up front; the source of '{dom.name}' "
                          f"({type(pool).__name__}) has no .labels")
    return np.asarray(labels, dtype=np.int64)


def dirichlet_order(labels: Sequence[int] | np.ndarray, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """A permutation of positions that correlates classes in time (NOTE / mariodoebler ``sort_by_dirichlet``).

    The stream is cut into as many chunks as there are classes; each class spreads its samples over the
    chunks with Dirichlet(alpha) proportions (chunks already full get none); the chunks follow each other,
    each holding its classes one after another in random order. Small alpha: long single-class runs.
    Draws are repeated until every chunk holds at least min(10, n / (2 * chunks)) samples (NOTE uses 10
    and a time limit; here a bounded number of tries, keeping the most balanced draw).
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    classes = np.unique(labels)
    chunks = len(classes)
    if n == 0 or chunks == 1:
        return rng.permutation(n)
    threshold = min(_DIRICHLET_MIN_CHUNK, n // (2 * chunks))
    best: list[list[np.ndarray]] | None = None
    best_min = -1
    for _ in range(_DIRICHLET_MAX_TRIES):
        parts, sizes = _dirichlet_split(labels, classes, alpha, rng)
        if sizes.min() > best_min:
            best, best_min = parts, int(sizes.min())
        if best_min >= threshold:
            break
    order = [best[j][c] for j in range(chunks) for c in rng.permutation(chunks)]
    return np.concatenate(order).astype(np.int64)


def _dirichlet_split(labels: np.ndarray, classes: np.ndarray, alpha: float,
                     rng: np.random.Generator) -> tuple[list[list[np.ndarray]], np.ndarray]:
    n, chunks = len(labels), len(classes)
    parts: list[list[np.ndarray]] = [[np.empty(0, np.int64)] * chunks for _ in range(chunks)]
    sizes = np.zeros(chunks, dtype=np.int64)
    for c, k in enumerate(classes):
        idx_k = rng.permutation(np.flatnonzero(labels == k))
        p = rng.dirichlet(np.full(chunks, float(alpha)))
        p = p * (sizes < n / chunks)
        if not np.isfinite(p).all() or p.sum() <= 0:  # tiny alpha can underflow to all zeros
            p = (sizes < n / chunks).astype(float)
            p = np.eye(chunks)[rng.choice(np.flatnonzero(p))]
        p = p / p.sum()
        cuts = (np.cumsum(p) * len(idx_k)).astype(int)[:-1]
        for j, piece in enumerate(np.split(idx_k, cuts)):
            parts[j][c] = piece
            sizes[j] += len(piece)
    return parts, sizes
