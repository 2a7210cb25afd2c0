"""The labeling pages in a real browser: login, ranking by drag and drop and by keyboard,
ties, skip, Likert and flags, pairwise tasks, inert HTML, Chinese UI, a 360 px screen and the
offline API docs. Each test checks what was stored against what the page showed."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, select, update

from app.models import (
    AnnotationStatus,
    Completion,
    GenerationJob,
    Lease,
    Prompt,
    User,
    WebSession,
    utcnow,
)
from tests.browser.conftest import (
    ARTIFACTS,
    Live,
    annotations_of,
    csp_violations,
    expect,
    lease_of,
    login,
    open_task,
    seed,
    shown_ids,
)
from tests.factories import PASSWORD


def texts_by_id(live: Live, ids: list[int]) -> dict[int, str]:
    with live.session() as s:
        rows = s.execute(select(Completion.id, Completion.text).where(Completion.id.in_(ids)))
        return {cid: text for cid, text in rows}


APPENDED = "!!document.querySelector('#ranked > .sortable-ghost:last-child')"
"""The chip being dragged sits at the end of the ranking."""


def drag(page: Any, source: Any, target: Any, *, landed: str, below: bool = False) -> None:
    """Drag with the mouse as a person would: press, move, hold still until the dragged chip
    sits where ``landed`` (a JS expression) says, let go. SortableJS runs in pointer-event
    mode and re-evaluates the pointer position every 50 ms while holding."""
    sb = source.bounding_box()
    tb = target.bounding_box()
    x, y = sb["x"] + sb["width"] / 2, sb["y"] + sb["height"] / 2
    tx, ty = tb["x"] + tb["width"] / 2, tb["y"] + (tb["height"] - 3 if below else tb["height"] / 2)
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + 6, y + 6, steps=3)
    page.mouse.move(tx, ty, steps=12)
    for i in range(60):
        if page.evaluate(landed):
            break
        page.wait_for_timeout(50)
        page.mouse.move(tx + i % 2, ty)
    else:
        page.mouse.up()
        raise AssertionError(f"the dragged chip never reached its place: {landed}")
    page.mouse.up()
    # Dropped: the page redraws the lists from its model (no ghost left).
    page.wait_for_function("!document.querySelector('.sortable-ghost, .sortable-fallback')")


def ranked_ids(page: Any) -> list[int]:
    return [
        int(i)
        for i in page.locator("#ranked .chip").evaluate_all("els => els.map(e => e.dataset.id)")
    ]


def wait_submitted(page: Any, count: int) -> None:
    expect(page.locator("#my-count")).to_have_text(str(count))


def assert_clean(page: Any) -> None:
    assert csp_violations(page) == []
    assert page.context.dialogs == []


# --------------------------------------------------------------------------- login


def test_login_home_and_logout(page, live):
    seeded = seed(live, prompts=1)
    page.goto("/")
    expect(page).to_have_url(re.compile(r"/login\?next=/label$"))
    page.fill("#username", seeded.username)
    page.fill("#password", "not the password")
    page.click("form[action='/login'] button[type=submit]")
    expect(page.locator("#login-error")).to_have_text("Wrong username or password.")

    login(page, seeded.username)
    project = page.locator(".project", has=page.locator(f"a[href='/label/{seeded.slug}']"))
    expect(project).to_contain_text("0 of 1 prompts complete")
    project.get_by_role("link", name=re.compile("Start labeling")).click()
    expect(page).to_have_url(re.compile(f"/label/{seeded.slug}$"))
    page.wait_for_selector("#task:not([hidden]) .card")

    page.get_by_role("button", name="Log out").click()
    expect(page).to_have_url(re.compile(r"/login$"))
    page.goto(f"/label/{seeded.slug}")
    expect(page).to_have_url(re.compile(r"/login\?next="))
    assert_clean(page)


# --------------------------------------------------------------------------- ranking


def test_rank_by_drag_and_drop_with_a_tie(page, live):
    seeded = seed(live)
    ids = open_task(page, seeded)
    page.evaluate("window.__sameDocument = true")

    def pool_chip(label: str) -> Any:
        return page.locator(f"#pool .chip[data-id='{ids[label]}']")

    drag(page, pool_chip("C"), page.locator("#ranked"), landed=APPENDED)
    for label in ("A", "D", "B"):
        drag(page, pool_chip(label), page.locator("#ranked"), below=True, landed=APPENDED)
    assert ranked_ids(page) == [ids["C"], ids["A"], ids["D"], ids["B"]]
    # Reorder inside the ranking: B above D.
    above_d = (
        "document.querySelector('#ranked > .sortable-ghost')"
        f"?.nextElementSibling?.dataset.id === '{ids['D']}'"
    )
    drag(
        page,
        page.locator(f"#ranked .chip[data-id='{ids['B']}']"),
        page.locator(f"#ranked .chip[data-id='{ids['D']}']"),
        landed=above_d,
    )
    assert ranked_ids(page) == [ids["C"], ids["A"], ids["B"], ids["D"]]
    # D ties with B (the chip above it).
    page.get_by_role("button", name="Tie D with the completion above").click()
    expect(page.locator("#card-D .rank-badge")).to_have_text("Rank 3 (tie)")
    expect(page.locator("#card-B .rank-badge")).to_have_text("Rank 3 (tie)")
    expect(page.locator("#card-C .rank-badge")).to_have_text("Rank 1")

    shown_texts = {
        label: page.locator(f"#card-{label} .completion-text").inner_text() for label in ids
    }
    page.get_by_role("button", name=re.compile("^Submit")).click()
    wait_submitted(page, 1)
    assert page.evaluate("window.__sameDocument") is True  # no page reload

    (annotation,) = annotations_of(live, seeded.username)
    assert annotation.status == AnnotationStatus.submitted
    assert annotation.ranking == [[ids["C"]], [ids["A"]], [ids["B"], ids["D"]]]
    # Display order = labels A, B, C, D, and the texts shown are those of these completions.
    assert annotation.display_order == [ids[label] for label in "ABCD"]
    assert lease_of(live, annotation.lease_id).display_order == annotation.display_order
    stored = texts_by_id(live, list(ids.values()))
    assert {label: stored[ids[label]] for label in ids} == shown_texts
    assert annotation.duration_ms is not None
    assert annotation.duration_ms > 0
    assert_clean(page)


def test_rank_by_keyboard_alone_with_a_tie(page, live):
    seeded = seed(live)
    ids = open_task(page, seeded)
    kb = page.keyboard
    kb.press("c")
    # Shortcuts are off in a text field.
    page.locator("#rationale").click()
    kb.type("ab = sd")
    assert ranked_ids(page) == [ids["C"]]
    page.locator("#prompt-heading").focus()
    kb.press("=")
    kb.press("a")
    expect(page.locator("#live")).to_have_text("A tied with C.")
    kb.press("d")
    kb.press("Backspace")  # undo D
    kb.press("b")
    assert ranked_ids(page) == [ids["C"], ids["A"], ids["B"]]
    expect(page.locator("#card-A .rank-badge")).to_have_text("Rank 1 (tie)")
    kb.press("?")
    expect(page.locator("#help-dialog")).to_be_visible()
    kb.press("?")
    expect(page.locator("#help-dialog")).to_be_hidden()
    page.wait_for_timeout(50)
    kb.press("Enter")  # D, the only one left, goes last
    wait_submitted(page, 1)

    (annotation,) = annotations_of(live, seeded.username)
    assert annotation.ranking == [[ids["C"], ids["A"]], [ids["B"]], [ids["D"]]]
    assert annotation.rationale == "ab = sd"
    assert annotation.duration_ms is not None
    assert annotation.duration_ms >= 40
    # The next task is on screen, with a clean slate.
    expect(page.locator("#ranked .chip")).to_have_count(0)
    expect(page.locator("#rationale")).to_have_value("")
    assert set(shown_ids(page).values()).isdisjoint(ids.values())
    assert_clean(page)


def test_skip_with_a_reason(page, live):
    seeded = seed(live)
    ids = open_task(page, seeded)
    page.keyboard.press("s")
    expect(page.locator("#skip-dialog")).to_be_visible()
    page.keyboard.type("I do not know this topic")  # the S shortcut is off in the text field
    page.keyboard.press("Enter")
    wait_submitted(page, 1)
    (annotation,) = annotations_of(live, seeded.username)
    assert annotation.status == AnnotationStatus.skipped
    assert annotation.skip_reason == "I do not know this topic"
    assert annotation.display_order == [ids[label] for label in "ABCD"]
    assert set(shown_ids(page).values()).isdisjoint(ids.values())
    assert_clean(page)


def test_likert_and_flags(page, live):
    seeded = seed(live, flags=["hallucination", "harmful advice"], likert=True)
    ids = open_task(page, seeded)
    page.locator("#card-A .likert-scale label", has_text="6").click()
    page.locator("#card-C .likert-scale label", has_text="2").click()
    page.locator("#card-B .flags summary").click()
    page.locator("#card-B .flags").get_by_label("hallucination").check()
    expect(page.locator("#card-B .flag-count")).to_have_text("(1)")
    page.locator("#prompt-heading").focus()
    for key in "dcba":
        page.keyboard.press(key)
    page.keyboard.press("Enter")
    wait_submitted(page, 1)
    (annotation,) = annotations_of(live, seeded.username)
    assert annotation.ranking == [[ids["D"]], [ids["C"]], [ids["B"]], [ids["A"]]]
    assert annotation.likert == {str(ids["A"]): 6, str(ids["C"]): 2}
    assert annotation.flags == {str(ids["B"]): ["hallucination"]}
    assert_clean(page)


def test_no_ties_and_a_required_rationale(page, live):
    seeded = seed(live, allow_ties=False, require_rationale=True, likert=False, flags=[])
    ids = open_task(page, seeded)
    assert page.locator("#cards .likert, #cards .flags").count() == 0
    page.keyboard.press("b")
    page.keyboard.press("=")
    expect(page.locator("#live")).to_have_text("Ties are not allowed in this project.")
    for key in "acd":
        page.keyboard.press(key)
    assert page.locator("#ranked .tie-toggle").count() == 0
    page.keyboard.press("Enter")
    expect(page.locator("#alert")).to_have_text(
        "Write a rationale before submitting: this project requires one."
    )
    expect(page.locator("#rationale")).to_be_focused()
    assert annotations_of(live, seeded.username) == []
    page.keyboard.type("B is the most accurate.")
    page.get_by_role("button", name=re.compile("^Submit")).click()
    wait_submitted(page, 1)
    (annotation,) = annotations_of(live, seeded.username)
    assert annotation.ranking == [[ids[x]] for x in "BACD"]
    assert annotation.rationale == "B is the most accurate."
    assert annotation.likert == {}
    expect(page.locator("#alert")).to_be_empty()


def test_an_expired_task_is_replaced_with_a_message(page, live):
    seeded = seed(live)
    ids = open_task(page, seeded)
    lease_id = int(page.locator("#task").get_attribute("data-lease-id"))
    with live.session() as s:  # the lease runs out behind the page's back
        s.execute(
            update(Lease)
            .where(Lease.id == lease_id)
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
        s.commit()
    for key in "abcd":
        page.keyboard.press(key)
    page.keyboard.press("Enter")
    expect(page.locator("#alert")).to_have_text(
        "This task expired or was already submitted; here is the next one."
    )
    page.wait_for_selector("#task:not([hidden]) .card")
    assert set(shown_ids(page).values()).isdisjoint(ids.values())
    assert annotations_of(live, seeded.username) == []
    expect(page.locator("#my-count")).to_have_text("0")


def test_a_lost_session_leads_back_to_login(page, live):
    seeded = seed(live)
    open_task(page, seeded)
    with live.session() as s:
        user_id = s.scalar(select(User.id).where(User.username == seeded.username))
        s.execute(delete(WebSession).where(WebSession.user_id == user_id))
        s.commit()
    for key in "abcd":
        page.keyboard.press(key)
    page.keyboard.press("Enter")
    expect(page).to_have_url(re.compile(rf"/login\?next=%2Flabel%2F{seeded.slug}$"))
    page.fill("#username", seeded.username)
    page.fill("#password", PASSWORD)
    page.click("form[action='/login'] button[type=submit]")
    expect(page).to_have_url(re.compile(rf"/label/{seeded.slug}$"))
    page.wait_for_selector("#task:not([hidden]) .card")  # the same task, resumed
    assert annotations_of(live, seeded.username) == []


def test_prefetch_and_heartbeat(page, live):
    seeded = seed(live, prompts=3)
    nexts: list[str] = []
    page.on("request", lambda r: nexts.append(r.url) if "/tasks/next" in r.url else None)
    with page.expect_response(lambda r: "/tasks/next?exclude=" in r.url) as prefetch:
        ids = open_task(page, seeded)
    prefetched = prefetch.value.json()
    first_lease = int(prefetch.value.url.rsplit("=", 1)[1])
    assert prefetched["lease_id"] != first_lease
    assert prefetched["prompt"]["id"] != lease_of(live, first_lease).prompt_id
    with page.expect_response(lambda r: r.url.endswith("/extend")) as beat:
        page.evaluate("document.dispatchEvent(new Event('visibilitychange'))")
    assert beat.value.status == 200
    for key in "abcd":
        page.keyboard.press(key)
    with page.expect_response(lambda r: "/tasks/next?exclude=" in r.url):
        page.keyboard.press("Enter")
    wait_submitted(page, 1)
    # The task shown next is the one prefetched while the first was on screen.
    assert shown_ids(page) == {c["label"]: c["id"] for c in prefetched["completions"]}
    assert set(shown_ids(page).values()).isdisjoint(ids.values())
    assert len([u for u in nexts if "exclude" not in u]) == 1
    assert_clean(page)


# --------------------------------------------------------------------------- safety


def test_html_in_completions_stays_inert_text(page, live):
    evil = [
        "<img src=x onerror=alert(1)>",
        "<script>alert(2)</script> and <b>bold</b>",
        "```html\n<img src=y onerror=alert(3)>\n```",
        '<a href="javascript:alert(4)">click</a>',
    ]
    seeded = seed(
        live,
        prompts=1,
        texts=[evil],
        messages=[
            {"role": "system", "content": "<svg onload=alert(5)>"},
            {"role": "user", "content": "Say <i>hi</i> <img src=z onerror=alert(6)>"},
        ],
    )
    ids = open_task(page, seeded)
    page.wait_for_timeout(300)  # time for any handler to fire
    stored = texts_by_id(live, list(ids.values()))
    for label, cid in ids.items():
        card = page.locator(f"#card-{label} .completion-text")
        text = stored[cid]
        if text.startswith("```"):
            expect(card.locator("pre.code-block")).to_have_text("<img src=y onerror=alert(3)>")
        else:
            expect(card).to_have_text(text)
    for tag in ("img", "script", "b", "a", "svg", "i"):
        assert page.locator(f"#cards {tag}, #prompt-body {tag}").count() == 0, tag
    expect(page.locator("#prompt-body")).to_contain_text(
        "Say <i>hi</i> <img src=z onerror=alert(6)>"
    )
    expect(page.locator("#prompt-body .message.system")).to_contain_text("<svg onload=alert(5)>")
    assert_clean(page)


# --------------------------------------------------------------------------- pairwise


def test_pairwise_layout_with_strength_and_both_bad(page, live):
    seeded = seed(live, k=2, prompts=2)
    ids = open_task(page, seeded)
    expect(page.locator("#pairwise")).to_be_visible()
    assert page.locator("#ranked").count() == 0
    expect(page.get_by_label("Much better")).to_be_disabled()
    page.keyboard.press("b")
    expect(page.get_by_label("B is better")).to_be_checked()
    page.keyboard.press("2")
    expect(page.get_by_label("Much better")).to_be_checked()
    page.keyboard.press("Enter")
    wait_submitted(page, 1)
    first = annotations_of(live, seeded.username)[0]
    assert first.ranking == [[ids["B"]], [ids["A"]]]
    assert first.strength == 2
    assert first.both_bad is False

    second_ids = shown_ids(page)
    page.get_by_label("Both are bad").check()
    expect(page.get_by_label("Much better")).to_be_disabled()
    page.get_by_role("button", name=re.compile("^Submit")).click()
    wait_submitted(page, 2)
    second = annotations_of(live, seeded.username)[1]
    assert second.ranking == [[second_ids["A"], second_ids["B"]]]
    assert second.both_bad is True
    assert second.strength is None
    assert_clean(page)


# --------------------------------------------------------------------------- language


def test_chinese_ui_and_the_language_switch(new_context, live):
    seeded = seed(live, prompts=1)
    page = new_context(locale="zh-CN").new_page()
    page.goto(f"/login?next=/label/{seeded.slug}")
    expect(page.locator("h1")).to_have_text("登录")
    expect(page.locator("html")).to_have_attribute("lang", "zh-CN")
    login(page, seeded.username, next=f"/label/{seeded.slug}")
    page.wait_for_selector("#task:not([hidden]) .card")
    expect(page.locator("#submit-button")).to_contain_text("提交")
    expect(page.locator("#card-A .rank-badge")).to_have_text("未排序")  # from the JS catalog
    expect(page.locator("#card-A .card-title")).to_have_text("回答 A")
    page.keyboard.press("a")
    expect(page.locator("#live")).to_have_text("A 排在第 1 位。")

    page.get_by_role("button", name="English").click()
    expect(page.locator("#submit-button")).to_contain_text("Submit")
    expect(page.locator("html")).to_have_attribute("lang", "en")
    # Remembered in a cookie, over the browser's Accept-Language.
    other = page.context.new_page()
    other.goto("/label")
    expect(other.locator("h1")).to_have_text("Your projects")
    other.get_by_role("button", name="简体中文").click()
    expect(other.locator("h1")).to_have_text("你的项目")
    assert_clean(page)


# --------------------------------------------------------------------------- small screens


def test_usable_at_360_px_without_horizontal_scroll(new_context, live):
    long_word = "x" * 300
    texts = [
        f"A very long word: {long_word}",
        "```python\nprint('" + "y" * 200 + "')\n```",
        "short",
        "Line one\n\n    indented line\nLine three",
    ]
    seeded = seed(
        live,
        prompts=1,
        texts=[texts],
        flags=["hallucination", "a rather long flag name that has to wrap on small screens"],
        guidelines="# Guide\n\n| a | b |\n|---|---|\n| " + "z" * 120 + " | 1 |\n",
    )
    page = new_context(viewport={"width": 360, "height": 740}, has_touch=True).new_page()
    page.goto("/login")
    assert _no_horizontal_scroll(page)
    ids = open_task(page, seeded)
    assert len(ids) == 4
    page.locator("#card-B .flags summary").click()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"label-360-{live.kind}.png"), full_page=True)
    assert _no_horizontal_scroll(page)
    # Whitespace is kept.
    text = page.locator("#cards .completion-text", has_text="indented").inner_text()
    assert "\n    indented line\n" in text
    # Tapping + ranks on touch screens: no keyboard and no dragging needed.
    for label in "BADC":
        page.locator(f"#pool .chip[data-id='{ids[label]}'] button.add").tap()
    page.locator("#submit-button").tap()
    wait_submitted(page, 1)
    (annotation,) = annotations_of(live, seeded.username)
    assert annotation.ranking == [[ids[x]] for x in "BADC"]
    page.goto("/label")
    assert _no_horizontal_scroll(page)
    assert_clean(page)


def _no_horizontal_scroll(page: Any) -> bool:
    return page.evaluate(
        "document.documentElement.scrollWidth <= document.documentElement.clientWidth"
    )


# --------------------------------------------------------------------------- API docs


def test_api_docs_load_offline_under_the_csp(page, live):
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    page.goto("/docs")
    expect(page.locator(".swagger-ui .information-container")).to_contain_text("prefero")
    expect(page.locator(".swagger-ui .opblock").first).to_be_visible()
    assert requested
    offsite = [u for u in requested if not u.startswith((live.url, "data:"))]
    assert offsite == []
    assert_clean(page)


# --------------------------------------------------------------------------- generation


def test_the_first_task_appears_by_itself_while_completions_are_generated(page, live):
    """The demo's case: the annotator opens the page before the worker has generated any
    completions. The page says tasks are being generated and shows the first one as soon as
    it is ready, without a reload."""
    seeded = seed(live, prompts=0)
    with live.session() as s:
        prompt = Prompt(
            project_id=seeded.project_id,
            external_id="new",
            messages=[{"role": "user", "content": "Not generated yet?"}],
            metadata_={},
        )
        s.add(prompt)
        s.flush()
        seeded.prompt_ids.append(prompt.id)  # no completions yet
        s.add(
            GenerationJob(
                project_id=seeded.project_id,
                backend="transformers",
                models=["smollm2-135m-instruct"],
                k=4,
                total=1,
                last_prompt_id=prompt.id,
            )
        )
        s.commit()
    login(page, seeded.username, next=f"/label/{seeded.slug}")
    expect(page.locator("#pending-generation")).to_contain_text("1 task is still being generated")
    expect(page.locator("#waiting")).to_be_visible()
    expect(page.locator("#done")).to_be_hidden()

    with live.session() as s:  # the worker saves the prompt's completions
        s.add_all(
            Completion(prompt_id=seeded.prompt_ids[0], external_id=f"g{j}", text=f"Generated {j}")
            for j in range(4)
        )
        s.commit()
    page.wait_for_selector("#task:not([hidden]) .card", timeout=15_000)
    expect(page.locator("#waiting")).to_be_hidden()
    assert sorted(shown_ids(page)) == ["A", "B", "C", "D"]
    assert_clean(page)
