"""The browser side's plumbing, free of FastAPI: templates, translations, Markdown, CSRF tokens
and the security headers every response carries.

- **Templates** live in ``<repo>/templates`` (Jinja2, autoescaped, ``jinja2.ext.i18n``).
- **Translations** are gettext catalogs, ``app/translations/<lang>/LC_MESSAGES/messages.po``,
  compiled in memory at first use (no ``.mo`` files to keep in step). English strings are the
  message ids. Strings the page's JavaScript needs are listed in :data:`JS_MESSAGES` and handed
  to it as a JSON catalog (:data:`ADMIN_JS_MESSAGES` for the admin page's script).
- **CSRF.** Forms of a logged-in user carry the session's ``csrf_token`` (stored with the
  session row). Forms shown before login carry a *signed double-submit* token: a random nonce
  in the ``prefero_csrf`` cookie and, in the form, ``HMAC(secret key, nonce)``; a cross-site
  page can neither read the cookie nor compute the HMAC.
- **Headers.** :class:`SecurityHeaders` (a plain ASGI middleware) adds a strict
  Content-Security-Policy (no inline script or style), ``nosniff``, ``same-origin`` referrers
  and ``DENY`` framing to every response.
"""

from __future__ import annotations

import base64
import gettext as gettext_module
import hashlib
import hmac
import io
import re
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po
from jinja2 import Environment, FileSystemLoader, pass_context, select_autoescape
from jinja2.runtime import Context
from markdown_it import MarkdownIt
from markupsafe import Markup

from app.config import ROOT

TEMPLATES_DIR = ROOT / "templates"
STATIC_DIR = Path(__file__).resolve().parent / "static"
TRANSLATIONS_DIR = Path(__file__).resolve().parent / "translations"

LANGUAGES: dict[str, str] = {"en": "English", "zh_CN": "简体中文"}
"""Supported UI languages (catalog directory → name shown in the language switch)."""
DEFAULT_LANGUAGE = "en"
HTML_LANG = {"en": "en", "zh_CN": "zh-CN"}
LANG_COOKIE = "prefero_lang"
LANG_COOKIE_MAX_AGE = 365 * 24 * 3600
CSRF_COOKIE = "prefero_csrf"
CSRF_FIELD = "csrf_token"

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
)


def N_(message: str) -> str:
    """Mark a string for extraction without translating it here."""
    return message


JS_MESSAGES: tuple[str, ...] = (
    N_("Task loaded: {k} completions, labelled {first} to {last}."),
    N_("Nothing left to label in this project for you. Thank you!"),
    N_("Tasks are still being generated: waiting for the next one."),
    N_("{label} ranked {rank}."),
    N_("{label} tied with {other}."),
    N_("{label} is already ranked."),
    N_("There is no completion {label}."),
    N_("Next letter ties with {label}."),
    N_("Ties are not allowed in this project."),
    N_("Type a letter first; = ties the next letter with it."),
    N_("Removed {label} from the ranking."),
    N_("Tie cancelled."),
    N_("Ranking cleared."),
    N_("Rank {rank}"),
    N_("Rank {rank} (tie)"),
    N_("Not ranked"),
    N_("Tie {label} with the completion above"),
    N_("Remove {label} from the ranking"),
    N_("Rank {label} next"),
    N_("Completion {label}"),
    N_("Submitting…"),
    N_("Submitted. Next task shown."),
    N_("Skipped. Next task shown."),
    N_("Rank every completion before submitting ({n} not ranked yet)."),
    N_("Choose which completion is better before submitting."),
    N_("Write a rationale before submitting: this project requires one."),
    N_("This task expired or was already submitted; here is the next one."),
    N_("The answer was not accepted:"),
    N_("You may not label this task."),
    N_("Your session has ended; log in again."),
    N_("The server could not be reached. Your answers are kept: try again."),
    N_(
        "You hold too many open tasks (in other tabs or projects): submit or skip one of them, "
        "then check again."
    ),
    N_("{label} is better."),
    N_("Both are equally good."),
    N_("Both are bad."),
    N_("Strength: slightly better."),
    N_("Strength: much better."),
    N_("User"),
    N_("Assistant"),
    N_("System"),
    N_("Code"),
    N_("Checking for new tasks…"),
)
"""Every string ``app/static/js/label.js`` shows; ``{name}`` placeholders are filled there."""

