"""How crackray starts Ray: Train's controller must poll its workers often enough that a
per-epoch `report` does not stall, the workers keep the memory they free (allocator.py), and a
value the user set must win."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from conftest import tempfile_short

from crackray import allocator

VARIABLE = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
# What a Ray worker process sees, after crackray started the local Ray.
PROBE = f"""
import os, ray
from crackray.runtime import ensure_ray
ensure_ray()
seen = ray.remote(num_cpus=0)(lambda: (os.environ.get("{VARIABLE}"),
                                       os.environ.get("GLIBC_TUNABLES")))
poll, tunables = ray.get(seen.remote())
print("SEEN", poll)
print("TUNABLES", tunables)
ray.shutdown()
"""


@pytest.mark.parametrize("given, expected", [(None, "0.5"), ("1.5", "1.5")])
def test_local_ray_workers_get_trains_poll_interval(given, expected):
    env = {k: v for k, v in os.environ.items()
           if k not in (VARIABLE, "RAY_ADDRESS", "GLIBC_TUNABLES")}
    if given is not None:
        env[VARIABLE] = given
    env["RAY_TMPDIR"] = temp = tempfile_short()
    try:
        result = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                                text=True, timeout=300)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"SEEN {expected}" in result.stdout
    assert f"TUNABLES {allocator.TUNABLES}" in result.stdout
