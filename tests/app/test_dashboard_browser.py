"""The dashboard in a real browser: Debian's headless Chromium driven by Playwright against a real
`modelpress serve` process and a real worker. A job goes queued -> succeeded on screen, then its
report opens; screenshots are kept under test-artifacts/."""

from __future__ import annotations

import re
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


def _seed_jobs(api, tmp_path: Path) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """Jobs in every state the overview must tell apart, written as the worker would leave them."""
    from datetime import timedelta

    from app.db import crud
    from app.db.models import Job, utcnow
    from app.db.session import session_scope
    from tests.helpers import files
    from tests.helpers.reports import tiny_report

    model_id = api.upload("/v1/models", files.tiny_onnx(tmp_path / "tiny.onnx")).json()["id"]
    (tmp_path / "report").mkdir()
    report = tiny_report(tmp_path / "report", gate={"max_metric_drop": 0.5, "max_size_bytes": 1})
    now, config = utcnow(), {"bits": 4, "group_size": None}
    rows = {
        "passed": {"status": "succeeded", "verdict": "pass", "report": {**report, "gate": {"verdict": "pass"}}},
        "gate_failed": {"status": "succeeded", "verdict": "fail", "report": report},
        "job_failed": {"status": "failed", "error_code": "worker_lost", "error_message": "stopped heartbeating"},
        "stale": {"status": "running", "stage": "compress", "heartbeat_at": now - timedelta(minutes=10)},
        "alive": {"status": "running", "stage": "compress", "heartbeat_at": now},
    }
    ids = {}
    with session_scope() as session:
        project = crud.get_or_create_project(session=session, name="default")
        for name, fields in rows.items():
            finished = now - timedelta(seconds=10) if fields["status"] in ("succeeded", "failed") else None
            job = Job(
                project_id=project.id,
                model_id=model_id,
                method="quant_rtn",
                config=config,
                started_at=now - timedelta(seconds=70)
                if fields["status"] != "running"
                else now - timedelta(minutes=12),
                finished_at=finished,
                **fields,
            )
            session.add(job)
            session.flush()
            ids[name] = job.id
    return {**ids, "size_ratio": report["compressed"]["size_bytes"] / report["original"]["size_bytes"]}


def test_dashboard_counts_gate_failures_apart_and_marks_stale_jobs(live_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from playwright.sync_api import expect, sync_playwright

    url, api = live_server(workers=0)
    ARTIFACTS.mkdir(exist_ok=True)
    seeded = _seed_jobs(api, tmp_path)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1600, "height": 900})
        try:
            page.goto(f"{url}/dashboard")
            page.get_by_test_id("key-input").fill(api.key)
            page.get_by_test_id("login-button").click()
            for card, count in {"succeeded": 2, "passed": 1, "gate-failed": 1, "failed": 1, "running": 2}.items():
                expect(page.get_by_test_id(f"count-{card}").locator("b")).to_have_text(str(count))
            expect(page.get_by_test_id("count-failed")).to_contain_text("job failed")
            passed = page.locator(f'[data-job-id="{seeded["passed"]}"]')
            expect(passed.locator('[data-col="model"]')).to_have_text("tiny.onnx")
            expect(passed.locator('[data-col="config"]')).to_have_text("bits=4 group_size=null")
            expect(passed.locator('[data-col="duration"]')).to_have_text("60.0 s")
            expect(passed.locator('[data-col="created"]')).to_contain_text(" UTC")
            expect(passed.locator('[data-col="metric"]')).to_contain_text("accuracy ")
            ratio = float(passed.locator('[data-col="size"]').inner_text().rstrip("x"))
            assert abs(ratio - seeded["size_ratio"]) < 0.01 * seeded["size_ratio"]
            expect(passed.locator('[data-col="speedup"]')).to_have_text(
                re.compile(r"^\d[\d.]*x \(\d[\d.]*-\d[\d.]*\)$")
            )
            gate_failed = page.locator(f'[data-job-id="{seeded["gate_failed"]}"]')
            expect(gate_failed).to_have_attribute("data-status", "succeeded")
            expect(gate_failed.locator('[data-col="verdict"]')).to_have_text("fail")
            stale = page.locator(f'[data-job-id="{seeded["stale"]}"]')
            expect(stale).to_have_attribute("data-stale", "true")
            expect(stale.get_by_test_id("stale")).to_have_text(re.compile(r"stale: no heartbeat for 10\.\d min"))
            expect(page.locator(f'[data-job-id="{seeded["alive"]}"]')).to_have_attribute("data-stale", "false")
            expect(page.get_by_test_id("failures")).to_contain_text("worker_lost")
            expect(page.get_by_test_id("failures")).not_to_contain_text(seeded["gate_failed"][:8])
            page.screenshot(path=str(ARTIFACTS / "dashboard-verdicts.png"), full_page=True)
        finally:
            browser.close()
