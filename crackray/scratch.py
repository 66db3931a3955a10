"""Files a crackray command needs for a moment (downloaded checkpoints, calibrated model
files on their way to the registry) live under one temporary folder per process, removed when
the process exits. Left in the system's temp dir, they add up: `crackray select` over 40
ResNet-18 trials downloads 40 best models of 45 MB each.

Not for Ray workers: Ray ends them without running `atexit`, so their root would stay (rank
0's spooled MLflow copies remove themselves once sent, `tracking/store.py::spool`)."""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path

_lock = threading.Lock()  # rank 0's MLflow thread and its training thread may both ask first
_root: tempfile.TemporaryDirectory | None = None


def scratch_folder(prefix: str) -> Path:
    """A new empty folder under this process's scratch root (removed at the process's exit;
    a caller that is done sooner may remove its folder itself)."""
    global _root
    with _lock:
        if _root is None:
            _root = tempfile.TemporaryDirectory(prefix="crackray-")
        return Path(tempfile.mkdtemp(prefix=prefix, dir=_root.name))
