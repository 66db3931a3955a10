"""What `crackray train` and `crackray tune` print, in crackray's words: one line per epoch
or trial event. Formatting only; the Train and Tune callbacks that feed it live beside the
drivers (train/progress.py, tune/progress.py)."""

from __future__ import annotations

import math

from crackray.scores import OBJECTIVE_KEY


def _value(metrics: dict, key: str) -> str:
    value = metrics.get(key)
    return "  -  " if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:.3f}"


def epoch_line(metrics: dict, objective_name: str, epoch_s: float, eta_s: float) -> str:
    """`epoch 3/8  loss 0.412  val ap 0.861  f1 0.702  recall 0.811  precision 0.619  21s
    ETA 1m45s` (F1, recall and precision at 0.5; the objective is threshold-free)."""
    epoch, planned = int(metrics["epoch"]), int(metrics["epochs_planned"])
    parts = [
        f"epoch {epoch + 1}/{planned}",
        f"loss {_value(metrics, 'train/loss')}",
        f"val {objective_name} {_value(metrics, OBJECTIVE_KEY)}",
        f"f1 {_value(metrics, 'val/f1')}",
        f"recall {_value(metrics, 'val/recall')}",
        f"precision {_value(metrics, 'val/precision')}",
    ]
    parts.append(_duration(epoch_s))
    if epoch + 1 < planned and not metrics.get("early_stopped"):
        parts.append(f"ETA {_duration(eta_s)}")
    if metrics.get("early_stopped"):
        parts.append("early stop")
    return "  ".join(parts)


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


class EpochClock:
    """Epoch wall times as the driver sees the reports arrive, and the ETA from their mean."""

    def __init__(self, now: float):
        self.start, self.last, self.seen = now, now, 0

    def tick(self, now: float, epoch: int, planned: int) -> tuple[float, float]:
        """-> (this epoch's seconds, estimated seconds left)."""
        epoch_s, self.last = now - self.last, now
        self.seen += 1
        return epoch_s, (now - self.start) / self.seen * max(planned - epoch - 1, 0)
