"""`crackray predict`: a model on tiles, folders and full-size photos.

Tiles go through exactly the evaluation preprocessing (`decode_rgb` at the model's image size,
then `to_model_input`), so a tile gets the probability evaluation gave it. Photos larger than
the tile are cut into tile x tile windows at `stride`; each window is resized like a tile, and
the window probabilities are averaged into a crack-probability map and an overlay PNG.

A file that cannot be used (corrupt, not an image, over the decompression-bomb limit) gets an
error row; the other files are still predicted. Large folders go through Ray Data with the
model on actors.
"""

from __future__ import annotations

import csv
import io
import json
import math
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from crackray import checkpoints
from crackray.config import RunConfig
from crackray.data.images import decode_rgb, encode_png
from crackray.data.transforms import to_model_input
from crackray.engine import crack_logits, seg_probabilities, to_uint8_maps
from crackray.errors import CrackrayError, DataError
from crackray.models import model_segments
from crackray.tracking import Tracker

RAY_THRESHOLD = 2000  # files: above this, predict with Ray Data and model actors
OVERLAY_MAX_SIDE = 2048  # px: maps and overlays of big photos are saved downscaled
CSV_FIELDS = ["path", "tile", "probability", "decision", "threshold", "error"]
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

    @property
    def image_size(self) -> int:
        return self.cfg.data.image_size

    @torch.no_grad()
    def predict_batch(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """uint8 (B, H, W, 3) at the model's image size -> crack probability (B,) and, for a
        segmentation model, its crack-probability maps upsampled to H x W (uint8 0..255)."""
        outputs = self.model(to_model_input(images, self.device))
        probs = torch.sigmoid(crack_logits(outputs).float()).cpu().numpy()
        if not isinstance(outputs, tuple):
            return probs, None
        return probs, to_uint8_maps(seg_probabilities(outputs[1], images.shape[1:3]))

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        return self.predict_batch(images)[0]


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
    return Predictor(
        model.to(torch_device).eval(),
        cfg,
        threshold,
        source,
        model_file,
        torch_device,
        mask_threshold=float(payload.get("pixel_threshold", DEFAULT_MASK_THRESHOLD)),
    )


def _model_file(ref: str, tracking_uri: str | None) -> Path:
    if ref.startswith("models:/"):
        name, sep, which = ref.removeprefix("models:/").partition("@")
        if not sep:
            name, _, which = name.rpartition("/")
        if not name or not which:
            raise CrackrayError(f"{ref}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
        tracker = Tracker(tracking_uri)
        version = tracker.model_version(name, which)
        # Only the weights-only crackray file: never the pickled copy MLflow keeps beside it.
        local = tracker.download_uri(f"models:/{name}/{version.version}/extra_files/{MODEL_FILE}")
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
    """Files as given, folders expanded recursively (sorted, hidden files skipped)."""
    files = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
        elif path.exists():
            files.append(path)
        else:
            raise CrackrayError(f"{item}: no such file or folder")
    if not files:
        raise CrackrayError("no input files found")
    return files


def _starts(length: int, tile: int, stride: int) -> list[int]:
    """Window offsets covering [0, length): a last window flush with the edge if needed."""
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return starts


def _resize(window: np.ndarray, size: int) -> np.ndarray:
    """The same bilinear resize that `decode_rgb` applies to a stored tile."""
    if window.shape[:2] == (size, size):
        return np.ascontiguousarray(window)
    image = Image.fromarray(window).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def read_pieces(path: Path, index: int, *, image_size: int, tile: int, stride: int) -> list[dict]:
    """The model inputs of one file: one piece for a tile, one per window for a photo, or one
    error piece. Each piece: index, path, x, y (-1 for a tile), width, height, image, error."""

    def piece(image=None, x=-1, y=-1, width=0, height=0, error=""):
        if image is None:
            image = np.zeros((image_size, image_size, 3), np.uint8)
        return {
            "index": index,
            "path": str(path),
            "x": x,
            "y": y,
            "width": width,
            "height": height,
            "image": image,
            "error": error,
        }

    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as header:
            width, height = header.size
        if width <= tile and height <= tile or min(width, height) < tile:
            return [piece(decode_rgb(data, image_size), width=width, height=height)]
        rgb = decode_rgb(data)
    except DataError as exc:
        return [piece(error=str(exc))]
    except UnidentifiedImageError:
        return [piece(error="not an image (unrecognised file format)")]
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for broken files
        return [piece(error=f"cannot decode: {type(exc).__name__}: {exc}")]
    return [
        piece(_resize(rgb[y : y + tile, x : x + tile], image_size), x, y, width, height)
        for y in _starts(height, tile, stride)
        for x in _starts(width, tile, stride)
    ]


# ------------------------------------------------------------------------- prediction


@dataclass
class PredictResult:
    rows: list[dict]
    csv_path: Path
    json_path: Path | None
    maps: list[Path]
    files: int
    pieces: int
    errors: int
    seconds: float
    threshold: float

    @property
    def pieces_per_s(self) -> float:
        return self.pieces / max(self.seconds, 1e-9)


def _batches(pieces: Iterator[dict], size: int) -> Iterator[list[dict]]:
    batch = []
    for piece in pieces:
        batch.append(piece)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _score(predictor: Predictor, batch: list[dict]) -> None:
    """Set `probability` on every piece of the batch (NaN on error pieces)."""
    good = [p for p in batch if not p["error"]]
    if good:
        probs, seg_maps = predictor.predict_batch(np.stack([p["image"] for p in good]))
        for i, (p, prob) in enumerate(zip(good, probs, strict=True)):
            p["probability"] = float(prob)
            if seg_maps is not None:
                p["seg"] = seg_maps[i]
    for p in batch:
        p.setdefault("probability", math.nan)
        p.pop("image", None)  # keep only the numbers: a big folder must not pile up pixels


def predict_local(
    predictor: Predictor, files: list[Path], *, tile: int, stride: int, batch_size: int
) -> list[dict]:
    def pieces():
        for i, path in enumerate(tqdm(files, desc="predict", unit="file", disable=None)):
            yield from read_pieces(
                path, i, image_size=predictor.image_size, tile=tile, stride=stride
            )

    out = []
    for batch in _batches(pieces(), batch_size):
        _score(predictor, batch)
        out += batch
    return out


class _ActorScorer:
    """A Ray Data actor holding the model: built once, then fed batch after batch."""

    def __init__(self, model_bytes: bytes, device: str):
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / checkpoints.BEST_FILE
            path.write_bytes(model_bytes)
            model, cfg, _ = checkpoints.build_model_from_file(path)
        self.predictor = Predictor(model.to(device), cfg, 0.5, "", path, torch.device(device))
        self.segmentation = model_segments(cfg.model.name)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images, ok = batch["image"], batch["error"] == ""
        out = {k: v for k, v in batch.items() if k != "image"}
        out["probability"] = np.full(len(ok), np.nan, dtype=np.float64)
        if self.segmentation:  # every batch has the column (zeros on error rows): one schema
            out["seg"] = np.zeros(images.shape[:3], np.uint8)
        if ok.any():
            probs, seg_maps = self.predictor.predict_batch(images[ok])
            out["probability"][ok] = probs
            if self.segmentation:
                out["seg"][ok] = seg_maps
        return out


def predict_ray(
    predictor: Predictor, files: list[Path], *, tile: int, stride: int, batch_size: int
) -> list[dict]:
    """Ray Data batch inference: reading / tiling in tasks, the model on actors."""
    import ray
    import ray.data

    from crackray.runtime import ensure_ray

    ensure_ray()
    gpu = predictor.device.type == "cuda"
    # One actor per GPU; on CPU half the cores, leaving the rest to the reading tasks.
    cpus = int(ray.cluster_resources().get("CPU", 1))
    actors = int(ray.cluster_resources().get("GPU", 1)) if gpu else max(1, cpus // 2)
    ds = ray.data.from_items([{"index": i, "path": str(p)} for i, p in enumerate(files)])
    ds = ds.flat_map(
        lambda row: read_pieces(
            Path(row["path"]),
            row["index"],
            image_size=predictor.image_size,
            tile=tile,
            stride=stride,
        )
    )
    ds = ds.map_batches(
        _ActorScorer,
        batch_size=batch_size,
        batch_format="numpy",
        concurrency=actors,
        num_gpus=1 if gpu else 0,
        fn_constructor_kwargs={
            "model_bytes": predictor.model_file.read_bytes(),
            "device": predictor.device.type,
        },
    )
    out = []
    with tqdm(total=len(files), desc="predict (ray)", unit="file", disable=None) as bar:
        seen = set()
        for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
            for i in range(len(batch["index"])):
                row = {k: _plain(batch[k][i]) for k in batch}
                if row["error"]:
                    row.pop("seg", None)  # as predict_local: no mask for an unreadable file
                out.append(row)
                if row["index"] not in seen:
                    seen.add(row["index"])
                    bar.update(1)
    return sorted(out, key=lambda r: (r["index"], r["y"], r["x"]))


def _plain(value):
    """A numpy scalar as a Python value; arrays (segmentation maps) stay arrays."""
    return value.item() if np.ndim(value) == 0 and hasattr(value, "item") else value


def predict(
    ref: str,
    inputs: Iterable[str | Path],
    out: str | Path,
    *,
    tile: int = 256,
    stride: int = 256,
    batch_size: int = 64,
    write_json: bool = False,
    device: str | None = None,
    tracking_uri: str | None = None,
    ray_threshold: int = RAY_THRESHOLD,
) -> PredictResult:
    if stride < 1 or tile < 1:
        raise CrackrayError("--tile and --stride must be positive")
    predictor = load_predictor(ref, tracking_uri=tracking_uri, device=device)
    files = collect_inputs(inputs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    run = predict_ray if len(files) > ray_threshold else predict_local
    pieces = run(predictor, files, tile=tile, stride=stride, batch_size=batch_size)
    seconds = time.perf_counter() - start
    rows = [_row(p, predictor.threshold) for p in pieces]
    maps = _write_maps(pieces, predictor.threshold, tile, out / "maps")
    masks = _write_masks(pieces, tile, out / "masks", predictor.mask_threshold)
    maps += masks
    csv_path = out / "predictions.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    json_path = None
    if write_json:
        json_path = out / "predictions.json"
        json_path.write_text(
            json.dumps(
                {
                    "model": ref,
                    "model_file": str(predictor.model_file),
                    "threshold": predictor.threshold,
                    "threshold_source": predictor.threshold_source,
                    "mask_threshold": predictor.mask_threshold if masks else None,
                    "image_size": predictor.image_size,
                    "tile": tile,
                    "stride": stride,
                    "predictions": [
                        {
                            **r,
                            "probability": None
                            if r["probability"] == ""
                            else float(r["probability"]),
                        }
                        for r in rows
                    ],
                },
                indent=2,
            )
        )
    errors = sum(1 for r in rows if r["error"])
    return PredictResult(
        rows,
        csv_path,
        json_path,
        maps,
        len(files),
        len(rows) - errors,
        errors,
        seconds,
        predictor.threshold,
    )


def _row(piece: dict, threshold: float) -> dict:
    prob = piece["probability"]
    ok = not piece["error"]
    return {
        "path": piece["path"],
        "tile": f"{piece['x']},{piece['y']}" if piece["x"] >= 0 else "",
        "probability": f"{prob:.6f}" if ok else "",
        "decision": ("crack" if prob >= threshold else "no_crack") if ok else "error",
        "threshold": f"{threshold:.6f}",
        "error": piece["error"],
    }


# ------------------------------------------------------------------------- photo maps


def probability_map(pieces: list[dict], width: int, height: int, tile: int) -> np.ndarray:
    """Mean probability of the windows covering each pixel (float32, height x width)."""
    total = np.zeros((height, width), np.float32)
    count = np.zeros((height, width), np.float32)
    for p in pieces:
        total[p["y"] : p["y"] + tile, p["x"] : p["x"] + tile] += p["probability"]
        count[p["y"] : p["y"] + tile, p["x"] : p["x"] + tile] += 1
    return total / np.maximum(count, 1)


def _write_maps(pieces: list[dict], threshold: float, tile: int, folder: Path) -> list[Path]:
    """A greyscale probability map and a red overlay (crack decisions) per tiled photo."""
    photos: dict[int, list[dict]] = {}
    for p in pieces:
        if p["x"] >= 0:
            photos.setdefault(p["index"], []).append(p)
    written, used = [], set()
    for windows in photos.values():
        path = Path(windows[0]["path"])
        width, height = windows[0]["width"], windows[0]["height"]
        prob = probability_map(windows, width, height, tile)
        scale = min(1.0, OVERLAY_MAX_SIDE / max(width, height))
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        photo = Image.open(path).convert("RGB").resize(size, Image.Resampling.BILINEAR)
        prob_small = np.asarray(Image.fromarray(prob).resize(size, Image.Resampling.BILINEAR))
        alpha = (0.5 * (prob_small >= threshold))[..., None]
        red = np.array([255, 0, 0], np.float32)
        overlay = (np.asarray(photo, np.float32) * (1 - alpha) + red * alpha).astype(np.uint8)
        stem = path.stem
        while stem in used:
            stem += "_"
        used.add(stem)
        folder.mkdir(parents=True, exist_ok=True)
        for name, array in (
            (f"{stem}_prob.png", (prob_small * 255).round().astype(np.uint8)),
            (f"{stem}_overlay.png", overlay),
        ):
            (folder / name).write_bytes(encode_png(array))
            written.append(folder / name)
    return written


# ------------------------------------------------------------------------- segmentation masks

def _write_masks(pieces: list[dict], tile: int, folder: Path, threshold: float) -> list[Path]:
    """Segmentation models: one crack-mask PNG (0 / 255) per input file at its own size
    (crack where the probability >= threshold); a photo's windows are stitched, averaging
    where they overlap."""
    files: dict[int, list[dict]] = {}
    for p in pieces:
        if "seg" in p:
            files.setdefault(p["index"], []).append(p)
    written, used = [], set()
    for windows in files.values():
        first = windows[0]
        width, height = first["width"], first["height"]
        if first["x"] < 0:  # a tile: its map covers the whole image
            prob = _resize_map(first["seg"], width, height)
        else:
            total = np.zeros((height, width), np.float32)
            count = np.zeros((height, width), np.float32)
            for p in windows:
                h, w = min(tile, height - p["y"]), min(tile, width - p["x"])
                window = _resize_map(p["seg"], tile, tile)[:h, :w]
                total[p["y"] : p["y"] + h, p["x"] : p["x"] + w] += window
                count[p["y"] : p["y"] + h, p["x"] : p["x"] + w] += 1
            prob = total / np.maximum(count, 1)
        stem = Path(first["path"]).stem
        while stem in used:
            stem += "_"
        used.add(stem)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{stem}_mask.png"
        path.write_bytes(encode_png(((prob >= threshold) * 255).astype(np.uint8)))
        written.append(path)
    return written


def _resize_map(seg: np.ndarray, width: int, height: int) -> np.ndarray:
    """uint8 0..255 map -> float 0..1 map of the given size."""
    image = Image.fromarray(seg).resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(image, np.float32) / 255.0
