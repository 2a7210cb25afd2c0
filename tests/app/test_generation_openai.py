"""The openai backend against a small fake OpenAI-compatible server started by each test."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from app.generation import (
    BackendError,
    GenerationRequest,
    Sampling,
    load_backend,
)
from app.generation.openai import OpenAIBackend

MODEL = "tiny-chat"
KEY = "sk-test-0123456789abcdef"


@dataclass
class Reply:
    status: int = 200
    body: Any = None
    """JSON body (non-streaming) or None for the echo answer."""
    headers: dict[str, str] = field(default_factory=dict)
    sleep: float = 0.0


def echo_text(body: dict[str, Any]) -> str:
    last_user = next(m["content"] for m in reversed(body["messages"]) if m["role"] == "user")
    return f"echo: {last_user} t={body['temperature']}"


class FakeServer:
    """A scriptable OpenAI-compatible /v1/chat/completions server on 127.0.0.1."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.script: deque[Reply] = deque()
        """Replies used first, one per call; then ``handler`` decides."""
        self.handler: Callable[[dict[str, Any]], Reply] = lambda body: Reply()
        self.models = {MODEL}
        self.api_key: str | None = None
        """When set, a different bearer token gets 401."""
        self.delay = 0.0
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                try:
                    fake.handle(self)
                except OSError:  # the client gave up (timeout test)
                    self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        body = json.loads(h.rfile.read(int(h.headers.get("Content-Length", 0))))
        with self.lock:
            self.calls.append(
                {"path": h.path, "body": body, "authorization": h.headers.get("Authorization")}
            )
            reply = self.script.popleft() if self.script else None
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay:
                self.stopping.wait(self.delay)
            if h.path != "/v1/chat/completions":
                return self.send_json(h, Reply(404, {"detail": "Not Found"}))
            if self.api_key is not None and h.headers.get("Authorization") != (
                f"Bearer {self.api_key}"
            ):
                return self.send_json(h, Reply(401, {"error": {"message": "Invalid API key"}}))
            if body["model"] not in self.models:
                msg = f"The model `{body['model']}` does not exist."
                err = {"object": "error", "message": msg, "type": "NotFoundError", "code": 404}
                return self.send_json(h, Reply(404, err))
            reply = reply or self.handler(body)
            if reply.sleep:
                self.stopping.wait(reply.sleep)
            if reply.status == 200 and reply.body is None:
                text = echo_text(body)
                if body.get("stream"):
                    return self.send_sse(h, text)
                reply = Reply(
                    200,
                    {
                        "id": "cmpl-1",
                        "object": "chat.completion",
                        "model": body["model"],
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": text},
                                "finish_reason": "stop",
                            }
                        ],
                    },
                )
            self.send_json(h, reply)
        finally:
            with self.lock:
                self.in_flight -= 1

    @staticmethod
    def send_json(h: BaseHTTPRequestHandler, reply: Reply) -> None:
        data = json.dumps(reply.body).encode()
        h.send_response(reply.status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for k, v in reply.headers.items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)

    @staticmethod
    def send_sse(h: BaseHTTPRequestHandler, text: str) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.send_header("Connection", "close")
        h.end_headers()

        def event(choices: list[dict[str, Any]]) -> None:
            chunk = {"id": "c1", "object": "chat.completion.chunk", "choices": choices}
            h.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            h.wfile.flush()

        h.wfile.write(b": keep-alive comment\n\n")
        event([{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}])
        words = text.split(" ")
        for i, word in enumerate(words):
            piece = word if i == 0 else f" {word}"
            event([{"index": 0, "delta": {"content": piece}, "finish_reason": None}])
        event([{"index": 0, "delta": {}, "finish_reason": "stop"}])
        event([])  # a usage-style chunk without choices
        h.wfile.write(b"data: [DONE]\n\n")
        h.wfile.flush()


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    server = FakeServer()
    server.start()
    try:
        yield server
    finally:
        server.close()


def req(key: object, prompt: str, temperature: float = 0.7, seed: int = 0) -> GenerationRequest:
    return GenerationRequest(
        key=key,
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": prompt},
        ],
        sampling=Sampling(temperature=temperature, top_p=0.9, max_new_tokens=32, seed=seed),
    )


