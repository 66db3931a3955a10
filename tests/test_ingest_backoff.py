"""Ray Data's scheduling loop must not spin while decoded blocks wait for a slow consumer
(`pipeline.IdleStepBackoff`): in a Train worker that loop is a thread beside the training
loop, and Ray 2.60's spins at thousands of steps a second, a core and the GIL taken from
training (README "Performance")."""

from __future__ import annotations

import sys
import time

import pytest
import ray.cloudpickle
import ray.data
from ray.data._internal.execution.execution_callback import ExecutionCallback

from crackray.config import RunConfig
from crackray.data.epochs import training_epoch
from crackray.data.pipeline import IdleStepBackoff
from crackray.data.prepare import prepare_synthetic

pytestmark = pytest.mark.slow


class StepCounter(ExecutionCallback):
    """Counts the scheduling loop's steps (the executor makes its own instance)."""

    steps = 0

    def on_execution_step(self, executor) -> None:
        StepCounter.steps += 1


def test_the_scheduling_loop_waits_while_outputs_wait_for_a_slow_consumer(ray_session,
                                                                          tmp_path):
    # The counter travels in the DataContext to Ray's tasks, which cannot import this module.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    # 224 px blocks of at least 64 rows (9.6 MB decoded): enough for Ray Data to hold outputs
    # back.
    prepare_synthetic(tmp_path / "data", n=600, seed=0, image_size=224)
    cfg = RunConfig.model_validate({"data": {"path": str(tmp_path / "data"),
                                             "image_size": 224}})
    context = ray.data.DataContext.get_current()
    context.custom_execution_callback_classes.append(StepCounter)
    try:
        epoch = training_epoch(cfg, 0)
        assert IdleStepBackoff in epoch.context.custom_execution_callback_classes
        start = time.perf_counter()
        rows = 0
        for batch in epoch.iter_batches(batch_size=16, batch_format="numpy"):
            rows += len(batch["label"])
            time.sleep(0.03)  # a training step, slower than decoding its batch
        seconds = time.perf_counter() - start
    finally:
        context.custom_execution_callback_classes.remove(StepCounter)
    assert rows > 400
    # Here: ~550 steps a second without the back-off, ~30 with it.
    assert StepCounter.steps / seconds < 150, (StepCounter.steps, seconds)
