"""Process-level allocator tuning for the streaming merge.

The merge allocates and frees the same few shard-sized buffers over and over. By
default glibc returns such blocks to the kernel at once, and every new buffer then
pays page faults on first touch, which on virtual machines costs more than the
arithmetic. Keeping freed blocks in the heap makes the reuse free; memory stays bounded
because the same sizes recur.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit


def keep_freed_memory() -> bool:
    """Tune glibc malloc for buffer reuse; returns False where that is not glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1
    return bool(ok and mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1)
