"""True per-epoch shuffling and one imbalance correction (issue 15).

`prepare` writes a split sorted by path, and SDNET2018's paths start with the class folder, so
a split's cracks sit together; every training epoch must still mix them uniformly,
differently per epoch, and the same way again when the epoch is re-run (a resume). pos_weight
must match what an epoch really contains."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from scipy import stats

from crackray.config import RunConfig, run_config_from_dict
from crackray.data import epochs, shards
from crackray.data.batches import to_torch
from crackray.data.epochs import training_epoch
from crackray.data.pipeline import BLOCK_BYTES, block_rows
from crackray.data.prepare import prepare_sdnet2018
from crackray.data.shards import read_split_table, split_files
from crackray.errors import ConfigError
from crackray.inference import split_batches
from crackray.losses import resolve_pos_weight

pytestmark = pytest.mark.slow
BATCH = 16


@pytest.fixture(scope="module")
def data(tmp_path_factory, ray_session):
    """Random-noise 32 px tiles in SDNET2018's layout, 30 % cracks: 24 photos of 3 cracked
    (D/CD) and 7 uncracked (D/UD) tiles, prepared as the real dataset is."""
    source = tmp_path_factory.mktemp("shuffle") / "sdnet"
    rng = np.random.default_rng(1)
    for photo in range(7001, 7025):
        for folder, tiles in (("CD", 3), ("UD", 7)):
            (source / "D" / folder).mkdir(parents=True, exist_ok=True)
            for tile in range(tiles):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(source / "D" / folder / f"{photo}-{tile}.jpg")
    out = source.parent / "data"
    with pytest.MonkeyPatch.context() as patch:  # several row groups in every split
        patch.setattr(shards, "ROW_GROUP_SIZE", 8)
        prepare_sdnet2018(source, out, seed=1)
    return out


def config(folder, **sections) -> RunConfig:
    tree = {"data": {"path": str(folder), "image_size": 32, "augment": 0.0},
            "train": {"seed": 7}}
    for section, values in sections.items():
        tree.setdefault(section, {}).update(values)
    return RunConfig.model_validate(tree)


def epoch_rows(cfg, epoch, rank=0, world_size=1) -> tuple[list[str], np.ndarray]:
    paths, labels = [], []
    for batch in training_epoch(cfg, epoch, rank=rank, world_size=world_size).iter_batches(
            batch_size=BATCH, batch_format="numpy"):
        paths += batch["path"].tolist()
        labels.append(batch["label"])
    return paths, np.concatenate(labels)


def test_every_batch_mixes_the_classes_and_each_epoch_has_its_own_order(data):
    stored = read_split_table(data, "train", ["path", "label"])
    stored_labels = np.asarray(stored.column("label").to_pylist())
    share = stored_labels.mean()
    # Every full batch's crack count within the binomial 0.1 %-99.9 % range of the split's share.
    low, high = stats.binom.ppf([0.001, 0.999], BATCH, share)

    def batch_counts(labels):
        full = len(labels) // BATCH * BATCH
        return labels[:full].reshape(-1, BATCH).sum(axis=1)

    # The check bites: batches read in the stored order (sorted by path) fall outside it.
    stored_counts = batch_counts(stored_labels)
    assert ((stored_counts < low) | (stored_counts > high)).any(), stored_counts
    cfg = config(data)
    orders = {}
    for epoch in (0, 1):
        paths, labels = epoch_rows(cfg, epoch)
        assert sorted(paths) == sorted(stored.column("path").to_pylist())  # each row once
        counts = batch_counts(labels)
        assert ((counts >= low) & (counts <= high)).all(), (counts, low, high)
        orders[epoch] = paths
    assert orders[0] != orders[1]
    # A resumed run re-runs epoch 1 and gets its order again, row for row.
    assert epoch_rows(cfg, 1)[0] == orders[1]
    # The order follows train.seed too: another seed, another order of the same epoch.
    assert epoch_rows(config(data, train={"seed": 8}), 1)[0] != orders[1]


def images_by_path(dataset) -> dict[str, np.ndarray]:
    """path -> what the model sees of the row: its augmented pixels with their colour jitter."""
    return {path: image for batch in dataset.iter_batches(batch_size=BATCH, batch_format="numpy")
            for path, image in zip(batch["path"], to_torch(batch, None)["image"].numpy(),
                                   strict=True)}


def test_augmentation_is_seeded_per_row_and_epoch(data):
    """A re-run epoch (a resume) sees the pixels it saw the first time; the next epoch new ones."""
    cfg = config(data, data={"augment": 1.0})
    first, again = (images_by_path(training_epoch(cfg, 1)) for _ in range(2))
    assert first.keys() == again.keys()
    assert all(np.array_equal(first[path], again[path]) for path in first)
    other = images_by_path(training_epoch(cfg, 2))
    changed = [not np.array_equal(first[path], other[path]) for path in first]
    assert np.mean(changed) > 0.9  # flips and rotations leave a few symmetric tiles as they were


def test_an_epochs_pixels_do_not_depend_on_how_it_is_cut_into_decode_blocks(data, monkeypatch):
    """Each row's augmentation is seeded by its key, not by its block or task: an epoch cut into
    blocks of 5 rows (a decode task each) is pixel for pixel the epoch cut the default way."""
    cfg = config(data, data={"augment": 1.0})
    default = training_epoch(cfg, 1)
    rows = default.count()
    assert default.materialize().num_blocks() == -(-rows // block_rows(rows, 32))
    monkeypatch.setattr(epochs, "block_rows", lambda *args, **kwargs: 5)
    fine = training_epoch(cfg, 1)
    assert fine.materialize().num_blocks() == -(-rows // 5)
    first, second = images_by_path(default), images_by_path(fine)
    assert first.keys() == second.keys()
    assert all(np.array_equal(first[path], second[path]) for path in first)


def test_decode_blocks_are_about_32_mib_but_at_least_8_an_epoch_and_64_rows():
    assert block_rows(2069, 224) == BLOCK_BYTES // (224 * 224 * 3) == 222  # SDNET at 224 px
    assert block_rows(2069, 224, with_masks=True) == BLOCK_BYTES // (224 * 224 * 4)
    assert block_rows(1000, 32) == 125  # small tiles: 8 blocks of an epoch share
    assert block_rows(200, 96) == 64  # a quickstart worker's epoch: 4 blocks, as many as before
    assert block_rows(100_000, 512) == 64  # large images: no fewer rows than 64


def validation_part(cfg, rank=0, world_size=1) -> dict[str, np.ndarray]:
    """What Train worker `rank` of `world_size` validates on, path -> model input."""
    return {path: image
            for batch in split_batches(cfg, "val", BATCH // 4, torch.device("cpu"), rank=rank,
                                       world_size=world_size)
            for path, image in zip(batch["path"], batch["image"], strict=True)}


def test_validation_parts_split_the_stored_order_between_workers(data):
    """Each Train worker reads its own part of validation. For any number of workers the parts
    are disjoint, within one row of each other in size, and in rank order they are the split in
    its stored order, with the pixels of a single read (no augmentation, the same every time)."""
    cfg = config(data, data={"augment": 1.0})
    stored = read_split_table(data, "val", ["path"]).column("path").to_pylist()
    row_groups = sum(pq.ParquetFile(f).num_row_groups for f in split_files(data, "val"))
    assert row_groups > 2  # the parts start and end inside row groups
    whole = validation_part(cfg)
    assert list(whole) == stored
    for world_size in (2, 3, 5):
        parts = [validation_part(cfg, rank, world_size) for rank in range(world_size)]
        assert [path for part in parts for path in part] == stored
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
        assert all(np.array_equal(image, whole[path])
                   for part in parts for path, image in part.items())
    with pytest.raises(ValueError, match="rank 2 is outside 0..1"):
        validation_part(cfg, 2, 2)


def test_workers_take_disjoint_equal_shares_of_the_epoch(data):
    cfg = config(data)
    whole, _ = epoch_rows(cfg, 0)
    shares = [epoch_rows(cfg, 0, rank, 2)[0] for rank in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == len(whole) // 2
    assert not set(shares[0]) & set(shares[1])
    assert set(shares[0]) | set(shares[1]) <= set(whole)


@pytest.mark.parametrize("data_options", [
    {},
    {"balanced_sampling": True},
    {"frequency_sampling": True},
    {"use_negatives": False},
])
def test_pos_weight_equals_the_epochs_own_negatives_over_positives(data, data_options):
    cfg = config(data, data=data_options, loss={"class_weighting": "inverse_frequency"})
    _, labels = epoch_rows(cfg, 0)
    positives, negatives = int((labels == 1).sum()), int((labels == 0).sum())
    stored = np.asarray(read_split_table(data, "train", ["label"]).column("label").to_pylist())
    weight = resolve_pos_weight(cfg, int(stored.sum()), int((stored == 0).sum()))
    expected = negatives / positives if negatives and positives else 1.0
    assert weight == pytest.approx(expected)
    if data_options:  # the sampling already balanced (or emptied) the epoch: not the split's
        assert 0.5 <= weight <= 1.5 < (stored == 0).sum() / stored.sum()


def test_a_double_correction_is_refused_in_one_line():
    with pytest.raises(ConfigError) as error:
        run_config_from_dict({"data": {"balanced_sampling": True},
                              "loss": {"class_weighting": "explicit", "pos_weight": 4.0}})
    message = str(error.value)
    assert "\n" not in message and "balanced_sampling" in message and "explicit" in message
