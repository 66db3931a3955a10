"""The `crackray` command: thin click wrappers that parse, load config and call one function.

User mistakes (`CrackrayError`) print one line and exit 2; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import functools
import sys

import click

from crackray import allocator
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
verbose_option = click.option(
    "--verbose", is_flag=True,
    help="Also show Ray's own output: worker logs, Tune's result tables, routine warnings.",
)


@click.group()
@click.version_option(package_name="crackray")
def main() -> None:
    """crackray: distributed crack-detection experiments on Ray."""
    # Before any process starts: Ray's local processes and the benchmarks' plain sides inherit
    # it, so both sides of a comparison run on the same allocator.
    allocator.keep_freed_memory()


def format_metrics(metrics: dict, prefix: str,
                    keys=("precision", "recall", "f1", "auroc")) -> str:
    return "  ".join(f"{k} {metrics.get(f'{prefix}/{k}', float('nan')):.3f}" for k in keys)
