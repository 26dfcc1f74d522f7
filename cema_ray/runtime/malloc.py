"""glibc malloc settings for the processes that run edges and the cloud.

Torch allocates every activation of every forward pass afresh. Under glibc's defaults a buffer above
the mmap threshold (128 KB at first, then adjusted as buffers are freed) is mapped on allocation and
unmapped on free, so the kernel hands out and zeroes fresh pages again and again. Inside Ray's worker
processes that is what happened: an EdgeHost's step ran 1.3-1.6x slower, a fifth to a third of its CPU
time in page faults, while the same step in a plain process showed none (docs/BENCHMARKS.md, section 3). Serving
buffers up to 32 MB from the heap and keeping freed memory for reuse removes that cost, for a bounded
amount of memory held per process.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys
import warnings

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's ceiling on 64-bit; a fixed value also stops its dynamic adjustment


def keep_freed_memory(keep_mb: int) -> bool:
    """Serve allocations below 32 MB from the heap; return freed memory to the OS only above ``keep_mb`` MiB.

    Returns whether the settings took effect: False for ``keep_mb`` 0 (glibc's defaults) and, with a
    warning, where the C library has no ``mallopt`` (not glibc).
    """
    if keep_mb <= 0:
        return False
    mallopt = _mallopt()
    if mallopt is None:
        warnings.warn("ray.malloc_keep_mb: this C library has no mallopt (not glibc); allocator left as is",
                      RuntimeWarning, stacklevel=2)
        return False
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1 and mallopt(M_TRIM_THRESHOLD, keep_mb * 2**20) == 1


def _mallopt():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return fn
