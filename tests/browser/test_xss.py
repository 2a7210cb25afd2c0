"""Stored XSS in a real browser: prompt, completion, model name, metadata, guidelines (Markdown
with raw HTML, ``javascript:`` links, ``onerror`` images), project name, flags, generation
settings, rationale, token name, job message and username all carry script payloads; every page
that shows them is opened by the role that sees it and must stay inert: ``window.__xss`` never
set, no dialog, no CSP violation (nothing the CSP had to stop: the payloads are escaped), no
event-handler attribute, inline script or ``javascript:`` URL in the DOM, and the payload shown
as text. SQLite only (the escaping does not depend on the database)."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from app.models import GenerationJob, JobStatus, Role
from tests.browser.conftest import Live, csp_violations, expect, login, project_of
from tests.factories import PASSWORD, make_token, make_user

SCRIPT = "<script>window.__xss=1</script>"
IMG = '<img src=x onerror="window.__xss=1">'
SVG = '"><svg onload=window.__xss=1>'
QUOTE = "'><img src=x onerror=window.__xss=1>"
JS_URL = "javascript:window.__xss=1"
PAYLOAD = f"{SCRIPT} {IMG} {SVG} {QUOTE} {JS_URL}"
FLAG = "flag </script>" + IMG  # breaks out of the page's JSON config if not escaped
SHORT = '"><svg onload=window.__xss=1><img src=x onerror=window.__xss=1>'  # 63 characters
GUIDELINES = f"""# Guidelines {SCRIPT}

Raw HTML: {IMG} and <a href="{JS_URL}">a raw link</a> and {SVG}

