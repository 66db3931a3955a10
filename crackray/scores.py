"""Which validation numbers rank epochs and trials: one definition for the best checkpoint,
early stopping, Tune's ranking and the tables that show it."""

from __future__ import annotations

from crackray.config import RunConfig

# The validation scores every trial table shows (tune's summary, report's trials table).
SCORE_KEYS = ("val/f1", "val/recall", "val/precision", "val/auroc")


def selection_score(cfg: RunConfig, metrics: dict, segments: bool) -> float:
    """The validation score that picks the best checkpoint and drives early stopping."""
    if not segments or cfg.train.best_model == "dec":
        return metrics["val/f1"]
    if cfg.train.best_model == "seg":
        return metrics["val/pixel_f1"]
    return (metrics["val/f1"] + metrics["val/pixel_f1"]) / 2
