"""The `crackray` command: thin click wrappers that parse, load config and call one function.

User mistakes (`CrackrayError`) print one line and exit 2; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time

import click

from crackray.errors import CrackrayError


def friendly_errors(fn):
    """Turn CrackrayError into `error: ...` on stderr with exit code 2, without traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CrackrayError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            # A second Ctrl-C, or one outside a tuning loop (which handles the first itself).
            click.echo("error: interrupted", err=True)
            sys.exit(130)

    return wrapper


tracking_option = click.option(
    "--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, "
    "else sqlite:///./mlflow.db)."
)
set_option = click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE",
    help="Override a config key, e.g. --set optim.lr=3e-4 (repeatable).",
)


@click.group()
@click.version_option(package_name="crackray")
def main() -> None:
    """crackray: distributed crack-detection experiments on Ray."""


# ---------------------------------------------------------------------------------- prepare


@main.group()
def prepare() -> None:
    """Turn a dataset on disk into Parquet shards with fixed, recorded splits."""


def _print_manifest(manifest: dict, out: str, seconds: float) -> None:
    click.echo(f"wrote {out} in {seconds:.1f} s (digest {manifest['digest'][:12]})")
    for split, totals in manifest["totals"].items():
        click.echo(f"  {split:5s} {totals['samples']:6d} samples, {totals['crack']:5d} crack, "
                   f"{totals['no_crack']:6d} no crack")
    if manifest.get("duplicates_dropped"):
        click.echo(f"  dropped {manifest['duplicates_dropped']} byte-identical duplicates")
    for conflict in manifest.get("label_conflicts", []):
        click.echo(f"  warning: duplicate with contradicting labels dropped: {conflict['paths']}",
                   err=True)
    if manifest.get("quarantined"):
        click.echo(f"  quarantined {manifest['quarantined']} unreadable files: see "
                   f"{os.path.join(out, 'quarantine.csv')}", err=True)


split_options = [
    click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder."),
    click.option("--val", default=0.15, show_default=True, type=click.FloatRange(0, 0.9)),
    click.option("--test", default=0.15, show_default=True, type=click.FloatRange(0, 0.9)),
    click.option("--seed", default=0, show_default=True, type=int),
]


def with_split_options(fn):
    for option in reversed(split_options):
        fn = option(fn)
    return fn


@prepare.command("sdnet2018")
@click.argument("src", type=click.Path())
@with_split_options
@friendly_errors
def prepare_sdnet2018_cmd(src, out, val, test, seed):
    """SDNET2018 in its original layout (D|P|W / C*|U* / <photo>-<tile>.jpg)."""
    from crackray.data.prepare import prepare_sdnet2018

    start = time.perf_counter()
    manifest = prepare_sdnet2018(src, out, val=val, test=test, seed=seed)
    _print_manifest(manifest, out, time.perf_counter() - start)


@prepare.command("synthetic")
@click.option("--n", default=400, show_default=True, type=click.IntRange(8))
@with_split_options
@friendly_errors
def prepare_synthetic_cmd(n, out, val, test, seed):
    """Synthetic crack / no-crack tiles with masks (demo and tests)."""
    from crackray.data.prepare import prepare_synthetic

    start = time.perf_counter()
    manifest = prepare_synthetic(out, n=n, val=val, test=test, seed=seed)
    _print_manifest(manifest, out, time.perf_counter() - start)


def _masked_layout_command(name: str, prepare_fn: str, doc: str) -> None:
    """`prepare cfd` / `prepare crack500`: image + mask layouts share every option."""

    @prepare.command(name, help=doc)
    @click.argument("src", type=click.Path())
    @click.option("--tile", default=None, type=click.IntRange(16), help="Cut into N x N tiles.")
    @with_split_options
    @friendly_errors
    def command(src, tile, out, val, test, seed):
        from crackray.data import prepare as prepare_module

        start = time.perf_counter()
        prepare_dataset = getattr(prepare_module, prepare_fn)
        manifest = prepare_dataset(src, out, tile=tile, val=val, test=test, seed=seed)
        _print_manifest(manifest, out, time.perf_counter() - start)


