"""`crackray prepare ...`: a dataset on disk -> Parquet shards with recorded splits."""

from __future__ import annotations

import os
import time

import click

from crackray.cli.common import friendly_errors, main

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
