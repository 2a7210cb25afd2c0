"""Application factory: ``create_app(settings=None)`` wires routers, state and error handlers."""

from __future__ import annotations

import gc
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from anyio import to_thread
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import DataError, IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from app import __version__
from app.config import Settings, get_settings
from app.db import (
    engine_from_settings,
    make_session_factory,
    make_statement_session_factory,
    statement_pool,
)
from app.errors import DomainError, TooManyRequests
from app.observability import Observability, install_record_factory, worker_stopped
from app.routes import (
    api_audit,
    api_exports,
    api_generation,
    api_projects,
    api_prompts,
    api_stats,
    api_tasks,
    api_users,
    health,
    metrics,
    pages_admin,
    pages_admin_audit,
    pages_admin_projects,
    pages_admin_users,
    pages_auth,
    pages_dashboard,
    pages_docs,
    pages_label,
)
from app.services.users import TokenCache
from app.web import STATIC_DIR, SecurityHeaders

log = logging.getLogger("prefero")

DESCRIPTION = """\
Admin API of **prefero**, a self-hosted service that collects human preference data
(rankings of model completions) for RLHF.

Authenticate with `Authorization: Bearer <token>` (`prefero tokens create USER`). Errors are
JSON: `{"detail": "…", "errors": [{"line"?, "field", "message"}]}`.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    engine = engine_from_settings(settings)

    @asynccontextmanager
    async def lifespan(started: FastAPI) -> AsyncIterator[None]:
        # Database work runs in worker threads: as many as the pool keeps connections, so a
        # thread never waits for one, no connection is opened and closed per request (the
        # pool's overflow), and fewer threads contend for the GIL.
        to_thread.current_default_thread_limiter().total_tokens = settings.request_threads
        _freeze_startup_heap()
        pool = started.state.statement_pool
        if pool is not None:
            await pool.open(wait=False)  # connects in the background
        try:
            yield
        finally:
            if pool is not None:
                await pool.close()
            engine.dispose()
            worker_stopped()

    # /docs is served from the vendored Swagger UI (pages_docs); FastAPI's own loads a CDN.
    app = FastAPI(
        title="prefero",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.session_factory = make_session_factory(engine)
    # the labeling routes' sessions: statement by statement on PostgreSQL (app.deps.request_session)
    app.state.open_session = make_statement_session_factory(engine)
    app.state.token_cache = TokenCache(settings.token_cache_seconds)
    # PostgreSQL: the labeling routes' single statements on the event loop (app.db.statement_pool)
    app.state.statement_pool = statement_pool(settings)

    # Routes are matched in order: the labeling API, most of the traffic, first.
    api_modules = (
        api_tasks,
        health,
        api_projects,
        api_prompts,
        api_generation,
        api_users,
        api_exports,
        api_stats,
        api_audit,
    )
    for module in api_modules:
        app.include_router(module.router)
    page_modules = (
        pages_auth,
        pages_label,
        pages_admin,
        pages_admin_projects,
        pages_admin_users,
        pages_admin_audit,
        pages_dashboard,
        pages_docs,
        metrics,
    )
    for module in page_modules:
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    # Request id, metrics, access log and the body limit for every request.
    app.add_middleware(Observability, max_body_bytes=settings.max_request_bytes)
    # Outermost, so that every answer has them, the middleware's own 413 included: CSP,
    # nosniff, referrer and framing.
    app.add_middleware(SecurityHeaders)
    install_record_factory()
    _install_error_handlers(app)
    return app


_heap_frozen = False


def _freeze_startup_heap() -> None:
    """What exists when the first app starts (modules, routes, schemas, the ORM's registry)
    lives as long as the process: keep it out of the cyclic collector, whose full collections
    would otherwise walk it again and again under load. Once per process: a full collection
    per app start would cost every test that starts one."""
    global _heap_frozen
    if not _heap_frozen:
        gc.collect()
        gc.freeze()
        _heap_frozen = True


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(DomainError)
    async def domain_error(_: Request, exc: DomainError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        if isinstance(exc, TooManyRequests):
            headers = {"Retry-After": str(exc.retry_after)}
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [_validation_error(e) for e in exc.errors()[:100]]
        return JSONResponse({"detail": "invalid request", "errors": errors}, status_code=422)

    @app.exception_handler(OperationalError)
    @app.exception_handler(PoolTimeout)
    async def database_unavailable(_: Request, exc: Exception) -> JSONResponse:
        # Connection lost, server restarting, pool exhausted, lock or statement timeout.
        log.warning("database unavailable: %s", type(exc).__name__)
        return JSONResponse(
            {"detail": "database temporarily unavailable, retry shortly"},
            status_code=503,
            headers={"Retry-After": "2"},
        )

    @app.exception_handler(DataError)
    async def unstorable_value(_: Request, exc: DataError) -> JSONResponse:
        # Backstop: input validation should have caught it (out-of-range number, bad text).
        log.warning("database rejected a value: %s", type(exc.orig).__name__)
        return JSONResponse(
            {"detail": "a value could not be stored (out of range or invalid characters)"},
            status_code=422,
        )

    @app.exception_handler(IntegrityError)
    async def conflicting_write(_: Request, exc: IntegrityError) -> JSONResponse:
        # Backstop for races the services did not anticipate: nothing was written.
        log.warning("integrity error: %s", type(exc.orig).__name__)
        return JSONResponse(
            {"detail": "conflicting concurrent change; nothing was written, retry"},
            status_code=409,
        )


_FIELD_PART = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$|^\d+$")


def _validation_error(error: dict[str, Any]) -> dict[str, Any]:
    # Union members add validator names to the location ("function-after[…]"): keep the path.
    loc = [str(p) for p in error.get("loc", ()) if _FIELD_PART.match(str(p))]
    loc = [p for p in loc if not p.startswith(("function-", "constrained-"))]
    return {"field": ".".join(loc) or None, "message": error.get("msg", "invalid")}
