"""The page of one run: its model file predicts validation and test once, then the page that
fits the model is written (segmenting models: the SegDec results page; classifiers: theirs)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from crackray import checkpoints
from crackray.config import RunConfig
from crackray.data.splits import TEST, VAL
from crackray.deploy.predict import MODEL_FILE_NAMES
from crackray.engine import EvalOutputs
from crackray.errors import CrackrayError
from crackray.inference import predict_split
from crackray.metrics import best_f1_threshold
from crackray.models import model_segments
from crackray.report import classification, segdec
from crackray.tracking import Tracker


@dataclass
class EvaluatedRun:
    """A run with its model's fresh predictions and the decision threshold they are read at."""

    run: object  # mlflow.entities.Run
    cfg: RunConfig
    val: EvalOutputs
    test: EvalOutputs
    threshold: float
    why: str  # where the threshold comes from

    @property
    def heading(self) -> str:
        return (f"MLflow run `{self.run.info.run_id}` (kind "
                f"{self.run.data.tags.get('crackray.kind', '?')}), model `{self.cfg.model.name}` "
                f"at {self.cfg.data.image_size} px, dataset `{self.cfg.data.path}`.")


def run_page(tracker: Tracker, run, out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    evaluated = _evaluate(tracker, run)
    page = segdec if model_segments(evaluated.cfg.model.name) else classification
    return page.page(tracker, evaluated, out)


def _evaluate(tracker: Tracker, run) -> EvaluatedRun:
    model, cfg, payload = checkpoints.build_model_from_file(_model_file(tracker, run))
    val, test = predict_split(model, cfg, VAL), predict_split(model, cfg, TEST)
    if "threshold" in payload:
        threshold = float(payload["threshold"])
        why = f"calibrated by select: {payload.get('criterion', '')}"
    else:
        threshold, why = best_f1_threshold(val.probs, val.targets), "best validation F1"
    return EvaluatedRun(run, cfg, val, test, threshold, why)


def _model_file(tracker: Tracker, run) -> Path:
    for name in MODEL_FILE_NAMES:
        try:
            return tracker.download(run.info.run_id, f"checkpoints/{name}")
        except Exception:  # noqa: BLE001 - absent artifact: try the next name
            continue
    raise CrackrayError(f"run {run.info.run_id} has no checkpoints/best_model.pt artifact")
