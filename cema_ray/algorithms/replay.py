"""The cloud's replay buffer: recent uploads, replayed 3:1 with new ones so the student keeps
seeing earlier data while the stream drifts.

Images stay uint8 NHWC (a quarter of float32's memory) in one preallocated ring; draws are uniform
without replacement from an explicit generator, so a run and its restart draw the same samples.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

Generator = torch.Generator | np.random.Generator


class ReplayBuffer:
    """FIFO store of at most ``capacity`` images; the oldest are overwritten first."""

    def __init__(self, capacity: int = 10000, generator: Generator | None = None) -> None:
        if int(capacity) < 1:
            raise ValueError(f"replay capacity must be >= 1, got {capacity!r}")
        if generator is None:
            raise ValueError("ReplayBuffer needs an explicit torch.Generator or numpy Generator")
        self.capacity = int(capacity)
        self.generator = generator
        self._store: np.ndarray | None = None
        self._start = 0  # physical index of the oldest image
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def _allocate(self, item_shape: tuple[int, ...]) -> None:
        self._store = np.empty((self.capacity, *item_shape), dtype=np.uint8)

    def add(self, images: np.ndarray) -> None:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"replay buffer stores uint8 (N, H, W, C) images, got {images.dtype} {images.shape}")
        if self._store is None:
            self._allocate(images.shape[1:])
        elif images.shape[1:] != self._store.shape[1:]:
            raise ValueError(f"image shape {images.shape[1:]} differs from the buffer's {self._store.shape[1:]}")
        images = images[-self.capacity:]
        n = len(images)
        end = (self._start + self._size) % self.capacity
        slots = (end + np.arange(n)) % self.capacity
        self._store[slots] = images
        overflow = max(0, self._size + n - self.capacity)
        self._start = (self._start + overflow) % self.capacity
        self._size = min(self.capacity, self._size + n)

    def _draw(self, n: int) -> np.ndarray:
        if isinstance(self.generator, np.random.Generator):
            return self.generator.choice(self._size, size=n, replace=False)
        return torch.randperm(self._size, generator=self.generator)[:n].numpy()

    def sample(self, n: int) -> np.ndarray:
        """``n`` distinct images drawn uniformly (a copy), in draw order."""
        if not 0 <= n <= self._size:
            raise ValueError(f"cannot draw {n} distinct images from a replay buffer holding {self._size}")
        logical = self._draw(n)
        return self._store[(self._start + logical) % self.capacity].copy()

    def ordered(self) -> np.ndarray:
        """All images, oldest first (a copy)."""
        if self._store is None:
            return np.empty((0, 0, 0, 0), dtype=np.uint8)
        return self._store[(self._start + np.arange(self._size)) % self.capacity].copy()

    def clear(self) -> None:
        self._start, self._size = 0, 0

    def state_dict(self) -> dict[str, Any]:
        """Images oldest first; the generator's state belongs to its owner, who may share it."""
        return {"capacity": self.capacity, "images": self.ordered()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["capacity"]) != self.capacity:
            raise ValueError(f"replay state has capacity {state['capacity']}, this buffer {self.capacity}")
        self.clear()
        images = np.asarray(state["images"])
        if len(images):
            self._store = None
            self.add(images)
