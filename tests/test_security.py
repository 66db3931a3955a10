"""Security (issue 7, item 6): model files never run pickled code, decompression bombs and
non-images are refused, `crackray ui` binds loopback by default, secrets stay out of MLflow.
"""

from __future__ import annotations

import ast
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import crackray
from crackray import checkpoints
from crackray.config import RunConfig
from crackray.data.images import decode_rgb, encode_png, sniff_bytes
from crackray.errors import CrackrayError, DataError
from crackray.runs import run_params
from crackray.tracking import Tracker

pytestmark = pytest.mark.faults
PACKAGE = Path(crackray.__file__).parent


class _Payload:
    """Pickles as "call os.system(command)": what a booby-trapped model file carries."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_model_file_with_pickled_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "best_model.pt"
    torch.save({"model_state": {}, "config": RunConfig().model_dump(),
                "extra": _Payload(f"touch {marker}")}, evil)

    with pytest.raises(CrackrayError, match="not a readable crackray model file") as info:
        checkpoints.build_model_from_file(evil)
    assert str(evil) in str(info.value)
    assert not marker.exists()  # the payload did not run

    # Control: the file really is armed; an unsafe load would have run it.
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_every_torch_load_in_the_package_is_weights_only():
    unsafe = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            if name in ("pickle.load", "pickle.loads", "mlflow.pytorch.load_model"):
                unsafe.append(f"{path.name}:{node.lineno} {name}")
            if name == "torch.load":
                flags = {k.arg: ast.unparse(k.value) for k in node.keywords}
                if flags.get("weights_only") != "True":
                    unsafe.append(f"{path.name}:{node.lineno} torch.load without weights_only")
    assert not unsafe


def _png_claiming(width: int, height: int) -> bytes:
    """A ~60-byte PNG whose header claims width x height pixels (a decompression bomb)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [8_000, 100_000])  # past crackray's limit; past Pillow's too
def test_decompression_bomb_is_refused_before_decoding(side):
    bomb = _png_claiming(side, side)
    assert len(bomb) < 100
    with pytest.raises(DataError, match="decompression bomb"):
        decode_rgb(bomb)
    assert "decompression bomb" in sniff_bytes(bomb)
    # A genuine image of the same format still decodes.
    tile = np.full((8, 8, 3), 200, np.uint8)
    assert (decode_rgb(encode_png(tile)) == tile).all()


def test_predict_reports_bombs_and_non_images_per_file(tmp_path):
    predict = pytest.importorskip("crackray.deploy.predict")
    bomb, text = tmp_path / "bomb.png", tmp_path / "notes.jpg"
    bomb.write_bytes(_png_claiming(100_000, 100_000))
    text.write_text("this is not an image\n")
    for path, reason in ((bomb, "decompression bomb"), (text, "not an image")):
        pieces = predict.read_pieces(path, 0, image_size=32, tile=256, stride=256)
        assert len(pieces) == 1 and reason in pieces[0]["error"], pieces[0]["error"]


def test_ui_binds_loopback_unless_told(monkeypatch, tmp_path):
    ui = pytest.importorskip("crackray.ui")
    from crackray.cli import main

    launched = []
    monkeypatch.setattr(ui.os, "execve", lambda exe, argv, env: launched.append(argv))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    for extra, host in (([], "127.0.0.1"), (["--host", "0.0.0.0"], "0.0.0.0")):
        done = CliRunner().invoke(main, ["ui", "--tracking-uri", uri, *extra])
        assert done.exit_code == 0, done.output
        argv = launched[-1]
        assert argv[argv.index("--host") + 1] == host


def test_no_secret_reaches_params_or_tags(monkeypatch, tmp_path):
    """The params a real run logs (run_params: the flattened config, digest, versions) with a
    password in the tracking URI and tokens in the environment."""
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-S3CRET-env")
    monkeypatch.setenv("CRACKRAY_API_TOKEN", "tok-S3CRET-env")
    cfg = RunConfig.model_validate(
        {"tracking": {"uri": "https://alice:pw-S3CRET@mlflow.internal:5000"}})
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = tracker.find_or_create_run("secrets", "train/x", run_name="x", kind="train")
    tracker.log_params(run_id, {**run_params(cfg, {"digest": "d", "dataset": "synthetic"}),
                                "tracking.password": "pw-S3CRET"})
    tracker.set_tags(run_id, {"crackray.tracking_uri": cfg.tracking.uri})

    run = tracker.client.get_run(run_id)
    logged = {**run.data.params, **run.data.tags}
    assert run.data.params["tracking.uri"] == "https://alice:***@mlflow.internal:5000"
    assert "tracking.password" not in run.data.params
    leaks = {k: v for k, v in logged.items() if "S3CRET" in f"{k}={v}"}
    assert not leaks
