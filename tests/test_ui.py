"""The Prefect UI in a real browser: headless Chromium (Debian's package) driven by
Playwright, against the session's server, with the demo deployment served by
`python -m deployments.serve` (the path for users without workers).

Open the UI, find the demo deployment, start a Custom run with changed
parameters through the form (a number typed in, a named choice picked from a
dropdown), see the run complete with its artifacts; then stop serve and see its
deployment paused, as the README says.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
import yaml

from tests.processes import server_env, start_logged, stop_group, wait_for_line

CHROMIUM = os.environ.get("FACTORY_CHROMIUM", "/usr/bin/chromium")
SHOTS = os.environ.get("FACTORY_UI_SCREENSHOTS", "")  # a folder: keep the screenshots there


def _browser_missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright (Python) is not installed: pip install playwright (never `playwright install`)"
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        return f"no Chromium at {CHROMIUM}: apt-get install chromium (as .ci/run does)"
    return None


pytestmark = pytest.mark.skipif(_browser_missing() is not None, reason=str(_browser_missing()))


def _field(page, title: str):
    """The form property whose label is ``title`` (the innermost one)."""
    prop = "contains(concat(' ', normalize-space(@class), ' '), ' schema-form-property ')"
    return page.locator(f"xpath=//span[contains(@class,'schema-form-property__label') and "
                        f"normalize-space()='{title} (Optional)']/ancestor::div[{prop}][1]")


def _shot(page, name: str) -> None:
    if SHOTS:  # (Path("") would be the working folder: screenshots only when asked for)
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / f"{name}.png"))


def _delete_worker_deployment(name: str) -> None:
    """As an operator switching to serve does: serve refuses a name deployed to a work pool."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            dep = client.read_deployment_by_name(name)
        except ObjectNotFound:
            return
        if dep.work_pool_name:
            client.delete_deployment(dep.id)


@pytest.fixture
def served_demo(prefect_server, tmp_path):
    """The project's demo deployment, its output redirected to tmp, served by deployments.serve."""
    from deployments.spec import PREFECT_FILE

    doc = yaml.safe_load(PREFECT_FILE.read_text())
    demo = next(d for d in doc["deployments"] if d["name"] == "embedded-default")
    demo["parameters"] = {"config": {"name": "data_ui_demo", "output_dir": str(tmp_path / "out")}}
    path = tmp_path / "prefect.yaml"
    path.write_text(yaml.safe_dump({"deployments": [demo]}))
    log = tmp_path / "serve.log"
    _delete_worker_deployment("multimodal/embedded-default")
    proc = start_logged(["-m", "deployments.serve", "--prefect-file", str(path)], log, server_env(prefect_server))
    try:
        wait_for_line(proc, log, "being served")  # prefect.serve's banner
        yield proc, log, tmp_path / "out" / "data_ui_demo"
    finally:
        stop_group(proc)