ADMIN_JS_MESSAGES: tuple[str, ...] = (
    N_("Queued"),
    N_("Running"),
    N_("Succeeded"),
    N_("Failed"),
    N_("Cancelled"),
    N_("{done} / {total} prompts"),
    N_("Job {id} succeeded."),
    N_("Job {id} failed."),
    N_("Job {id} was cancelled."),
    N_("Cancellation requested for job {id}: it stops after its current batch."),
    N_("Job {id} had already finished."),
    N_("Job {id} could not be cancelled."),
    N_("Your session has ended; log in again."),
    N_("Only administrators can follow and cancel jobs."),
    N_("The server could not be reached; progress updates resume when it can be."),
)
"""Every string ``app/static/js/admin.js`` shows (the admin page's script)."""


# --------------------------------------------------------------------------- translations


def _compile(po_path: Path) -> gettext_module.GNUTranslations:
    with po_path.open("rb") as f:
        catalog = read_po(f, locale=po_path.parent.parent.name)
    buf = io.BytesIO()
    write_mo(buf, catalog, use_fuzzy=False)
    buf.seek(0)
    return gettext_module.GNUTranslations(buf)


@lru_cache
def translations(lang: str) -> gettext_module.NullTranslations:
    """The compiled catalog of ``lang`` (one of :data:`LANGUAGES`)."""
    if lang not in LANGUAGES:
        raise KeyError(lang)
    return _compile(TRANSLATIONS_DIR / lang / "LC_MESSAGES" / "messages.po")


def js_catalog(lang: str, messages: tuple[str, ...] = JS_MESSAGES) -> dict[str, str]:
    """A page script's strings (:data:`JS_MESSAGES` by default, or :data:`ADMIN_JS_MESSAGES`),
    translated into ``lang``."""
    t = translations(lang)
    return {message: t.gettext(message) for message in messages}


_LANG_TAG = re.compile(r"^[A-Za-z]{1,8}(?:-[A-Za-z0-9]{1,8})*$|^\*$")


def language_of(tag: str) -> str | None:
    """The supported language for a BCP 47 tag, e.g. ``zh-Hans-CN`` → ``zh_CN``."""
    primary = tag.strip().replace("_", "-").split("-")[0].lower()
    if primary == "zh":
        return "zh_CN"  # the only Chinese catalog (Simplified)
    if primary == "en":
        return "en"
    return None


def negotiate_language(cookie: str | None, accept_language: str | None) -> str:
    """The UI language: the ``prefero_lang`` cookie if valid, else the best supported entry of
    ``Accept-Language`` (q-values honoured), else English."""
    if cookie in LANGUAGES:
        return cookie
    choices: list[tuple[float, int, str]] = []
    for i, part in enumerate((accept_language or "").split(",")[:32]):
        tag, _, params = part.strip().partition(";")
        tag = tag.strip()
        if not tag or not _LANG_TAG.match(tag):
            continue
        q = 1.0
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        lang = language_of(tag)
        if lang is not None and 0 < q <= 1:
            choices.append((-q, i, lang))
    return min(choices)[2] if choices else DEFAULT_LANGUAGE


# --------------------------------------------------------------------------- Markdown

_SAFE_SCHEMES = {"http", "https", "mailto"}
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


def safe_link(url: str) -> bool:
    """Links and images in guidelines: http(s), mailto, or relative; nothing else."""
    url = url.strip()
    if any(ord(c) < 0x20 for c in url):
        return False
    match = _SCHEME.match(url)
    return match is None or match.group(1).lower() in _SAFE_SCHEMES


def _markdown() -> MarkdownIt:
    md = MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False})
    md.enable(["table", "strikethrough"])
    md.validateLink = safe_link  # type: ignore[method-assign]

    def link_open(self: Any, tokens: list[Any], idx: int, options: Any, env: Any) -> str:
        href = tokens[idx].attrGet("href") or ""
        if urlsplit(str(href)).scheme in {"http", "https"}:
            tokens[idx].attrSet("rel", "noopener noreferrer nofollow")
        return self.renderToken(tokens, idx, options, env)

    md.add_render_rule("link_open", link_open)
    return md


