"""`crackray tune`'s console: one line per trial event (started, each epoch's objective,
pruned, finished, failed), printed by a Tune callback in the driver. Tune's own result
tables are off (`verbose=0`)."""

from __future__ import annotations

from ray import tune

from crackray.scores import OBJECTIVE_KEY
from crackray.tune.trial import cut_short


def _params(config: dict) -> str:
    return "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in config.items())


class TrialPrinter(tune.Callback):
    # Prints at call time (not a stored `print`): Tune pickles its callbacks with the job's
    # state, and a driver-side Ray may have replaced builtins.print.
    def __init__(self, objective: str):
        self.objective = objective

    @staticmethod
    def echo(line: str) -> None:
        print(line, flush=True)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.echo(f"trial {trial.trial_id} started  {_params(trial.config)}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "epoch" not in result:
            return
        self.echo(f"trial {trial.trial_id} epoch {result['epoch'] + 1}/"
                  f"{result['epochs_planned']}  val {self.objective} "
                  f"{result.get(OBJECTIVE_KEY, float('nan')):.3f}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        if cut_short(result):
            self.echo(f"trial {trial.trial_id} pruned by ASHA after epoch {result['epoch'] + 1}")
        else:
            self.echo(f"trial {trial.trial_id} finished")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.echo(f"trial {trial.trial_id} failed: {trial.error_file or 'see the trial log'}")
