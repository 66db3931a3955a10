"""`crackray ui` in a real browser: headless Chromium (Debian's package) driven by selenium
opens the MLflow UI over a store filled by a tiny tuning job, expands the job's parent run to
its trial runs and opens a trial's confusion-matrix image."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1600,1000"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
                       reason="needs Debian's chromium and chromium-driver "
                              "(apt-get install chromium chromium-driver; .ci/run installs them)"),
]
webdriver = pytest.importorskip("selenium.webdriver",
                                reason="needs selenium (pip install -e '.[dev]')")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from test_select import tune_store  # noqa: E402


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ui")
    tune_store(folder)
    return folder


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def ui_url(store_dir):
    """`crackray ui` on a free port, in its own session so the test stops exactly the server
    and the workers it started."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    log = (store_dir / "ui.log").open("w")
    server = subprocess.Popen([str(Path(sys.executable).parent / "crackray"), "ui",
                               "--port", str(port)], cwd=store_dir, env=env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("crackray ui did not come up:\n"
                                + (store_dir / "ui.log").read_text()[-3000:])
                time.sleep(0.5)
        assert f"http://127.0.0.1:{port}" in (store_dir / "ui.log").read_text()
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()


@pytest.fixture()
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _wait_text(driver, text: str, timeout: float = 60):
    WebDriverWait(driver, timeout).until(
        ec.presence_of_element_located((By.XPATH, f"//*[text()='{text}']")))


def _click_text(driver, text: str, timeout: float = 60):
    WebDriverWait(driver, timeout).until(
        ec.element_to_be_clickable((By.XPATH, f"//*[text()='{text}']"))).click()


def test_ui_shows_trials_under_the_job_and_the_confusion_matrix(store_dir, ui_url, browser,
                                                                 tmp_path):
    from crackray.tracking import Tracker

    tracker = Tracker(f"sqlite:///{store_dir / 'mlflow.db'}")
    parent = tracker.latest_run_anywhere("tune")
    trials = tracker.child_runs(parent.info.run_id, kind="trial")
    assert len(trials) == 2
    experiment = parent.info.experiment_id

    browser.get(f"{ui_url}/#/experiments/{experiment}/runs")
    _wait_text(browser, parent.info.run_name)
    for trial in trials:  # collapsed under their parent until it is expanded
        assert not browser.find_elements(By.XPATH, f"//*[text()='{trial.info.run_name}']")
    browser.find_element(By.CSS_SELECTOR,
                         "button[data-component-id*=runnamecellrenderer]").click()
    for trial in trials:
        _wait_text(browser, trial.info.run_name)
    browser.save_screenshot(str(tmp_path / "experiment.png"))

    child = trials[0]
    browser.get(f"{ui_url}/#/experiments/{experiment}/runs/{child.info.run_id}/artifacts")
    _click_text(browser, "val")
    _click_text(browser, "confusion_matrix.png")
    # The UI shows artifacts as blob: images; it must be the logged figure, pixel size and all.
    image = WebDriverWait(browser, 60).until(lambda d: next(
        (img for img in d.find_elements(By.CSS_SELECTOR, "img[src^='blob:']")
         if d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0",
                             img)), False))
    shown = browser.execute_script(
        "return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image)
    logged = Image.open(tracker.download(child.info.run_id, "val/confusion_matrix.png"))
    assert tuple(shown) == logged.size
    shot = tmp_path / "confusion_matrix.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
