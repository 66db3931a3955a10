"""crackray/scratch.py: a process's scratch folders go when the process does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

MAKE_TWO = """
import threading
from crackray.scratch import scratch_folder
folders = []
threads = [threading.Thread(target=lambda: folders.append(scratch_folder("t-")))
           for _ in range(2)]
for t in threads: t.start()
for t in threads: t.join()
for folder in folders:
    (folder / "model.pt").write_bytes(b"x" * 1000)
print(*folders)
"""


def test_scratch_folders_share_one_root_removed_at_exit(tmp_path):
    done = subprocess.run([sys.executable, "-c", MAKE_TWO], capture_output=True, text=True,
                          env={**os.environ, "TMPDIR": str(tmp_path)}, timeout=60)
    assert done.returncode == 0, done.stderr
    folders = [Path(p) for p in done.stdout.split()]
    assert len(folders) == 2 and folders[0] != folders[1]
    assert folders[0].parent == folders[1].parent  # one root, even asked from two threads
    assert folders[0].parent.parent == tmp_path
    assert not folders[0].parent.exists()  # removed, files and all, when the process ended
    assert list(tmp_path.iterdir()) == []
