"""Browser tests: the real app under uvicorn (a background thread, a free loopback port) on a
freshly migrated database — SQLite and PostgreSQL — driven by Playwright through Debian's
Chromium (``/usr/bin/chromium``; ``playwright install`` is never needed).

One browser for the whole session, a new context (cookies, storage) per test. Locally the
tests are skipped when Chromium or Playwright is missing; with ``PREFERO_CI=1`` they fail.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from app.config import ROOT, Settings
from app.db import make_engine
from app.main import create_app
from app.models import Annotation, Completion, Lease, Project, Prompt, Role, User
from tests.conftest import create_database, migrate, unavailable
from tests.factories import PASSWORD, make_project, make_user

try:
    from playwright.sync_api import expect
except ImportError:  # reported by the playwright_browser fixture (a skip locally, a CI failure)
    expect = None

CHROMIUM = os.environ.get("PREFERO_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
ARTIFACTS = ROOT / "tests" / "artifacts"
TIMEOUT_MS = 10_000

# Records Content-Security-Policy violations and dialogs (alert/confirm) the page triggers.
WATCH_SCRIPT = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", (e) => {
  window.__cspViolations.push(e.violatedDirective + " " + (e.blockedURI || "inline"));
});
"""


@dataclass
class Live:
    kind: str
    url: str
    engine: Engine
    settings: Settings

    def session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)


@dataclass
class Seeded:
    username: str
    slug: str
    project_id: int
    prompt_ids: list[int] = field(default_factory=list)


@pytest.fixture(scope="session")
def playwright_browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists() and shutil.which(CHROMIUM) is None:
        unavailable("Chromium", f"{CHROMIUM} not found (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as e:  # pragma: no cover - depends on the environment
        unavailable("Playwright", str(e))
    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def live(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Live]:
    import uvicorn

    tmp = tmp_path_factory.mktemp(f"browser-{request.param}")
    url, drop = create_database(request.param, tmp)
    server = thread = engine = app = None
    try:
        migrate(url)
        settings = Settings(data_dir=tmp / "data", database_url=url, secret_key="browser-tests")
        app = create_app(settings)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        server = uvicorn.Server(
            uvicorn.Config(app, log_level="warning", lifespan="on", access_log=False)
        )
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        deadline = time.monotonic() + 20
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        engine = make_engine(url)
        yield Live(request.param, f"http://127.0.0.1:{port}", engine, settings)
    finally:
        if server is not None:
            server.should_exit = True
        if thread is not None:
            thread.join(15)
        if engine is not None:
            engine.dispose()
        if app is not None:
            app.state.engine.dispose()
        drop()


@pytest.fixture
def new_context(playwright_browser: Any, live: Live) -> Iterator[Any]:
    """Makes browser contexts (own cookies and storage) on the live server, closed afterwards.
    Keyword arguments go to ``Browser.new_context`` (locale, viewport, has_touch …)."""
    made: list[Any] = []

    def make(**options: Any) -> Any:
        options = {"locale": "en-US", "viewport": {"width": 1280, "height": 900}, **options}
        ctx = playwright_browser.new_context(base_url=live.url, **options)
        ctx.set_default_timeout(TIMEOUT_MS)
        ctx.add_init_script(WATCH_SCRIPT)
        ctx.dialogs = []  # alert()/confirm() messages: none may ever fire

        def on_dialog(dialog: Any) -> None:
            ctx.dialogs.append(dialog.message)
            dialog.dismiss()

        ctx.on("dialog", on_dialog)
        made.append(ctx)
        return ctx

    try:
        yield make
    finally:
        for ctx in made:
            ctx.close()


@pytest.fixture
def context(new_context: Any) -> Any:
    return new_context()


@pytest.fixture
def page(context: Any) -> Any:
    return context.new_page()


# --------------------------------------------------------------------------- data helpers

_seq = iter(range(1, 10**9))


def seed(
    live: Live,
    *,
    k: int = 4,
    prompts: int = 2,
    texts: list[list[str]] | None = None,
    messages: list[dict[str, str]] | None = None,
    role: Role = Role.annotator,
    **project_fields: Any,
) -> Seeded:
    """A new annotator and a new project with ``prompts`` prompts of ``k`` completions each
    (``texts[i]`` overrides prompt i's completion texts)."""
    n = next(_seq)
    with live.session() as s:
        user = make_user(s, username=f"{live.kind}-ann-{n}", role=role)
        project = make_project(
            s,
            slug=f"{live.kind[:2]}-p{n}",
            name=f"Browser project {n}",
            completions_per_task=k,
            **project_fields,
        )
        ids = []
        for i in range(prompts):
            prompt = Prompt(
                project_id=project.id,
                external_id=f"p{i}",
                messages=messages or [{"role": "user", "content": f"Question {i} of project {n}?"}],
                metadata_={},
            )
            own = texts[i] if texts and i < len(texts) else None
            prompt.completions = [
                Completion(external_id=f"c{j}", text=own[j] if own else f"Answer {j} to {i}/{n}")
                for j in range(k)
            ]
            s.add(prompt)
            s.commit()
            ids.append(prompt.id)
        return Seeded(user.username, project.slug, project.id, ids)


def annotations_of(live: Live, username: str) -> list[Annotation]:
    with live.session() as s:
        user_id = s.scalar(select(User.id).where(User.username == username))
        return list(
            s.scalars(
                select(Annotation).where(Annotation.user_id == user_id).order_by(Annotation.id)
            )
        )


def lease_of(live: Live, lease_id: int) -> Lease:
    with live.session() as s:
        lease = s.get(Lease, lease_id)
        assert lease is not None
        return lease


def project_of(live: Live, slug: str) -> Project:
    with live.session() as s:
        project = s.scalar(select(Project).where(Project.slug == slug))
        assert project is not None
        return project


def login(page: Any, username: str, *, next: str = "/label") -> None:
    page.goto(f"/login?next={next}")
    page.fill("#username", username)
    page.fill("#password", PASSWORD)
    page.click("form[action='/login'] button[type=submit]")
    page.wait_for_url(f"**{next}")


def open_task(page: Any, seeded: Seeded) -> dict[str, int]:
    """Log in, open the labeling page and wait for a task; returns label → completion id as
    shown on the page."""
    login(page, seeded.username, next=f"/label/{seeded.slug}")
    page.wait_for_selector("#task:not([hidden]) .card")
    return shown_ids(page)


def shown_ids(page: Any) -> dict[str, int]:
    cards = page.locator("#cards .card")
    return {
        cards.nth(i).get_attribute("data-label"): int(cards.nth(i).get_attribute("data-id"))
        for i in range(cards.count())
    }


def csp_violations(page: Any) -> list[str]:
    return page.evaluate("window.__cspViolations || []")
