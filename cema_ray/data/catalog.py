"""From a config's `data` section to arrays: which loader, which root, which cache.

The loaders in `sources.py` take explicit paths; this module resolves a config (root, then the
source's environment variable, then its default) into calls of them, in one place.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

import numpy as np

from cema_ray.data.sources import DATA_SOURCES, DataSourceInfo, LabeledImages


class LabeledImagesLike(Protocol):
    """In-memory `LabeledImages` or a lazy image folder: both have len() and take()."""

    labels: np.ndarray
    classes: list[str]

    def __len__(self) -> int: ...

    def take(self, indices: np.ndarray) -> LabeledImages: ...


def source_info(name: str) -> DataSourceInfo:
    return DATA_SOURCES.get(name)


def load_clean_split(data_cfg: dict[str, Any], split: str) -> LabeledImagesLike:
    """The clean `split` of a clean source (corrupted on the fly by the streams)."""
    info = source_info(data_cfg["source"])
    if info.kind != "clean":
        raise ValueError(f"data source '{info.name}' ships corrupted domains; it has no clean split")
    root = info.resolve_root(data_cfg.get("root"))
    if info.name == "cifar10-folder":
        return info.loader(root, split, cache_dir=data_cfg.get("cache_dir"))
    if info.name == "image-folder":
        return info.loader(root, split=split)
    return info.loader(root, split)


def corrupted_provider(data_cfg: dict[str, Any]) -> Callable[[str, int], LabeledImagesLike]:
    """For pre-corrupted sources: (corruption, severity) -> that domain's images."""
    info = source_info(data_cfg["source"])
    root = info.resolve_root(data_cfg.get("root"))
    cache: dict[tuple[str, int], LabeledImagesLike] = {}

    def provide(corruption: str, severity: int) -> LabeledImagesLike:
        key = (corruption, severity)
        if key not in cache:
            cache[key] = info.loader(root, corruption, severity)
        return cache[key]

    return provide