@pytest.mark.timeout(1200)
def test_custom_run_from_the_ui_completes_with_artifacts(prefect_server, served_demo):
    from playwright.sync_api import expect, sync_playwright
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    proc, log, out = served_demo
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 2400})  # tall: the UI scrolls a panel
            page.set_default_timeout(180_000)
            page.goto(f"{prefect_server.ui_url}/deployments")
            expect(page.get_by_text("Can't connect to Server API")).to_have_count(0)
            page.get_by_role("link", name="embedded-default").first.click()
            page.get_by_role("button", name="Run", exact=True).click()
            page.get_by_text("Custom run").first.click()
            n_tiles = _field(page, "Tiles · n_tiles").locator("input")
            n_tiles.fill("4")
            mode = _field(page, "Tiles · sampling_mode").locator("button.p-select-button__control")
            expect(mode).to_have_text("biome-area")  # the default by name, not an empty choice
            mode.focus()
            mode.press("ArrowDown")
            page.get_by_role("option", name="ecoregion-equal").click()
            expect(mode).to_have_text("ecoregion-equal")
            _shot(page, "custom_run_form")
            with get_client(sync_client=True) as client:
                dep = client.read_deployment_by_name("multimodal/embedded-default")
            page.get_by_role("button", name="Submit").click()
            page.wait_for_url(f"**/deployments/deployment/{dep.id}**")  # back on the deployment's page
            deadline = time.monotonic() + 900
            while True:
                with get_client(sync_client=True) as client:
                    runs = [r for r in client.read_flow_runs(deployment_filter=DeploymentFilter(
                        id=DeploymentFilterId(any_=[dep.id]))) if not r.auto_scheduled]
                assert len(runs) <= 1, [r.name for r in runs]
                run = runs[0] if runs else None
                if run and run.state and run.state.is_final():
                    break
                assert proc.poll() is None, f"serve exited:\n{log.read_text()[-4000:]}"
                assert time.monotonic() < deadline, f"run still {run and run.state.name}\n{log.read_text()[-4000:]}"
                time.sleep(3)
            assert run.state.is_completed(), f"{run.state.name}: {run.state.message}\n{log.read_text()[-4000:]}"
            assert run.parameters["config"]["n_tiles"] == 4
            assert run.parameters["config"]["sampling_mode"] == "ecoregion-equal"
            page.reload()  # the deployment's page lists the run: open it
            page.get_by_role("link", name=run.name).first.click()
            expect(page.get_by_text("Completed").first).to_be_visible()
            page.get_by_text("Artifacts", exact=True).first.click()  # the run page's tab
            expect(page.get_by_text("data-ui-demo-report").first).to_be_visible()
            _shot(page, "run_artifacts")
        finally:
            browser.close()
    assert (out / "data_ui_demo.h5").exists() and (out / "report.json").exists()

    # stopping serve pauses what it served
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=120)
    with get_client(sync_client=True) as client:
        assert client.read_deployment_by_name("multimodal/embedded-default").paused


def _accuracy_table_run() -> str:
    """A flow run that publishes an accuracy table as the aerial flow does (the artifact's id)."""
    from prefect import flow
    from prefect.artifacts import create_table_artifact

    from tasks.aerial.evaluate import summary_table

    acc = {"poses": {"photos registered": 15, "photos attempted": 16, "median rotation error deg": 0.123,
                     "median centre error m": 0.456, "median centre error / extent": 0.0018, "scene extent m": 250.0,
                     "scale ratio median": 1.0012, "scale ratio max deviation": 0.0041},
           "depth": {g: {"images": 48, "pixels": 10**6, "coverage": 0.645, "absrel": 0.0201, "within_1.25": 0.987}
                     for g in ("aerial", "photos", "all")}}

    @flow(name="ui-accuracy-check")
    def publish():
        return create_table_artifact(key="aerial-0001-accuracy", table=summary_table(acc),
                                     description="scene 0001: accuracy against ground truth")

    return str(publish())


@pytest.mark.timeout(600)
def test_aerial_form_keeps_markdown_literal_and_accuracy_verdict_fits(prefect_server):
    """The aerial form's descriptions are literal (``data/<scene>/`` is not rendered ``data//``),
    and the accuracy table's "met" column is on screen at 1400 px."""
    from playwright.sync_api import expect, sync_playwright

    from flows.aerial import aerial_flow

    dep_id = aerial_flow.to_deployment(name="ui-form-check").apply()
    artifact_id = _accuracy_table_run()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 2400})
            page.set_default_timeout(120_000)
            page.goto(f"{prefect_server.ui_url}/deployments/deployment/{dep_id}")
            page.get_by_role("button", name="Run", exact=True).click()
            page.get_by_text("Custom run").first.click()
            root = _field(page, "Inputs · root")
            expect(root).to_contain_text("Earth Studio root: downloaded_data/ in, data/<scene>/ out", timeout=120_000)
            _shot(page, "aerial_form")
            page.goto(f"{prefect_server.ui_url}/artifacts/artifact/{artifact_id}")
            verdict = page.get_by_text("NO: 1 not registered", exact=True).first
            try:
                expect(verdict).to_be_visible(timeout=120_000)
            finally:
                _shot(page, "accuracy_table")
            header = page.locator("th").filter(has_text=re.compile(r"^\s*met\s*$")).first
            for cell in (header, verdict):  # on screen at 1400 px: not clipped by the table's scroll box
                assert cell.evaluate("""el => { const r = el.getBoundingClientRect();
                    const hit = document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2);
                    return hit !== null && (el === hit || el.contains(hit)); }"""), cell
        finally:
            browser.close()
