"""The quality dashboard in a real browser (SQLite and PostgreSQL): an admin logs in and opens
it, the SVG charts and the tables render, the annotator far from the rest is highlighted, the
CSV downloads, nothing violates the CSP; and the page is usable at 360 px."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from sqlalchemy import select

from app.models import Prompt, Role
from tests.browser.conftest import ARTIFACTS, Live, csp_violations, expect, login, seed
from tests.factories import make_annotation, make_user


def annotate(live: Live, project_id: int) -> tuple[list[str], str]:
    """Three annotators who agree and rotate what they see first, and one who reverses them
    and always puts the first-shown completion first."""
    with live.session() as s:
        good = [make_user(s, username=f"{live.kind}-good-{project_id}-{i}") for i in range(3)]
        odd = make_user(s, username=f"{live.kind}-odd-{project_id}")
        prompts = s.scalars(select(Prompt).where(Prompt.project_id == project_id)).all()
        for i, prompt in enumerate(prompts):
            ids = [c.id for c in prompt.completions]
            for u in good:
                make_annotation(
                    s,
                    prompt,
                    u,
                    ranking=[[c] for c in ids],
                    display_order=ids[i % 4 :] + ids[: i % 4],
                    duration_ms=20_000 + 1000 * i,
                )
            make_annotation(
                s,
                prompt,
                odd,
                ranking=[[c] for c in reversed(ids)],
                display_order=list(reversed(ids)),
                duration_ms=3000,
            )
        return [u.username for u in good], odd.username


def test_dashboard_renders_highlights_the_outlier_and_downloads_csv(page, live):
    seeded = seed(live, role=Role.admin, k=4, prompts=12)
    good, odd = annotate(live, seeded.project_id)
    url = f"/admin/projects/{seeded.slug}/dashboard"
    login(page, seeded.username, next=url)

    for chart in ("#chart-progress", "#chart-days", "#chart-annotators"):
        expect(page.locator(chart)).to_be_visible()
    expect(page.locator("#chart-annotators title").first).to_have_text(
        "Agreement with the other annotators' consensus"
    )
    expect(page.locator("[data-field=complete]")).to_have_text("12")
    row = page.locator(f"#annotator-table tr[data-username='{odd}']")
    expect(row).to_have_attribute("data-outlier", "true")
    expect(row.locator("[data-field=status]")).to_contain_text("low agreement")
    expect(row.locator("[data-field=status]")).to_contain_text("position bias")
    for name in good:
        expect(page.locator(f"#annotator-table tr[data-username='{name}']")).to_have_attribute(
            "data-outlier", "false"
        )
    # The outlier's dot is drawn in the alert colour, with a ring.
    expect(page.locator("#chart-annotators .chart-dot-alert")).to_have_count(1)
    expect(page.locator("#chart-annotators .chart-ring")).to_have_count(1)

    with page.expect_download() as download:
        page.get_by_role("link", name="Annotators (CSV)").click()
    assert download.value.suggested_filename == f"{seeded.slug}-annotators.csv"
    text = Path(download.value.path()).read_text(encoding="utf-8")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert {r["username"] for r in rows} == {*good, odd}
    assert {r["outlier"] for r in rows if r["username"] == odd} == {"true"}

    assert csp_violations(page) == []
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"dashboard-desktop-{live.kind}.png"), full_page=True)


def test_dashboard_at_360_px(new_context, live):
    seeded = seed(live, role=Role.admin, k=4, prompts=4)
    annotate(live, seeded.project_id)
    page = new_context(viewport={"width": 360, "height": 780}).new_page()
    login(page, seeded.username, next=f"/admin/projects/{seeded.slug}/dashboard")
    expect(page.locator("#chart-annotators")).to_be_visible()
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 362, f"the page scrolls sideways ({width} px)"
    assert csp_violations(page) == []
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"dashboard-mobile-{live.kind}.png"), full_page=True)
