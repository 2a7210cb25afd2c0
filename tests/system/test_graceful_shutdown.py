"""A real ``prefero serve`` gets SIGTERM while a slow import is still uploading: the import
completes (201, every prompt written), the server takes no new requests, and the process exits
0 within the grace period. SQLite with one worker (new connections are refused at once) and
PostgreSQL with two worker processes (new connections are never served)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.cli import GRACEFUL_SHUTDOWN_S
from app.db import make_engine
from app.models import Prompt, Role
from bench._support import free_port, prefero_command
from tests.conftest import create_database, migrate
from tests.factories import make_project, make_token, make_user

pytestmark = pytest.mark.slow

PROMPTS = 400
CHUNKS = 20
CHUNK_PAUSE_S = 0.15  # the upload lasts about 3 s
START_TIMEOUT_S = 90


def _wait_until_up(base: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode} before serving")
        try:
            if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("server did not start in time")


def _connects(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _stops_serving(base: str, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{base}/healthz", timeout=1)
        except httpx.TransportError:
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(params=[("sqlite", 1), ("postgresql", 2)], ids=["sqlite-1-worker", "pg-2-workers"])
def server(request, tmp_path) -> Iterator[tuple]:
    kind, workers = request.param
    url, drop = create_database(kind, tmp_path)
    migrate(url)
    engine = make_engine(url)
    with Session(engine) as s:
        token = make_token(s, make_user(s, role=Role.admin))
        slug = make_project(s, completions_per_task=2).slug
    port = free_port()
    env = {
        **os.environ,
        "PREFERO_DATABASE_URL": url,
        "PREFERO_DATA_DIR": str(tmp_path / "data"),
        "PREFERO_SECRET_KEY": "graceful",
        "PREFERO_LOG_FORMAT": "json",
    }
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [prefero_command(), "serve", "--port", str(port), "--workers", str(workers)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield proc, port, token, slug, engine, workers, tmp_path / "serve.log"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        engine.dispose()
        drop()


def test_sigterm_finishes_the_request_in_flight(server):
    proc, port, token, slug, engine, workers, log_path = server
    base = f"http://127.0.0.1:{port}"
    _wait_until_up(base, proc)

    lines = [
        json.dumps({"prompt": f"prompt {i}", "completions": [f"a {i}", f"b {i}"]}) + "\n"
        for i in range(PROMPTS)
    ]
    per_chunk = PROMPTS // CHUNKS
    started = threading.Event()
    result: dict = {}

    def body() -> Iterator[bytes]:
        for c in range(CHUNKS):
            yield "".join(lines[c * per_chunk : (c + 1) * per_chunk]).encode()
            started.set()
            time.sleep(CHUNK_PAUSE_S)

    def upload() -> None:
        try:
            result["response"] = httpx.post(
                f"{base}/api/v1/projects/{slug}/prompts",
                content=body(),
                headers={
                    "Authorization": f"Bearer {token}",
                    "Content-Type": "application/x-ndjson",
                },
                timeout=60,
            )
        except Exception as e:  # reported by the assertions below
            result["error"] = e

    uploader = threading.Thread(target=upload)
    uploader.start()
    assert started.wait(30)
    time.sleep(CHUNK_PAUSE_S)  # the server is reading the body now
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)

    # No new request is served from now on (a supervisor relays the signal to its workers
    # within its 0.5 s polling interval).
    if workers == 1:
        time.sleep(0.5)
        assert not _connects(port), "the listening socket is still open after SIGTERM"
    else:
        assert _stops_serving(base, within_s=5), "new requests still served after SIGTERM"
        assert uploader.is_alive(), "the upload ended before the check: make it slower"

    uploader.join(60)
    assert "error" not in result, result.get("error")
    response = result["response"]
    assert response.status_code == 201, response.text
    assert response.json()["created"] == PROMPTS

    code = proc.wait(GRACEFUL_SHUTDOWN_S + 10)
    took = time.monotonic() - signalled
    assert code == 0, log_path.read_text()[-3000:]
    assert took < GRACEFUL_SHUTDOWN_S
    with Session(engine) as s:
        assert s.scalar(select(func.count()).select_from(Prompt)) == PROMPTS
    assert not _connects(port)
    access = [
        json.loads(line)
        for line in log_path.read_text().splitlines()
        if line.startswith("{") and '"prefero.access"' in line
    ]
    imports = [a for a in access if a["path"].endswith("/prompts") and a["method"] == "POST"]
    assert [a["status"] for a in imports] == [201]
    assert imports[0]["request_id"] == response.headers["x-request-id"]
