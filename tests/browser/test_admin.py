"""The admin page in a real browser: a job's progress bar follows the worker (simulated by
updating the job's row) without a reload, the finish is announced, polling pauses while the
tab is hidden and stops when no job is left running, the Cancel button cancels through the
JSON API; and the page is usable at 360 px."""

from __future__ import annotations

import json
import re
from typing import Any

from app.models import GenerationJob, JobStatus, Project, Role, utcnow
from tests.browser.conftest import (
    ARTIFACTS,
    Live,
    csp_violations,
    expect,
    login,
    project_of,
    seed,
)


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


# --------------------------------------------------------------------------- project pages


def bad_then_good_files() -> tuple[bytes, bytes]:
    good = [
        {
            "id": f"q{i}",
            "prompt": f"Browser question {i}?\n  (indented)",
            "completions": [{"id": f"c{j}", "text": f"Answer <{j}> to {i}"} for j in range(3)],
        }
        for i in range(3)
    ]
    lines = [json.dumps(r) for r in good]
    bad = "\n".join([lines[0], "{broken json", json.dumps({"id": "x", "completions": []})])
    return bad.encode() + b"\n", "\n".join(lines).encode() + b"\n"


def test_create_a_project_import_files_and_browse_prompts(page, live):
    seeded = seed(live, role=Role.admin, k=2, prompts=0)
    slug = f"{live.kind[:2]}-made-{seeded.project_id}"
    login(page, seeded.username, next="/admin")
    page.get_by_role("link", name="New project").click()
    page.wait_for_url("**/admin/new-project")

    # Invalid values: the form comes back with the problems next to the fields.
    page.fill("#name", "Made in the browser")
    page.fill("#slug", slug)
    page.fill("#completions_per_task", "12")
    page.fill("#guidelines", "# Be kind\n\nRank the **most helpful** first.")
    page.get_by_role("button", name="Create project").click()
    expect(page.locator("#completions_per_task-error")).to_have_text("Must be at most 9.")
    expect(page.locator("#completions_per_task")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#name")).to_have_value("Made in the browser")  # kept

    # The preview renders the Markdown without creating anything.
    page.fill("#completions_per_task", "3")
    page.get_by_role("button", name="Preview guidelines").click()
    expect(page.locator("#preview h1")).to_have_text("Be kind")
    expect(page.locator("#preview strong")).to_have_text("most helpful")

    page.get_by_role("button", name="Create project").click()
    page.wait_for_url(f"**/admin/projects/{slug}")
    expect(page.locator("#flash")).to_contain_text("Made in the browser")
    assert project_of(live, slug).completions_per_task == 3

    # A file with errors: the problems listed by line, nothing imported.
    bad, good = bad_then_good_files()
    page.set_input_files(
        "#file", {"name": "bad.jsonl", "mimeType": "application/x-ndjson", "buffer": bad}
    )
    page.get_by_role("button", name="Import", exact=True).click()
    errors = page.locator("#import-errors")
    expect(errors).to_contain_text("Nothing was written.")
    expect(errors.locator("tbody tr").first.locator("td").first).to_have_text("2")
    expect(errors.locator("tbody tr").nth(1).locator("td").first).to_have_text("3")
    expect(page.locator("#prompt-count")).to_have_text("0")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"admin-import-errors-{live.kind}.png"), full_page=True)

    # The good file: a summary, the counts updated.
    page.set_input_files(
        "#file", {"name": "good.jsonl", "mimeType": "application/x-ndjson", "buffer": good}
    )
    page.get_by_role("button", name="Import", exact=True).click()
    expect(page.locator("#flash")).to_have_text(
        "Import finished: 3 prompts created, 0 already present; "
        "9 completions added, 0 already present."
    )
    expect(page.locator("#prompt-count")).to_have_text("3")
    expect(page.locator("#import-errors")).to_have_count(0)

    # Browse the prompts, open one: its completions, text escaped with whitespace kept.
    page.get_by_role("link", name="Browse prompts").click()
    page.wait_for_url(f"**/admin/projects/{slug}/prompts")
    expect(page.locator("#prompts tbody tr")).to_have_count(3)
    page.get_by_role("link", name=re.compile(r"^Browser question 1\?")).click()
    expect(page.locator("h1")).to_have_text("Prompt q1")
    texts = page.locator(".completion-text")
    expect(texts).to_have_count(3)
    expect(texts.first).to_have_text("Answer <0> to 1")
    message = page.locator(".message.user .text-block")
    assert message.inner_text() == "Browser question 1?\n  (indented)"
    page.screenshot(path=str(ARTIFACTS / f"admin-prompt-{live.kind}.png"), full_page=True)
    assert csp_violations(page) == []
    assert page.context.dialogs == []


