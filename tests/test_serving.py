"""The registered champion as a servable MLflow pyfunc: `mlflow models serve` answers REST
requests with the probabilities `crackray predict` gives the same files, bad requests get a
4xx and the server keeps serving, the model loads in a fresh process without Ray, and a
segmentation model returns predict's mask."""

from __future__ import annotations

import base64
import contextlib
import csv
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import SDNET
from PIL import Image

from crackray import checkpoints
from crackray.config import RunConfig
from crackray.data.prepare import prepare_synthetic
from crackray.data.synthetic import make_tile
from crackray.deploy.predict import predict
from crackray.models import create_model

SERVE_START_S = 180  # loading torch + the model in a cold process on 2 shared CPUs


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def _file_rows(result) -> dict[str, dict]:
    with result.csv_path.open() as handle:
        return {r["path"]: r for r in csv.DictReader(handle) if r["level"] == "file"}


def _bomb_png(side: int) -> bytes:
    """A tiny PNG whose header claims side x side pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def _inputs(folder: Path) -> tuple[list[Path], Path]:
    """Three real SDNET2018 tiles when the shared data is there (else synthetic ones) and a
    photo larger than a tile made of four tiles, cropped to an odd size."""
    folder.mkdir(parents=True, exist_ok=True)
    if SDNET.exists():
        tiles = [sorted((SDNET / sub).glob("*.jpg"))[0] for sub in ("D/CD", "D/UD", "P/CP")]
    else:
        rng = np.random.default_rng(0)
        tiles = []
        for i, crack in enumerate((True, False, True)):
            Image.fromarray(make_tile(rng, 256, crack)[0]).save(folder / f"tile{i}.jpg")
            tiles.append(folder / f"tile{i}.jpg")
    pixels = [np.asarray(Image.open(t).convert("RGB").resize((256, 256))) for t in tiles]
    grid = np.concatenate([np.concatenate([pixels[0], pixels[1]], axis=1),
                           np.concatenate([pixels[2], pixels[0][::-1]], axis=1)], axis=0)
    photo = folder / "photo.jpg"
    Image.fromarray(grid[:430, :500]).save(photo, quality=92)
    return tiles, photo


# ------------------------------------------------------------------------- the champion


@pytest.fixture(scope="module")
def champion(tiny_tune_job, tmp_path_factory):
    """The session's tiny tuning job, `select`ed: (tracking URI, model URI)."""
    from crackray.deploy.select import Criterion, run_selection

    store = tiny_tune_job.copy(tmp_path_factory.mktemp("serve")).uri
    run_selection(tracking_uri=store, experiment="quickstart", parent_run_id=None,
                  criterion=Criterion(0.0), alias="champion", name="crackray-serve")
    return store, "models:/crackray-serve@champion"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _post(port: int, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations", data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def _frame(*images: str) -> dict:
    return {"dataframe_split": {"columns": ["image"], "data": [[i] for i in images]}}


@pytest.fixture()
def server(champion, tmp_path):
    """`mlflow models serve` of the champion on a free loopback port: the port. Stopped by
    its process group (the server runs uvicorn as a child)."""
    store, model_uri = champion
    port = _free_port()
    # MLflow starts `uvicorn` from PATH: the venv's bin, as with an activated environment.
    env = {**os.environ, "MLFLOW_TRACKING_URI": store,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = (tmp_path / "serve.log").open("w")
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", model_uri,
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + SERVE_START_S
    try:
        while True:  # ready when /ping answers; a dead server fails at once
            assert process.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.5)
        yield port
    finally:
        with contextlib.suppress(ProcessLookupError):  # the group is gone if it died
            os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
        log.close()


@pytest.mark.slow
def test_served_champion_answers_like_predict_and_survives_bad_requests(champion, server,
                                                                        tmp_path):
    store, model_uri = champion
    tiles, photo = _inputs(tmp_path / "in")
    local = _file_rows(predict(model_uri, [*tiles, photo], tmp_path / "out",
                               tracking_uri=store))

    status, body = _post(server, _frame(*[_b64(p) for p in [*tiles, photo]]))
    assert status == 200, body
    served = pd.DataFrame(body["predictions"])
    assert list(served.columns) == ["probability", "decision", "threshold"]
    for path, row in zip([*tiles, photo], served.to_dict("records"), strict=True):
        expected = local[str(path)]
        assert row["probability"] == pytest.approx(float(expected["probability"]), abs=1e-5)
        assert row["decision"] == (expected["decision"] == "crack")
        assert row["threshold"] == pytest.approx(float(expected["threshold"]), abs=1e-6)
    assert int(local[str(photo)]["windows"]) > 1  # the photo really was cut into windows

    not_image = base64.b64encode(b"just some text, not a picture").decode()
    bomb = base64.b64encode(_bomb_png(100_000)).decode()
    for payload, message in ((_frame("%%% not base64 %%%"), "row 0: `image` is not valid base64"),
                             (_frame(_b64(tiles[0]), not_image), "row 1: not an image"),
                             (_frame(bomb), "decompression bomb")):
        status, body = _post(server, payload)
        assert 400 <= status < 500 and message in body["message"], (status, body)
        assert body["error_code"] == "INVALID_PARAMETER_VALUE"
    # Still serving, with the same answer.
    status, body = _post(server, _frame(_b64(tiles[1])))
    assert status == 200
    assert body["predictions"][0]["probability"] == pytest.approx(
        float(local[str(tiles[1])]["probability"]), abs=1e-5)


@pytest.mark.slow
def test_registered_pyfunc_loads_in_a_fresh_process_without_ray(champion, tmp_path):
    store, model_uri = champion
    tiles, photo = _inputs(tmp_path / "in")
    local = _file_rows(predict(model_uri, [*tiles, photo], tmp_path / "out",
                               tracking_uri=store))
    frame = pd.DataFrame({"image": [_b64(p) for p in [*tiles, photo]]})
    frame.to_json(tmp_path / "frame.json", orient="split")
    script = (
        "import sys, mlflow, pandas as pd\n"
        f"model = mlflow.pyfunc.load_model({model_uri!r})\n"
        f"out = model.predict(pd.read_json({str(tmp_path / 'frame.json')!r}, orient='split'))\n"
        "print(out.to_json(orient='records'))\n"
        "print('ray imported:', 'ray' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "MLFLOW_TRACKING_URI": store})
    assert done.returncode == 0, done.stderr[-3000:]
    records_line, ray_line = done.stdout.strip().splitlines()[-2:]
    assert ray_line == "ray imported: False"
    records = json.loads(records_line)
    for path, row in zip([*tiles, photo], records, strict=True):
        assert row["probability"] == pytest.approx(float(local[str(path)]["probability"]),
                                                   abs=1e-5)


# ------------------------------------------------------------------------- segmentation


@pytest.fixture(scope="module")
def segdec_pyfunc(tmp_path_factory):
    """An untrained segdec_tiny (64 px, trained on 96 px tiles) logged with `log_servable`
    and registered: (tracking URI, model file, loaded pyfunc)."""
    import mlflow

    from crackray.deploy.serving import log_servable
    from crackray.tracking import Tracker

    root = tmp_path_factory.mktemp("segserve")
    prepare_synthetic(root / "data", n=20, seed=5)
    cfg = RunConfig.model_validate({"model": {"name": "segdec_tiny"},
                                    "data": {"path": str(root / "data"), "image_size": 64}})
    torch.manual_seed(0)
    model = create_model("segdec_tiny", pretrained=False, dropout=0.0, image_size=64)
    model_file = checkpoints.save_model_file(root / "crackray_model.pt",
                                             checkpoints.cpu_state(model), cfg, tile=96,
                                             threshold=0.5, pixel_threshold=0.45)
    uri = f"sqlite:///{root}/mlflow.db"
    tracker = Tracker(uri)
    run_id = tracker.find_or_create_run("serve-test", "k", run_name="r", kind="select")
    version = tracker.register(log_servable(tracker, run_id, model_file, {"threshold": 0.5}),
                               "crackray-seg", "champion")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    info = mlflow.models.get_model_info(f"models:/crackray-seg/{version}")
    assert [c["name"] for c in info.signature.inputs.to_dict()] == ["image"]
    assert [c["name"] for c in info.signature.outputs.to_dict()] == [
        "probability", "decision", "threshold", "mask"]
    assert info.saved_input_example_info["type"] == "dataframe"
    return uri, model_file, mlflow.pyfunc.load_model("models:/crackray-seg@champion")


def test_segdec_pyfunc_returns_predicts_mask_and_probability(segdec_pyfunc, tmp_path):
    _, model_file, pyfunc = segdec_pyfunc
    rng = np.random.default_rng(9)
    Image.fromarray(rng.integers(0, 255, (150, 200, 3), np.uint8)).save(tmp_path / "photo.png")
    Image.fromarray(rng.integers(0, 255, (80, 80, 3), np.uint8)).save(tmp_path / "tile.png")
    files = [tmp_path / "photo.png", tmp_path / "tile.png"]
    result = predict(str(model_file), files, tmp_path / "out")
    local = _file_rows(result)
    out = pyfunc.predict(pd.DataFrame({"image": [_b64(p) for p in files]}))
    for path, row in zip(files, out.to_dict("records"), strict=True):
        assert row["probability"] == pytest.approx(float(local[str(path)]["probability"]),
                                                   abs=1e-5)
        mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(row["mask"]))))
        written = np.asarray(Image.open(tmp_path / "out" / "masks" / f"{path.stem}_mask.png"))
        np.testing.assert_array_equal(mask, written)
    assert out["mask"].map(lambda m: len(m) > 0).all()


def test_bad_inputs_are_invalid_parameters_naming_the_row(segdec_pyfunc, tmp_path):
    from mlflow.exceptions import MlflowException

    _, _, pyfunc = segdec_pyfunc
    Image.new("RGB", (64, 64), (120, 120, 120)).save(tmp_path / "ok.png")
    good = _b64(tmp_path / "ok.png")
    cases = [
        ([good, "not base64!"], "row 1: `image` is not valid base64"),
        ([base64.b64encode(b"hello").decode()], "row 0: not an image"),
        ([good, good, base64.b64encode(_bomb_png(100_000)).decode()],
         "row 2: .*decompression bomb"),
        ([base64.b64encode(_bomb_png(7_000)).decode()],  # past crackray's limit, not Pillow's
         "row 0: image of 7000x7000 pixels exceeds the limit"),
        ([base64.b64encode(b"").decode()], "row 0: empty file"),
    ]
    for images, message in cases:
        with pytest.raises(MlflowException, match=message) as info:
            pyfunc.predict(pd.DataFrame({"image": images}))
        assert info.value.get_http_status_code() == 400
