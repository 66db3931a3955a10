"""Data trouble (issue 7, item 5): a corrupt, missing or rewritten shard, or a broken manifest,
stops `crackray train` / `crackray tune` with one clear line naming the file, before any
tracking run or Ray start.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from crackray.cli import main
from crackray.data.prepare import prepare_synthetic

pytestmark = pytest.mark.faults

EXPERIMENT = """\
base:
  data: {{path: {data}, image_size: 32}}
  model: {{name: simple_cnn}}
  train: {{epochs: 1, batch_size: 16}}
  tracking: {{uri: "sqlite:///{db}"}}
search:
  optim.lr: {{type: float, low: 1.0e-3, high: 1.0e-2, log: true}}
tune: {{num_samples: 1, workers_per_trial: 1, scheduler: {{name: fifo}}}}
"""


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pristine") / "data"
    prepare_synthetic(path, n=60, seed=0)
    return path


@pytest.fixture()
def dataset(pristine, tmp_path) -> Path:
    """A private copy of the prepared dataset, free to damage."""
    return Path(shutil.copytree(pristine, tmp_path / "data"))


def corrupt_bytes(data: Path) -> Path:
    shard = data / "train" / "part-00000.parquet"
    raw = bytearray(shard.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 64] = b"\x00" * 64
    raw[-8:] = b"garbage!"  # the footer too: pyarrow cannot even open it
    shard.write_bytes(bytes(raw))
    return shard


def delete_shard(data: Path) -> Path:
    shard = data / "val" / "part-00000.parquet"
    shard.unlink()
    return shard


def rewrite_labels(data: Path) -> Path:
    """A valid Parquet file whose content no longer matches the manifest (labels flipped)."""
    shard = data / "train" / "part-00000.parquet"
    table = pq.read_table(shard)
    flipped = pc.cast(pc.subtract(1, table["label"]), table.schema.field("label").type)
    pq.write_table(table.set_column(table.schema.get_field_index("label"), "label", flipped),
                   shard)
    return shard


def break_manifest(data: Path) -> Path:
    manifest = data / "manifest.json"
    manifest.write_text(manifest.read_text()[:40])
    return manifest


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (corrupt_bytes, "corrupt shard"),
        (delete_shard, "missing shard"),
        (rewrite_labels, "differs from"),
        (break_manifest, "corrupt"),
    ],
    ids=["corrupt", "missing", "digest", "manifest"],
)
@pytest.mark.parametrize("command", ["train", "tune"])
def test_bad_dataset_is_one_clear_line_naming_the_file(tmp_path, dataset, damage, expected,
                                                       command):
    damaged = damage(dataset)
    db = tmp_path / "mlflow.db"
    experiment = tmp_path / "exp.yaml"
    experiment.write_text(EXPERIMENT.format(data=dataset, db=db))

    # In-process (CliRunner): the same click command and error handling as the `crackray`
    # executable, without paying its start-up per case.
    done = CliRunner().invoke(main, [command, str(experiment)])

    assert done.exit_code == 2, done.output
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr  # one line, no traceback
    assert lines[0].startswith("error: ")
    assert str(damaged) in lines[0] and expected in lines[0]
    # Refused before anything started: no tracking store was touched.
    assert not db.exists()
