"""`crackray train`, `crackray tune`, and running them on a cluster (`submit`, `jobs`)."""

from __future__ import annotations

import sys

import click

from crackray.cli.common import (
    format_metrics,
    friendly_errors,
    main,
    set_option,
    tracking_option,
    verbose_option,
)

# ------------------------------------------------------------------------------------ train


def _load(file, overrides, tracking_uri):
    from crackray.config import load_experiment, parse_overrides

    experiment = load_experiment(file, parse_overrides(overrides))
    if tracking_uri:
        experiment.base.tracking.uri = tracking_uri
    return experiment


@main.command()
@click.argument("file", type=click.Path())
@set_option
@tracking_option
@click.option("--resume", is_flag=True, help="Continue the latest unfinished run of this file.")
@verbose_option
@friendly_errors
def train(file, overrides, tracking_uri, resume, verbose):
    """Train the `base` config of an experiment FILE with Ray Train, tracked in MLflow."""
    experiment = _load(file, overrides, tracking_uri)  # a config error in 3 s, before Ray loads
    from crackray.train.driver import run_training

    result = run_training(experiment.base, resume=resume, verbose=verbose,
                          storage_path=experiment.tune.storage_path)
    # Validation of the best epoch: the checkpoint that was tested, not the last epoch.
    from crackray.checkpoints import load_model_file

    best_epoch = load_model_file(result.best_model)["epoch"]
    best = next((r for r in result.history if r["epoch"] == best_epoch), result.history[-1])
    click.echo(f"epochs run: {len(result.history)}  best epoch: {best_epoch + 1}  "
               f"wall time: {result.seconds:.0f} s")
    click.echo("val (best epoch)   " + format_metrics(best, "val", ("ap", "f1_best", "auroc")))
    tuned = result.test_metrics.get("test/tuned/threshold", float("nan"))
    click.echo("test @0.5          " + format_metrics(result.test_metrics, "test"))
    click.echo(f"test @{tuned:.3f} (val) " + format_metrics(result.test_metrics, "test/tuned"))
    click.echo(f"MLflow run {result.run_id}  (deploy it: crackray select --run {result.run_id})")


# ------------------------------------------------------------------------------------- tune


@main.command()
@click.argument("file", type=click.Path())
@set_option
@tracking_option
@click.option("--resume", is_flag=True, help="Restore the interrupted job of this file.")
@click.option("--address", default=None, help="Ray cluster address (default: local Ray).")
@verbose_option
@friendly_errors
def tune(file, overrides, tracking_uri, resume, address, verbose):
    """Run a tuning job: Ray Tune + Optuna (TPE) + ASHA over Ray Train trials."""
    experiment = _load(file, overrides, tracking_uri)  # a config error before Ray Tune loads
    from crackray.tune.job import run_tuning

    summary = run_tuning(experiment, file, resume=resume, address=address, verbose=verbose)
    click.echo(summary.table)
    if summary.best_test_metrics:
        tuned = summary.best_test_metrics.get("test/tuned/threshold", float("nan"))
        click.echo("best trial, test @0.5   " + format_metrics(summary.best_test_metrics, "test"))
        click.echo(f"best trial, test @{tuned:.2f}  "
                   + format_metrics(summary.best_test_metrics, "test/tuned"))
    else:
        click.echo("no finished trial: nothing tested")
    click.echo(f"browse: crackray ui  (experiment '{summary.experiment}', parent run "
               f"{summary.parent_run_id}, store {summary.tracking_uri})")



# ---------------------------------------------------------------------------- cluster jobs


address_option = click.option(
    "--address", required=True, envvar="RAY_API_SERVER_ADDRESS",
    help="The cluster's Ray Jobs API (dashboard), e.g. http://HEAD:8265 "
    "(default: $RAY_API_SERVER_ADDRESS).",
)


@main.command()
@click.argument("file", type=click.Path())
@address_option
@set_option
@tracking_option
@click.option("--working-dir", default=".", show_default=True, type=click.Path(file_okay=False),
              help="Folder uploaded with the job (data, stores and results stay behind).")
@click.option("--no-deps", is_flag=True, envvar="CRACKRAY_NO_DEPS",
              help="Use the cluster image's packages instead of installing crackray's pins "
              "(also $CRACKRAY_NO_DEPS=1).")
@click.option("--no-wait", is_flag=True, help="Print the job id and return at once.")
@friendly_errors
def submit(file, address, overrides, tracking_uri, working_dir, no_deps, no_wait):
    """Submit `crackray tune FILE` to a Ray cluster as a job; follow it to its end."""
    from crackray.cluster import submit as submit_job

    sys.exit(submit_job(file, address, overrides, tracking_uri, working_dir=working_dir,
                        deps=not no_deps, wait=not no_wait))


@main.group()
def jobs() -> None:
    """List, follow and stop jobs on a Ray cluster."""


@jobs.command("list")
@address_option
@friendly_errors
def jobs_list(address):
    """The cluster's submitted jobs and their status."""
    from crackray.cluster import list_jobs

    click.echo(list_jobs(address))


@jobs.command("logs")
@click.argument("job_id")
@address_option
@click.option("--follow", is_flag=True, help="Stream until the job ends; exit with its code.")
@friendly_errors
def jobs_logs(job_id, address, follow):
    """Print (or follow) a job's logs."""
    from crackray.cluster import job_logs

    sys.exit(job_logs(address, job_id, follow_logs=follow))


@jobs.command("stop")
@click.argument("job_id")
@address_option
@friendly_errors
def jobs_stop(job_id, address):
    """Stop a running job and wait until it has ended."""
    from crackray.cluster import stop_job

    click.echo(f"job {job_id} {stop_job(address, job_id)}")