_masked_layout_command("cfd", "prepare_cfd", "CrackForest (images/*.jpg + masks/*.png).")
_masked_layout_command(
    "crack500",
    "prepare_crack500",
    "CRACK500 (*.jpg with same-stem *.png masks; train/val/test lists if present).",
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
@friendly_errors
def train(file, overrides, tracking_uri, resume):
    """Train the `base` config of an experiment FILE with Ray Train, tracked in MLflow."""
    from crackray.train.driver import run_training

    experiment = _load(file, overrides, tracking_uri)
    result = run_training(experiment.base, resume=resume,
                          storage_path=experiment.tune.storage_path)
    # Validation of the best epoch: the checkpoint that was tested, not the last epoch.
    from crackray.checkpoints import load_model_file

    best_epoch = load_model_file(result.best_model)["epoch"]
    best = next((r for r in result.history if r["epoch"] == best_epoch), result.history[-1])
    click.echo(f"epochs run: {len(result.history)}  best epoch: {best_epoch}  "
               f"wall time: {result.seconds:.0f} s")
    click.echo("val  " + _format_metrics(best, "val"))
    click.echo("test " + _format_metrics(result.test_metrics, "test"))
    click.echo(f"MLflow run {result.run_id}")


def _format_metrics(metrics: dict, prefix: str) -> str:
    keys = ("precision", "recall", "f1", "auroc")
    return "  ".join(f"{k} {metrics.get(f'{prefix}/{k}', float('nan')):.3f}" for k in keys)


# ------------------------------------------------------------------------------------- tune


@main.command()
@click.argument("file", type=click.Path())
@set_option
@tracking_option
@click.option("--resume", is_flag=True, help="Restore the interrupted job of this file.")
@click.option("--address", default=None, help="Ray cluster address (default: local Ray).")
@friendly_errors
def tune(file, overrides, tracking_uri, resume, address):
    """Run a tuning job: Ray Tune + Optuna (TPE) + ASHA over Ray Train trials."""
    from crackray.tune.job import run_tuning

    experiment = _load(file, overrides, tracking_uri)
    summary = run_tuning(experiment, file, resume=resume, address=address)
    click.echo(summary.table)
    if summary.best_test_metrics:
        tuned = summary.best_test_metrics.get("test/tuned/threshold", float("nan"))
        click.echo("best trial, test @0.5   " + _format_metrics(summary.best_test_metrics, "test"))
        click.echo(f"best trial, test @{tuned:.2f}  "
                   + _format_metrics(summary.best_test_metrics, "test/tuned"))
    else:
        click.echo("no finished trial: nothing tested")
    click.echo(f"browse: crackray ui  (experiment '{summary.experiment}', parent run "
               f"{summary.parent_run_id}, store {summary.tracking_uri})")


# ------------------------------------------------------------------ select / predict / report / ui


@main.command()
@click.option("--by", type=click.Choice(["recall"]), default="recall", show_default=True,
              help="What selection maximises on validation.")
@click.option("--min-precision", type=click.FloatRange(0, 1), default=None,
              help="Precision floor the calibrated threshold must meet (required unless "
              "--target-recall).")
@click.option("--target-recall", type=click.FloatRange(0, 1), default=None,
              help="Instead: the best precision at recall >= R.")
@click.option("--alias", default="champion", show_default=True, help="Registry alias to set.")
@click.option("--name", default="crackray-sdnet", show_default=True,
              help="Registered model name.")
@click.option("--experiment", default=None, help="Use the latest tuning job of this experiment.")
@click.option("--parent", "parent_run_id", default=None, help="The tuning job's parent run id.")
@tracking_option
@friendly_errors
def select(by, min_precision, target_recall, alias, name, experiment, parent_run_id,
           tracking_uri):
    """Pick a tuning job's deployment model, calibrate its threshold, register it."""
    from crackray.deploy.select import Criterion, run_selection

    if min_precision is None and target_recall is None:
        raise CrackrayError("select: give --min-precision P (or --target-recall R)")
    result = run_selection(
        tracking_uri=tracking_uri, experiment=experiment, parent_run_id=parent_run_id,
        criterion=Criterion(min_precision or 0.0, target_recall), alias=alias, name=name)
    click.echo(result.table)
    click.echo(result.reason)
    click.echo("test " + _format_metrics(result.test, "test")
               + f"  at threshold {result.winner.threshold:.4f}")
    click.echo(f"registered models:/{name}@{alias} (version {result.version}); "
               f"select run {result.select_run_id}")


@main.command()
@click.argument("model")
@click.argument("inputs", nargs=-1, required=True)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--tile", default=256, show_default=True, type=click.IntRange(8),
              help="Window size for photos larger than a tile.")
@click.option("--stride", default=256, show_default=True, type=click.IntRange(1))
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1))
@click.option("--json", "write_json", is_flag=True, help="Also write predictions.json.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
              help="Default: cuda if available, else cpu.")
@click.option("--ray-threshold", default=2000, show_default=True, type=click.IntRange(0),
              help="Above this many files, predict with Ray Data and model actors.")
