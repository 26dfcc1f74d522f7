"""Decoded-array cache: decoding tens of thousands of small JPEGs takes tens of seconds, a .npz load does not.

A cache file is named by a key built from everything that would make its content stale (absolute source
path, split, file count, newest modification time, total size), so a changed data folder gets a new file
instead of silently reusing the old one. Files are written to a temporary name and renamed, so a crash or
two concurrent writers never leave a half-written cache behind.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
import zipfile
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from cema_ray.atomic import replacing

DEFAULT_CACHE_DIR = "~/.cache/cema_ray"
CACHE_DIR_ENV = "CEMA_CACHE_DIR"


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Explicit argument, else $CEMA_CACHE_DIR, else ~/.cache/cema_ray."""
    chosen = cache_dir if cache_dir is not None else os.environ.get(CACHE_DIR_ENV, DEFAULT_CACHE_DIR)
    return Path(chosen).expanduser()


def cache_key(*parts: object) -> str:
    """A short stable hash of JSON-serialisable parts (paths are stringified)."""
    blob = json.dumps([str(p) if isinstance(p, os.PathLike) else p for p in parts], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def files_fingerprint(files: Iterable[Path]) -> dict[str, int]:
    """Count, newest mtime and total size: changes whenever a file is added, removed or rewritten."""
    count = newest = total = 0
    for f in files:
        st = os.stat(f)
        count += 1
        newest = max(newest, st.st_mtime_ns)
        total += st.st_size
    return {"count": count, "newest_mtime_ns": newest, "total_bytes": total}


def cache_file(cache_dir: str | os.PathLike | None, name: str, key: str) -> Path:
    return resolve_cache_dir(cache_dir) / f"{name}-{key}.npz"


def load_arrays(path: Path) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None when absent or unreadable (an unreadable cache is rebuilt, not fatal)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        warnings.warn(f"ignoring unreadable cache file {path}: {exc}", stacklevel=2)
        return None


def save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Atomic write (cema_ray/atomic.py)."""
    with replacing(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)


def cached_arrays(path: Path, build: Callable[[], dict[str, np.ndarray]],
                  use_cache: bool = True) -> dict[str, np.ndarray]:
    """Load ``path`` if present, else ``build()`` and store it (a cache folder we cannot write is not fatal)."""
    if use_cache:
        hit = load_arrays(path)
        if hit is not None:
            return hit
    arrays = build()
    if use_cache:
        try:
            save_arrays(path, arrays)
        except OSError as exc:
            warnings.warn(f"could not write cache file {path}: {exc}", stacklevel=2)
    return arrays
