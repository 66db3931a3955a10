"""`crackray predict`: evaluation-identical tile probabilities, error rows for bad files,
photo windows (overlapping, at the model's training scale, EXIF-upright, strips padded) with
photo-level decisions and averaged maps, folder filtering, model references (local file,
registry alias), the Ray Data path."""

from __future__ import annotations

import csv
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crackray import checkpoints
from crackray.config import RunConfig
from crackray.data.prepare import prepare_synthetic
from crackray.data.shards import read_split_table
from crackray.deploy.predict import load_predictor, predict, read_pieces
from crackray.errors import CrackrayError
from crackray.models import create_model

IMAGE_SIZE = 32


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """A seeded, untrained test_tiny model on a small synthetic dataset (no training needed:
    the tests compare two ways of computing the same probabilities)."""
    root = tmp_path_factory.mktemp("predict")
    prepare_synthetic(root / "data", n=60, seed=3)
    cfg = RunConfig.model_validate({"model": {"name": "test_tiny"},
                                    "data": {"path": str(root / "data"),
                                             "image_size": IMAGE_SIZE}})
    torch.manual_seed(0)
    model = create_model("test_tiny", pretrained=False, dropout=0.0, image_size=IMAGE_SIZE)
    return checkpoints.save_model_file(root / "best_model.pt", checkpoints.cpu_state(model), cfg,
                                       threshold=0.5)


def _read_csv(path: Path) -> list[dict]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def _write_test_tiles(model_file: Path, folder: Path) -> dict[str, Path]:
    """The test split's stored tile bytes, written unchanged to files: path -> file."""
    cfg = RunConfig.model_validate(checkpoints.load_model_file(model_file)["config"])
    folder.mkdir()
    out = {}
    for i, row in enumerate(read_split_table(cfg.data.path, "test", ["path", "image"]).to_pylist()):
        target = folder / f"{i:03d}.jpg"
        target.write_bytes(row["image"])
        out[row["path"]] = target
    return out


@pytest.mark.slow
def test_tile_probability_equals_evaluation(model_file, tmp_path, ray_session):
    from crackray.inference import predict_split

    model, cfg, _ = checkpoints.build_model_from_file(model_file)
    evaluated = predict_split(model, cfg, "test")
    files = _write_test_tiles(model_file, tmp_path / "tiles")
    result = predict(str(model_file), [tmp_path / "tiles"], tmp_path / "out", batch_size=5)
    rows = _read_csv(result.csv_path)
    by_file = {r["path"]: float(r["probability"]) for r in rows}
    assert len(by_file) == len(evaluated.paths) == len(files)
    for path, prob in zip(evaluated.paths, evaluated.probs, strict=True):
        assert by_file[str(files[path])] == pytest.approx(float(prob), abs=1e-5)
    # Decisions follow "crack iff probability >= threshold".
    for row in rows:
        assert row["level"] == "file"
        assert row["decision"] == ("crack" if float(row["probability"]) >= 0.5 else "no_crack")


