"""`crackray bench ...`: what the Ray machinery costs against plain PyTorch."""

from __future__ import annotations

import json

import click

from crackray.cli.common import friendly_errors, main

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
@json_option
@friendly_errors
def bench_train_cmd(data, model, image_size, batch_size, epochs, repeats, limit, threads,
                    as_json):
    """One Ray Train worker vs a plain loop in one process: training images/s."""
    from crackray.bench import bench_train

    _emit(bench_train(data, model=model, image_size=image_size, batch_size=batch_size,
                      epochs=epochs, repeats=repeats, limit=limit, threads=threads), as_json)


@bench.command("gpu")
@data_option
@click.option("--model", default="resnet18", show_default=True)
@click.option("--image-size", default=224, show_default=True, type=click.IntRange(16, 1024))
@click.option("--batch-size", default=128, show_default=True, type=click.IntRange(1))
@click.option("--epochs", default=3, show_default=True, type=click.IntRange(1),
              help="Pipeline-fed epochs; the first is warm-up when there are more.")
@click.option("--steps", default=30, show_default=True, type=click.IntRange(1),
              help="Timed steps on the synthetic batch.")
@limit_option
@click.option("--gpu-decode/--no-gpu-decode", default=True, show_default=True,
              help="Also time nvJPEG decoding on the GPU (torchvision.io.decode_jpeg).")
@json_option
@friendly_errors
def bench_gpu_cmd(data, model, image_size, batch_size, epochs, steps, limit, gpu_decode,
                  as_json):
    """Pipeline-fed vs synthetic-batch training on one GPU (bf16, channels-last); skips
    with the reason where there is no CUDA device."""
    from crackray.bench import bench_gpu

    _emit(bench_gpu(data, model=model, image_size=image_size, batch_size=batch_size,
                    epochs=epochs, steps=steps, limit=limit, gpu_decode=gpu_decode), as_json)


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
