"""The dashboard in a real browser: Debian's headless Chromium driven by Playwright against a real
`modelpress serve` process and a real worker. A job goes queued -> succeeded on screen, then its
report opens; screenshots are kept under test-artifacts/."""

from __future__ import annotations

from pathlib import Path

from app.cli import ROOT
from tests.conftest import Workers
from tests.workers.test_end_to_end import submit, upload_inputs

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def test_dashboard_shows_a_job_from_queued_to_succeeded(live_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from playwright.sync_api import expect, sync_playwright

    url, api = live_server(workers=0, MODELPRESS_FAULT_STAGE_DELAY_S="1.5")
    ARTIFACTS.mkdir(exist_ok=True)
    model_id, dataset_id = upload_inputs(api, tmp_path)
    workers = Workers(tmp_path)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        try:
            page.goto(f"{url}/dashboard")
            page.get_by_test_id("key-input").fill(api.key)
            page.get_by_test_id("login-button").click()
            job_id = submit(api, model_id, dataset_id)
            row = page.locator(f'[data-job-id="{job_id}"]')
            expect(row).to_have_attribute("data-status", "queued", timeout=15_000)
            page.screenshot(path=str(ARTIFACTS / "dashboard-queued.png"), full_page=True)
            workers.start("browser")
            expect(row).to_have_attribute("data-status", "running", timeout=60_000)
            expect(page.get_by_test_id("workers")).to_contain_text(job_id[:8], timeout=15_000)
            expect(row).to_have_attribute("data-status", "succeeded", timeout=120_000)
            expect(page.get_by_test_id("count-succeeded")).to_contain_text("1")
            expect(page.get_by_test_id("workers")).to_contain_text("browser@")
            page.screenshot(path=str(ARTIFACTS / "dashboard-succeeded.png"), full_page=True)
            row.get_by_test_id("job-link").click()
            expect(page.get_by_test_id("job-status-value")).to_have_text("succeeded")
            expect(page.get_by_test_id("job-events")).to_contain_text("compress")
            report = page.frame_locator('[data-testid="report-frame"]')
            expect(report.locator("h1")).to_contain_text("quant_rtn", timeout=15_000)
            expect(report.locator("svg").first).to_be_visible()
            page.screenshot(path=str(ARTIFACTS / "dashboard-job.png"), full_page=True)
        finally:
            browser.close()
            workers.stop_all()
    assert (ARTIFACTS / "dashboard-job.png").stat().st_size > 10_000