def make(fake: FakeServer, **kw: Any) -> OpenAIBackend:
    kw.setdefault("base_url", fake.url)
    kw.setdefault("backoff_s", 0.01)
    return OpenAIBackend(kw.pop("model", MODEL), **kw)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------- happy paths


def test_non_streaming_echo_in_order_with_params(fake: FakeServer):
    backend = load_backend(
        "openai",
        MODEL,
        cache_dir="unused",
        openai_base_url=fake.url,
        openai_api_key=KEY,
        openai_max_concurrency=4,
        openai_timeout_s=5,
    )
    try:
        assert backend.backend == "openai"
        assert backend.model_name == MODEL
        requests = [req(("p", i), f"héllo {i}", temperature=0.1 * i, seed=i) for i in range(6)]
        results = backend.generate(requests)
    finally:
        backend.close()

    assert [r.key for r in results] == [("p", i) for i in range(6)]
    assert [r.text for r in results] == [f"echo: héllo {i} t={0.1 * i}" for i in range(6)]
    assert all(r.error is None for r in results)
    r0 = results[0]
    assert r0.input_text == json.dumps(requests[0].messages, ensure_ascii=False)
    assert "héllo" in r0.input_text
    assert r0.params == {
        "backend": "openai",
        "model": MODEL,
        "temperature": 0.0,
        "top_p": 0.9,
        "max_new_tokens": 32,
        "seed": 0,
        "finish_reason": "stop",
        "base_url": f"{fake.url}/v1",
    }
    assert all(KEY not in json.dumps(r.params) for r in results)
    assert KEY not in repr(backend)

    assert len(fake.calls) == 6
    assert all(c["path"] == "/v1/chat/completions" for c in fake.calls)
    assert all(c["authorization"] == f"Bearer {KEY}" for c in fake.calls)
    sent = next(c["body"] for c in fake.calls if c["body"]["seed"] == 3)
    assert sent == {
        "model": MODEL,
        "messages": requests[3].messages,
        "temperature": requests[3].sampling.temperature,
        "top_p": 0.9,
        "max_tokens": 32,
        "seed": 3,
        "stream": False,
    }


@pytest.mark.parametrize("suffix", ["/", "/v1", "/v1/"])
def test_base_url_forms(fake: FakeServer, suffix: str):
    with make(fake, base_url=fake.url + suffix) as backend:
        [result] = backend.generate([req(1, "x")])
    assert result.text == "echo: x t=0.7"
    assert fake.calls[0]["path"] == "/v1/chat/completions"
    assert result.params["base_url"] == f"{fake.url}/v1"


def test_no_authorization_header_without_key(fake: FakeServer):
    with make(fake) as backend:
        backend.generate([req(1, "x")])
    assert fake.calls[0]["authorization"] is None


def test_streaming(fake: FakeServer):
    with make(fake, stream=True, api_key=KEY) as backend:
        results = backend.generate([req(i, f"stream {i} now", temperature=1.0) for i in range(3)])
    assert [r.text for r in results] == [f"echo: stream {i} now t=1.0" for i in range(3)]
    assert all(r.params["finish_reason"] == "stop" and r.error is None for r in results)
    assert all(c["body"]["stream"] is True for c in fake.calls)


def test_empty_batch_and_close_twice(fake: FakeServer):
    backend = make(fake)
    assert backend.generate([]) == []
    backend.close()
    backend.close()
    with pytest.raises(BackendError, match="closed"):
        backend.generate([req(1, "x")])
    assert fake.calls == []


# ---------------------------------------------------------------------------- retries


def test_429_then_success_honours_retry_after(fake: FakeServer):
    fake.script.append(Reply(429, {"error": {"message": "slow down"}}, {"Retry-After": "0"}))
    # A backoff of 5 s would be used without the Retry-After header.
    with make(fake, backoff_s=5.0) as backend:
        start = time.monotonic()
        [result] = backend.generate([req(1, "again")])
        elapsed = time.monotonic() - start
    assert result.text == "echo: again t=0.7"
    assert result.error is None
    assert len(fake.calls) == 2
    assert elapsed < 2.0


def test_503_then_success(fake: FakeServer):
    fake.script.append(Reply(503, {"error": {"message": "loading model"}}))
    with make(fake, stream=True) as backend:
        [result] = backend.generate([req(1, "up")])
    assert result.text == "echo: up t=0.7"
    assert len(fake.calls) == 2