@tracking_option
@friendly_errors
def predict(model, inputs, out, tile, stride, batch_size, write_json, device, ray_threshold,
            tracking_uri):
    """Run MODEL (models:/NAME@ALIAS, runs:/ID/PATH or a model file) on images and photos."""
    from crackray.deploy.predict import predict as run_predict

    result = run_predict(model, inputs, out, tile=tile, stride=stride, batch_size=batch_size,
                         write_json=write_json, device=device, tracking_uri=tracking_uri,
                         ray_threshold=ray_threshold)
    cracks = sum(1 for r in result.rows if r["decision"] == "crack")
    click.echo(f"{result.files} files, {result.pieces} tiles predicted ({cracks} crack at "
               f"threshold {result.threshold:.4f}), {result.errors} errors, "
               f"{result.pieces_per_s:.1f} tiles/s")
    click.echo(f"wrote {result.csv_path}" + (f", {result.json_path}" if result.json_path else "")
               + (f" and {len(result.maps)} map/overlay PNGs" if result.maps else ""))


@main.command()
@click.argument("run_id")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@tracking_option
@friendly_errors
def report(run_id, out, tracking_uri):
    """Markdown results page of a run or tuning job, written to OUT and logged to MLflow."""
    from crackray.report import build_report

    click.echo(f"wrote {build_report(run_id, out, tracking_uri=tracking_uri)}")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=5000, show_default=True, type=click.IntRange(1, 65535))
@tracking_option
@friendly_errors
def ui(host, port, tracking_uri):
    """The MLflow UI over the project's tracking store."""
    from crackray.ui import serve

    serve(tracking_uri=tracking_uri, host=host, port=port)


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


# ------------------------------------------------------------------------------------ bench


@main.group()
def bench() -> None:
    """Throughput benchmarks: crackray's Ray machinery side by side with plain PyTorch."""


json_option = click.option("--json", "as_json", is_flag=True,
                           help="Also print the result as one JSON object on the last line.")
data_option = click.option("--data", required=True, type=click.Path(exists=True, file_okay=False),
                           help="Prepared shards (crackray prepare ...).")
limit_option = click.option("--limit", default=None, type=click.IntRange(1),
                            help="Use only the first N training rows.")


def _emit(result: dict, as_json: bool) -> None:
    from crackray.bench import describe

    click.echo(describe(result))
    if as_json:
        click.echo(json.dumps(result))


@bench.command("ingest")
@data_option
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1))
@click.option("--image-size", default=224, show_default=True, type=click.IntRange(16, 1024))
@click.option("--repeats", "--epochs", default=3, show_default=True, type=click.IntRange(1),
              help="Timed epochs per side, alternating.")
@limit_option
@json_option
@friendly_errors
def bench_ingest_cmd(data, batch_size, image_size, repeats, limit, as_json):
    """Ray Data pipeline vs DataLoader with as many workers: images/s, same transforms."""
    from crackray.bench import bench_ingest

    _emit(bench_ingest(data, batch_size=batch_size, image_size=image_size, repeats=repeats,
                       limit=limit), as_json)


@bench.command("train")
@data_option
@click.option("--model", default="simple_cnn", show_default=True)
@click.option("--image-size", default=224, show_default=True, type=click.IntRange(16, 1024))
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1))
@click.option("--epochs", default=2, show_default=True, type=click.IntRange(1),
              help="Epochs per round; the first is warm-up when there are more.")
@click.option("--repeats", default=2, show_default=True, type=click.IntRange(1))
@click.option("--limit", default=None, type=click.IntRange(1),
              help="Training rows per epoch (the first N; default: the whole split).")
@click.option("--threads", default=None, type=click.IntRange(1),
              help="torch threads of the Ray worker (train.threads_per_worker; default: all "
                   "cores, as the plain loop uses).")
@click.option("--gpu", is_flag=True, help="Also model-only vs pipeline-fed on the GPU.")
@json_option
@friendly_errors
def bench_train_cmd(data, model, image_size, batch_size, epochs, repeats, limit, threads, gpu,
                    as_json):
    """One Ray Train worker vs a plain loop in one process: training images/s."""
    from crackray.bench import bench_train

    _emit(bench_train(data, model=model, image_size=image_size, batch_size=batch_size,
                      epochs=epochs, repeats=repeats, limit=limit, threads=threads, gpu=gpu),
          as_json)


@bench.command("trial")
@click.argument("file", required=False, type=click.Path(exists=True, dir_okay=False))
@click.option("--trials", default=2, show_default=True, type=click.IntRange(1))
@click.option("--workdir", default=None, type=click.Path(file_okay=False),
              help="Where demo data, MLflow store and Ray results go (default: a temp dir).")
@json_option
@friendly_errors
def bench_trial_cmd(file, trials, workdir, as_json):
    """Fixed cost of one tuning trial (default FILE: search_spaces/quickstart.yaml)."""
    from crackray.bench import bench_trial

    _emit(bench_trial(file, trials=trials, workdir=workdir), as_json)


if __name__ == "__main__":
    main()
