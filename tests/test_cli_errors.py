"""Bad input through the real `crackray` command: a one-line `error: ...` on stderr, exit
code 2 and no traceback; or, for a bad file among good ones, a quarantine entry."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
import yaml

from crackray.data import images
from crackray.data.synthetic import make_tile
from tests.conftest import SDNET

FOLDERS = ("D/CD", "D/UD", "W/CW", "W/UW")


def assert_clean_error(result, *fragments: str) -> str:
    """Exit code 2, exactly one stderr line starting `error:` naming `fragments`."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture()
def small_sdnet(tmp_path):
    """Five tiles per SDNET class folder: real ones when present, else synthetic JPEGs."""
    src = tmp_path / "src"
    rng = np.random.default_rng(0)
    for folder in FOLDERS:
        (src / folder).mkdir(parents=True)
        real = sorted((SDNET / folder).glob("*.jpg"))[:5] if SDNET.is_dir() else []
        for path in real:
            shutil.copy(path, src / folder / path.name)
        for i in range(5 - len(real)):
            tile, _ = make_tile(rng, 64, crack=folder[2] == "C")
            (src / folder / f"{7000 + i}-{i}.jpg").write_bytes(images.encode_jpeg(tile))
    return src


def test_prepare_missing_path(cli, tmp_path):
    result = cli("prepare", "sdnet2018", tmp_path / "nowhere", "--out", tmp_path / "out")
    assert_clean_error(result, str(tmp_path / "nowhere"), "no such folder")
    assert not (tmp_path / "out").exists()


def test_prepare_empty_folder(cli, tmp_path):
    (tmp_path / "empty").mkdir()
    result = cli("prepare", "sdnet2018", tmp_path / "empty", "--out", tmp_path / "out")
    assert_clean_error(result, "no SDNET2018 images found", "D|P|W/C*|U*")
    assert not (tmp_path / "out").exists()


def test_prepare_quarantines_a_corrupt_jpeg_and_writes_the_rest(cli, small_sdnet, tmp_path):
    good = next((small_sdnet / "W/CW").glob("*.jpg")).read_bytes()
    (small_sdnet / "W/CW/7999-3.jpg").write_bytes(good[: len(good) // 4])  # truncated JPEG
    out = tmp_path / "out"
    result = cli("prepare", "sdnet2018", small_sdnet, "--out", out, "--val", "0.2", "--test", "0.2")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "quarantined 1 unreadable files" in result.stderr
    with (out / "quarantine.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["path"] for row in rows] == ["W/CW/7999-3.jpg"]
    assert rows[0]["reason"]
    total = sum(int(line.split()[1]) for line in result.stdout.splitlines()[1:4])
    assert total == 20  # every good tile written


@pytest.fixture()
def experiment(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"base": {"data": {"path": "data/none", "image_size": 32},
                                             "model": {"name": "test_tiny"}}}))
    return path


def test_train_unknown_override_key(cli, experiment):
    result = cli("train", experiment, "--set", "optim.lrr=0.1")
    assert_clean_error(result, "optim.lrr", "unknown key")


def test_train_unknown_key_in_the_file(cli, tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("base:\n  train:\n    epohcs: 3\n")
    result = cli("train", path)
    assert_clean_error(result, str(path), "base.train.epohcs", "unknown key")


@pytest.mark.parametrize("pair, key", [("train.epochs=many", "base.train.epochs"),
                                       ("optim.lr=fast", "base.optim.lr"),
                                       ("loss.name=hinge", "base.loss.name")])
def test_train_wrong_value_type(cli, experiment, pair, key):
    result = cli("train", experiment, "--set", pair)
    assert_clean_error(result, key)


def test_train_missing_experiment_file_and_data(cli, tmp_path, experiment):
    assert_clean_error(cli("train", tmp_path / "absent.yaml"), "absent.yaml", "no such experiment")
    # data.path points nowhere: named before Ray or MLflow start
    result = cli("train", experiment)
    assert_clean_error(result, str(tmp_path / "data" / "none"), "crackray prepare")
    assert not (tmp_path / "mlflow.db").exists()
