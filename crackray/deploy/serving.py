"""The registered champion as an MLflow pyfunc: image bytes in, decisions out, so that
`mlflow models serve -m models:/NAME@ALIAS --env-manager local` deploys it as it is.

Input: a DataFrame with a column `image` of base64-encoded image bytes (JPEG, PNG, ...; a
tile, or a photo of any size that is cut into windows exactly as `crackray predict` cuts it,
by the same `tiling.pieces_from_bytes`). Output: one row per input with `probability` (a
photo's highest window's), `decision` (probability >= the calibrated `threshold`),
`threshold`, and for a segmentation model `mask`, a base64 PNG (0 / 255) at the image's size.

The model's artifacts are the weights-only crackray model file and nothing pickled but this
small class; its code is the installed `crackray` package (the serving environment must have
it: `--env-manager local` in crackray's environment). Ray is never imported.

A bad request (not base64, not an image, a decompression bomb) raises an MlflowException
with INVALID_PARAMETER_VALUE, which the scoring server answers with HTTP 400 and the
message, and keeps serving.
"""

from __future__ import annotations

import base64
import binascii
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

from crackray.data.images import encode_png
from crackray.deploy.tiling import image_probability, pieces_from_bytes, stitched_seg
from crackray.errors import DataError
from crackray.scratch import scratch_folder

ARTIFACT = "crackray_model"  # the key of the model file in the pyfunc's artifacts
BATCH = 64  # windows per forward pass


def _bad_request(message: str):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def decode_b64(value, row: int) -> bytes:
    if not isinstance(value, str | bytes):
        raise _bad_request(f"row {row}: `image` must be a base64 string, got "
                           f"{type(value).__name__}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _bad_request(f"row {row}: `image` is not valid base64 ({exc})") from None


# No type hints on `predict`: MLflow would derive the signature from them and then serve only
# the `inputs` payload, not `dataframe_split`; the signature is logged explicitly instead
# (MLflow warns once about the missing hints).
class CrackDetector(PythonModel):
    """Loads `crackray_model.pt` through `load_predictor`, as `crackray predict` does."""

    def load_context(self, context) -> None:
        from crackray.deploy.predict import load_predictor

        self.use(load_predictor(context.artifacts[ARTIFACT]))

    def use(self, predictor) -> None:
        """Predict with `predictor`, cutting photos at its training scale."""
        self.predictor = predictor
        self.tile, self.stride, _ = predictor.window(None, None)

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        if not isinstance(model_input, pd.DataFrame) or "image" not in model_input.columns:
            raise _bad_request("input must be a DataFrame with a column `image` "
                               "(base64-encoded image bytes)")
        images = []
        for row, value in enumerate(model_input["image"]):
            try:
                images.append(pieces_from_bytes(decode_b64(value, row),
                                                image_size=self.predictor.image_size,
                                                tile=self.tile, stride=self.stride))
            except DataError as exc:
                raise _bad_request(f"row {row}: {exc}") from None
        flat = [piece for pieces in images for piece in pieces]
        for start in range(0, len(flat), BATCH):
            self.predictor.score(flat[start : start + BATCH])
        threshold = self.predictor.threshold
        out = pd.DataFrame({"probability": [image_probability(p) for p in images]})
        out["decision"] = out["probability"] >= threshold
        out["threshold"] = threshold
        if self.predictor.segments:
            out["mask"] = [self._mask(pieces) for pieces in images]
        return out

    def _mask(self, pieces: list[dict]) -> str:
        mask = stitched_seg(pieces, self.tile) >= self.predictor.mask_threshold
        return base64.b64encode(encode_png((mask * 255).astype(np.uint8))).decode("ascii")


def example_image(size: int) -> str:
    """A mid-grey size x size PNG tile, base64: the logged input example."""
    grey = np.full((size, size, 3), 128, np.uint8)
    return base64.b64encode(encode_png(grey)).decode("ascii")


def pip_requirements() -> list[str]:
    """What the model needs, pinned to this environment (for `--env-manager local` these
    document it; crackray itself is not on PyPI, so other managers need it installed)."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in
            ("crackray", "mlflow", "torch", "torchvision", "timm", "pillow", "numpy", "pandas")]


def log_servable(tracker, run_id: str, model_file, metadata: dict) -> str:
    """Log `model_file` (a calibrated crackray model file) as the servable pyfunc in
    `run_id`, with a signature and an input example computed by the model itself; the model
    URI."""
    from mlflow.models import infer_signature

    from crackray.deploy.predict import MODEL_FILE, load_predictor

    if Path(model_file).name != MODEL_FILE:  # the artifact keeps its name; predict wants this
        named = scratch_folder("servable-") / MODEL_FILE
        shutil.copyfile(model_file, named)
        model_file = named
    detector = CrackDetector()
    detector.use(load_predictor(str(model_file), device="cpu"))
    # Two tiles of the model's training size: what a client sends, and the rows it gets.
    example = pd.DataFrame({"image": [example_image(detector.tile)] * 2})
    output = detector.predict(None, example)
    # A fresh instance is pickled: the weights travel as the model file, not inside it.
    return tracker.log_pyfunc_model(
        run_id, CrackDetector(), artifacts={ARTIFACT: str(model_file)}, input_example=example,
        signature=infer_signature(example, output), metadata=metadata,
        pip_requirements=pip_requirements())