def test_project_page_at_360_px(new_context, live):
    seeded = seed(live, role=Role.admin, k=2, prompts=1)
    page = new_context(viewport={"width": 360, "height": 740}, has_touch=True).new_page()
    login(page, seeded.username, next=f"/admin/projects/{seeded.slug}")
    expect(page.get_by_role("heading", name="Import prompts")).to_be_visible()
    assert page.evaluate(NO_HORIZONTAL_SCROLL)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"admin-project-360-{live.kind}.png"), full_page=True)
    page.goto("/admin/users")
    assert page.evaluate(NO_HORIZONTAL_SCROLL)
    assert csp_violations(page) == []


# --------------------------------------------------------------------------- users, tokens


def test_deactivate_a_user_ends_their_session_and_tokens_are_created_and_revoked(new_context, live):
    admin = seed(live, role=Role.admin, k=2, prompts=1)
    annotator = seed(live, k=2, prompts=1)
    theirs = new_context().new_page()
    login(theirs, annotator.username, next="/label")

    page = new_context().new_page()
    login(page, admin.username, next="/admin")
    page.get_by_role("link", name="Users and tokens").click()
    page.wait_for_url("**/admin/users")
    row = page.locator(f"#user-{annotator.username}")
    expect(row.locator("[data-field=web_sessions]")).to_have_text("1")
    row.get_by_role("button", name=f"Deactivate {annotator.username}").click()
    expect(page.locator("#flash")).to_contain_text("is deactivated")
    expect(row.locator("[data-field=status]")).to_have_text("Deactivated")
    expect(row.locator("[data-field=web_sessions]")).to_have_text("0")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"admin-users-{live.kind}.png"), full_page=True)

    # Their open page: the next navigation lands on the login page.
    theirs.reload()
    theirs.wait_for_url("**/login?next=/label")

    row.get_by_role("button", name=f"Reactivate {annotator.username}").click()
    expect(row.locator("[data-field=status]")).to_have_text("Active")

    # A token for them: shown once, it works; revoked, it does not.
    row.get_by_role("link", name=re.compile("^Tokens")).click()
    page.wait_for_url(f"**/admin/users/{annotator.username}")
    page.fill("#token-name", "browser test")
    page.get_by_role("button", name="Create token").click()
    secret = page.locator("#token-secret").input_value()
    assert secret
    page.screenshot(path=str(ARTIFACTS / f"admin-token-{live.kind}.png"), full_page=True)
    api = page.context.request  # no cookie needed: the bearer token authenticates
    url = f"/api/v1/projects/{annotator.slug}/tasks/next"
    assert api.get(url, headers={"Authorization": f"Bearer {secret}"}).status in (200, 204)
    page.get_by_role("button", name=re.compile(r"^Revoke token browser test")).click()
    expect(page.locator("#flash")).to_have_text("Token “browser test” revoked: it no longer works.")
    assert api.get(url, headers={"Authorization": f"Bearer {secret}"}).status == 401
    page.goto(f"/admin/users/{annotator.username}")
    expect(page.locator("#token-secret")).to_have_count(0)  # never shown again
    assert csp_violations(page) == []
    assert page.context.dialogs == []
