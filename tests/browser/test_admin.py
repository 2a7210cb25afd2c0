"""The admin page in a real browser: a job's progress bar follows the worker (simulated by
updating the job's row) without a reload, the finish is announced, polling pauses while the
tab is hidden and stops when no job is left running, the Cancel button cancels through the
JSON API; and the page is usable at 360 px."""

from __future__ import annotations

import re
from typing import Any

from app.models import GenerationJob, JobStatus, Project, Role, utcnow
from tests.browser.conftest import ARTIFACTS, Live, csp_violations, expect, login, seed


def add_job(live: Live, project_id: int, **fields: Any) -> int:
    with live.session() as s:
        values = {
            "project_id": project_id,
            "status": JobStatus.queued,
            "backend": "transformers",
            "models": ["smollm2-135m-instruct"],
            "k": 2,
            "total": 3,
            **fields,
        }
        job = GenerationJob(**values)
        s.add(job)
        s.commit()
        return job.id


def worker_writes(live: Live, job_id: int, **fields: Any) -> None:
    """What a worker's save_batch / finish_job would leave in the row."""
    with live.session() as s:
        job = s.get(GenerationJob, job_id)
        assert job is not None
        for name, value in fields.items():
            setattr(job, name, value)
        s.commit()


def job_row(live: Live, job_id: int) -> GenerationJob:
    with live.session() as s:
        job = s.get(GenerationJob, job_id)
        assert job is not None
        return job


API_REQUESTS = (
    "performance.getEntriesByType('resource').filter(e => e.name.includes('/api/v1/')).length"
)
"""How many API requests the page has made (its polls and cancels)."""


def api_requests(page: Any) -> int:
    return page.evaluate(API_REQUESTS)


def set_visibility(page: Any, state: str) -> None:
    page.evaluate(
        """(state) => {
        Object.defineProperty(document, "visibilityState", {value: state, configurable: true});
        Object.defineProperty(document, "hidden", {value: state === "hidden", configurable: true});
        document.dispatchEvent(new Event("visibilitychange"));
    }""",
        state,
    )


def test_job_progress_is_live_and_jobs_can_be_cancelled(page, live):
    seeded = seed(live, role=Role.admin, k=2, prompts=3)
    running = add_job(live, seeded.project_id, status=JobStatus.running, worker="host:7")
    queued = add_job(live, seeded.project_id)
    login(page, seeded.username, next="/admin")
    page.evaluate("window.__sameDocument = true")

    project = page.locator(f"#project-{seeded.slug}")
    row = page.locator(f"#job-{running}")
    bar = row.locator("progress")
    expect(row.locator("[data-field=progress]")).to_have_text("0 / 3 prompts")
    expect(row.locator("[data-field=status]")).to_have_text("Running")
    expect(project.locator("[data-field=completion_count]")).to_have_text("6")
    expect(project.locator("[data-field=pending_generation]")).to_have_text("6")
    expect(page.locator("#no-worker")).to_be_visible()
    assert bar.evaluate("b => [b.value, b.max]") == [0, 3]
    expect(page.get_by_role("link", name="Admin")).to_have_attribute("aria-current", "page")

    # The worker saves a batch: the bar advances without a reload.
    worker_writes(live, running, done=2, cursor=seeded.prompt_ids[1], completions_created=4)
    expect(row.locator("[data-field=progress]")).to_have_text("2 / 3 prompts")
    assert bar.evaluate("b => [b.value, b.max]") == [2, 3]
    expect(row.locator("[data-field=completions_created]")).to_have_text("4")
    expect(project.locator("[data-field=completion_count]")).to_have_text("10")
    expect(project.locator("[data-field=pending_generation]")).to_have_text("4")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"admin-desktop-{live.kind}.png"), full_page=True)

    # It finishes: the status changes, the finish is announced, its Cancel button goes.
    worker_writes(
        live,
        running,
        done=3,
        completions_created=5,
        duplicates_dropped=1,
        status=JobStatus.succeeded,
        finished_at=utcnow(),
    )
    expect(row.locator("[data-field=status]")).to_have_text("Succeeded")
    expect(page.locator("#live")).to_have_text(f"Job {running} succeeded.")
    expect(row.locator("[data-field=progress]")).to_have_text("3 / 3 prompts")
    expect(row.locator("[data-field=duplicates_dropped]")).to_have_text("1")
    expect(row.locator("[data-field=finished_at]")).to_have_text(re.compile(r"^\d{4}-\d\d-\d\d "))
    expect(row.get_by_role("button", name=f"Cancel job {running}")).to_be_hidden()
    expect(project.locator("[data-field=pending_generation]")).to_have_text("3")

    # Hidden tab: no polling (the queued job is still unfinished); visible again: at once.
    set_visibility(page, "hidden")
    page.wait_for_timeout(300)  # a request already in flight may land
    before = api_requests(page)
    page.wait_for_timeout(2600)
    assert api_requests(page) == before
    set_visibility(page, "visible")
    for _ in range(30):  # polls again at once, not after the next interval
        if api_requests(page) > before:
            break
        page.wait_for_timeout(50)
    else:
        raise AssertionError("no poll after the tab became visible again")

    # Cancel the queued job: through the JSON API, announced, the focus kept in its row.
    other = page.locator(f"#job-{queued}")
    other.get_by_role("button", name=f"Cancel job {queued}").click()
    expect(other.locator("[data-field=status]")).to_have_text("Cancelled")
    expect(page.locator("#live")).to_have_text(f"Job {queued} was cancelled.")
    expect(other.locator("th")).to_be_focused()
    expect(other.get_by_role("button", name=f"Cancel job {queued}")).to_be_hidden()
    expect(other.locator("[data-field=message]")).to_have_text("cancelled before it started")
    assert job_row(live, queued).status == JobStatus.cancelled
    expect(page.locator("#no-worker")).to_be_hidden()  # no job waits for a worker any more

    # Nothing left running: polling stops.
    page.wait_for_timeout(300)
    before = api_requests(page)
    page.wait_for_timeout(2600)
    assert api_requests(page) == before
    assert page.evaluate("window.__sameDocument") is True  # never reloaded

    for width in (1280, 1100, 800):  # a wide table scrolls inside its box, never the page
        page.set_viewport_size({"width": width, "height": 900})
        assert page.evaluate(NO_HORIZONTAL_SCROLL), width
    assert csp_violations(page) == []
    assert page.context.dialogs == []