- [a Markdown link]({JS_URL})
- [an encoded one](jav&#x61;script:window.__xss=1)
- <{JS_URL}>
- ![an image](x" onerror="window.__xss=1)
- [data](data:text/html,<script>window.__xss=1</script>)

<details open ontoggle="window.__xss=1">toggle</details>
<iframe src="{JS_URL}"></iframe>
"""

DOM_SCAN = """() => {
  const bad = [];
  for (const el of document.querySelectorAll("*")) {
    for (const a of el.attributes) {
      if (a.name.toLowerCase().startsWith("on")) bad.push(el.tagName + "[" + a.name + "]");
      if (/^\\s*(javascript|data|vbscript):/i.test(a.value) &&
          ["href", "src", "action", "formaction", "xlink:href", "srcdoc"].includes(a.name))
        bad.push(el.tagName + "[" + a.name + "=" + a.value + "]");
    }
    const tag = el.tagName.toLowerCase();
    if (tag === "script" && !el.src && el.type !== "application/json") bad.push("inline script");
    if (["iframe", "object", "embed", "base"].includes(tag)) bad.push(tag);
  }
  return bad;
}"""


def check_inert(page: Any, url: str, *, shown: tuple[str, ...] = ()) -> None:
    """The page at ``url`` (already open) ran nothing from the data and shows ``shown`` as
    text."""
    page.wait_for_load_state("load")
    page.wait_for_timeout(150)  # an image's onerror, a toggle event …
    assert page.evaluate("window.__xss") is None, f"{url}: a payload ran"
    assert page.context.dialogs == [], f"{url}: a dialog fired"
    assert csp_violations(page) == [], f"{url}: the CSP had to block something"
    assert page.evaluate(DOM_SCAN) == [], f"{url}: live markup from the data"
    text = page.locator("body").inner_text()
    for fragment in shown:
        assert fragment in text, f"{url}: {fragment!r} is not shown as text"


def visit(page: Any, url: str, *, status: int = 200, shown: tuple[str, ...] = ()) -> None:
    response = page.goto(url)
    assert response is not None
    assert response.status == status, f"{url}: {response.status}"
    check_inert(page, url, shown=shown)


@pytest.mark.parametrize("live", ["sqlite"], indirect=True)
def test_stored_xss_is_inert_on_every_page(new_context, live: Live) -> None:
    with live.session() as s:
        admin = make_user(s, role=Role.admin, username="xss-admin")
        admin_token = make_token(s, admin)
    api = httpx.Client(
        base_url=live.url, headers={"Authorization": f"Bearer {admin_token}"}, timeout=30
    )

    # The API refuses markup in a username …
    r = api.post("/api/v1/users", json={"username": SHORT, "role": "annotator"})
    assert r.status_code == 422, r.text
    # … so the hostile annotator comes from elsewhere (an older version, the database).
    with live.session() as s:
        make_user(s, username=SHORT)
    user_path = quote(SHORT, safe="")

    slug = "xss-project"
    r = api.post(
        "/api/v1/projects",
        json={
            "slug": slug,
            "name": f"Project {SCRIPT}{IMG}"[:200],
            "guidelines": GUIDELINES,
            "completions_per_task": 3,
            "overlap": 2,
            "likert": False,
            "flags": [FLAG, "plain"],
            "system_prompt": PAYLOAD,
            "instruction_template": "{prompt} " + PAYLOAD,
        },
    )
    assert r.status_code == 201, r.text
    name = r.json()["name"]
    records = [
        {
            "id": f"xss-{n}",
            "prompt": [
                {"role": "system", "content": "system " + PAYLOAD},
                {"role": "user", "content": f"prompt {n} {PAYLOAD}\n```html\n{SCRIPT}\n```"},
            ],
            "completions": [
                {"id": f"c{i}", "text": f"completion {i} {PAYLOAD}", "model": f"model-{i} {IMG}"}
                for i in range(3)
            ],
            "metadata": {"note": PAYLOAD, SCRIPT: IMG},
        }
        for n in (1, 2)
    ]
    r = api.post(
        f"/api/v1/projects/{slug}/prompts",
        content="\n".join(json.dumps(r) for r in records).encode(),
        headers={"Content-Type": "application/x-ndjson"},
    )
    assert r.status_code in (200, 201), r.text
    r = api.post(f"/api/v1/users/{user_path}/tokens", json={"name": f"token {IMG}"[:100]})
    assert r.status_code == 201, r.text
    hostile_token = r.json()["token"]

    # The hostile annotator labels through the API: a rationale and flags with payloads.
    labeler = httpx.Client(
        base_url=live.url, headers={"Authorization": f"Bearer {hostile_token}"}, timeout=30
    )
    task = labeler.get(f"/api/v1/projects/{slug}/tasks/next").json()
    ids = [c["id"] for c in task["completions"]]
    r = labeler.post(
        f"/api/v1/leases/{task['lease_id']}/submit",
        json={
            "ranking": [[i] for i in ids],
            "rationale": "rationale " + PAYLOAD,
            "flags": {str(ids[0]): [FLAG]},
        },
    )
    assert r.status_code == 201, r.text
    prompt_id = task["prompt"]["id"]
    project_id = project_of(live, slug).id
    with live.session() as s:
        s.add(
            GenerationJob(
                project_id=project_id,
                status=JobStatus.running,
                backend="builtin",
                models=[f"model {IMG}"],
                k=2,
                total=5,
                done=1,
                worker=f"worker {SVG}",
                message="message " + PAYLOAD,
            )
        )
        s.commit()

    # The hostile annotator's own pages (a second prompt-less view: the home page).
    ctx = new_context()
    page = ctx.new_page()
    login(page, SHORT, next="/label")
    check_inert(page, "/label", shown=(name, SHORT))
    visit(page, f"/label/{slug}", shown=(name,))
    page.wait_for_selector("#task:not([hidden]) .card")
    check_inert(page, f"/label/{slug} (task)", shown=(PAYLOAD, "completion 0 " + PAYLOAD))
    assert FLAG in page.locator("#cards").text_content()  # the flag menus (collapsed)
    expect(page.locator(".guidelines .markdown")).to_contain_text(SCRIPT)
    expect(page.locator(".guidelines .markdown")).to_contain_text(IMG)
    visit(page, f"/label/{quote(SCRIPT, safe='')}", status=404)

    # Every admin page that shows the data.
    ctx = new_context()
    page = ctx.new_page()
    login(page, "xss-admin", next="/admin")
    check_inert(page, "/admin", shown=(name, "message " + PAYLOAD))
    visit(page, f"/admin/projects/{slug}", shown=(name,))
    expect(page.locator("#name")).to_have_value(name)
    assert page.locator("#guidelines").input_value().strip() == GUIDELINES.strip()
    page.locator("button[name=action][value=preview]").first.click()
    page.wait_for_selector(".guidelines-preview")
    check_inert(page, "settings preview", shown=(SCRIPT,))
    visit(page, f"/admin/projects/{slug}/prompts", shown=(f"prompt 1 {SCRIPT} {IMG}",))
    visit(
        page,
        f"/admin/projects/{slug}/prompts/{prompt_id}",
        shown=(PAYLOAD, "completion 2 " + PAYLOAD, "rationale " + PAYLOAD, SHORT, FLAG),
    )
    visit(page, f"/admin/projects/{slug}/dashboard", shown=(name,))
    visit(page, "/admin/users", shown=(SHORT,))
    visit(page, f"/admin/users/{user_path}", shown=(SHORT, f"token {IMG}"))
    visit(page, "/admin/audit", shown=(f"Project {SCRIPT}", SHORT))  # details are JSON
    visit(page, f"/admin/projects/{quote(SCRIPT, safe='')}", status=404)

    # A project created in the browser: the form preview, then the flash message with its name.
    page.goto("/admin/new-project")
    page.fill("#name", f"UI {SVG}")
    page.fill("#slug", "xss-ui")
    page.fill("#guidelines", GUIDELINES)
    page.locator("button[name=action][value=preview]").first.click()
    page.wait_for_selector(".guidelines-preview")
    check_inert(page, "new-project preview", shown=(SCRIPT,))
    page.locator("button[type=submit].primary").click()
    page.wait_for_url("**/admin/projects/xss-ui**")
    check_inert(page, "after create (flash)", shown=(f"UI {SVG}",))

    # The login page echoing a hostile username back into its form.
    ctx = new_context()
    page = ctx.new_page()
    page.goto(f"/login?next={quote(JS_URL)}")
    page.fill("#username", SHORT)
    page.fill("#password", PASSWORD + "wrong")
    page.click("form[action='/login'] button[type=submit]")
    page.wait_for_selector("#username")
    check_inert(page, "login error")
    expect(page.locator("#username")).to_have_value(SHORT)
