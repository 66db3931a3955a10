"""The allocator settings crackray's processes run with (allocator.py): memory a process frees
stays with it, instead of being faulted back in, zeroed, at the next allocation."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from crackray import allocator

# Page faults of allocating, touching and freeing a 64 MiB buffer, after one untimed round;
# then the environment a child process of this one sees.
PROBE = """
import ctypes, os, resource, sys
from crackray import allocator
if sys.argv[1] == "keep":
    allocator.keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]

def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def round_() -> None:  # what a training step does with its activations, in C
    block = libc.malloc(64 * 2**20)
    ctypes.memset(block, 1, 64 * 2**20)  # touch every page
    libc.free(block)

round_()
before = faults()
for _ in range(4):
    round_()
print("FAULTS", (faults() - before) / 4)
child = "import os; print(os.environ.get('GLIBC_TUNABLES'))"
print("CHILD", __import__("subprocess").run([sys.executable, "-c", child], capture_output=True,
                                             text=True).stdout.strip())
"""
PAGES = 64 * 2**20 // os.sysconf("SC_PAGE_SIZE")


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
    # glibc's default: the 64 MiB block goes back to the kernel on free, every page faults in
    # again at the next round.
    assert float(default["FAULTS"]) > 0.9 * PAGES
    assert float(kept["FAULTS"]) < 0.01 * PAGES
    # Processes started afterwards (Ray's, DataLoader's) get the same settings when they start.
    assert default["CHILD"] == "None"
    assert kept["CHILD"] == allocator.TUNABLES


@pytest.mark.skipif(not allocator._is_glibc(), reason="the settings are glibc's")
def test_a_glibc_tunables_already_set_wins():
    mine = "glibc.malloc.check=0"
    out = _probe("keep", tunables=mine)
    assert out["CHILD"] == mine
    assert float(out["FAULTS"]) > 0.9 * PAGES  # and this process was not changed either