def _bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def test_bad_files_get_error_rows_and_the_rest_is_predicted(model_file, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    good = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))
    good.save(folder / "good.png")
    good.save(folder / "good2.jpg")
    jpeg = (folder / "good2.jpg").read_bytes()
    (folder / "corrupt.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (tmp_path / "notes.txt").write_text("not an image")  # given by name: an input
    (folder / "bomb.png").write_bytes(_bomb_png(8_000, 6_000))

    result = predict(str(model_file), [folder, tmp_path / "notes.txt"], tmp_path / "out",
                     write_json=True)
    rows = {Path(r["path"]).name: r for r in _read_csv(result.csv_path)}
    assert set(rows) == {"good.png", "good2.jpg", "corrupt.jpg", "notes.txt", "bomb.png"}
    for name in ("good.png", "good2.jpg"):
        assert rows[name]["error"] == ""
        assert 0.0 <= float(rows[name]["probability"]) <= 1.0
    assert "not an image" in rows["notes.txt"]["error"]
    assert "cannot decode" in rows["corrupt.jpg"]["error"]
    assert "exceeds the limit" in rows["bomb.png"]["error"]
    for name in ("notes.txt", "corrupt.jpg", "bomb.png"):
        assert rows[name]["decision"] == "error" and rows[name]["probability"] == ""
    assert result.errors == 3 and result.pieces == 2
    payload = json.loads(result.json_path.read_text())
    assert payload["threshold"] == 0.5 and len(payload["predictions"]) == 5


def _model_probs(model_file: Path, images: list[np.ndarray]) -> np.ndarray:
    """The network's crack probability of uint8 HxWx3 crops, each resized to the model's
    size like a stored tile (computed here without predict's code)."""
    from crackray.data.images import decode_rgb, encode_png
    from crackray.data.transforms import to_model_input

    model, cfg, _ = checkpoints.build_model_from_file(model_file)
    size = cfg.data.image_size
    batch = np.stack([decode_rgb(encode_png(np.ascontiguousarray(i)), size) for i in images])
    with torch.no_grad():
        out = model(to_model_input(batch))
    return torch.sigmoid((out[0] if isinstance(out, tuple) else out).float()).numpy()


def test_photo_windows_overlap_and_the_photo_row_takes_the_highest(model_file, tmp_path):
    rng = np.random.default_rng(1)
    photo = rng.integers(0, 255, (128, 160, 3), np.uint8)  # height 128, width 160
    Image.fromarray(photo).save(tmp_path / "photo.png")

    # No --stride: half the tile, so windows overlap.
    result = predict(str(model_file), [tmp_path / "photo.png"], tmp_path / "out", tile=64)
    assert (result.tile, result.stride) == (64, 32)
    rows = _read_csv(result.csv_path)
    windows = [r for r in rows if r["level"] == "window"]
    [photo_row] = [r for r in rows if r["level"] == "file"]
    # x in 0, 32, 64, 96 and y in 0, 32, 64: 4 x 3 windows, each flush inside the photo.
    assert sorted((int(r["x"]), int(r["y"])) for r in windows) == sorted(
        (x, y) for x in (0, 32, 64, 96) for y in (0, 32, 64))
    assert all((r["width"], r["height"]) == ("64", "64") for r in windows)
    expected = _model_probs(model_file, [photo[int(r["y"]) : int(r["y"]) + 64,
                                               int(r["x"]) : int(r["x"]) + 64]
                                         for r in windows])
    np.testing.assert_allclose([float(r["probability"]) for r in windows], expected, atol=1e-5)
    # The photo: its highest window's probability, cracked iff any window is.
    assert float(photo_row["probability"]) == pytest.approx(float(expected.max()), abs=1e-6)
    assert (photo_row["x"], photo_row["y"], photo_row["width"], photo_row["height"],
            photo_row["windows"]) == ("0", "0", "160", "128", "12")
    payload = checkpoints.load_model_file(model_file)
    cfg = RunConfig.model_validate(payload["config"])
    photo_decisions = []
    for threshold in (float(np.median(expected)), float(expected.max()) + 1e-3):
        other = checkpoints.save_model_file(tmp_path / f"t{threshold}.pt", payload["model_state"],
                                            cfg, threshold=threshold)
        again = _read_csv(predict(str(other), [tmp_path / "photo.png"], tmp_path / "o2",
                                  tile=64).csv_path)
        cracked = [float(r["probability"]) >= threshold for r in again if r["level"] == "window"]
        [photo_again] = [r for r in again if r["level"] == "file"]
        photo_decisions.append(photo_again["decision"])
        assert (photo_again["decision"] == "crack") == any(cracked)
    assert photo_decisions == ["crack", "no_crack"]

    # The map averages the windows over each pixel, computed here directly.
    maps = {p.name: p for p in result.maps}
    assert set(maps) == {"photo_prob.png", "photo_overlay.png"}
    assert Image.open(maps["photo_overlay.png"]).size == (160, 128)
    direct = np.zeros((128, 160))
    for yy in range(128):
        for xx in range(160):
            covering = [p for r, p in zip(windows, expected, strict=True)
                        if int(r["x"]) <= xx < int(r["x"]) + 64
                        and int(r["y"]) <= yy < int(r["y"]) + 64]
            direct[yy, xx] = np.mean(covering)
    written = np.asarray(Image.open(maps["photo_prob.png"])).astype(float)
    assert np.abs(written - np.round(direct * 255)).max() <= 1
    assert len({round(v, 6) for v in direct.ravel()}) > 12  # overlaps really were averaged


def test_exif_orientation_is_honoured(model_file, tmp_path):
    """A camera file stored sideways with EXIF orientation 6 (rotate 90 degrees clockwise to
    view) is predicted exactly as the upright image."""
    rng = np.random.default_rng(4)
    stored = rng.integers(0, 255, (96, 160, 3), np.uint8)  # as the sensor wrote it
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "sideways.png", exif=exif.tobytes())
    Image.fromarray(np.rot90(stored, k=-1).copy()).save(tmp_path / "upright.png")

    result = predict(str(model_file), [tmp_path / "sideways.png", tmp_path / "upright.png"],
                     tmp_path / "out", tile=64)
    rows = _read_csv(result.csv_path)
    by_file = {}
    for r in rows:
        by_file.setdefault(Path(r["path"]).name, []).append(
            (r["level"], r["x"], r["y"], r["width"], r["height"], r["probability"]))
    assert by_file["sideways.png"] == by_file["upright.png"]
    assert by_file["sideways.png"][-1][:5] == ("file", "0", "0", "96", "160")  # upright size


