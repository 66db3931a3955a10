"""`crackray predict`: a model on tiles, folders and full-size photos.

The pixels come from `tiling.pieces_from_bytes`, the code the served MLflow model runs too:
a tile gets the probability evaluation gave it; a photo is cut into windows at the scale the
model was trained at (the tile size in its model file), overlapping by half a window unless
told otherwise, and gets a photo-level row (cracked if any window is) beside its window rows,
a probability map and an overlay PNG (`outputs.py`).

Rows are written as they are produced, so a large folder never piles up on the driver. A
file that cannot be used (corrupt, not an image, over the decompression-bomb limit) gets an
error row; the other files are still predicted. Large folders go through Ray Data with the
model on actors.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from crackray import checkpoints
from crackray.config import RunConfig
from crackray.data.transforms import to_model_input
from crackray.deploy.tiling import IMAGE_SUFFIXES, Gatherer, pieces_from_bytes
from crackray.engine import crack_logits, seg_probabilities, to_uint8_maps
from crackray.errors import CrackrayError, DataError
from crackray.models import model_segments
from crackray.tracking import Tracker

RAY_THRESHOLD = 2000  # files: above this, predict with Ray Data and model actors
# Windows of a model file that records no training tile: SDNET2018's and the synthetic
# data's own tile size.
DEFAULT_TILE = 256
MODEL_FILE = "crackray_model.pt"  # the calibrated model file `select` logs with the model
MODEL_FILE_NAMES = (MODEL_FILE, checkpoints.BEST_FILE)
DEFAULT_MASK_THRESHOLD = 0.5  # segdec masks of model files that `select` has not calibrated


# ------------------------------------------------------------------------- the model


@dataclass
class Predictor:
    """A model ready for inference, with the threshold its decisions use."""

    model: torch.nn.Module
    cfg: RunConfig
    threshold: float
    threshold_source: str
    model_file: Path
    device: torch.device
    # segdec masks: crack pixel iff map >= this (`select` calibrates it on validation)
    mask_threshold: float = DEFAULT_MASK_THRESHOLD
    tile: int | None = None  # the training tile size its model file records

    @property
    def image_size(self) -> int:
        return self.cfg.data.image_size

    @property
    def segments(self) -> bool:
        return model_segments(self.cfg.model.name)

    def window(self, tile: int | None, stride: int | None) -> tuple[int, int, str]:
        """(tile, stride, why this tile): the model's training scale unless told otherwise;
        windows overlap by half a tile by default."""
        if tile is not None:
            why = "--tile"
        elif self.tile is not None:
            tile, why = self.tile, "the model's training tile"
        else:
            tile, why = DEFAULT_TILE, f"default {DEFAULT_TILE}: the model file records no tile"
        stride = stride if stride is not None else max(1, tile // 2)
        if stride < 1 or tile < 1:
            raise CrackrayError("--tile and --stride must be positive")
        return tile, stride, why

    @torch.no_grad()
    def predict_batch(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """uint8 (B, H, W, 3) at the model's image size -> crack probability (B,) and, for a
        segmentation model, its crack-probability maps upsampled to H x W (uint8 0..255)."""
        outputs = self.model(to_model_input(images, self.device))
        probs = torch.sigmoid(crack_logits(outputs).float()).cpu().numpy()
        if not isinstance(outputs, tuple):
            return probs, None
        return probs, to_uint8_maps(seg_probabilities(outputs[1], images.shape[1:3]))

    def score(self, pieces: list[dict]) -> None:
        """Set `probability` (and `seg` for a segmentation model) on pieces without an error,
        and drop their pixels: a big folder must not pile up images."""
        good = [p for p in pieces if not p.get("error")]
        if good:
            probs, seg_maps = self.predict_batch(np.stack([p["image"] for p in good]))
            for i, (p, prob) in enumerate(zip(good, probs, strict=True)):
                p["probability"] = float(prob)
                if seg_maps is not None:
                    p["seg"] = seg_maps[i]
        for p in pieces:
            p.pop("image", None)


def load_predictor(
    ref: str, *, tracking_uri: str | None = None, device: str | None = None
) -> Predictor:
    """MODEL is `models:/NAME@ALIAS` (or `models:/NAME/VERSION`), `runs:/RUN_ID/PATH`, or a
    local model file / folder holding one."""
    model_file = _model_file(ref, tracking_uri)
    model, cfg, payload = checkpoints.build_model_from_file(model_file)
    if "threshold" in payload:
        threshold = float(payload["threshold"])
        source = f"calibrated ({payload.get('criterion', 'select')})"
    else:
        threshold, source = (
            0.5,
            "default 0.5: the model file has no calibrated threshold "
            "(use a model from `crackray select`)",
        )
    torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise CrackrayError("--device cuda: no CUDA GPU is available here")
    return Predictor(model.to(torch_device).eval(), cfg, threshold, source, model_file,
                     torch_device,
                     mask_threshold=float(payload.get("pixel_threshold", DEFAULT_MASK_THRESHOLD)),
                     tile=checkpoints.trained_tile(payload))


def _model_file(ref: str, tracking_uri: str | None) -> Path:
    if ref.startswith("models:/"):
        name, sep, which = ref.removeprefix("models:/").partition("@")
        if not sep:
            name, _, which = name.rpartition("/")
        if not name or not which:
            raise CrackrayError(f"{ref}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
        tracker = Tracker(tracking_uri)
        version = tracker.model_version(name, which)
        # Only the weights-only crackray file (a pyfunc artifact): never a pickle.
        local = tracker.download_uri(f"models:/{name}/{version.version}/artifacts/{MODEL_FILE}")
    elif ref.startswith("runs:/"):
        local = Tracker(tracking_uri).download_uri(ref)
    else:
        local = Path(ref)
        if not local.exists():
            raise CrackrayError(f"{ref}: no such model file, and not a models:/ or runs:/ URI")
    if local.is_file():
        return local
    for name in MODEL_FILE_NAMES:
        found = sorted(local.rglob(name))
        if found:
            return found[0]
    raise CrackrayError(f"{ref}: no crackray model file ({' or '.join(MODEL_FILE_NAMES)}) in it")


# ------------------------------------------------------------------------- inputs


def collect_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Files as given; folders expanded recursively to their image files (by suffix; sorted,
    hidden files skipped), so a MANIFEST.csv or notes beside the photos are not inputs."""
    files = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix.lower() in IMAGE_SUFFIXES
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
        elif path.exists():
            files.append(path)
        else:
            raise CrackrayError(f"{item}: no such file or folder")
    if not files:
        raise CrackrayError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) found")
    return files