_MD = _markdown()


def render_markdown(text: str) -> Markup:
    """Markdown to HTML with raw HTML escaped (``html=False``) and only safe link schemes."""
    return Markup(_MD.render(text or ""))


# --------------------------------------------------------------------------- templates


@pass_context
def _gettext(ctx: Context, message: str) -> str:
    return ctx["translations"].gettext(message)


@pass_context
def _ngettext(ctx: Context, singular: str, plural: str, n: int) -> str:
    return ctx["translations"].ngettext(singular, plural, n)


@lru_cache
def _asset_version(path: str) -> str:
    full = (STATIC_DIR / path).resolve()
    if not full.is_relative_to(STATIC_DIR) or not full.is_file():
        raise FileNotFoundError(f"no static file {path!r}")
    return hashlib.sha256(full.read_bytes()).hexdigest()[:12]


def static_url(path: str) -> str:
    """``/static/<path>?v=<content hash>``: cached freely, refetched when the file changes."""
    return f"/static/{path}?v={_asset_version(path)}"


def utc_time(value: datetime | None) -> str:
    """A timestamp as the pages show it, ``2026-11-30 14:05:09`` (UTC); empty for None."""
    if value is None:
        return ""
    if value.tzinfo is not None:
        value = value.astimezone(UTC)
    return value.strftime("%Y-%m-%d %H:%M:%S")


def make_environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(TEMPLATES_DIR),
        autoescape=select_autoescape(default=True, default_for_string=True),
        extensions=["jinja2.ext.i18n"],
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.policies["ext.i18n.trimmed"] = True  # as extracted (app/translations/babel.cfg)
    env.install_gettext_callables(_gettext, _ngettext, newstyle=True)  # type: ignore[attr-defined]
    env.globals["static_url"] = static_url
    env.globals["languages"] = LANGUAGES
    env.filters["markdown"] = render_markdown
    env.filters["utc_time"] = utc_time
    return env


# --------------------------------------------------------------------------- CSRF


def new_csrf_nonce() -> str:
    return secrets.token_urlsafe(32)


def signed_csrf_token(secret_key: str, nonce: str) -> str:
    """The form half of the double-submit pair whose cookie half is ``nonce``."""
    mac = hmac.new(secret_key.encode(), b"prefero-csrf:" + nonce.encode(), hashlib.sha256)
    return base64.urlsafe_b64encode(mac.digest()).decode().rstrip("=")


def check_signed_csrf(secret_key: str, nonce: str | None, token: str | None) -> bool:
    if not nonce or not token or len(nonce) > 200 or len(token) > 200:
        return False
    return hmac.compare_digest(signed_csrf_token(secret_key, nonce), token)


def same_token(expected: str | None, token: str | None) -> bool:
    if not expected or not token:
        return False
    return hmac.compare_digest(expected.encode(), token.encode())


def safe_next(url: str | None, default: str = "/label") -> str:
    """A local path to go back to after login; anything else (other hosts, ``//x``, ``\\x``,
    schemes, control characters) becomes ``default``."""
    if not url or len(url) > 2000 or any(ord(c) < 0x21 or c == "\\" for c in url):
        return default
    parts = urlsplit(url)
    if parts.scheme or parts.netloc or not url.startswith("/") or url.startswith("//"):
        return default
    return url


# --------------------------------------------------------------------------- headers

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class SecurityHeaders:
    """ASGI middleware: the headers of :data:`SECURITY_HEADERS` on every HTTP response (those a
    route set itself are left alone), the 500 answer to an unhandled error included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers += [(k, v) for k, v in SECURITY_HEADERS if k not in present]
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception:
            # Starlette's 500 answer is sent outside every middleware: answer here, with the
            # headers (and JSON, like every other error), and let the error propagate to be
            # logged.
            if not started:
                body = b'{"detail":"internal server error"}'
                await send_with_headers(
                    {
                        "type": "http.response.start",
                        "status": 500,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                        ],
                    }
                )
                await send_with_headers({"type": "http.response.body", "body": body})
            raise
