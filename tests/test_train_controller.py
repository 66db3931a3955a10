"""Ray Train's controller, a new process for every run and every tuning trial, starts without
importing torch or crackray's training code (README "Performance": ~5 s of every trial).

It unpickles what the trainer hands it: the backend config, `train_loop_config` and the
run's callbacks. A probe callback records the controller's imports once it has started, in a
real 2-worker run that still trains, validates and reports through the torch process group.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from ray.train.v2._internal.execution.callback import ControllerCallback

from crackray.config import RunConfig
from crackray.data.prepare import prepare_synthetic
from crackray.runs import resolve_data
from crackray.train.driver import build_trainer
from crackray.tune.reuse import StopOnRequest

pytestmark = pytest.mark.slow
HEAVY = ("torch", "torchvision", "torchmetrics", "crackray.train.worker", "crackray.engine")


class ImportProbe(ControllerCallback):
    """In the controller: which of `HEAVY` it has imported when it has started."""

    def __init__(self, out: Path):
        self.out = out

    def after_controller_start(self, train_run_context) -> None:
        loaded = [name for name in HEAVY if name in sys.modules]
        self.out.write_text(json.dumps({"loaded": loaded, "crackray": "crackray" in sys.modules}))


def test_the_train_controller_imports_no_torch(ray_session, tmp_path):
    import ray.cloudpickle

    # The controller cannot import this test module: ship the probe by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    prepare_synthetic(tmp_path / "data", n=96, seed=0, image_size=32)
    cfg = RunConfig.model_validate({
        "data": {"path": str(tmp_path / "data"), "image_size": 32},
        "model": {"name": "test_tiny"},
        "train": {"epochs": 1, "workers": 2, "batch_size": 16},
    })
    cfg, manifest = resolve_data(cfg)
    probe = tmp_path / "controller.json"
    # The callbacks of a tuning trial's run (crackray.tune.trial) besides Tune's own.
    callbacks = [StopOnRequest(tmp_path / "never"), ImportProbe(probe)]
    trainer = build_trainer(cfg, manifest, tracking=None, name="probe",
                            storage_path=str(tmp_path / "ray"), callbacks=callbacks)
    result = trainer.fit()

    assert result.error is None
    assert result.metrics["epoch"] == 0 and "val/loss" in result.metrics  # it did train
    seen = json.loads(probe.read_text())
    assert seen["crackray"]  # the stop callback's module: imported, but not its torch
    assert seen["loaded"] == []