def test_strip_narrower_than_a_tile_is_padded_not_squashed(model_file, tmp_path):
    rng = np.random.default_rng(6)
    strip = rng.integers(0, 255, (40, 150, 3), np.uint8)
    Image.fromarray(strip).save(tmp_path / "strip.png")
    rows = _read_csv(predict(str(model_file), [tmp_path / "strip.png"], tmp_path / "out",
                             tile=64).csv_path)
    windows = [r for r in rows if r["level"] == "window"]
    assert [(int(r["x"]), r["width"], r["height"]) for r in windows] == [
        (0, "64", "40"), (32, "64", "40"), (64, "64", "40"), (86, "64", "40")]
    # Each window is the 40 x 64 cut mirrored down to 64 x 64, at the model's training scale.
    padded = [np.pad(strip[:, x : x + 64], ((0, 24), (0, 0), (0, 0)), mode="symmetric")
              for x in (0, 32, 64, 86)]
    np.testing.assert_allclose([float(r["probability"]) for r in windows],
                               _model_probs(model_file, padded), atol=1e-5)


def test_a_folder_yields_its_image_files_only(model_file, tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    tile = np.random.default_rng(0).integers(0, 255, (48, 48, 3), np.uint8)
    Image.fromarray(tile).save(folder / "a.JPG", format="JPEG")
    Image.fromarray(tile).save(folder / "sub" / "b.png")
    (folder / "MANIFEST.csv").write_text("path,label\na.JPG,1\n")
    (folder / "README.txt").write_text("notes")
    (folder / ".hidden.png").write_bytes(b"")
    rows = _read_csv(predict(str(model_file), [folder], tmp_path / "out").csv_path)
    assert sorted(Path(r["path"]).name for r in rows) == ["a.JPG", "b.png"]
    assert all(r["error"] == "" for r in rows)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "MANIFEST.csv").write_text("x")
    with pytest.raises(CrackrayError, match="no image files"):
        predict(str(model_file), [tmp_path / "empty"], tmp_path / "out2")


def test_pieces_of_a_tile_match_evaluation_decode(model_file, tmp_path):
    from crackray.data.transforms import decode_images

    data = read_split_table(
        RunConfig.model_validate(checkpoints.load_model_file(model_file)["config"]).data.path,
        "val", ["image"]).column("image")[0].as_py()
    (tmp_path / "t.jpg").write_bytes(data)
    [piece] = read_pieces(tmp_path / "t.jpg", 0, image_size=IMAGE_SIZE, tile=256, stride=256)
    np.testing.assert_array_equal(piece["image"], decode_images([data], IMAGE_SIZE)[0])


def test_model_without_threshold_defaults_to_half(model_file, tmp_path):
    payload = checkpoints.load_model_file(model_file)
    cfg = RunConfig.model_validate(payload["config"])
    bare = checkpoints.save_model_file(tmp_path / "best_model.pt", payload["model_state"], cfg)
    predictor = load_predictor(str(bare))
    assert predictor.threshold == 0.5 and "no calibrated threshold" in predictor.threshold_source
    with pytest.raises(CrackrayError, match="no such model file"):
        load_predictor(str(tmp_path / "missing.pt"))


