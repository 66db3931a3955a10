"""The page of a tuning job: its trials table (by the objective) and the best trial's page."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from crackray.errors import CrackrayError
from crackray.report.markdown import table
from crackray.report.run import run_page
from crackray.scores import OBJECTIVE_KEY, SCORE_KEYS
from crackray.tracking import Tracker


def tune_page(tracker: Tracker, run, out: Path) -> str:
    trials = tracker.child_runs(run.info.run_id, kind="trial")
    if not trials:
        raise CrackrayError(f"tuning job {run.info.run_id} has no trial runs")
    searched = _searched_keys(trials)
    rows = [[t.info.run_name, t.data.tags.get("crackray.trial_status", t.info.status),
             *[t.data.params.get(k) for k in searched],
             *[t.data.metrics.get(k, math.nan) for k in SCORE_KEYS],
             t.info.run_id] for t in trials]
    objective_column = 2 + len(searched) + SCORE_KEYS.index(OBJECTIVE_KEY)
    rows.sort(key=lambda r: -np.nan_to_num(r[objective_column], nan=-1.0))
    best_id = run.data.tags.get("crackray.best_run_id") or (rows[0][-1] if rows else None)
    parts = [f"# Tuning job {run.info.run_name}", "",
             f"MLflow run `{run.info.run_id}`, {len(trials)} trials; best trial: `{best_id}`.", "",
             f"## Trials (last epoch's validation metrics, by {OBJECTIVE_KEY})", "",
             table(["trial", "status", *searched, *SCORE_KEYS, "run_id"], rows), ""]
    if best_id:
        (out / "best_trial").mkdir(parents=True, exist_ok=True)
        (out / "best_trial" / "report.md").write_text(
            run_page(tracker, tracker.get_run(best_id), out / "best_trial"))
        parts += ["## Best trial", "", "See [best_trial/report.md](best_trial/report.md).", ""]
    return "\n".join(parts)


def _searched_keys(trials) -> list[str]:
    """Config keys whose value differs between trials (the searched parameters)."""
    keys = set().union(*(t.data.params for t in trials))
    return sorted(k for k in keys if len({t.data.params.get(k) for t in trials}) > 1
                  and not k.startswith(("version.", "git_")))
