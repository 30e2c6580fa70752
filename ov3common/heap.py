"""glibc heap settings for processes that allocate and free the same large tensors over and over (CPU training
steps, the eval networks' batches): :func:`heap_reuse`."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import platform

__all__ = ["heap_reuse"]

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
# what glibc's dynamic thresholds settle at for large blocks (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit, twice that)
_GLIBC_MMAP_THRESHOLD_MAX, _GLIBC_MMAP_MAX = 32 << 20, 65536
_heap_depth = [0]  # heap_reuse nesting (process-wide, like the setting itself)


@functools.lru_cache(maxsize=1)
def _glibc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


@contextlib.contextmanager
def heap_reuse(enabled: bool = True):
    """Inside: glibc's malloc keeps freed memory for reuse (no mmap'd blocks, no trimming of the heap top).

    Why: activations and gradients are tens to hundreds of MB; glibc serves blocks above its mmap threshold (at
    most 32 MB) with fresh mmaps and unmaps them on free, so every batch pays ~10^4 page faults per image
    (measured: 1.3-2M minor faults and 2.5-4 s of system time per 100-150 Inception images, ~1.5e5 and ~0.2 s with
    this; a DiT-DH-S training step at batch 2: 160-215k faults and 5-8 % of the step, ~0 faults with this). On
    exit the thresholds are set to the values glibc's dynamic adjustment reaches for large blocks (mmap above 32 MB,
    trim above 64 MB) and the unused heap is returned (``malloc_trim``). A no-op where the C library
    is not glibc, or with ``enabled=False`` (callers that decide at run time: CPU only, fused path only).
    Process-wide (as the setting is); nested uses leave it to the outermost."""
    libc = _glibc() if enabled else None
    if libc is None or _heap_depth[0]:  # not glibc, or already inside (nested: the outermost one restores)
        yield
        return
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1)  # mallopt takes a C int
    _heap_depth[0] += 1
    try:
        yield
    finally:
        _heap_depth[0] -= 1
        libc.mallopt(_M_MMAP_THRESHOLD, _GLIBC_MMAP_THRESHOLD_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, 2 * _GLIBC_MMAP_THRESHOLD_MAX)
        libc.mallopt(_M_MMAP_MAX, _GLIBC_MMAP_MAX)
        libc.malloc_trim(0)
