"""What "better" means: the one validation score (`val/objective`) that picks the best
checkpoint, drives early stopping and the plateau scheduler, and that ASHA, TPE, tune's
ranking and report's trials table all read."""

from __future__ import annotations

from crackray.config import RunConfig

OBJECTIVE_KEY = "val/objective"
# The validation scores every trial table shows (tune's summary, report's trials table).
SCORE_KEYS = (OBJECTIVE_KEY, "val/ap", "val/f1_best", "val/f1", "val/recall", "val/precision",
              "val/auroc")


def objective_name(cfg: RunConfig, segments: bool) -> str:
    """What val/objective is, in a few words: `ap`, `segdec_f1`, `mean(ap, pixel_f1)`."""
    if not segments or cfg.train.best_model == "dec":
        return cfg.train.objective
    pixel = "pixel_f1" if cfg.train.pixel_protocol == "symmetric" else "segdec_f1"
    return pixel if cfg.train.best_model == "seg" else f"mean({cfg.train.objective}, {pixel})"


def objective(cfg: RunConfig, metrics: dict, segments: bool) -> float:
    """`val/objective` of one epoch from its validation metrics (NaN when undefined, e.g. a
    split with one class: such an epoch never counts as an improvement)."""
    decision = metrics.get(f"val/{cfg.train.objective}", float("nan"))
    if not segments or cfg.train.best_model == "dec":
        return decision
    prefix = "pixel" if cfg.train.pixel_protocol == "symmetric" else "segdec"
    pixel = metrics[f"val/{prefix}_f1"]
    return pixel if cfg.train.best_model == "seg" else (decision + pixel) / 2
