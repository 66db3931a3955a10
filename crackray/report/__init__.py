"""`crackray report`: a Markdown results page of a run (train / trial / select) or of a tuning
job (trials table + the best trial's page), written to a folder and logged to MLflow.

A classifier's page (`classification`) shows decision metrics, curves and worst mistakes; a
segmenting model's page (`segdec`) follows the SegDec results page this project started from,
section by section. The numbers come from a fresh pass of the run's model over validation and
test, so every page shows the same thresholds and counts as the run's test pass.
"""

from __future__ import annotations

from pathlib import Path

from crackray.report.run import run_page
from crackray.report.tune import tune_page
from crackray.tracking import Tracker


def build_report(run_id: str, out: str | Path, *, tracking_uri: str | None = None) -> Path:
    """Write `out/report.md` (+ PNGs) for `run_id`, log the folder to the run; returns the file."""
    tracker = Tracker(tracking_uri)
    tracker.check_reachable()
    run = tracker.get_run(run_id)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if run.data.tags.get("crackray.kind") == "tune":
        page = tune_page(tracker, run, out)
    else:
        page = run_page(tracker, run, out)
    report = out / "report.md"
    report.write_text(page)
    for path in sorted(out.rglob("*")):
        if path.is_file():
            parent = path.parent.relative_to(out)
            tracker.log_artifact(run_id, path, "report" if parent == Path(".")
                                 else f"report/{parent.as_posix()}")
    tracker.flush(timeout_s=60)
    return report