def test_registry_alias_and_unknown_alias(model_file, tmp_path, cli):
    from crackray.deploy.serving import log_servable
    from crackray.tracking import Tracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri)
    run_id = tracker.find_or_create_run("predict-test", "k", run_name="r", kind="select")
    model_uri = log_servable(tracker, run_id, model_file, {"threshold": 0.5})
    version = tracker.register(model_uri, "crackray-test", "champion")

    predictor = load_predictor("models:/crackray-test@champion", tracking_uri=uri)
    assert predictor.threshold == 0.5
    assert load_predictor(f"models:/crackray-test/{version}", tracking_uri=uri).threshold == 0.5
    with pytest.raises(CrackrayError, match=r"no alias or version 'nope' \(aliases: champion\)"):
        load_predictor("models:/crackray-test@nope", tracking_uri=uri)
    with pytest.raises(CrackrayError, match="no registered model 'other'"):
        load_predictor("models:/other@champion", tracking_uri=uri)

    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    done = cli("predict", "models:/crackray-test@nope", tmp_path / "x.png", "--out",
               tmp_path / "o", "--tracking-uri", uri)
    assert done.returncode == 2
    assert "error: registered model 'crackray-test' has no alias" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_ray_data_path_matches_local(model_file, tmp_path, ray_session):
    files = list(_write_test_tiles(model_file, tmp_path / "tiles").values())[:4]
    (tmp_path / "tiles" / "zz.jpg").write_text("nope")  # an image by name: an error row
    local = predict(str(model_file), [tmp_path / "tiles"], tmp_path / "a")
    distributed = predict(str(model_file), [tmp_path / "tiles"], tmp_path / "b", batch_size=3,
                          ray_threshold=2)
    # Rows stream back in the order Ray finishes them: compare file by file.
    local_rows = sorted(_read_csv(local.csv_path), key=lambda r: r["path"])
    distributed_rows = sorted(_read_csv(distributed.csv_path), key=lambda r: r["path"])
    assert len(local_rows) == len(list((tmp_path / "tiles").iterdir())) > len(files)
    assert [r["path"] for r in distributed_rows] == [r["path"] for r in local_rows]
    for a, b in zip(local_rows, distributed_rows, strict=True):
        assert a["error"] == b["error"] and a["decision"] == b["decision"]
        if a["probability"]:
            assert float(a["probability"]) == pytest.approx(float(b["probability"]), abs=1e-5)


def _segdec_model_file(root: Path, **extras) -> tuple[torch.nn.Module, Path]:
    """An untrained segdec_tiny at 64 px in a crackray model file (extras: e.g. the training
    `tile` its file records)."""
    prepare_synthetic(root / "data", n=20, seed=5)
    cfg = RunConfig.model_validate({"model": {"name": "segdec_tiny"},
                                    "data": {"path": str(root / "data"), "image_size": 64}})
    torch.manual_seed(0)
    model = create_model("segdec_tiny", pretrained=False, dropout=0.0, image_size=64)
    return model, checkpoints.save_model_file(root / "best_model.pt",
                                              checkpoints.cpu_state(model), cfg, threshold=0.5,
                                              **extras)


@pytest.mark.slow
def test_ray_data_path_writes_the_same_masks(tmp_path, ray_session):
    _, model_file = _segdec_model_file(tmp_path / "seg")
    rng = np.random.default_rng(3)
    (tmp_path / "in").mkdir()
    for name, shape in [("a", (64, 64)), ("b", (90, 70)), ("photo", (128, 160))]:
        pixels = rng.integers(0, 255, (*shape, 3), np.uint8)
        Image.fromarray(pixels).save(tmp_path / "in" / f"{name}.png")
    (tmp_path / "in" / "broken.png").write_bytes(b"not a png")
    local = predict(str(model_file), [tmp_path / "in"], tmp_path / "a", tile=96, stride=64)
    distributed = predict(str(model_file), [tmp_path / "in"], tmp_path / "b", tile=96, stride=64,
                          batch_size=2, ray_threshold=1)
    names = sorted(p.name for p in (tmp_path / "a" / "masks").iterdir())
    assert names == ["a_mask.png", "b_mask.png", "photo_mask.png"]
    assert sorted(p.name for p in (tmp_path / "b" / "masks").iterdir()) == names
    for name in names:
        a = np.asarray(Image.open(tmp_path / "a" / "masks" / name))
        b = np.asarray(Image.open(tmp_path / "b" / "masks" / name))
        assert a.shape == b.shape and (a == b).mean() > 0.99, name
    assert len(_read_csv(local.csv_path)) == len(_read_csv(distributed.csv_path))


