"""The ``openai`` backend: any OpenAI-compatible ``/v1/chat/completions`` endpoint (vLLM, TGI,
llama.cpp server, OpenAI itself).

Requests run on a thread pool of ``max_concurrency`` workers sharing one ``httpx.Client`` whose
connection pool has the same size, so at most ``max_concurrency`` requests are in flight.
429, 408 and 5xx answers, timeouts and connection errors are retried with exponential backoff
and jitter (a ``Retry-After`` header is honoured); a request that still fails gets an error in
its result. Failures that concern every request — the server cannot be reached at all, the API
key is refused, the model does not exist — raise :class:`BackendError`.

The API key is sent only in the ``Authorization`` header: it is never logged, recorded in the
parameters, or included in an error message.
"""

from __future__ import annotations

import email.utils
import json
import logging
import random
import re
import threading
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from app.generation.base import BackendError, GenerationRequest, GenerationResult

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({408, 429})
"""Retried besides every 5xx."""
MAX_BACKOFF_S = 30.0
MAX_RETRY_AFTER_S = 120.0
"""A ``Retry-After`` longer than this is shortened to it, so a job never stalls for hours."""
SNIPPET_CHARS = 300

_MODEL_MISSING = re.compile(
    r"does not exist|not found|unknown model|invalid model|model_not_found|no such model",
    re.IGNORECASE,
)


class _Fatal(Exception):
    """Raised inside a worker thread; becomes a :class:`BackendError` for the whole batch."""


class _Unreachable(Exception):
    """The very first connection attempt failed while the server was never reached."""


class _Retryable(Exception):
    """A transient failure: retry after ``delay`` (None: use the exponential backoff)."""

    def __init__(self, message: str, *, delay: float | None = None, connect: bool = False):
        super().__init__(message)
        self.delay = delay
        self.connect = connect


class _RequestFailed(Exception):
    """This request failed for good (bad input, odd answer); other requests may succeed."""


@dataclass(slots=True)
class _Outcome:
    text: str | None
    finish_reason: str | None = None
    error: str | None = None
    connect_error: bool = False
    """The error was a failure to connect (every attempt)."""


def _strip_userinfo(url: str) -> str:
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port is not None else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def _error_message(response: httpx.Response) -> str:
    """The server's own error message, or the start of the body."""
    try:
        body = response.json()
    except (ValueError, UnicodeDecodeError):
        body = None
    message: Any = None
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            message = err.get("message") or err.get("code")
        elif isinstance(err, str):
            message = err
        message = message or body.get("message") or body.get("detail")
    if not message:
        try:
            message = response.text
        except (UnicodeDecodeError, httpx.ResponseNotRead):
            message = ""
    text = " ".join(str(message).split())
    return text[:SNIPPET_CHARS] + ("…" if len(text) > SNIPPET_CHARS else "")


