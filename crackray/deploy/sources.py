"""What `select` chooses from: a tuning job's finished trials, or one training run; a job or
run that has not finished cleanly is refused rather than silently selected from."""

from __future__ import annotations

from dataclasses import dataclass

from crackray.errors import CrackrayError
from crackray.tracking import KIND_TAG, Tracker

SELECTABLE = ("finished", "early_stopped")  # crackray.trial_status values with a full run
TRAINING_KINDS = ("train", "trial")  # runs with a best checkpoint of their own


@dataclass
class Source:
    run: object  # the tuning job's parent run, or the training run itself (an MLflow Run)
    candidates: list  # the runs whose best checkpoints compete


def find_source(tracker: Tracker, *, experiment: str | None, parent_run_id: str | None,
                run_id: str | None, allow_unfinished: bool) -> Source:
    if run_id and parent_run_id:
        raise CrackrayError("select: give --run (one training run) or --parent (a tuning job), "
                            "not both")
    if run_id:
        run = tracker.get_run(run_id)
        kind = run.data.tags.get(KIND_TAG)
        if kind not in TRAINING_KINDS:
            raise CrackrayError(f"run {run_id} is not a training run ({KIND_TAG}={kind!r}); "
                                "for a tuning job use --parent")
        check_finished(run, "training run", allow_unfinished)
        return Source(run, [run])
    parent = find_parent(tracker, experiment, parent_run_id)
    check_finished(parent, "tuning job", allow_unfinished)
    return Source(parent, finished_trials(tracker, parent))


def check_finished(run, what: str, allow_unfinished: bool) -> None:
    """Refuse a RUNNING job (its trials are still changing), and a KILLED or FAILED one unless
    the user accepts selecting from what it finished."""
    status, label = run.info.status, f"{what} {run.info.run_name} ({run.info.run_id})"
    if status in ("RUNNING", "SCHEDULED"):
        raise CrackrayError(f"{label} is still {status}: select once it has finished (if its "
                            "process died, finish it with --resume)")
    if status != "FINISHED" and not allow_unfinished:
        raise CrackrayError(f"{label} ended {status}: finish it with --resume, or pass "
                            "--allow-unfinished to select from what it completed")


def find_parent(tracker: Tracker, experiment: str | None, parent_run_id: str | None):
    if parent_run_id:
        parent = tracker.get_run(parent_run_id)
        if parent.data.tags.get(KIND_TAG) != "tune":
            raise CrackrayError(f"run {parent_run_id} is not a tuning job ({KIND_TAG}="
                                f"{parent.data.tags.get(KIND_TAG)!r}); for a training run use "
                                "--run")
        return parent
    parent = tracker.latest_run_anywhere("tune", experiment)
    if parent is None:
        where = f"experiment {experiment!r}" if experiment else "any experiment"
        raise CrackrayError(f"no tuning job in {where} of {tracker.uri}: run `crackray tune` "
                            "first, or select one training run with --run")
    return parent


def finished_trials(tracker: Tracker, parent) -> list:
    trials = tracker.child_runs(parent.info.run_id, kind="trial")
    done = [t for t in trials if t.info.status == "FINISHED"
            and t.data.tags.get("crackray.trial_status") in SELECTABLE]
    if not done:
        statuses = ", ".join(
            f"{t.info.run_name}: {t.data.tags.get('crackray.trial_status', t.info.status)}"
            for t in trials) or "no trials at all"
        raise CrackrayError(f"tuning job {parent.info.run_name} ({parent.info.run_id}) has no "
                            f"finished trials ({statuses})")
    return done