def test_persistent_5xx_fails_only_that_request(fake: FakeServer):
    def handler(body: dict[str, Any]) -> Reply:
        if "bad" in body["messages"][-1]["content"]:
            return Reply(500, {"error": {"message": "internal boom"}})
        return Reply()

    fake.handler = handler
    with make(fake, max_retries=2) as backend:
        results = backend.generate([req(0, "ok"), req(1, "bad"), req(2, "fine")])
    assert [r.text for r in results] == ["echo: ok t=0.7", None, "echo: fine t=0.7"]
    bad = results[1]
    assert bad.error is not None
    assert "HTTP 500" in bad.error
    assert "internal boom" in bad.error
    assert "3 attempts" in bad.error
    assert bad.params["finish_reason"] is None
    assert sum("bad" in c["body"]["messages"][-1]["content"] for c in fake.calls) == 3


def test_400_is_a_request_error_without_retry(fake: FakeServer):
    fake.script.append(Reply(400, {"error": {"message": "max_tokens is too large"}}))
    with make(fake, api_key=KEY) as backend:
        [result] = backend.generate([req(1, "long")])
    assert result.text is None
    assert "400" in result.error
    assert "max_tokens is too large" in result.error
    assert len(fake.calls) == 1


def test_timeout_gives_error_after_retries(fake: FakeServer):
    fake.handler = lambda body: Reply(sleep=1.0)
    with make(fake, timeout_s=0.2, max_retries=1) as backend:
        start = time.monotonic()
        [result] = backend.generate([req(1, "slow")])
        elapsed = time.monotonic() - start
    assert result.text is None
    assert "timed out" in result.error
    assert "0.2 s" in result.error
    assert "2 attempts" in result.error
    assert len(fake.calls) == 2
    assert elapsed < 1.5


# ---------------------------------------------------------------------------- whole-backend errors


def test_empty_base_url():
    with pytest.raises(BackendError, match="needs a base URL: set PREFERO_OPENAI_BASE_URL"):
        load_backend("openai", MODEL, cache_dir="unused", openai_base_url="")


def test_wrong_api_key(fake: FakeServer):
    fake.api_key = "the-right-key"
    with make(fake, api_key=KEY) as backend, pytest.raises(BackendError) as info:
        backend.generate([req(i, "x") for i in range(5)])
    assert str(info.value) == "the server refused the API key (401)"
    assert KEY not in str(info.value)
    assert len(fake.calls) <= 5


def test_right_api_key(fake: FakeServer):
    fake.api_key = KEY
    with make(fake, api_key=KEY) as backend:
        [result] = backend.generate([req(1, "x")])
    assert result.text == "echo: x t=0.7"


def test_unknown_model(fake: FakeServer):
    with make(fake, model="nope") as backend, pytest.raises(BackendError) as info:
        backend.generate([req(1, "x"), req(2, "y")])
    assert str(info.value) == f"model 'nope' not found on {fake.url}/v1"


def test_wrong_path_404(fake: FakeServer):
    with make(fake, base_url=fake.url + "/api") as backend, pytest.raises(BackendError) as info:
        backend.generate([req(1, "x")])
    assert "404" in str(info.value)
    assert "PREFERO_OPENAI_BASE_URL" in str(info.value)


def test_unreachable_server_fails_fast():
    url = f"http://127.0.0.1:{closed_port()}"
    # Default retries and backoff: an unreachable server must not be retried for long.
    backend = load_backend("openai", MODEL, cache_dir="unused", openai_base_url=url)
    try:
        start = time.monotonic()
        with pytest.raises(BackendError) as info:
            backend.generate([req(i, "x") for i in range(4)])
        elapsed = time.monotonic() - start
    finally:
        backend.close()
    assert str(info.value).startswith(f"cannot reach {url}/v1/chat/completions: ")
    assert elapsed < 2.0


# ---------------------------------------------------------------------------- concurrency


def test_concurrency_is_bounded(fake: FakeServer):
    fake.delay = 0.05
    with make(fake, max_concurrency=3) as backend:
        results = backend.generate([req(i, f"n{i}") for i in range(20)])
    assert [r.text for r in results] == [f"echo: n{i} t=0.7" for i in range(20)]
    assert len(fake.calls) == 20
    assert 2 <= fake.max_in_flight <= 3
