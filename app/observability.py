"""Request ids, structured logs, Prometheus metrics and the request body limit.

:class:`Observability` is a plain ASGI middleware, outermost in the app. For every HTTP request
it

- takes the request id from a sane incoming ``X-Request-ID`` (else generates one), returns it
  in the ``X-Request-ID`` response header and keeps it in a context variable, so that every log
  record emitted while handling the request carries it (threads of the thread pool included);
- counts the request and its latency by method, route template and status, and the requests in
  flight (``prometheus_client``; multiprocess mode when ``PROMETHEUS_MULTIPROC_DIR`` is set,
  which ``prefero serve --workers N`` does for N > 1);
- writes one access-log line (logger ``prefero.access``): method, path without the query
  string (it may hold secrets), status, duration, user id, request id;
- limits the request body (``PREFERO_MAX_REQUEST_BYTES``; the import routes raise the limit to
  ``PREFERO_MAX_IMPORT_BYTES`` with :func:`set_body_limit`): ``Content-Length`` and the bytes
  actually received are both checked, and a larger body gets a JSON 413.
"""

from __future__ import annotations

import logging
import logging.config
import os
import re
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import orjson
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily, Metric

from app.errors import PayloadTooLarge

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

REQUEST_ID_HEADER = "X-Request-ID"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+=/-]{0,127}$")
_BODY_LIMIT_KEY = "prefero.body_limit"

access_log = logging.getLogger("prefero.access")
log = logging.getLogger("prefero")


# --------------------------------------------------------------------------- request context


@dataclass(slots=True)
class RequestContext:
    """What the logs know about the request being handled (shared with its worker threads)."""

    request_id: str
    user_id: int | None = None


_context: ContextVar[RequestContext | None] = ContextVar("prefero_request", default=None)


def current_request_id() -> str | None:
    ctx = _context.get()
    return ctx.request_id if ctx is not None else None


def set_user_id(user_id: int) -> None:
    """Record the authenticated caller for the access log (no-op outside a request)."""
    ctx = _context.get()
    if ctx is not None:
        ctx.user_id = user_id


def request_id_from(value: str | None) -> str:
    """The incoming id if it is sane (1-128 characters of ``[A-Za-z0-9._:+=/-]``), else a new
    random one."""
    if value and _SANE_REQUEST_ID.match(value):
        return value
    return uuid.uuid4().hex


# --------------------------------------------------------------------------- logging

_ACCESS_FIELDS = ("method", "path", "status", "duration_ms", "user_id", "client")


