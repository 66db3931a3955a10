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


@prepare.command("cfd")
@click.argument("src", type=click.Path())
@click.option("--tile", default=None, type=click.IntRange(16), help="Cut into N x N tiles.")
@with_split_options
@friendly_errors
def prepare_cfd_cmd(src, tile, out, val, test, seed):
    """CrackForest (images/*.jpg + masks/*.png)."""
    from crackray.data.prepare import prepare_cfd

    start = time.perf_counter()
    manifest = prepare_cfd(src, out, tile=tile, val=val, test=test, seed=seed)
    _print_manifest(manifest, out, time.perf_counter() - start)


@prepare.command("crack500")
@click.argument("src", type=click.Path())
@click.option("--tile", default=None, type=click.IntRange(16), help="Cut into N x N tiles.")
@with_split_options
@friendly_errors
def prepare_crack500_cmd(src, tile, out, val, test, seed):
    """CRACK500 (*.jpg with same-stem *.png masks; train/val/test lists if present)."""
    from crackray.data.prepare import prepare_crack500

    start = time.perf_counter()
    manifest = prepare_crack500(src, out, tile=tile, val=val, test=test, seed=seed)
    _print_manifest(manifest, out, time.perf_counter() - start)


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
    from crackray.train import run_training

    experiment = _load(file, overrides, tracking_uri)
    result = run_training(experiment.base, resume=resume,
                          storage_path=experiment.tune.storage_path)
    last = result.history[-1]
    click.echo(f"epochs run: {len(result.history)}  wall time: {result.seconds:.0f} s")
    click.echo("val  " + _format_metrics(last, "val"))
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
    from crackray.tune import run_tuning

    experiment = _load(file, overrides, tracking_uri)
    summary = run_tuning(experiment, file, resume=resume, address=address)
    click.echo(summary.table)
    click.echo(json.dumps(summary.best_test_metrics, indent=None) if summary.best_test_metrics
               else "no finished trial: nothing tested")
    click.echo(f"browse: crackray ui  (experiment '{summary.experiment}', parent run "
               f"{summary.parent_run_id}, store {summary.tracking_uri})")


if __name__ == "__main__":
    main()
