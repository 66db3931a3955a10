"""The allocator settings crackray's processes run with (allocator.py): memory a process frees
stays with it, instead of being faulted back in, zeroed, at the next allocation."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from crackray import allocator

# Page faults of a round of allocating, touching and freeing 128 MiB (one 64 MiB block and
# sixteen of 4 MiB), after one untimed round, on the main thread and on another one (Ray Train
# runs the training loop on a thread of its own); then the environment a child process sees.
PROBE = """
import ctypes, resource, subprocess, sys, threading
from crackray import allocator
if sys.argv[1] == "keep":
    allocator.keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
SIZES = (64 * 2**20, *[4 * 2**20] * 16)

def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def round_() -> None:  # what a training step does with its activations, in C
    blocks = [libc.malloc(size) for size in SIZES]
    for block, size in zip(blocks, SIZES):
        ctypes.memset(block, 1, size)  # touch every page
    for block in blocks:
        libc.free(block)

def measure(where: str) -> None:
    round_()
    before = faults()
    for _ in range(4):
        round_()
    print(where, (faults() - before) / 4)  # page faults a round

measure("MAIN")
thread = threading.Thread(target=measure, args=("THREAD",))
thread.start()
thread.join()
child = "import os; print(os.environ.get('GLIBC_TUNABLES'))"
print("CHILD", subprocess.run([sys.executable, "-c", child], capture_output=True,
                              text=True).stdout.strip())
"""
PAGES = 128 * 2**20 // os.sysconf("SC_PAGE_SIZE")


def _probe(mode: str, tunables: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if tunables is not None:
        env["GLIBC_TUNABLES"] = tunables
    result = subprocess.run([sys.executable, "-c", PROBE, mode], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return dict(line.split(" ", 1) for line in result.stdout.splitlines())


@pytest.mark.skipif(not allocator._is_glibc(), reason="the settings are glibc's")
def test_freed_memory_is_reused_instead_of_faulted_back_in():
    default = _probe("default")
    kept = _probe("keep")
    # glibc's default: the 64 MiB block goes back to the kernel on free, and on a thread the
    # 4 MiB ones too (their heaps unmapped once empty), to be faulted in again next round.
    assert float(default["MAIN"]) > 0.2 * PAGES
    assert float(default["THREAD"]) > 0.1 * PAGES
    assert float(kept["MAIN"]) < 0.01 * PAGES
    assert float(kept["THREAD"]) < 0.01 * PAGES
    # Processes started afterwards (Ray's, DataLoader's) get the same settings when they start.
    assert default["CHILD"] == "None"
    assert kept["CHILD"] == allocator.TUNABLES


@pytest.mark.skipif(not allocator._is_glibc(), reason="the settings are glibc's")
def test_a_glibc_tunables_already_set_wins():
    mine = "glibc.malloc.check=0"
    out = _probe("keep", tunables=mine)
    assert out["CHILD"] == mine
    assert float(out["MAIN"]) > 0.2 * PAGES  # and this process was not changed either
