"""Test-only fault injection, run inside the Train workers as a crackray worker hook.

`environment(folder)` gives the variables under which a `crackray` process (or an in-process
`run_training`) makes every worker call a `FaultInjector` at the hook points (`start`,
`epoch<N>`). It writes `<point>.rank<R>.pid`; then, on rank 0, raises while the counter in
`<point>.raise` is positive (decremented per raise), or SIGKILLs itself once if
`<point>.kill` exists (removed first: within milliseconds, where a killer watching the pid
file would take a poll); and on every rank waits while `<point>.hold` exists (the test kills
the process meanwhile)."""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import ray.cloudpickle

from crackray.train.hooks import HOOKS_ENV

# Pickled by value with Ray's own (vendored) cloudpickle, the one that ships WorkerSettings:
# Ray's workers cannot import this test module (a Ray started before the test set PYTHONPATH
# never sees tests/).
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

FAULT_DIR_ENV = "CRACKRAY_TEST_FAULT_DIR"
TESTS = str(Path(__file__).resolve().parent)


def environment(folder: Path) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [TESTS, os.environ.get("PYTHONPATH")]))
    return {FAULT_DIR_ENV: str(folder), HOOKS_ENV: "fault_hooks:from_environment",
            "PYTHONPATH": path}


def from_environment() -> FaultInjector:
    return FaultInjector(Path(os.environ[FAULT_DIR_ENV]))


@dataclass(frozen=True)
class FaultInjector:
    folder: Path

    def __call__(self, point: str, rank: int) -> None:
        (self.folder / f"{point}.rank{rank}.pid").write_text(str(os.getpid()))
        counter = self.folder / f"{point}.raise"
        if rank == 0 and counter.exists() and int(counter.read_text() or 0) > 0:
            counter.write_text(str(int(counter.read_text()) - 1))
            raise RuntimeError(f"injected test fault at {point}")
        if rank == 0 and (self.folder / f"{point}.kill").exists():
            (self.folder / f"{point}.kill").unlink()
            os.kill(os.getpid(), signal.SIGKILL)
        deadline = time.monotonic() + 300
        while (self.folder / f"{point}.hold").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
