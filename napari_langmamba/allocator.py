"""Large CPU tensors from the malloc heap while heavy CPU work runs (glibc only).

glibc serves every allocation above its mmap threshold (at most 32 MiB) with fresh pages from
the kernel and returns them on free, so each large tensor of a network's forward and backward
pass (a 4 x 128 x 128 x 128 float32 activation is exactly 32 MiB) is page-faulted in again,
page by page, on every use. On the 2-core machines this project trains on that was most of
the time of a copy, a cast or an element-wise product of such a tensor (13 ms instead of
1.7 ms for a 32 MiB copy). Inside :func:`heap_allocations`, malloc keeps such blocks in its
heap and reuses them; afterwards the previous limits come back and the freed heap memory is
returned to the system. Where the C library is not glibc, the scope does nothing.

``benchmarks/training.py`` and ``benchmarks/denoise.py`` measure what it changes.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import sys
import threading
from collections.abc import Iterator

# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
# Inside the scope: no mmap'd blocks, and up to 1 GiB of free memory kept at the heap's top.
_TRIM_INSIDE = 1 << 30
# Afterwards: mmap again (glibc's default count), with the threshold glibc's own dynamic rule
# reaches once a large block has been freed (32 MiB, trim at twice that). Any mallopt call
# switches that dynamic rule off for good, so its end state is set explicitly.
_MMAP_MAX_DEFAULT = 65536
_MMAP_THRESHOLD_AFTER = 32 << 20
_TRIM_AFTER = 64 << 20

_lock = threading.Lock()
_depth = 0


@functools.lru_cache(maxsize=1)
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
        libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        libc.malloc_trim.argtypes = (ctypes.c_size_t,)
    except (OSError, AttributeError):  # musl and others: no gnu_get_libc_version, other malloc
        return None
    return libc


def heap_allocations_available() -> bool:
    """Whether :func:`heap_allocations` changes anything here (Linux with glibc)."""
    return _glibc() is not None


@contextlib.contextmanager
def heap_allocations() -> Iterator[None]:
    """Within this scope large allocations come from the heap and are reused, not mmap'd.

    Nested and concurrent scopes (threads) are counted: the settings apply while any is
    open, and the last one to close restores them and returns free heap memory to the
    system (``malloc_trim``). Allocate what outlives the scope (a result volume) before
    entering it, so that it does not pin heap memory after the work is done.
    """
    global _depth
    libc = _glibc()
    if libc is None:
        yield
        return
    with _lock:
        if _depth == 0:
            libc.mallopt(_M_MMAP_MAX, 0)
            libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_INSIDE)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                libc.mallopt(_M_MMAP_MAX, _MMAP_MAX_DEFAULT)
                libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_AFTER)
                libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_AFTER)
                libc.malloc_trim(0)
