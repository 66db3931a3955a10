"""Peak memory and CPU time of a benchmark side, sampled with psutil.

Memory is the proportional set size (PSS): pages shared between processes (forked DataLoader
workers, Ray's mapped libraries and object store) are split between the processes that share
them, so a sum over a side's processes counts each page once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import psutil


def dataloader_workers() -> list[psutil.Process]:
    """This process and its forked children with the same command line (DataLoader workers)."""
    me = psutil.Process()
    mine = me.cmdline()
    return [me] + [p for p in _children(me, recursive=False) if _cmdline(p) == mine]


def ray_side() -> list[psutil.Process]:
    """This process and every process it started (local Ray: GCS, raylet, workers), except
    idle DataLoader workers of the other side and what Python's multiprocessing started (the
    other side's fresh process, its children, multiprocessing's resource tracker)."""
    me = psutil.Process()
    mine = me.cmdline()
    return [me] + [p for p in _children(me, recursive=True)
                   if (line := _cmdline(p)) != mine and not _from_multiprocessing(line)]


def _from_multiprocessing(cmdline: list[str] | None) -> bool:
    """A process that Python's multiprocessing spawned (`-c "from multiprocessing..."`)."""
    return any("from multiprocessing" in part for part in cmdline or [])


def _children(process: psutil.Process, recursive: bool) -> list[psutil.Process]:
    try:
        return process.children(recursive=recursive)
    except psutil.Error:
        return []


def _cmdline(process: psutil.Process) -> list[str] | None:
    try:
        return process.cmdline()
    except psutil.Error:  # exited or unreadable since it was listed
        return None


def pss_bytes(process: psutil.Process) -> int:
    """PSS of one process; 0 when it has exited meanwhile (Ray workers come and go)."""
    try:
        return process.memory_full_info().pss
    except psutil.Error:
        return 0


def cpu_seconds(processes: list[psutil.Process]) -> dict[int, float]:
    """User + system CPU seconds so far of each process, by pid."""
    out = {}
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        out[process.pid] = times.user + times.system
    return out


def cpu_used(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds spent between two snapshots by the processes alive at the second (one
    started in between counts whole; one that ended in between is missed)."""
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())


class PeakMemory:
    """Polls the summed PSS of `select()`'s processes in a thread; peak in MiB after the
    block. Both sides are measured the same way, so they stay comparable."""

    def __init__(self, select: Callable[[], list[psutil.Process]], interval_s: float = 0.25):
        self.select, self.interval_s = select, interval_s
        self.peak_bytes, self._stop = 0, threading.Event()

    def _poll(self) -> None:
        while True:
            self.peak_bytes = max(self.peak_bytes, sum(pss_bytes(p) for p in self.select()))
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> PeakMemory:
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / 2**20