def read_pieces(path: Path, index: int, *, image_size: int, tile: int, stride: int) -> list[dict]:
    """`pieces_from_bytes` of one file, each piece tagged with the file's index and path, or
    one error piece when the file cannot be used."""
    try:
        pieces = pieces_from_bytes(Path(path).read_bytes(), image_size=image_size, tile=tile,
                                   stride=stride)
    except (DataError, OSError) as exc:
        message = str(exc) if isinstance(exc, DataError) else f"cannot read: {exc}"
        pieces = [{"kind": "error", "x": 0, "y": 0, "width": 0, "height": 0,
                   "image_width": 0, "image_height": 0, "count": 1, "error": message,
                   "image": np.zeros((image_size, image_size, 3), np.uint8)}]
    for piece in pieces:
        piece.update(index=index, path=str(path))
        piece.setdefault("error", "")
    return pieces


# ------------------------------------------------------------------------- scoring


def _batches(pieces: Iterator[dict], size: int) -> Iterator[list[dict]]:
    batch = []
    for piece in pieces:
        batch.append(piece)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def score_local(predictor: Predictor, files: list[Path], *, tile: int, stride: int,
                batch_size: int) -> Iterator[dict]:
    """Scored pieces, file after file, in this process."""
    def pieces():
        for i, path in enumerate(tqdm(files, desc="predict", unit="file", disable=None)):
            yield from read_pieces(path, i, image_size=predictor.image_size, tile=tile,
                                   stride=stride)

    for batch in _batches(pieces(), batch_size):
        predictor.score(batch)
        yield from batch