def test_admin_page_at_360_px_and_in_chinese(new_context, live):
    seeded = seed(live, role=Role.admin, k=2, prompts=2)
    with live.session() as s:
        s.get(Project, seeded.project_id).name = "A project with a rather long name, to wrap"
        s.commit()
    job = add_job(
        live,
        seeded.project_id,
        status=JobStatus.running,
        done=1,
        worker="a-long-worker-host-name.example.internal:123456",
        started_at=utcnow(),
        message="x" * 200,
        models=["smollm2-135m-instruct", "/a/very/long/local/model/directory/policy-round-2"],
    )
    page = new_context(viewport={"width": 360, "height": 740}, has_touch=True).new_page()
    login(page, seeded.username, next="/admin")
    row = page.locator(f"#job-{job}")
    expect(row.locator("[data-field=progress]")).to_have_text("1 / 3 prompts")
    expect(row.get_by_role("button", name=f"Cancel job {job}")).to_be_visible()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"admin-360-{live.kind}.png"), full_page=True)
    assert page.evaluate(NO_HORIZONTAL_SCROLL)

    # The language switch in the header: the page and its script's strings in Chinese.
    page.get_by_role("button", name="简体中文").tap()
    expect(row.locator("[data-field=status]")).to_have_text("运行中")
    expect(row.locator("[data-field=progress]")).to_have_text("1 / 3 个提示")
    expect(row.get_by_role("button", name=f"取消任务 {job}")).to_be_visible()
    assert page.evaluate(NO_HORIZONTAL_SCROLL)
    worker_writes(live, job, done=2)
    expect(row.locator("[data-field=progress]")).to_have_text("2 / 3 个提示")
    worker_writes(live, job, done=3, status=JobStatus.failed, finished_at=utcnow())
    expect(page.locator("#live")).to_have_text(f"任务 {job} 失败。")
    expect(row.locator("[data-field=status]")).to_have_text("已失败")
    assert csp_violations(page) == []


NO_HORIZONTAL_SCROLL = (
    "document.documentElement.scrollWidth <= document.documentElement.clientWidth"
)
