"""Uploads waiting in the cloud for a step: arrival order, popped in chunks of a fixed size."""
from __future__ import annotations

import numpy as np


class UploadQueue:
    """Uploads waiting for a cloud step, in arrival order; popped in chunks of a fixed size (a chunk may
    span several edge batches)."""

    def __init__(self) -> None:
        self.items: list[tuple[np.ndarray, np.ndarray | None]] = []
        self.size = 0

    def add(self, images: np.ndarray, labels: np.ndarray | None) -> None:
        self.items.append((images.copy(), None if labels is None else np.asarray(labels).copy()))
        self.size += len(images)

    def pop(self, n: int) -> tuple[np.ndarray, np.ndarray | None]:
        images, labels, have = [], [], 0
        while have < n:
            head_i, head_l = self.items.pop(0)
            take = min(n - have, len(head_i))
            images.append(head_i[:take])
            labels.append(None if head_l is None else head_l[:take])
            if take < len(head_i):
                self.items.insert(0, (head_i[take:], None if head_l is None else head_l[take:]))
            have += take
        self.size -= n
        return np.concatenate(images), (None if labels[0] is None else np.concatenate(labels))

    def clear(self) -> None:
        self.items, self.size = [], 0

    def extend(self, other: "UploadQueue") -> None:
        """Take ``other``'s uploads after this queue's own (``other`` ends empty)."""
        self.items += other.items
        self.size += other.size
        other.clear()

    def state_dict(self) -> list[tuple[np.ndarray, np.ndarray | None]]:
        return [(i.copy(), None if l is None else l.copy()) for i, l in self.items]

    def load_state_dict(self, items: list) -> None:
        self.items = [(np.asarray(i).copy(), None if l is None else np.asarray(l).copy()) for i, l in items]
        self.size = sum(len(i) for i, _ in self.items)