def install_record_factory() -> None:
    """Stamp every log record, whichever handler gets it, with the current request id when
    it is created (idempotent)."""
    base = logging.getLogRecordFactory()
    if getattr(base, "_prefero", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = base(*args, **kwargs)
        record.request_id = current_request_id()
        return record

    factory._prefero = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` (or None) to every record passing through a handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = current_request_id()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, request_id, access fields,
    exc_info."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None) or current_request_id(),
        }
        for key in _ACCESS_FIELDS:
            if hasattr(record, key):
                out[key] = getattr(record, key)
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


class TextFormatter(logging.Formatter):
    """``time level logger [request id] message``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        if not getattr(record, "request_id", None):
            record.request_id = current_request_id() or "-"
        return super().format(record)


def resolve_log_format(log_format: str, stream: Any = None) -> str:
    """``json`` or ``text``: ``auto`` is JSON unless the stream is a terminal."""
    if log_format != "auto":
        return log_format
    stream = stream if stream is not None else sys.stderr
    return "text" if hasattr(stream, "isatty") and stream.isatty() else "json"


def log_config(log_format: str, level: str = "info") -> dict[str, Any]:
    """A ``logging.config.dictConfig`` (also uvicorn's ``log_config``): every logger, uvicorn's
    included, writes to standard error in ``log_format`` with the request id."""
    fmt = resolve_log_format(log_format)
    lvl = level.upper()
    handler = {"handlers": ["default"], "level": lvl, "propagate": False}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": RequestIdFilter}},
        "formatters": {"json": {"()": JsonFormatter}, "text": {"()": TextFormatter}},
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": fmt,
                "filters": ["request_id"],
            }
        },
        "loggers": {
            "uvicorn": handler,
            "uvicorn.error": {"level": lvl},
            "uvicorn.access": handler,
            "prefero": handler,
        },
        "root": {"handlers": ["default"], "level": "WARNING"},
    }


def configure_logging(log_format: str, level: str = "info") -> None:
    logging.config.dictConfig(log_config(log_format, level))


# --------------------------------------------------------------------------- metrics

REQUESTS = Counter(
    "prefero_http_requests",
    "HTTP requests answered, by method, route template and status.",
    ("method", "route", "status"),
)
LATENCY = Histogram(
    "prefero_http_request_duration_seconds",
    "Time to answer an HTTP request (until the last byte was sent), by route template.",
    ("route",),
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
IN_FLIGHT = Gauge(
    "prefero_http_requests_in_flight",
    "HTTP requests being handled now.",
    multiprocess_mode="livesum",
)


class DatabaseGauges(Protocol):
    """Values read from the database at scrape time (``app.services.monitoring``)."""

    queue_prompts: dict[str, int]
    live_leases: dict[str, int]
    jobs: dict[str, int]


class _Families:
    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self.families


def _families(gauges: DatabaseGauges) -> list[Metric]:
    queue = GaugeMetricFamily(
        "prefero_queue_prompts",
        "Prompts that still need annotations (fewer submitted than the overlap), per project.",
        labels=["project"],
    )
    for slug, n in sorted(gauges.queue_prompts.items()):
        queue.add_metric([slug], n)
    leases = GaugeMetricFamily(
        "prefero_leases_live", "Open leases not yet expired, per project.", labels=["project"]
    )
    for slug, n in sorted(gauges.live_leases.items()):
        leases.add_metric([slug], n)
    jobs = GaugeMetricFamily(
        "prefero_generation_jobs", "Generation jobs by status.", labels=["status"]
    )
    for status, n in sorted(gauges.jobs.items()):
        jobs.add_metric([status], n)
    return [queue, leases, jobs]


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


def exposition(gauges: DatabaseGauges) -> tuple[bytes, str]:
    """The Prometheus text exposition (body, content type): the request metrics of every
    worker process (summed in multiprocess mode) and the database gauges."""
    if multiprocess_dir():
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    db = CollectorRegistry(auto_describe=False)
    db.register(_Families(_families(gauges)))  # type: ignore[arg-type]
    return generate_latest(registry) + generate_latest(db), CONTENT_TYPE_LATEST


def prepare_multiprocess_dir(path: Path) -> None:
    """An empty directory for the metric files of a new server run (older runs' files would
    add their counts)."""
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink()


def worker_stopped() -> None:
    """Drop this process's live gauges (in-flight requests) from the multiprocess files."""
    if multiprocess_dir():
        multiprocess.mark_process_dead(os.getpid())


# --------------------------------------------------------------------------- body limit


@dataclass(slots=True)
class _BodyLimit:
    limit: int
    what: str = "request body"
    exceeded: bool = False


def set_body_limit(scope: Scope, limit: int, *, what: str = "request body") -> None:
    """Allow this request a body of up to ``limit`` bytes (the import routes: ``what`` names
    the body in the 413's message)."""
    current = scope.get(_BODY_LIMIT_KEY)
    if isinstance(current, _BodyLimit):
        current.limit = limit
        current.what = what


def body_too_large(limit: int, what: str = "request body") -> PayloadTooLarge:
    return PayloadTooLarge(f"the {what} is larger than the limit of {limit} bytes")


# --------------------------------------------------------------------------- middleware


class Observability:
    """ASGI middleware: request id, metrics, access log, body limit (see the module doc)."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope.get("headers") or []
        incoming = next((v.decode("latin-1") for k, v in headers if k == b"x-request-id"), None)
        ctx = RequestContext(request_id=request_id_from(incoming))
        token = _context.set(ctx)
        started = time.perf_counter()
        body_limit = _BodyLimit(self.max_body_bytes)
        scope[_BODY_LIMIT_KEY] = body_limit
        declared = _content_length(headers)
        received = 0
        status = 500
        response_started = replaced = False
        request_id_header = (b"x-request-id", ctx.request_id.encode())

        async def limited_receive() -> Message:
            nonlocal received
            if declared is not None and declared > body_limit.limit:
                body_limit.exceeded = True
                raise body_too_large(body_limit.limit, body_limit.what)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > body_limit.limit:
                    body_limit.exceeded = True
                    raise body_too_large(body_limit.limit, body_limit.what)
            return message

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started, replaced
            if replaced:
                return  # the body of an answer replaced by the 413
            if message["type"] == "http.response.start":
                response_started = True
                if body_limit.exceeded and message["status"] != 413:
                    # The app turned the limit error into another answer (e.g. a body parser's
                    # 400): the client must learn that the body was too large.
                    replaced = True
                    status = 413
                    await _send_json(send, 413, _too_large_body(body_limit), ctx)
                    return
                status = message["status"]
                message["headers"] = [*message.get("headers", []), request_id_header]
            await send(message)

        IN_FLIGHT.inc()
        try:
            await self.app(scope, limited_receive, send_with_id)
        except PayloadTooLarge:
            if response_started:
                raise
            status = 413
            await _send_json(send, 413, _too_large_body(body_limit), ctx)
        except Exception:
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            status = 500
            raise
        finally:
            IN_FLIGHT.dec()
            elapsed = time.perf_counter() - started
            route = _route_template(scope)
            method = scope.get("method", "")
            REQUESTS.labels(method, route, str(status)).inc()
            LATENCY.labels(route).observe(elapsed)
            access_log.info(
                "%s %s %s",
                method,
                scope.get("path", ""),
                status,
                extra={
                    "method": method,
                    "path": scope.get("path", ""),
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 2),
                    "user_id": ctx.user_id,
                    "client": (scope.get("client") or (None,))[0],
                },
            )
            _context.reset(token)


def _too_large_body(limit: _BodyLimit) -> bytes:
    return orjson.dumps(body_too_large(limit.limit, limit.what).body())


async def _send_json(send: Send, status: int, body: bytes, ctx: RequestContext) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
                (b"x-content-type-options", b"nosniff"),
                (b"x-request-id", ctx.request_id.encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _content_length(headers: Iterable[tuple[bytes, bytes]]) -> int | None:
    for key, value in headers:
        if key == b"content-length":
            return int(value) if value.isdigit() else None
    return None


def _route_template(scope: Scope) -> str:
    """The matched route's path template (``/api/v1/leases/{lease_id}/submit``), so that the
    metrics have one series per route rather than per URL; ``/static`` for static files and
    ``<unmatched>`` for 404s."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path or "/"
    return "<unmatched>"
