"""DESIGN.md's layering, checked where it can break: choosing, reporting and predicting (and
the plain-torch core under them) load neither Ray nor crackray's Ray drivers, so a reader
follows one epoch or one prediction without them and `crackray predict` starts fast."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

RAY_FREE = [
    "crackray.deploy.select", "crackray.deploy.predict", "crackray.deploy.serving",
    "crackray.report", "crackray.engine", "crackray.evaluation", "crackray.inference",
    "crackray.data.batches", "crackray.data.transforms", "crackray.data.shards",
    "crackray.models", "crackray.metrics", "crackray.losses", "crackray.tracking",
]


@pytest.mark.parametrize("module", RAY_FREE)
def test_module_imports_no_ray_and_no_driver(module):
    script = (
        "import importlib, json, sys\n"
        f"importlib.import_module({module!r})\n"
        "print(json.dumps(sorted(m for m in sys.modules if m == 'ray' or m.startswith(("
        "'ray.', 'crackray.train', 'crackray.tune', 'crackray.data.pipeline', "
        "'crackray.data.epochs')))))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
