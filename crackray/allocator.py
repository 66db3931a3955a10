"""glibc's allocator told to keep the memory a process frees, for the process to reuse.

glibc hands a freed block larger than its mmap threshold (32 MiB at most) straight back to
the kernel, trims its heap whenever 128 KiB sit free at the top, and gives threads other than
the main one arenas of 64 MiB heaps that it unmaps as soon as one empties, whatever the trim
threshold (Ray Train runs the training loop on such a thread). A CPU training step allocates
and frees hundreds of MiB of activations, so every step faulted all of those pages back in,
each one zeroed by the kernel: ~150,000-250,000 page faults a step and about a third of its
CPU time in the kernel (`simple_cnn`, batch 32, 224 px, two threads: 52-71 images/s by
default, 91-110 with freed memory kept; README "Performance"). The cost is that a process's
memory stays at its high-water mark, which a training or decode process reaches again every
step or block anyway.

Where the C library is not glibc, nothing changes.
"""

from __future__ import annotations

import ctypes
import os

# No block served by its own mmap, no trim below 2 GiB free at the heap's top, and every
# thread on the main heap (one lock: the threads that allocate much are few).
TUNABLES = ("glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647"
            ":glibc.malloc.arena_max=1")
ENV_VARS = {"GLIBC_TUNABLES": TUNABLES}  # read by glibc when a program starts
# mallopt's parameter numbers (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def keep_freed_memory() -> None:
    """Apply `TUNABLES` to this process (mallopt) and, through the environment, to every
    process it starts: Ray's local processes, DataLoader and benchmark processes. A
    GLIBC_TUNABLES already in the environment wins (this process started with it, or a user
    chose their own) and nothing is changed."""
    if "GLIBC_TUNABLES" in os.environ or not _is_glibc():
        return
    os.environ.update(ENV_VARS)
    libc = ctypes.CDLL(None)  # the C library the interpreter runs on
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    libc.mallopt(_M_ARENA_MAX, 1)  # threads started from now on; none has allocated much yet


def _is_glibc() -> bool:
    try:
        return bool(os.confstr("CS_GNU_LIBC_VERSION"))
    except (ValueError, OSError, AttributeError):  # not a GNU C library, or not POSIX
        return False
