"""The web console in a real browser: Debian's chromium, headless, driven by Selenium.

One embedded console (the local folder, SQLite and its own daemon) serves the whole module. The
browser logs in, uploads the sample video through the form, watches the job succeed, opens the
splat in the viewer and checks that the canvas really drew it, then resubmits with a changed export
setting (the earlier stages are reused) and cancels a running job. Screenshots are kept in
test-artifacts/console/.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from codsplat.pipeline.contract import MEDIA_SUFFIXES
from conftest import ROOT, SAMPLE
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select
from servers import free_port, start

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
ARTIFACTS = ROOT / "test-artifacts" / "console"
TOKEN = "browser-test-token"
TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")


@pytest.fixture(scope="module")
def console(tmp_path_factory):
    assert CHROMIUM.exists() and CHROMEDRIVER.exists(), "install Debian's chromium and chromium-driver (.ci/run does)"
    assert (ROOT / "orchestrator/console/static/dist/viewer.js").exists(), "run `npm ci && npm run build` (.ci/run does)"
    home = tmp_path_factory.mktemp("console")
    port = free_port()
    server = start("console", [sys.executable, "-m", "codsplat.orchestrator.cli", "console", "--embedded", str(home),
                               "--port", str(port)], f"http://127.0.0.1:{port}", "/health",
                   env={"CODSPLAT_CONSOLE_TOKEN": TOKEN}, timeout=60)
    try:
        yield server.url, home
    finally:
        server.stop()  # the console and, in its process group, its daemon
        for pid_file in home.glob("results/*/.run.pid"):  # a pipeline run outlives its daemon (to resume later)
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900",
                "--use-angle=swiftshader", "--enable-unsafe-swiftshader"):  # WebGL2 on the CPU
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_script_timeout(30)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


def wait(predicate, timeout, what, interval=0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def page_state(driver) -> str | None:
    # one script call: the page re-renders while a job runs, so an element found now may be gone next
    return driver.execute_script("return document.querySelector('#job-view h2 .state')?.dataset.state ?? null")


def row_state(driver, job_id) -> str | None:
    return driver.execute_script(
        "return document.querySelector(`tr[data-job='${arguments[0]}'] .state`)?.dataset.state ?? null", job_id)


# the fewest steps that still give a splat the viewer draws over most of its canvas
SHORT = {"train.steps": 150, "train.refine_start": 50, "train.refine_stop": 120, "export.min_psnr": 10}


def fill(driver, form: str, values: dict) -> None:
    """Type settings into a form's fields, opening the section each one is folded in."""
    for field, value in values.items():
        box = driver.find_element(By.CSS_SELECTOR, f'{form} [data-field="{field}"]')
        driver.execute_script("arguments[0].closest('details').open = true", box)
        box.clear()
        box.send_keys(str(value))


def submit_sample(driver, url, preset="tiny", settings=None) -> str:
    driver.get(url + "/")
    wait(lambda: driver.find_elements(By.ID, "media"), 30, "the new-job form")
    picker = driver.find_element(By.ID, "media")
    assert picker.get_attribute("accept") == ",".join(MEDIA_SUFFIXES)  # the files the worker reads, .avi too
    picker.send_keys(str(SAMPLE))
    if preset:
        Select(driver.find_element(By.CSS_SELECTOR, '[data-field="preset"]')).select_by_value(preset)
    fill(driver, "#new-job", settings or {})
    driver.find_element(By.ID, "submit-job").click()
    wait(lambda: "/jobs/" in driver.current_url, 60, "the job page after the upload")
    return driver.current_url.rsplit("/", 1)[1]


def canvas_image(driver) -> np.ndarray:
    png = driver.find_element(By.CSS_SELECTOR, "#viewer canvas").screenshot_as_png
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)


