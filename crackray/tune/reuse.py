"""One trial driver process for many trials (Tune's `reuse_actors`): the next trial starts in
a process that has Python, Ray, torch and MLflow loaded already (~11 s a trial here, README
"Performance").

Tune hands a driver to the next trial by resetting it, also when ASHA stopped its trial in
mid-run. Ray's function trainable then waits 2 s for the trial function to return and, as our
trial function is still inside `TorchTrainer.fit()`, gives up ("Could not re-use actor"): no
later trial starts. So a reset stops the Train run first. The trial driver gives its Train
controller a `StopOnRequest` callback that watches a flag file named after the driver's pid
(Ray places a Train controller on its driver's node) and aborts the run (workers stopped,
placement group freed) when the flag appears; `fit()` then raises in the driver, which returns
as a stopped trial.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path

import ray
from ray.train._internal.session import get_session
from ray.train.v2._internal.execution.callback import ControllerCallback
from ray.tune.trainable.function_trainable import wrap_function

# How long a reset waits for an aborted Train run to end: the controller stops its workers
# and frees their placement group (about a second here).
ABORT_TIMEOUT_S = 60
_POLL_S = 0.2


def stop_flag() -> Path:
    """The flag file that asks the Train run of this trial driver process to stop."""
    return Path(tempfile.gettempdir()) / f"crackray-stop-trial-{os.getpid()}"


class StopOnRequest(ControllerCallback):
    """Runs in the Train controller: aborts the run once its driver's stop flag exists."""

    def __init__(self, flag: Path):
        self.flag = flag

    def after_controller_start(self, train_run_context) -> None:
        controller = ray.get_runtime_context().current_actor
        threading.Thread(target=self._abort_when_asked, args=(controller,), daemon=True).start()

    def _abort_when_asked(self, controller) -> None:
        while not self.flag.exists():
            time.sleep(_POLL_S)
        controller.abort.remote()


def reusable(trial_function) -> type:
    """The function trainable of `trial_function` (from `tune.with_parameters`), whose reset
    stops the Train run of the trial it was driving before it takes the next trial."""

    class Reusable(wrap_function(trial_function)):
        def reset_config(self, new_config):
            stop = stop_flag()
            if get_session().training_thread.is_alive():
                stop.touch()
                # Ray's reset gives the trial function $TUNE_FUNCTION_THREAD_TIMEOUT_S to return.
                os.environ["TUNE_FUNCTION_THREAD_TIMEOUT_S"] = str(ABORT_TIMEOUT_S)
            try:
                return super().reset_config(new_config)
            finally:
                stop.unlink(missing_ok=True)

    # Tune names trials after the trainable ("trial_driver_<id>").
    Reusable.__name__ = Reusable.__qualname__ = trial_function.__name__
    return Reusable
