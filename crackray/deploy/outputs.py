"""What `crackray predict` writes, file by file as results come in: `predictions.csv` (and
optionally `predictions.json`), probability maps and overlays of photos, segmentation masks.

Rows: every input file has one `file` row (a tile's probability, a photo's highest window's,
or the error); a photo also has one `window` row per window. `x`, `y`, `width`, `height` are
the region of the (EXIF-upright) image a row covers: the whole image for a `file` row.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

from crackray.data.images import encode_png
from crackray.deploy.tiling import (
    WINDOW,
    decode_upright,
    image_probability,
    probability_map,
    stitched_seg,
)

OVERLAY_MAX_SIDE = 2048  # px: maps and overlays of big photos are saved downscaled
CSV_FIELDS = ["path", "level", "x", "y", "width", "height", "windows", "probability",
              "decision", "threshold", "error"]


def decision(probability: float, threshold: float) -> str:
    return "crack" if probability >= threshold else "no_crack"


class PredictionWriter:
    """Streams rows to CSV / JSON and writes each photo's maps as soon as it is complete."""

    def __init__(self, out: Path, predictor, *, ref: str, tile: int, stride: int,
                 tile_source: str, write_json: bool):
        out.mkdir(parents=True, exist_ok=True)
        self.out, self.predictor, self.tile = out, predictor, tile
        self.threshold = predictor.threshold
        self.csv_path = out / "predictions.csv"
        self.json_path = out / "predictions.json" if write_json else None
        self.maps: list[Path] = []
        self.pieces = self.errors = self.cracked = 0
        self._stems: set[str] = set()
        self._csv_handle = self.csv_path.open("w", newline="")
        self._csv = csv.DictWriter(self._csv_handle, fieldnames=CSV_FIELDS)
        self._csv.writeheader()
        self._json = None
        self._json_rows = 0
        if self.json_path:
            # The header now, the rows as they come: valid JSON once closed, never in memory.
            header = {
                "model": ref, "model_file": str(predictor.model_file),
                "threshold": predictor.threshold, "threshold_source": predictor.threshold_source,
                "mask_threshold": predictor.mask_threshold if predictor.segments else None,
                "image_size": predictor.image_size, "tile": tile, "tile_source": tile_source,
                "stride": stride,
            }
            self._json = self.json_path.open("w")
            self._json.write(json.dumps(header, indent=2)[:-2] + ',\n  "predictions": [')

    def __enter__(self) -> PredictionWriter:
        return self

    def __exit__(self, *exc) -> None:
        self._csv_handle.close()
        if self._json:
            self._json.write("\n  ]\n}\n")
            self._json.close()

    def _row(self, row: dict) -> None:
        self._csv.writerow(row)
        if self._json:
            value = row["probability"]
            item = {**row, "probability": float(value) if value != "" else None}
            self._json.write(("," if self._json_rows else "") + "\n    " + json.dumps(item))
            self._json_rows += 1

    def write_file(self, pieces: list[dict]) -> None:
        """One input file's scored pieces (all of them): its rows, maps and mask."""
        first = pieces[0]
        base = {"path": first["path"], "threshold": f"{self.threshold:.6f}"}
        if first["error"]:
            self.errors += 1
            self._row({**base, "level": "file", "x": "", "y": "", "width": "", "height": "",
                       "windows": 0, "probability": "", "decision": "error",
                       "error": first["error"]})
            self._csv_handle.flush()
            return
        self.pieces += len(pieces)
        windows = first["kind"] == WINDOW
        if windows:
            for p in pieces:
                self._row({**base, "level": "window", "x": p["x"], "y": p["y"],
                           "width": p["width"], "height": p["height"], "windows": 1,
                           "probability": f"{p['probability']:.6f}",
                           "decision": decision(p["probability"], self.threshold),
                           "error": ""})
        probability = image_probability(pieces)
        self.cracked += probability >= self.threshold
        self._row({**base, "level": "file", "x": 0, "y": 0, "width": first["image_width"],
                   "height": first["image_height"], "windows": len(pieces) if windows else 1,
                   "probability": f"{probability:.6f}",
                   "decision": decision(probability, self.threshold), "error": ""})
        self._csv_handle.flush()
        stem = self._stem(Path(first["path"]).stem)
        if windows:
            self._write_map(pieces, stem)
        if "seg" in first:
            mask = stitched_seg(pieces, self.tile) >= self.predictor.mask_threshold
            self._save(self.out / "masks" / f"{stem}_mask.png", (mask * 255).astype(np.uint8))

    def _stem(self, stem: str) -> str:
        while stem in self._stems:  # photos of one name in two folders
            stem += "_"
        self._stems.add(stem)
        return stem

    def _save(self, path: Path, array: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_png(array))
        self.maps.append(path)

    def _write_map(self, windows: list[dict], stem: str) -> None:
        """A greyscale probability map and a red overlay (crack decisions) of a photo."""
        width, height = windows[0]["image_width"], windows[0]["image_height"]
        prob = probability_map(windows)
        scale = min(1.0, OVERLAY_MAX_SIDE / max(width, height))
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        photo = Image.fromarray(decode_upright(Path(windows[0]["path"]).read_bytes()))
        photo = photo.resize(size, Image.Resampling.BILINEAR)
        prob_small = np.asarray(Image.fromarray(prob).resize(size, Image.Resampling.BILINEAR))
        alpha = (0.5 * (prob_small >= self.threshold))[..., None]
        red = np.array([255, 0, 0], np.float32)
        overlay = (np.asarray(photo, np.float32) * (1 - alpha) + red * alpha).astype(np.uint8)
        self._save(self.out / "maps" / f"{stem}_prob.png",
                   (prob_small * 255).round().astype(np.uint8))
        self._save(self.out / "maps" / f"{stem}_overlay.png", overlay)
