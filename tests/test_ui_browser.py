"""`crackray ui` in a real browser: headless Chromium (Debian's package) driven by selenium
opens the URL `crackray ui` prints over a store filled by a tiny tuning job: the Runs table in
model-training mode, the job's parent run expanded to its trial runs with `val/*` metric
columns on offer, a trial's page with its datasets and logged model, and a trial's
confusion-matrix image. Screenshots go to /tmp/crackray-ui-*.png for a person to look at."""

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

from crackray.tracking import DATASET_CONTEXT_TAG  # noqa: E402


@pytest.fixture(scope="module")
def store_dir(tiny_tune_job, tmp_path_factory) -> Path:
    """A folder whose ./mlflow.db (what `crackray ui` opens by default) holds the job; a copy,
    as the UI's server opens its store read-write."""
    return tiny_tune_job.copy(tmp_path_factory.mktemp("ui")).db.parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


SHOTS = Path("/tmp")


@pytest.fixture()
def ui_url(store_dir):
    """`crackray ui` on a free port, in its own session so the test stops exactly the server
    and the workers it started; yields (server address, the URL it printed)."""
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
        printed = (store_dir / "ui.log").read_text().split()
        shown = next(word for word in printed if word.startswith(f"{url}/"))
        yield url, shown
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


def _job(store_dir):
    from crackray.tracking import Tracker

    tracker = Tracker(f"sqlite:///{store_dir / 'mlflow.db'}")
    parent = tracker.latest_run_anywhere("tune")
    trials = tracker.child_runs(parent.info.run_id, kind="trial")
    assert len(trials) == 2
    return tracker, parent, trials


def test_ui_url_opens_the_runs_table_of_every_trial_with_val_metrics(store_dir, ui_url,
                                                                     browser):
    _, parent, trials = _job(store_dir)
    _, shown = ui_url
    browser.get(shown)
    # Model-training mode: the Runs table, not MLflow 3's GenAI overview (Traces, Token usage).
    _wait_text(browser, "Runs")
    _wait_text(browser, parent.info.run_name)
    assert "workflowType=machine_learning" in browser.current_url
    assert f"/experiments/{parent.info.experiment_id}/runs" in browser.current_url
    browser.find_element(By.CSS_SELECTOR,
                         "button[data-component-id*=runnamecellrenderer]").click()
    for trial in trials:
        _wait_text(browser, trial.info.run_name)
    _click_text(browser, "Columns")
    logged = sorted(k for k in trials[0].data.metrics if k.startswith("val/"))
    assert {"val/objective", "val/f1", "val/ap"} <= set(logged)
    for key in logged:  # every val/* metric is a column the table offers
        _wait_text(browser, key)
    browser.save_screenshot(str(SHOTS / "crackray-ui-runs-table.png"))


def test_a_run_page_shows_its_datasets_and_logged_model(store_dir, ui_url, browser):
    _, parent, trials = _job(store_dir)
    url, _ = ui_url
    trial = trials[0]
    model_id = trial.data.tags["crackray.best_model_id"]
    browser.get(f"{url}/#/experiments/{parent.info.experiment_id}/runs/{trial.info.run_id}"
                "?workflowType=machine_learning")
    train_input = next(i for i in trial.inputs.dataset_inputs
                       if i.dataset.name.endswith("/train"))
    dataset = train_input.dataset
    # The dataset's name and digest (the label may be split over nested elements).
    WebDriverWait(browser, 60).until(ec.presence_of_element_located(
        (By.XPATH, f"//*[contains(., '{dataset.name}') and contains(., '{dataset.digest}')]")))
    # The dataset's context as logged ("training"; the UI capitalises it with CSS only).
    context = next(t.value for t in train_input.tags if t.key == DATASET_CONTEXT_TAG)
    assert context == "training"
    _wait_text(browser, context)
    heading = WebDriverWait(browser, 60).until(ec.presence_of_element_located(
        (By.XPATH, "//*[text()='Logged models (1)']")))
    link = WebDriverWait(browser, 60).until(ec.presence_of_element_located(
        (By.XPATH, f"//a[contains(@href, '/models/{model_id}')]")))
    assert link.text == "best_model"
    browser.execute_script("arguments[0].scrollIntoView()", heading)
    browser.save_screenshot(str(SHOTS / "crackray-ui-run-page.png"))


def test_ui_shows_trials_under_the_job_and_the_confusion_matrix(store_dir, ui_url, browser,
                                                                 tmp_path):
    tracker, parent, trials = _job(store_dir)
    experiment = parent.info.experiment_id
    ui_url, _ = ui_url

    browser.get(f"{ui_url}/#/experiments/{experiment}/runs?workflowType=machine_learning")
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