class OpenAIBackend:
    """Completions from an OpenAI-compatible chat completions server."""

    backend = "openai"

    def __init__(
        self,
        model: str,
        *,
        base_url: str,
        api_key: str = "",
        max_concurrency: int = 8,
        timeout_s: float = 60.0,
        stream: bool = False,
        max_retries: int = 5,
        backoff_s: float = 0.5,
    ) -> None:
        base = (base_url or "").strip().rstrip("/")
        if not base:
            raise BackendError("the openai backend needs a base URL: set PREFERO_OPENAI_BASE_URL")
        if not base.lower().startswith(("http://", "https://")):
            raise BackendError(
                f"the openai base URL must start with http:// or https://, got {base!r}"
            )
        if not model:
            raise BackendError("the openai backend needs a model name")
        if max_concurrency < 1:
            raise BackendError("openai max_concurrency must be at least 1")
        if not timeout_s > 0:
            raise BackendError("openai timeout_s must be positive")
        if max_retries < 0 or backoff_s < 0:
            raise BackendError("openai max_retries and backoff_s must not be negative")
        base = base if base.endswith("/v1") else f"{base}/v1"
        try:
            httpx.URL(base)
        except httpx.InvalidURL as exc:
            raise BackendError(f"invalid openai base URL: {exc}") from None

        self.model_name = model
        self.base_url = _strip_userinfo(base)
        """The normalised base URL (ending in /v1, without any user:password part)."""
        self.url = f"{base}/chat/completions"
        self._shown_url = f"{self.base_url}/chat/completions"
        self._api_key = api_key
        self.max_concurrency = max_concurrency
        self.timeout_s = float(timeout_s)
        self.stream = stream
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self._reached = False
        """Set once any HTTP answer came back from the server."""
        self._closed = False

        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(self.timeout_s),
            limits=httpx.Limits(
                max_connections=max_concurrency, max_keepalive_connections=max_concurrency
            ),
            follow_redirects=False,
        )
        self._executor = ThreadPoolExecutor(
            max_workers=max_concurrency, thread_name_prefix="prefero-openai"
        )

    def __repr__(self) -> str:
        return f"OpenAIBackend(model={self.model_name!r}, base_url={self.base_url!r})"

    def __enter__(self) -> OpenAIBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ public API

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        if self._closed:
            raise BackendError("the openai backend is closed")
        if not requests:
            return []
        abort = threading.Event()
        outcomes: list[_Outcome | None] = [None] * len(requests)

        # First pass. While the server has never answered, a refused first connection is not
        # retried: if every request is refused the server is down and the whole job fails.
        first_pass_fast_fail = not self._reached
        pending = self._run(requests, range(len(requests)), outcomes, abort, first_pass_fast_fail)
        if pending:
            if not self._reached:
                raise BackendError(self._redact(f"cannot reach {self._shown_url}: {pending[0][1]}"))
            # Some requests got through: retry the refused ones normally.
            self._run(requests, [i for i, _ in pending], outcomes, abort, False)

        done = [o for o in outcomes if o is not None]
        if done and all(o.connect_error for o in done):
            raise BackendError(self._redact(f"cannot reach {self._shown_url}: {done[0].error}"))
        return [self._result(r, o) for r, o in zip(requests, done, strict=True)]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._client.close()

    # ------------------------------------------------------------------ internals

    def _run(
        self,
        requests: Sequence[GenerationRequest],
        indices: Sequence[int],
        outcomes: list[_Outcome | None],
        abort: threading.Event,
        fast_fail: bool,
    ) -> list[tuple[int, str]]:
        """Run ``requests[i]`` for each index, filling ``outcomes``; returns the (index, reason)
        of requests refused on their first connection when ``fast_fail``."""
        futures: dict[Future[_Outcome], int] = {
            self._executor.submit(self._one, requests[i], abort, fast_fail): i for i in indices
        }
        done, not_done = wait(futures, return_when=FIRST_EXCEPTION)
        fatal: BaseException | None = None
        unreachable: list[tuple[int, str]] = []
        for fut in done:
            exc = fut.exception()
            if isinstance(exc, _Unreachable):
                unreachable.append((futures[fut], str(exc)))
            elif exc is not None:
                fatal = exc
        if fatal is not None or not_done:
            if fatal is not None:
                abort.set()
                for fut in not_done:
                    fut.cancel()
            wait(not_done)
            for fut in not_done:
                if fut.cancelled():
                    continue
                exc = fut.exception()
                if isinstance(exc, _Unreachable):
                    unreachable.append((futures[fut], str(exc)))
                elif exc is not None and fatal is None:
                    fatal = exc
        if fatal is not None:
            abort.set()
            if isinstance(fatal, _Fatal):
                raise BackendError(self._redact(str(fatal))) from None
            raise BackendError(self._redact(f"openai backend failed: {fatal!r}")) from None
        for fut, i in futures.items():
            if not fut.exception():
                outcomes[i] = fut.result()
        return sorted(unreachable)

    def _result(self, request: GenerationRequest, outcome: _Outcome) -> GenerationResult:
        s = request.sampling
        return GenerationResult(
            key=request.key,
            text=outcome.text,
            input_text=json.dumps(request.messages, ensure_ascii=False),
            params={
                "backend": self.backend,
                "model": self.model_name,
                "temperature": s.temperature,
                "top_p": s.top_p,
                "max_new_tokens": s.max_new_tokens,
                "seed": s.seed,
                "finish_reason": outcome.finish_reason,
                "base_url": self.base_url,
            },
            error=self._redact(outcome.error) if outcome.error is not None else None,
        )

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text

    def _body(self, request: GenerationRequest) -> dict[str, Any]:
        s = request.sampling
        return {
            "model": self.model_name,
            "messages": request.messages,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "max_tokens": s.max_new_tokens,
            "seed": s.seed,
            "stream": self.stream,
        }

    def _backoff(self, attempt: int) -> float:
        return min(MAX_BACKOFF_S, self.backoff_s * 2**attempt) * random.uniform(0.5, 1.0)

    def _one(self, request: GenerationRequest, abort: threading.Event, fast_fail: bool) -> _Outcome:
        """One request with retries. Raises _Fatal / _Unreachable; otherwise an outcome."""
        body = self._body(request)
        attempts = self.max_retries + 1
        last = ""
        all_connect = True
        for attempt in range(attempts):
            if abort.is_set():
                return _Outcome(None, error="cancelled")
            try:
                text, finish = self._attempt(body)
                return _Outcome(text, finish)
            except _Retryable as exc:
                last = str(exc)
                all_connect = all_connect and exc.connect
                if exc.connect and fast_fail and attempt == 0 and not self._reached:
                    raise _Unreachable(last) from None
                if attempt + 1 >= attempts:
                    break
                delay = exc.delay if exc.delay is not None else self._backoff(attempt)
                log.info(
                    "openai request failed (%s); retry %d/%d in %.2f s",
                    last,
                    attempt + 1,
                    self.max_retries,
                    delay,
                )
                if abort.wait(delay):
                    return _Outcome(None, error="cancelled")
            except _RequestFailed as exc:
                return _Outcome(None, error=str(exc))
        tries = f"{attempts} attempt{'s' if attempts != 1 else ''}"
        return _Outcome(None, error=f"{last} (gave up after {tries})", connect_error=all_connect)

    def _attempt(self, body: dict[str, Any]) -> tuple[str, str | None]:
        try:
            if self.stream:
                with self._client.stream(
                    "POST", self.url, json=body, headers={"Accept": "text/event-stream"}
                ) as response:
                    self._reached = True
                    if response.status_code != 200:
                        response.read()
                        self._check_status(response)
                    return self._read_stream(response)
            response = self._client.post(self.url, json=body)
            self._reached = True
            self._check_status(response)
            return self._read_json(response)
        except httpx.ConnectTimeout:
            raise _Retryable(
                f"timed out connecting after {self.timeout_s:g} s", connect=True
            ) from None
        except httpx.ConnectError as exc:
            raise _Retryable(f"connection failed: {exc}", connect=True) from None
        except httpx.TimeoutException:
            raise _Retryable(
                f"timed out: no answer within the {self.timeout_s:g} s timeout"
            ) from None
        except httpx.TransportError as exc:
            raise _Retryable(f"connection error: {type(exc).__name__}: {exc}") from None
        except httpx.HTTPError as exc:
            raise _RequestFailed(
                f"bad answer from the server: {type(exc).__name__}: {exc}"
            ) from None

    def _check_status(self, response: httpx.Response) -> None:
        status = response.status_code
        if 200 <= status < 300:
            return
        message = _error_message(response)
        detail = f"HTTP {status}" + (f": {message}" if message else "")
        if 300 <= status < 400:
            location = response.headers.get("Location", "")
            raise _Fatal(
                f"{self._shown_url} redirects (HTTP {status}) to {location or 'elsewhere'}: "
                "set PREFERO_OPENAI_BASE_URL to the final address"
            )
        if status in (401, 403):
            raise _Fatal(f"the server refused the API key ({status})")
        if status == 404:
            if _MODEL_MISSING.search(message) and "model" in message.lower():
                raise _Fatal(f"model {self.model_name!r} not found on {self.base_url}")
            raise _Fatal(
                f"{self._shown_url} answered 404 Not Found"
                + (f" ({message})" if message else "")
                + ": check the base URL (PREFERO_OPENAI_BASE_URL) and the model name"
            )
        if status in RETRY_STATUSES or status >= 500:
            raise _Retryable(detail, delay=_parse_retry_after(response.headers.get("Retry-After")))
        if "model" in message.lower() and _MODEL_MISSING.search(message):
            raise _Fatal(f"model {self.model_name!r} not found on {self.base_url}: {message}")
        raise _RequestFailed(f"the server rejected the request: {detail}")

    def _read_json(self, response: httpx.Response) -> tuple[str, str | None]:
        try:
            data = response.json()
            choice = data["choices"][0]
            content = choice["message"].get("content")
            finish = choice.get("finish_reason")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            snippet = " ".join(response.text.split())[:SNIPPET_CHARS]
            raise _RequestFailed(f"unexpected answer from the server: {snippet!r}") from None
        if content is None:
            raise _RequestFailed(f"the server returned no message content (finish_reason={finish})")
        return str(content), finish

    def _read_stream(self, response: httpx.Response) -> tuple[str, str | None]:
        parts: list[str] = []
        finish: str | None = None
        finished = False
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue  # blank separators, ": comments", "event:" lines
            payload = line[5:].strip()
            if payload == "[DONE]":
                finished = True
                break
            try:
                chunk = json.loads(payload)
            except ValueError:
                raise _RequestFailed(
                    f"unreadable stream chunk: {payload[:SNIPPET_CHARS]!r}"
                ) from None
            if not isinstance(chunk, dict):
                continue
            if chunk.get("error"):
                err = chunk["error"]
                message = err.get("message") if isinstance(err, dict) else err
                raise _RequestFailed(f"the server reported an error: {message}")
            for choice in chunk.get("choices") or []:
                if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                    continue
                delta = choice.get("delta") or {}
                content = delta.get("content") if isinstance(delta, dict) else None
                if content:
                    parts.append(str(content))
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
                    finished = True
        if not finished:
            raise _Retryable("the stream ended before the completion finished")
        return "".join(parts), finish


__all__ = ["OpenAIBackend"]
