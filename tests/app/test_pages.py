"""The HTML pages: login/logout, CSRF, the login rate limit, security headers, escaping,
language negotiation and redirects (on SQLite and PostgreSQL, through the ASGI app)."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.config import ROOT
from app.models import GenerationJob, JobStatus, ProjectMember, Role, WebSession
from app.services.tasks import next_task
from app.web import CONTENT_SECURITY_POLICY, negotiate_language, render_markdown, safe_next
from tests.factories import PASSWORD, count, make_project, make_prompt, make_user

CSRF_FIELD = re.compile(r'name="csrf_token" value="([^"]+)"')
META_CSRF = re.compile(r'<meta name="csrf-token" content="([^"]+)">')


def form_token(html: str) -> str:
    match = CSRF_FIELD.search(html)
    assert match, "no csrf_token field in the page"
    return match.group(1)


def log_in(client, username: str, *, next: str = "/label"):
    token = form_token(client.get("/login").text)
    return client.post(
        "/login",
        data={"username": username, "password": PASSWORD, "csrf_token": token, "next": next},
        follow_redirects=False,
    )


def logged_in(client, session, **user_fields):
    user = make_user(session, **user_fields)
    r = log_in(client, user.username)
    assert r.status_code == 303, r.text
    return user


def session_csrf(client) -> str:
    match = META_CSRF.search(client.get("/label").text)
    assert match
    return match.group(1)


# --------------------------------------------------------------------------- login / logout


def test_login_page_has_a_signed_csrf_token_and_strict_headers(client):
    r = client.get("/login")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert r.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["referrer-policy"] == "same-origin"
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["cache-control"] == "no-store"
    assert "prefero_csrf" in client.cookies
    assert form_token(r.text) != client.cookies["prefero_csrf"]  # the HMAC, not the nonce
    # The same nonce (hence token) is kept while the cookie lives: several tabs work.
    assert form_token(client.get("/login").text) == form_token(r.text)


def test_login_sets_a_hardened_session_cookie_and_redirects(client, session):
    user = make_user(session)
    r = log_in(client, user.username, next="/label/some-project?x=1")
    assert r.status_code == 303
    assert r.headers["location"] == "/label/some-project?x=1"
    cookies = r.headers.get_list("set-cookie")
    (session_cookie,) = [c for c in cookies if c.startswith("prefero_session=")]
    attrs = {a.strip().lower() for a in session_cookie.split(";")[1:]}
    assert "httponly" in attrs
    assert "samesite=lax" in attrs
    assert "path=/" in attrs
    assert "max-age=604800" in attrs
    assert "secure" not in attrs
    # The pre-login CSRF cookie is dropped.
    assert any(c.startswith("prefero_csrf=") and "Max-Age=0" in c for c in cookies)
    assert count(session, WebSession) == 1
    home = client.get("/label")
    assert home.status_code == 200
    assert user.username in home.text


def test_secure_cookie_when_configured(app, session, settings):
    settings.session_cookie_secure = True
    user = make_user(session)
    with TestClient(app, base_url="https://testserver") as client:
        r = log_in(client, user.username)
    assert r.status_code == 303
    (cookie,) = [c for c in r.headers.get_list("set-cookie") if c.startswith("prefero_session=")]
    assert "secure" in cookie.lower()


@pytest.mark.parametrize(
    "token", [None, "", "forged", "x" * 300], ids=["missing", "empty", "forged", "long"]
)
def test_login_without_a_valid_csrf_token_is_refused(client, session, token):
    user = make_user(session)
    client.get("/login")
    data = {"username": user.username, "password": PASSWORD}
    if token is not None:
        data["csrf_token"] = token
    r = client.post("/login", data=data, follow_redirects=False)
    assert r.status_code == 403
    assert "prefero_session" not in r.headers.get("set-cookie", "")
    assert count(session, WebSession) == 0


def test_login_token_only_matches_its_own_cookie(client, session):
    user = make_user(session)
    token = form_token(client.get("/login").text)
    client.cookies.clear()
    client.cookies.set("prefero_csrf", "another-nonce")
    r = client.post(
        "/login",
        data={"username": user.username, "password": PASSWORD, "csrf_token": token},
        follow_redirects=False,
    )
    assert r.status_code == 403


def test_wrong_password_shows_a_message(client, session):
    user = make_user(session)
    token = form_token(client.get("/login").text)
    r = client.post(
        "/login",
        data={"username": user.username, "password": "wrong password", "csrf_token": token},
    )
    assert r.status_code == 401
    assert "Wrong username or password." in r.text
    assert f'value="{user.username}"' in r.text  # the username is kept, the password is not
    assert "wrong password" not in r.text


def test_login_is_rate_limited_with_a_clear_message(client, session, settings):
    user = make_user(session)
    token = form_token(client.get("/login").text)
    bad = {"username": user.username, "password": "nope nope", "csrf_token": token}
    for _ in range(settings.login_max_failures):
        assert client.post("/login", data=bad).status_code == 401
    r = client.post("/login", data={**bad, "password": PASSWORD})  # even the right one now
    assert r.status_code == 429
    assert r.headers["retry-after"]
    assert "Too many failed attempts. Wait a minute, then try again." in r.text
    assert r.headers["content-security-policy"] == CONTENT_SECURITY_POLICY


def test_inactive_users_cannot_log_in(client, session):
    user = make_user(session, active=False)
    assert log_in(client, user.username).status_code == 401


@pytest.mark.parametrize(
    "target",
    [
        "//evil.example/x",
        "https://evil.example/",
        "/\\evil.example",
        "javascript:alert(1)",
        "label",
        "/ok\r\nSet-Cookie: x=1",
        "",
    ],
)
def test_login_never_redirects_off_site(client, session, target):
    user = make_user(session)
    r = log_in(client, user.username, next=target)
    assert r.status_code == 303
    assert r.headers["location"] == "/label"
    assert safe_next(target) == "/label"


def test_logout_needs_the_session_csrf_token(client, session):
    logged_in(client, session)
    r = client.post("/logout", data={"csrf_token": "wrong"}, follow_redirects=False)
    assert r.status_code == 403
    assert client.get("/label", follow_redirects=False).status_code == 200  # still logged in

    r = client.post("/logout", data={"csrf_token": session_csrf(client)}, follow_redirects=False)
    assert r.status_code == 303
    assert r.headers["location"] == "/login"
    assert any(
        c.startswith("prefero_session=") and "Max-Age=0" in c
        for c in r.headers.get_list("set-cookie")
    )
    assert count(session, WebSession) == 0
    client.cookies.clear()
    assert client.get("/label", follow_redirects=False).status_code == 303


def test_a_logged_in_visit_to_login_goes_on(client, session):
    logged_in(client, session)
    r = client.get("/login?next=/label/x", follow_redirects=False)
    assert r.status_code == 303
    assert r.headers["location"] == "/label/x"


# --------------------------------------------------------------------------- redirects, access


@pytest.mark.parametrize("path", ["/label", "/label/some-project"])
def test_pages_send_anonymous_visitors_to_login(client, path):
    r = client.get(path, follow_redirects=False)
    assert r.status_code == 303
    assert r.headers["location"] == f"/login?next={path}"


def test_an_expired_or_unknown_session_cookie_is_anonymous(client):
    client.cookies.set("prefero_session", "not-a-session")
    r = client.get("/label", follow_redirects=False)
    assert r.status_code == 303


def test_unknown_project_page_is_404_html(client, session):
    logged_in(client, session)
    r = client.get("/label/no-such-project")
    assert r.status_code == 404
    assert r.headers["content-type"].startswith("text/html")
    assert "Project not found" in r.text
    assert r.headers["content-security-policy"] == CONTENT_SECURITY_POLICY


def test_members_only_project_is_403_for_others(client, session):
    project = make_project(session, members_only=True)
    make_prompt(session, project)
    logged_in(client, session)
    r = client.get(f"/label/{project.slug}")
    assert r.status_code == 403
    assert "members only" in r.text
    assert project.name not in client.get("/label").text


def test_members_see_their_members_only_project(client, session):
    project = make_project(session, members_only=True)
    make_prompt(session, project)
    user = logged_in(client, session)
    session.add(ProjectMember(project_id=project.id, user_id=user.id))
    session.commit()
    assert client.get(f"/label/{project.slug}").status_code == 200
    assert project.name in client.get("/label").text


def test_annotators_cannot_reach_admin_routes_or_others_annotations(client, session):
    project = make_project(session)
    prompt = make_prompt(session, project)
    logged_in(client, session)
    csrf = {"X-CSRF-Token": session_csrf(client)}
    assert client.get("/api/v1/projects").status_code == 403
    assert client.get(f"/api/v1/prompts/{prompt.id}").status_code == 403
    assert client.get("/api/v1/users").status_code == 403
    r = client.post("/api/v1/projects", json={"name": "x", "slug": "x"}, headers=csrf)
    assert r.status_code == 403

    # Another annotator's lease can be neither submitted nor skipped nor extended.
    task = next_task(session, slug=project.slug, user=make_user(session))
    assert task is not None
    for action, body in (("submit", {"ranking": [[1]]}), ("skip", {}), ("extend", None)):
        r = client.post(f"/api/v1/leases/{task.lease_id}/{action}", json=body, headers=csrf)
        assert r.status_code == 403, (action, r.text)


def test_the_page_token_drives_the_json_api(client, session):
    project = make_project(session)
    make_prompt(session, project)
    logged_in(client, session)
    page = client.get(f"/label/{project.slug}")
    token = META_CSRF.search(page.text).group(1)
    task = client.get(f"/api/v1/projects/{project.slug}/tasks/next").json()
    body = {"ranking": [[c["id"]] for c in task["completions"]], "duration_ms": 1200}
    url = f"/api/v1/leases/{task['lease_id']}/submit"
    assert client.post(url, json=body).status_code == 403  # no CSRF header
    assert client.post(url, json=body, headers={"X-CSRF-Token": "nope"}).status_code == 403
    assert client.post(url, json=body, headers={"X-CSRF-Token": token}).status_code == 201


# --------------------------------------------------------------------------- pages' content


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def _tags(html: str) -> list[tuple[str, dict[str, str | None]]]:
    parser = _Tags()
    parser.feed(html)
    return parser.tags


def assert_no_inline_code(html: str) -> None:
    for tag, attrs in _tags(html):
        assert "style" not in attrs, f"inline style on <{tag}>"
        handlers = [a for a in attrs if a.startswith("on")]
        assert not handlers, f"event handler attribute {handlers} on <{tag}>"
        if tag == "script":
            assert attrs.get("src") or attrs.get("type") == "application/json", attrs
        if tag == "style":
            raise AssertionError("inline <style> element")
        if tag in ("script", "link", "img", "iframe", "source", "video", "audio"):
            # everything a page loads is served by prefero itself (no CDN):
            # a same-origin path, never a scheme or a protocol-relative URL
            # (a bare "cdn" substring test failed on a random CSRF token)
            for name in ("src", "href"):
                url = attrs.get(name)
                local = url is None or (url.startswith("/") and not url.startswith("//"))
                assert local, f"<{tag} {name}={url!r}>"
    assert "http://" not in html
    assert "https://" not in html.replace("https://x.example", "")


def test_every_page_is_free_of_inline_code_and_carries_the_csp(client, session):
    project = make_project(session, guidelines="See [the site](https://x.example).")
    make_prompt(session, project)
    pages = [client.get("/login"), client.get("/docs")]
    logged_in(client, session)
    pages += [client.get("/label"), client.get(f"/label/{project.slug}"), client.get("/label/x")]
    for r in pages:
        assert r.headers["content-security-policy"] == CONTENT_SECURITY_POLICY, r.url
        assert r.headers["x-frame-options"] == "DENY"
        assert_no_inline_code(r.text)


def test_templates_have_no_inline_code():
    for path in sorted((ROOT / "templates").rglob("*.html")):
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"\sstyle\s*=", text), path
        assert not re.search(r"\son[a-z]+\s*=", text), path
        for match in re.finditer(r"<script\b([^>]*)>", text):
            assert "src=" in match.group(1) or "application/json" in match.group(1), path


def test_json_api_responses_carry_the_headers_too(client):
    r = client.get("/healthz")
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["content-security-policy"] == CONTENT_SECURITY_POLICY


def test_project_data_is_escaped_everywhere(client, session):
    evil = "</script><script>alert(1)</script>"
    project = make_project(
        session,
        name=f"<img src=x onerror=alert(1)>{evil}",
        guidelines=(
            "# Guide\n\n<script>alert(2)</script>\n\n[bad](javascript:alert(3)) "
            "[ok](https://x.example/page) ![img](data:text/html,boom)"
        ),
        flags=[f"flag {evil}", 'quote " flag'],
    )
    make_prompt(session, project)
    logged_in(client, session)
    for r in (client.get("/label"), client.get(f"/label/{project.slug}")):
        assert r.status_code == 200
        assert "<img src=x" not in r.text
        assert "<script>alert" not in r.text
        assert "&lt;img src=x onerror=alert(1)&gt;" in r.text
        assert_no_inline_code(r.text)
    page = client.get(f"/label/{project.slug}").text
    assert 'href="javascript:' not in page
    assert "[bad](javascript:alert(3))" in page  # left as plain text
    assert '<a href="https://x.example/page" rel="noopener noreferrer nofollow">ok</a>' in page
    assert 'src="data:text/html' not in page
    # The JSON config cannot close its <script> element.
    config = re.search(r'<script type="application/json" id="label-config">(.*?)</script>', page)
    assert config
    assert "\\u003c/script\\u003e" in config.group(1)


def test_markdown_rendering_is_sanitised():
    html = str(
        render_markdown(
            "<b>x</b> [a](JAVASCRIPT:alert(1)) [b](vbscript:x) [c](/rel) [d](mailto:a@b.c) `<i>`"
        )
    )
    assert "<b>" not in html
    assert "&lt;b&gt;" in html
    assert 'href="javascript' not in html.lower()
    assert 'href="vbscript' not in html.lower()
    assert 'href="/rel"' in html
    assert 'href="mailto:a@b.c"' in html
    assert "<code>&lt;i&gt;</code>" in html
    assert render_markdown("") == ""


def test_home_lists_projects_with_progress(client, session):
    project = make_project(session, name="Helpfulness")
    make_prompt(session, project)
    make_prompt(session, project)
    logged_in(client, session)
    page = client.get("/label").text
    assert "Helpfulness" in page
    assert "0 of 2 prompts complete" in page
    assert f'href="/label/{project.slug}"' in page
    assert "Start labeling" in page


def test_label_page_shows_settings_guidelines_and_pending_generation(client, session):
    project = make_project(
        session, completions_per_task=2, guidelines="**Be kind**", require_rationale=True
    )
    make_prompt(session, project, k=2)
    session.add(
        GenerationJob(
            project_id=project.id,
            status=JobStatus.running,
            backend="transformers",
            models=["m"],
            k=2,
            total=5,
            done=2,
        )
    )
    session.commit()
    logged_in(client, session)
    page = client.get(f"/label/{project.slug}").text
    assert '<details class="guidelines" open>' in page
    assert "<strong>Be kind</strong>" in page
    assert "3 tasks are still being generated." in page
    assert 'id="pairwise"' in page
    assert 'id="ranked"' not in page
    assert "Rationale (required)" in page
    assert '<meta name="csrf-token"' in page
    assert "/static/js/label.js?v=" in page
    assert "/static/vendor/sortablejs/Sortable.min.js" not in page  # pairwise needs no dragging


def test_admins_may_label_too(client, session):
    project = make_project(session)
    make_prompt(session, project)
    logged_in(client, session, role=Role.admin)
    assert client.get(f"/label/{project.slug}").status_code == 200


# --------------------------------------------------------------------------- static files


def test_static_files_and_vendored_licences(client):
    r = client.get("/static/js/label.js")
    assert r.status_code == 200
    assert "javascript" in r.headers["content-type"]
    assert r.headers["x-content-type-options"] == "nosniff"
    assert "innerHTML" not in r.text  # data is only ever written as text
    vendor = ROOT / "app" / "static" / "vendor"
    assert (vendor / "sortablejs" / "LICENSE").read_text().startswith("MIT License")
    assert "Apache License" in (vendor / "swagger-ui" / "LICENSE").read_text()
    for path in ("sortablejs/Sortable.min.js", "swagger-ui/swagger-ui-bundle.js"):
        assert client.get(f"/static/vendor/{path}").status_code == 200
    assert client.get("/static/../app/web.py").status_code == 404


def test_docs_use_the_vendored_swagger_ui(client):
    page = client.get("/docs").text
    srcs = [a.get("src") or "" for t, a in _tags(page) if t == "script"]
    assert len(srcs) == 2
    assert srcs[0].startswith("/static/vendor/swagger-ui/swagger-ui-bundle.js?v=")
    assert srcs[1].startswith("/static/js/docs.js?v=")
    assert client.get("/redoc").status_code == 404
    assert "/docs" not in client.get("/openapi.json").json()["paths"]


# --------------------------------------------------------------------------- languages


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("zh-CN,zh;q=0.9,en;q=0.8", "zh_CN"),
        ("zh-Hans", "zh_CN"),
        ("zh", "zh_CN"),
        ("fr-FR, zh;q=0.5, en;q=0.4", "zh_CN"),
        ("en;q=0.9, zh;q=0.8", "en"),
        ("zh;q=0, en", "en"),
        ("de", "en"),
        ("", "en"),
        (None, "en"),
        ("garbage;;;q=x,,", "en"),
        ("*", "en"),
    ],
)
def test_language_negotiation(header, expected):
    assert negotiate_language(None, header) == expected


def test_the_cookie_wins_over_accept_language():
    assert negotiate_language("en", "zh-CN") == "en"
    assert negotiate_language("zh_CN", "en") == "zh_CN"
    assert negotiate_language("xx", "zh") == "zh_CN"


def test_pages_follow_accept_language(client):
    r = client.get("/login", headers={"Accept-Language": "zh-CN,zh;q=0.9"})
    assert '<html lang="zh-CN">' in r.text
    assert "<h1>登录</h1>" in r.text
    assert "<h1>Log in</h1>" in client.get("/login", headers={"Accept-Language": "en"}).text


def test_language_switch_is_remembered_in_a_cookie(client, session):
    token = form_token(client.get("/login").text)
    r = client.post(
        "/lang",
        data={"lang": "zh_CN", "next": "/login?next=/label", "csrf_token": token},
        follow_redirects=False,
    )
    assert r.status_code == 303
    assert r.headers["location"] == "/login?next=/label"
    (cookie,) = [c for c in r.headers.get_list("set-cookie") if c.startswith("prefero_lang=")]
    assert "httponly" in cookie.lower()
    assert "samesite=lax" in cookie.lower()
    assert "<h1>登录</h1>" in client.get("/login", headers={"Accept-Language": "en"}).text

    # Logged in, the session's token is used; the Chinese JS catalog is on the page.
    project = make_project(session)
    make_prompt(session, project)
    logged_in(client, session)
    page = client.get(f"/label/{project.slug}").text
    assert "未排序" in page
    assert "提交" in page
    r = client.post(
        "/lang",
        data={"lang": "en", "next": f"/label/{project.slug}", "csrf_token": session_csrf(client)},
        follow_redirects=False,
    )
    assert r.status_code == 303
    assert "Submit" in client.get(f"/label/{project.slug}").text


def test_language_switch_needs_csrf_and_ignores_unknown_languages(client):
    client.get("/login")
    r = client.post("/lang", data={"lang": "zh_CN", "next": "/label"}, follow_redirects=False)
    assert r.status_code == 403
    token = form_token(client.get("/login").text)
    r = client.post(
        "/lang",
        data={"lang": "xx", "next": "https://evil.example/", "csrf_token": token},
        follow_redirects=False,
    )
    assert r.status_code == 303
    assert r.headers["location"] == "/label"
    assert "prefero_lang" not in r.headers.get("set-cookie", "")


def test_session_rows_are_per_login(client, session):
    user = logged_in(client, session)
    again = log_in(client, user.username)
    assert again.status_code == 303
    rows = session.scalars(select(WebSession).where(WebSession.user_id == user.id)).all()
    assert len(rows) == 2