class _ActorScorer:
    """A Ray Data actor holding the model: built once, then fed batch after batch."""

    def __init__(self, model_bytes: bytes, device: str):
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / checkpoints.BEST_FILE
            path.write_bytes(model_bytes)
            model, cfg, _ = checkpoints.build_model_from_file(path)
        self.predictor = Predictor(model.to(device), cfg, 0.5, "", path, torch.device(device))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images, ok = batch["image"], batch["error"] == ""
        out = {k: v for k, v in batch.items() if k != "image"}
        out["probability"] = np.full(len(ok), np.nan, dtype=np.float64)
        if self.predictor.segments:  # every batch has the column (zeros on errors): one schema
            out["seg"] = np.zeros(images.shape[:3], np.uint8)
        if ok.any():
            probs, seg_maps = self.predictor.predict_batch(images[ok])
            out["probability"][ok] = probs
            if seg_maps is not None:
                out["seg"][ok] = seg_maps
        return out


def score_ray(predictor: Predictor, files: list[Path], *, tile: int, stride: int,
              batch_size: int) -> Iterator[dict]:
    """Ray Data batch inference: reading / tiling in tasks, the model on actors; scored
    pieces are streamed back in whatever order they finish."""
    import ray
    import ray.data

    from crackray.runtime import ensure_ray

    ensure_ray()
    gpu = predictor.device.type == "cuda"
    # One actor per GPU; on CPU half the cores, leaving the rest to the reading tasks.
    cpus = int(ray.cluster_resources().get("CPU", 1))
    actors = int(ray.cluster_resources().get("GPU", 1)) if gpu else max(1, cpus // 2)
    image_size = predictor.image_size
    ds = ray.data.from_items([{"index": i, "path": str(p)} for i, p in enumerate(files)])
    ds = ds.flat_map(lambda row: read_pieces(Path(row["path"]), row["index"],
                                             image_size=image_size, tile=tile, stride=stride))
    ds = ds.map_batches(
        _ActorScorer,
        batch_size=batch_size,
        batch_format="numpy",
        concurrency=actors,
        num_gpus=1 if gpu else 0,
        fn_constructor_kwargs={"model_bytes": predictor.model_file.read_bytes(),
                               "device": predictor.device.type},
    )
    for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
        for i in range(len(batch["index"])):
            piece = {k: _plain(batch[k][i]) for k in batch}
            if piece["error"]:
                piece.pop("seg", None)  # as score_local: no map for an unreadable file
                piece.pop("probability", None)
            yield piece


def _plain(value):
    """A numpy scalar as a Python value; arrays (segmentation maps) stay arrays."""
    return value.item() if np.ndim(value) == 0 and hasattr(value, "item") else value


# ------------------------------------------------------------------------- the command


@dataclass
class PredictResult:
    csv_path: Path
    json_path: Path | None
    maps: list[Path]
    files: int
    pieces: int
    errors: int
    cracked: int  # files (tiles or photos) decided cracked
    seconds: float
    threshold: float
    tile: int
    stride: int
    tile_source: str

    @property
    def pieces_per_s(self) -> float:
        return self.pieces / max(self.seconds, 1e-9)


def predict(
    ref: str,
    inputs: Iterable[str | Path],
    out: str | Path,
    *,
    tile: int | None = None,
    stride: int | None = None,
    batch_size: int = 64,
    write_json: bool = False,
    device: str | None = None,
    tracking_uri: str | None = None,
    ray_threshold: int = RAY_THRESHOLD,
) -> PredictResult:
    from crackray.deploy.outputs import PredictionWriter

    predictor = load_predictor(ref, tracking_uri=tracking_uri, device=device)
    tile, stride, tile_source = predictor.window(tile, stride)
    files = collect_inputs(inputs)
    start = time.perf_counter()
    score = score_ray if len(files) > ray_threshold else score_local
    gatherer = Gatherer()
    with PredictionWriter(Path(out), predictor, ref=ref, tile=tile, stride=stride,
                          tile_source=tile_source, write_json=write_json) as writer:
        for piece in score(predictor, files, tile=tile, stride=stride, batch_size=batch_size):
            done = gatherer.add(piece)
            if done:
                writer.write_file(done)
    return PredictResult(writer.csv_path, writer.json_path, writer.maps, len(files),
                         writer.pieces, writer.errors, writer.cracked,
                         time.perf_counter() - start, predictor.threshold, tile, stride,
                         tile_source)