@pytest.mark.parametrize("pixel_threshold", [None, 0.45])
def test_segmentation_model_writes_mask_pngs(tmp_path, pixel_threshold):
    """A segdec model also writes a crack mask per input: tiles at their own size, photos
    stitched from their windows; the tile's mask agrees with the network's own map, cut at
    the pixel threshold `select` stored in the model file (0.5 when there is none)."""
    extras = {} if pixel_threshold is None else {"pixel_threshold": pixel_threshold}
    model, model_file = _segdec_model_file(tmp_path / "seg", **extras)
    rng = np.random.default_rng(2)
    tile = rng.integers(0, 255, (96, 96, 3), np.uint8)
    Image.fromarray(tile).save(tmp_path / "tile.png")
    Image.fromarray(rng.integers(0, 255, (128, 160, 3), np.uint8)).save(tmp_path / "photo.png")

    result = predict(str(model_file), [tmp_path / "tile.png", tmp_path / "photo.png"],
                     tmp_path / "out", tile=96, stride=64, write_json=True)
    cut = 0.5 if pixel_threshold is None else pixel_threshold
    assert json.loads(result.json_path.read_text())["mask_threshold"] == cut
    masks = {p.name: p for p in result.maps if p.parent.name == "masks"}
    assert set(masks) == {"tile_mask.png", "photo_mask.png"}
    assert Image.open(masks["photo_mask.png"]).size == (160, 128)
    tile_mask = np.asarray(Image.open(masks["tile_mask.png"]))
    assert tile_mask.shape == (96, 96) and set(np.unique(tile_mask)) <= {0, 255}

    # Independently: the network's seg map for the resized tile, upsampled to 96 px.
    from crackray.data.images import decode_rgb
    from crackray.data.transforms import to_model_input

    image = decode_rgb((tmp_path / "tile.png").read_bytes(), 64)[None]
    with torch.no_grad():
        seg = torch.sigmoid(model.eval()(to_model_input(image))[1])
    upsampled = torch.nn.functional.interpolate(seg, size=(96, 96), mode="bilinear")[0, 0]
    expected = (upsampled >= cut).numpy()
    agreement = ((tile_mask == 255) == expected).mean()
    assert agreement > 0.97  # uint8 quantisation may flip pixels right at the threshold
    # The cut matters here: a fair share of this untrained map lies between 0.45 and 0.5.
    assert ((upsampled >= 0.45) != (upsampled >= 0.5)).float().mean() > 0.05


def test_segdec_model_trained_at_another_tile_size_cuts_photos_at_it(tmp_path):
    """A model file records the tile it was trained at (here 96 px tiles, resized to 64):
    photo windows are cut at 96 px by default, not at 256, and each window's probability is
    the network's on that 96 px cut."""
    model, model_file = _segdec_model_file(tmp_path / "seg", tile=96)
    payload = checkpoints.load_model_file(model_file)
    assert (payload["tile"], payload["image_size"]) == (96, 64)
    photo = np.random.default_rng(8).integers(0, 255, (150, 200, 3), np.uint8)
    Image.fromarray(photo).save(tmp_path / "photo.png")

    result = predict(str(model_file), [tmp_path / "photo.png"], tmp_path / "out", write_json=True)
    assert (result.tile, result.stride, result.tile_source) == (96, 48, "the model's training tile")
    meta = json.loads(result.json_path.read_text())
    assert (meta["tile"], meta["stride"]) == (96, 48)
    windows = [r for r in _read_csv(result.csv_path) if r["level"] == "window"]
    assert sorted({int(r["x"]) for r in windows}) == [0, 48, 96, 104]
    assert sorted({int(r["y"]) for r in windows}) == [0, 48, 54]
    assert {(r["width"], r["height"]) for r in windows} == {("96", "96")}
    cuts = [photo[int(r["y"]) : int(r["y"]) + 96, int(r["x"]) : int(r["x"]) + 96] for r in windows]
    np.testing.assert_allclose([float(r["probability"]) for r in windows],
                               _model_probs(model_file, cuts), atol=1e-5)
    assert Image.open(tmp_path / "out" / "masks" / "photo_mask.png").size == (200, 150)
