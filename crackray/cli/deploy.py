"""`crackray select`, `predict`, `report` and `ui`: from trained runs to a deployed model."""

from __future__ import annotations

import click

from crackray.cli.common import format_metrics, friendly_errors, main, tracking_option
from crackray.errors import CrackrayError

# ------------------------------------------------------------------ select / predict / report / ui


@main.command()
@click.option("--by", type=click.Choice(["recall", "f1"]), default="recall", show_default=True,
              help="What selection maximises on validation: recall at the precision floor, or "
              "F1 at its best threshold (at the floor, if one is given).")
@click.option("--min-precision", type=click.FloatRange(0, 1), default=None,
              help="Precision floor the calibrated threshold must meet (required with --by "
              "recall unless --target-recall).")
@click.option("--target-recall", type=click.FloatRange(0, 1), default=None,
              help="Instead: the best precision at recall >= R.")
@click.option("--alias", default="champion", show_default=True, help="Registry alias to set.")
@click.option("--name", default="crackray-sdnet", show_default=True,
              help="Registered model name.")
@click.option("--experiment", default=None, help="Use the latest tuning job of this experiment.")
@click.option("--parent", "parent_run_id", default=None, help="The tuning job's parent run id.")
@click.option("--run", "run_id", default=None,
              help="Instead of a tuning job: one training run (`crackray train`) to calibrate.")
@click.option("--allow-unfinished", is_flag=True,
              help="Select from a KILLED or FAILED job's finished trials (never a RUNNING one).")
@tracking_option
@friendly_errors
def select(by, min_precision, target_recall, alias, name, experiment, parent_run_id, run_id,
           allow_unfinished, tracking_uri):
    """Pick a tuning job's (or take a training run's) deployment model, calibrate its threshold
    on validation, test it once, register it."""
    from crackray.deploy.select import Criterion, run_selection

    if by == "f1" and target_recall is not None:
        raise CrackrayError("select: --target-recall goes with --by recall, not --by f1")
    if by == "recall" and min_precision is None and target_recall is None:
        raise CrackrayError("select: give --min-precision P (or --target-recall R, or --by f1)")
    result = run_selection(
        tracking_uri=tracking_uri, experiment=experiment, parent_run_id=parent_run_id,
        run_id=run_id, allow_unfinished=allow_unfinished,
        criterion=Criterion(min_precision or 0.0, target_recall, by=by), alias=alias, name=name)
    click.echo(result.table)
    click.echo(result.reason)
    click.echo("test " + format_metrics(result.test, "test")
               + f"  at threshold {result.winner.threshold:.4f}")
    click.echo("test 95 % intervals (photo bootstrap) " + "  ".join(
        f"{key} [{low:.3f}, {high:.3f}]" for key, (low, high) in result.intervals.items()))
    for alert in result.alerts:
        click.echo(alert, err=True)
    click.echo(f"registered models:/{name}@{alias} (version {result.version}); "
               f"select run {result.select_run_id}")


@main.command()
@click.argument("model")
@click.argument("inputs", nargs=-1, required=True)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--tile", default=None, type=click.IntRange(8),
              help="Window size (px) for photos larger than a tile. Default: the tile size the "
              "model was trained at (its model file records it), else 256.")
@click.option("--stride", default=None, type=click.IntRange(1),
              help="Window step (px). Default: half the tile, so windows overlap.")
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
    click.echo(f"{result.files} files ({result.cracked} crack at threshold "
               f"{result.threshold:.4f}, {result.errors} errors), {result.pieces} tiles/windows "
               f"of {result.tile} px ({result.tile_source}, stride {result.stride}), "
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
@click.option("--experiment", default=None,
              help="Experiment to show (default: the one of the newest crackray run).")
@click.option("--open", "open_browser", is_flag=True,
              help="Open the Runs table in a web browser once the server is up.")
@tracking_option
@friendly_errors
def ui(host, port, experiment, open_browser, tracking_uri):
    """The MLflow UI over the project's tracking store, on an experiment's Runs table."""
    from crackray.ui import serve

    serve(tracking_uri=tracking_uri, host=host, port=port, experiment=experiment,
          open_browser=open_browser)
