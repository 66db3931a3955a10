"""`crackray train`'s epoch lines. Train V2 calls its callbacks on the controller actor, not
in the driver, so the callback forwards rank 0's report through a Ray queue and a driver
thread prints it: Ray's own worker logs can then stay off the console."""

from __future__ import annotations

import sys
import threading
import time
from queue import Empty

import ray.train
from ray.util.queue import Queue

from crackray.config import RunConfig
from crackray.console import EpochClock, epoch_line
from crackray.models import model_segments
from crackray.scores import objective_name

_DONE = "done"


class ReportFeed(ray.train.UserCallback):
    def __init__(self, queue: Queue):
        self.queue = queue

    def after_report(self, run_context, metrics, checkpoint):
        self.queue.put(metrics[0])  # rank 0's report: every rank reports the same metrics


class EpochPrinter:
    """Context manager: while open, prints one line per reported epoch."""

    def __init__(self, cfg: RunConfig, echo=print):
        self.objective = objective_name(cfg, model_segments(cfg.model.name))
        self.echo = echo
        self.queue = Queue(actor_options={"num_cpus": 0})
        self.callback = ReportFeed(self.queue)
        self._thread = threading.Thread(target=self._print, daemon=True)

    def __enter__(self) -> EpochPrinter:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.queue.put(_DONE)
        self._thread.join(timeout=10)
        self.queue.shutdown()

    def _print(self) -> None:
        clock = EpochClock(time.monotonic())
        while True:
            try:
                metrics = self.queue.get(timeout=1.0)
            except Empty:
                continue
            except Exception:  # noqa: BLE001 - the queue actor is gone: nothing more to print
                return
            if metrics == _DONE:
                return
            epoch_s, eta_s = clock.tick(time.monotonic(), metrics["epoch"],
                                        metrics["epochs_planned"])
            self.echo(epoch_line(metrics, self.objective, epoch_s, eta_s))
            if metrics.get("tracking/pending_writes"):
                print(f"warning: MLflow tracking server unreachable: buffering tracking writes "
                      f"and retrying ({metrics['tracking/pending_writes']} pending)",
                      file=sys.stderr)