def test_login_upload_watch_view_resubmit_and_cancel(console, browser):
    url, home = console
    # no session: the console sends the browser to its login page
    browser.get(url + "/")
    assert "/login" in browser.current_url
    browser.find_element(By.ID, "token").send_keys("not-the-token")
    browser.find_element(By.ID, "login").click()
    error = wait(lambda: browser.find_elements(By.CLASS_NAME, "error"), 10, "the login error")
    assert "not right" in error[0].text
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "login").click()
    wait(lambda: browser.current_url.rstrip("/") == url, 10, "the job list")

    # the form is the job schema: every setting of every section is a field
    wait(lambda: browser.find_elements(By.CSS_SELECTOR, "[data-field]"), 30, "the settings form")
    fields = {e.get_attribute("data-field") for e in browser.find_elements(By.CSS_SELECTOR, "[data-field]")}
    schema = json.loads((ROOT / "jobspecs" / "job.schema.json").read_text())
    for section in ("frames", "sfm", "train", "export", "compute", "notify"):
        ref = schema["properties"][section]["$ref"].split("/")[-1]
        assert {f"{section}.{k}" for k in schema["$defs"][ref]["properties"]} <= fields, section
    assert "preset" in fields

    # upload the sample (multipart, straight into the folder) and watch the job to the end
    job_id = submit_sample(browser, url, settings=SHORT)
    seen = set()
    wait(lambda: seen.add(page_state(browser)) or page_state(browser) in TERMINAL, 900, "the job to end", 1.0)
    browser.save_screenshot(str(ARTIFACTS / "job.png"))
    assert page_state(browser) == "SUCCEEDED", browser.find_element(By.ID, "job-view").text
    assert "RUNNING" in seen or "QUEUED" in seen or "SUBMITTED" in seen  # it was watched, not found finished
    history = [e.get_attribute("data-state") for e in browser.find_elements(By.CSS_SELECTOR, "#job-history .state")]
    assert history == ["RECEIVED", "VALIDATED", "QUEUED", "RUNNING", "SUCCEEDED"]
    psnr = float(browser.find_element(By.ID, "metric-psnr").text.split()[0])
    record = json.loads(subprocess.run([sys.executable, "-m", "codsplat.orchestrator.cli", "jobs", "show", job_id,
                                        "--embedded", str(home)], capture_output=True, text=True, check=True).stdout)
    assert record["state"] == "SUCCEEDED" and abs(record["result"]["metrics"]["psnr"] - psnr) < 0.01
    previews = browser.find_elements(By.CSS_SELECTOR, ".previews img")
    assert previews and all(browser.execute_script("return arguments[0].naturalWidth", img) > 0 for img in previews)

    # the list shows it too
    browser.get(url + "/")
    assert wait(lambda: row_state(browser, job_id), 30, "the job row") == "SUCCEEDED"
    browser.save_screenshot(str(ARTIFACTS / "jobs.png"))

    # the viewer draws the splat, and moving the camera changes the picture
    browser.get(f"{url}/jobs/{job_id}/view")
    state = wait(lambda: browser.execute_script(
        "const v = window.codsplatViewer; return v && (v.ready || v.error) ? v : null"), 90, "the viewer")
    assert state["ready"] and not state.get("error") and state["splats"] == record["result"]["metrics"]["gaussians"]
    # it opened where the first held-out photo was taken (docs/console.md), looking the way it looked
    photo = json.loads((home / f"results/{job_id}/export/cameras.json").read_text())["views"][0]
    assert state["opened_at"] == photo["name"] == "frame_00000.jpg"
    c2w = np.linalg.inv(np.array(photo["world_to_camera"]))
    rdf_to_world = np.diag([1.0, -1.0, -1.0])  # the viewer's world turns the cameras' RDF axes over x
    assert np.allclose(state["camera"]["position"], rdf_to_world @ c2w[:3, 3], atol=1e-4)
    assert np.allclose(state["camera"]["up"], rdf_to_world @ -c2w[:3, 1], atol=1e-4)
    assert abs(state["camera"]["fov"] - np.degrees(2 * np.arctan(photo["height"] / (2 * photo["fy"])))) < 1e-3
    first = canvas_image(browser)
    browser.save_screenshot(str(ARTIFACTS / "viewer.png"))
    background = np.array([16, 20, 24])
    assert first.std() > 20 and (np.abs(first - background).sum(-1) > 30).mean() > 0.5, "the canvas is blank"
    # an idle viewer draws nothing; moving the camera draws until the new view's sort is on screen
    drawn = browser.execute_script("return window.codsplatViewer.frames")
    time.sleep(1.0)
    assert browser.execute_script("return window.codsplatViewer.frames") == drawn, "an idle viewer kept drawing"
    browser.execute_script("window.codsplatViewer.orbit(30)")
    wait(lambda: browser.execute_script(
        "const v = window.codsplatViewer; return v.ready && v.frames > arguments[0]", drawn), 60, "the orbited view")
    second = canvas_image(browser)
    Image.fromarray(second.astype(np.uint8)).save(ARTIFACTS / "viewer-orbit.png")
    assert np.abs(first - second).mean() > 8, "the picture did not change with the camera"

    # resubmit with another export setting: frames, SfM and training are reused, export runs again
    browser.get(f"{url}/jobs/{job_id}")
    wait(lambda: browser.find_elements(By.CSS_SELECTOR, "#resubmit > summary"), 30, "the resubmit form")[0].click()
    fill(browser, "#resubmit", {"export.min_psnr": 11})
    browser.find_element(By.ID, "resubmit-job").click()
    wait(lambda: browser.current_url.endswith(f"/jobs/{job_id}-r2"), 30, "the resubmitted job's page")
    wait(lambda: page_state(browser) in TERMINAL, 300, "the resubmitted job to end", 1.0)
    assert page_state(browser) == "SUCCEEDED"
    runs = [json.loads(line)["stage"] for line in (home / f"results/{job_id}-r2/runs.jsonl").read_text().splitlines()]
    assert runs == ["export"]
    document = json.loads((home / f"jobs/console/{job_id}-r2.json").read_text())
    assert document["export"]["min_psnr"] == 11 and document["preset"] == "tiny" and document["train"]["steps"] == 150

    # cancel a job while it runs
    other = submit_sample(browser, url, preset=None)
    wait(lambda: page_state(browser) == "RUNNING", 120, "the second job to start")
    browser.find_element(By.ID, "cancel-job").click()
    wait(lambda: page_state(browser) in TERMINAL, 120, "the cancelled job to end", 1.0)
    assert page_state(browser) == "CANCELLED"
    browser.get(url + "/")
    assert wait(lambda: row_state(browser, other), 30, "the cancelled row") == "CANCELLED"
