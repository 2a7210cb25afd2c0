"""Annotation load benchmark: many simulated annotators doing next → submit against a real server.

Run from the repository root with the project's virtual environment active::

    python bench/annotate_load.py                        # N = 1, 32, 200; about 2 minutes
    python bench/annotate_load.py --levels 200 --repeat 3 --json annotate.json
    python bench/annotate_load.py --client httpx         # the same load with httpx as client
    python bench/annotate_load.py --levels 200 --profile prof/   # py-spy samples of the server
    PREFERO_DB_POOL_SIZE=20 python bench/annotate_load.py        # the server inherits PREFERO_*

For every level N (and repetition) it creates a fresh PostgreSQL database
(``CREATE DATABASE prefero_bench_<random>`` on ``--pg-url``, dropped afterwards), migrates it
with ``prefero db upgrade`` and seeds it directly (``app.models`` through SQLAlchemy for the
project, users and tokens; psycopg ``COPY`` for the prompts and completions): one project with
10,000 prompts × 4 completions (K = 4), overlap 3, ties and Likert scores on, and N annotator
users, each with its own API token. So every level starts from the same state. It then starts
``prefero serve --workers 2`` on a free loopback port (log level warning, its log kept and
summarised) and waits for ``/readyz``.

The load comes from this process (not the server's), over loopback: one asyncio task per
simulated annotator, each with its own user, token and one keep-alive HTTP/1.1 connection,
looping ``GET /api/v1/projects/{slug}/tasks/next`` → ``POST /api/v1/leases/{id}/submit``
(a random ranking of the 4 completion ids, a two-way tie in about one submission in six, a
random Likert score 1–7 per completion). An iteration always ends with its submit; annotators
stop starting iterations when the time is up; a call taking over 60 s counts as an error. The
first ``--warmup`` seconds (3) are not counted: the figures cover calls *started* in the
following ``--duration`` seconds (20), and submissions/s = 201 answers to those submits /
duration. Latency is the client's wall time per call (``perf_counter_ns`` from writing the
request to having read the whole answer). ``--ramp S`` spreads the annotators' first requests
(and so their connections) evenly over S seconds of the warm-up (default 2: 100 new
annotators a second at N = 200). Not all at once: the server's workers accept from one shared
socket and a keep-alive connection stays with the worker that accepted it, so 200 connections
opened in the same millisecond may all but go to one worker (185 against 15 was seen), which
then serves them on one core for the whole run; annotators who start within a couple of
seconds of each other are spread evenly (the busier worker accepts less).

The default client is a minimal HTTP/1.1 client on asyncio streams (uvloop when installed):
the client shares the 2 CPUs with the server and PostgreSQL, and httpx costs about ten times
as much CPU per request (``--client httpx`` measures it; the client's CPU per call is printed
for every run).

Think time (Little's law): N annotators in a closed loop with no think time keep N requests in
flight, so latency = N / throughput; 200 such clients could not have a p99 of 150 ms unless the
server did more than 1,300 calls/s. Real annotators read and think between tasks. So the levels
in ``--paced`` (default: 200) run each annotator at a fixed pace: after each submit it waits
until ``period × U(0.5, 1.5)`` has passed since the iteration started, with
``period = N / --rate`` (default 350 submissions/s offered in total), after a random start
offset within one period; it goes on at once when the server is slower than that (the loop
then becomes closed). The other levels (1, 32) run closed-loop, without think time: the most a
given number of clients can get out of the server.

Afterwards (server stopped) it checks in the database: no prompt has more than ``overlap``
submitted annotations; per prompt ``annotation_count + open_leases <= overlap``,
``annotation_count`` = its submitted revision-1 annotations and ``open_leases`` = its leases in
status open; live leases + submitted <= overlap; no (prompt, user) with two leases or two
revision-1 annotations; every annotation matches its lease (same user and prompt, lease
submitted) and every submitted lease has one annotation; every 201 answer's annotation exists
with its lease and user; annotation rows = 201 answers (none lost, none duplicated); lease rows
= distinct leases handed out by ``next``; and, as a second opinion, the task service's own
``check_invariants``.

It also measures, over the window, the CPU time of this client, of the server's processes
(each worker), of the bench database's PostgreSQL backends and of the rest of the machine,
and how the client connections are spread over the server's workers; ``--profile DIR`` adds
``py-spy record --gil`` samples of each worker (collapsed stacks) when py-spy is installed.

Goals (exit status 1 when one fails): at N = 200, >= 300 submissions/s and p99 <= 150 ms for
``next`` and for ``submit``; at every level no invariant violation and no error (a non-2xx
answer other than 204, a failed connection or a timeout). Exit status 2 means a broken run
(setup failed, the server died, nothing was measured). It prints the date, the machine, the
load average at the start (the machine may be shared: figures measured beside other work are
noisy) and the versions.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import http.client
import math
import os
import platform
import random
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import orjson
import psutil
import psycopg
from sqlalchemy import insert
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from _support import free_port, libpq, prefero_command  # noqa: E402

from app.db import make_engine  # noqa: E402
from app.models import ApiToken, Project, Role, User  # noqa: E402
from app.security import hash_token, new_token  # noqa: E402

PG_DEFAULT = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
PROJECT_SLUG = "bench"
GOAL_LEVEL = 200
GOAL_RATE = 300.0
GOAL_P99_MS = 150.0
WORKERS = 2
MS = 1_000_000  # ns per ms
REQUEST_TIMEOUT_S = 60.0
PYSPY_ARGS = ["--rate", "100", "--nonblocking", "--gil", "--format", "raw"]


# --------------------------------------------------------------------------- helpers


def _wait_ready(port: int, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefero serve exited with status {proc.returncode}")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request("GET", "/readyz")
            resp = conn.getresponse()
            resp.read()
            if resp.status == 200:
                return
        except OSError:
            pass
        finally:
            conn.close()
        time.sleep(0.1)
    raise RuntimeError(f"/readyz did not answer 200 within {timeout:.0f} s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _pct(sorted_values: list[int], q: float) -> float:
    """Nearest-rank percentile of nanosecond values, in milliseconds (nan when empty)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1] / MS


# --------------------------------------------------------------------------- database


class Database:
    """A fresh PostgreSQL database for one run, seeded with the bench project."""

    def __init__(self, pg_url: str) -> None:
        server = make_url(pg_url)
        if not server.drivername.startswith("postgresql"):
            raise SystemExit("--pg-url must be a postgresql+psycopg:// URL")
        self.name = f"prefero_bench_{secrets.token_hex(4)}"
        self._admin = libpq(pg_url)
        with psycopg.connect(self._admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')
        self.url = server.set(database=self.name).render_as_string(hide_password=False)
        self.libpq = libpq(self.url)

    def drop(self) -> None:
        with psycopg.connect(self._admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


@dataclass
class Seeded:
    project_id: int
    overlap: int
    users: list[tuple[int, str]]  # (user id, token secret)


def _texts(rng: random.Random, chars: int) -> str:
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]
    vocab = sorted(
        {"".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(3000)}
    )
    vocab += ["the", "a", "of", "to", "and", "in", "is", "it", "for", "résumé", "café", "東京"]
    punct = [" "] * 12 + [", ", ". ", "? ", ".\n"]
    out: list[str] = []
    total = 0
    while total < chars:
        chunk = "".join(
            w + s for w, s in zip(rng.choices(vocab, k=64), rng.choices(punct, k=64), strict=True)
        )
        out.append(chunk)
        total += len(chunk)
    return "".join(out)


def seed(
    db: Database, *, annotators: int, prompts: int, k: int, overlap: int, rng_seed: int
) -> Seeded:
    """Project, users and tokens through ``app.models``; prompts and completions with COPY."""
    rng = random.Random(rng_seed)
    corpus = _texts(rng, 3_000_000)
    limit = len(corpus) - 1000

    def snippet(lo: int, hi: int) -> str:
        start = rng.randrange(limit)
        return corpus[start : start + rng.randint(lo, hi)].strip() or "x"

    engine = make_engine(db.url, pool_size=1)
    try:
        with Session(engine) as s:
            project = Project(
                name="Annotation load benchmark",
                slug=PROJECT_SLUG,
                completions_per_task=k,
                overlap=overlap,
                allow_ties=True,
                likert=True,
                require_rationale=False,
                lease_seconds=600,
            )
            s.add(project)
            s.flush()
            project_id = project.id
            rows = s.execute(
                insert(User).returning(User.id, sort_by_parameter_order=True),
                [
                    {"username": f"annotator-{i:04d}", "role": Role.annotator, "active": True}
                    for i in range(annotators)
                ],
            ).all()
            user_ids = [r[0] for r in rows]
            secrets_ = [new_token() for _ in user_ids]
            s.execute(
                insert(ApiToken),
                [
                    {"user_id": uid, "name": "bench", "token_hash": hash_token(sec)}
                    for uid, sec in zip(user_ids, secrets_, strict=True)
                ],
            )
            s.commit()
    finally:
        engine.dispose()

    now = datetime.now(UTC)
    with psycopg.connect(db.libpq) as conn:
        with conn.cursor().copy(
            "COPY prompt (project_id, external_id, messages, metadata, created_at) FROM STDIN"
        ) as cp:
            for i in range(prompts):
                messages = [{"role": "user", "content": snippet(60, 240) + "?"}]
                cp.write_row(
                    (
                        project_id,
                        f"p{i:06d}",
                        orjson.dumps(messages).decode(),
                        '{"bench": true}',
                        now,
                    )
                )
        ids = [r[0] for r in conn.execute("SELECT id FROM prompt ORDER BY id").fetchall()]
        with conn.cursor().copy(
            "COPY completion (prompt_id, external_id, text, model, params, created_at) FROM STDIN"
        ) as cp:
            for pid in ids:
                for j in range(k):
                    cp.write_row((pid, f"c{j}", snippet(240, 360), f"model-{j}", "{}", now))
        conn.execute("ANALYZE")
        conn.commit()
    return Seeded(project_id, overlap, list(zip(user_ids, secrets_, strict=True)))


# --------------------------------------------------------------------------- HTTP clients


class RawClient:
    """One keep-alive HTTP/1.1 connection on asyncio streams: the least CPU per request."""

    def __init__(self, host: str, port: int, token: str) -> None:
        self.host, self.port = host, port
        self._auth = f"Host: {host}:{port}\r\nAuthorization: Bearer {token}\r\n".encode()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _connect(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)

    async def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        if self._writer is None:
            await self._connect()
        assert self._reader is not None
        assert self._writer is not None
        head = f"{method} {path} HTTP/1.1\r\n".encode() + self._auth
        if body is not None:
            head += b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
            self._writer.write(head + body)
        else:
            self._writer.write(head + b"\r\n")
        raw = await self._reader.readuntil(b"\r\n\r\n")
        status = int(raw[9:12])
        length = 0
        chunked = close = False
        for line in raw.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif name == b"connection" and b"close" in value.lower():
                close = True
        if chunked:
            parts = []
            while True:
                size = int((await self._reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:  # then optional trailers and an empty line
                    while await self._reader.readuntil(b"\r\n") != b"\r\n":
                        pass
                    break
                parts.append((await self._reader.readexactly(size + 2))[:-2])
            data = b"".join(parts)
        else:
            data = await self._reader.readexactly(length) if length else b""
        if close:
            await self.aclose()
        return status, data

    async def aclose(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()
        self._reader = self._writer = None


class HttpxClient:
    """The same, with httpx (for comparing the client's own CPU cost)."""

    def __init__(self, host: str, port: int, token: str) -> None:
        import httpx

        self._client = httpx.AsyncClient(
            base_url=f"http://{host}:{port}",
            headers={"Authorization": f"Bearer {token}"},
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
            timeout=60.0,
        )

    async def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        import httpx

        headers = {"Content-Type": "application/json"} if body is not None else None
        try:
            resp = await self._client.request(method, path, content=body, headers=headers)
        except httpx.HTTPError as e:
            raise OSError(f"{type(e).__name__}: {e}") from e
        return resp.status_code, resp.content

    async def aclose(self) -> None:
        await self._client.aclose()


# --------------------------------------------------------------------------- the load


@dataclass
class Calls:
    """Everything the annotators recorded (latencies in ns, by call start)."""

    next_ns: list[int] = field(default_factory=list)
    submit_ns: list[int] = field(default_factory=list)
    next_status: dict[int, int] = field(default_factory=dict)
    submit_status: dict[int, int] = field(default_factory=dict)
    submitted: int = 0  # 201s to submits started in the window
    exceptions: dict[str, int] = field(default_factory=dict)
    ok: list[tuple[int, int, int]] = field(default_factory=list)  # (annotation, lease, user): all
    leases: set[int] = field(default_factory=set)  # every lease handed out by next: all
    all_calls: int = 0
    errors: int = 0  # over every call, warm-up included: non-2xx answers and failed connections
    error_samples: list[str] = field(default_factory=list)


def _ranking(rng: random.Random, ids: list[int]) -> list[list[int]]:
    order = ids[:]
    rng.shuffle(order)
    groups = [[i] for i in order]
    if len(groups) > 1 and rng.random() < 1 / 6:  # a two-way tie
        j = rng.randrange(len(groups) - 1)
        groups[j : j + 2] = [groups[j] + groups[j + 1]]
    return groups


async def annotator(
    client: RawClient | HttpxClient,
    user_id: int,
    calls: Calls,
    *,
    t_window: int,
    t_end: int,
    period_s: float,
    start_s: float,
    rng: random.Random,
) -> None:
    next_path = f"/api/v1/projects/{PROJECT_SLUG}/tasks/next"
    perf = time.perf_counter_ns
    if start_s:
        await asyncio.sleep(start_s)
    try:
        while perf() < t_end:
            t_iter = perf()
            try:
                t0 = perf()
                async with asyncio.timeout(REQUEST_TIMEOUT_S):
                    status, body = await client.request("GET", next_path)
                t1 = perf()
            except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as e:
                calls.exceptions[type(e).__name__] = calls.exceptions.get(type(e).__name__, 0) + 1
                calls.errors += 1
                await client.aclose()
                await asyncio.sleep(0.05)
                continue
            calls.all_calls += 1
            counted = t0 >= t_window
            if counted:
                calls.next_ns.append(t1 - t0)
                calls.next_status[status] = calls.next_status.get(status, 0) + 1
            if status == 204:
                return  # nothing left for this annotator
            if status != 200:
                calls.errors += 1
                if len(calls.error_samples) < 5:
                    calls.error_samples.append(f"next {status}: {body[:200]!r}")
                await asyncio.sleep(0.05)
                continue
            task = orjson.loads(body)
            lease_id = task["lease_id"]
            calls.leases.add(lease_id)
            ids = [c["id"] for c in task["completions"]]
            payload = orjson.dumps(
                {
                    "ranking": _ranking(rng, ids),
                    "likert": {str(i): rng.randint(1, 7) for i in ids},
                    "flags": {},
                    "rationale": "",
                    "duration_ms": rng.randint(2_000, 60_000),
                }
            )
            try:
                t0 = perf()
                async with asyncio.timeout(REQUEST_TIMEOUT_S):
                    status, body = await client.request(
                        "POST", f"/api/v1/leases/{lease_id}/submit", payload
                    )
                t1 = perf()
            except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as e:
                calls.exceptions[type(e).__name__] = calls.exceptions.get(type(e).__name__, 0) + 1
                calls.errors += 1
                await client.aclose()
                continue
            calls.all_calls += 1
            if status == 201:
                calls.ok.append((orjson.loads(body)["annotation_id"], lease_id, user_id))
            else:
                calls.errors += 1
                if len(calls.error_samples) < 5:
                    calls.error_samples.append(f"submit {status}: {body[:200]!r}")
            if t0 >= t_window:
                calls.submit_ns.append(t1 - t0)
                calls.submit_status[status] = calls.submit_status.get(status, 0) + 1
                if status == 201:
                    calls.submitted += 1
            if period_s:
                think = period_s * rng.uniform(0.5, 1.5) - (perf() - t_iter) / 1e9
                if think > 0:
                    await asyncio.sleep(think)
    finally:
        await client.aclose()


async def drive(
    port: int,
    users: list[tuple[int, str]],
    *,
    client_kind: str,
    warmup_s: float,
    duration_s: float,
    period_s: float,
    ramp_s: float,
    rng_seed: int,
    on_window: object,
) -> Calls:
    calls = Calls()
    cls = RawClient if client_kind == "raw" else HttpxClient
    start = time.perf_counter_ns()
    t_window = start + int(warmup_s * 1e9)
    t_end = t_window + int(duration_s * 1e9)
    rngs = [random.Random(rng_seed * 1_000_003 + i) for i in range(len(users))]
    # First request (and connection) of annotator i: i/N of the ramp, plus, when paced, a
    # random offset within one period so that the paced annotators do not move in step.
    starts = [
        ramp_s * i / len(users) + (rng.uniform(0, period_s) if period_s else 0.0)
        for i, rng in enumerate(rngs)
    ]
    tasks = [
        asyncio.create_task(
            annotator(
                cls("127.0.0.1", port, token),
                uid,
                calls,
                t_window=t_window,
                t_end=t_end,
                period_s=period_s,
                start_s=start_s,
                rng=rng,
            )
        )
        for (uid, token), rng, start_s in zip(users, rngs, starts, strict=True)
    ]

    async def mark() -> None:  # CPU snapshots at the window's edges
        await asyncio.sleep(max(0.0, (t_window - time.perf_counter_ns()) / 1e9))
        on_window("start")  # type: ignore[operator]
        await asyncio.sleep(max(0.0, (t_end - time.perf_counter_ns()) / 1e9))
        on_window("end")  # type: ignore[operator]

    marker = asyncio.create_task(mark())
    await asyncio.gather(*tasks)
    await marker
    return calls


# --------------------------------------------------------------------------- CPU accounting


class CpuMeter:
    """CPU seconds over the measurement window: this client, the server (per process),
    PostgreSQL (the bench database's backends, the rest of the cluster) and everything else;
    also how the client connections are spread over the server's worker processes."""

    GROUPS = ("client", "server", "pg_bench", "pg_other", "others")

    def __init__(self, server_pid: int, db_name: str, port: int) -> None:
        self.server = psutil.Process(server_pid)
        self.db_name = db_name
        self.port = port
        self.me = os.getpid()
        self.t: dict[str, float] = {}
        self.snap: dict[str, dict[int, tuple[str, str, float]]] = {}
        self.sys: dict[str, Any] = {}
        self.result: dict[str, Any] = {}
        self.connections: dict[int, int] = {}

    def _server_pids(self) -> set[int]:
        pids = {self.server.pid}
        with contextlib.suppress(psutil.Error):
            pids |= {p.pid for p in self.server.children(recursive=True)}
        return pids

    def _snapshot(self) -> dict[int, tuple[str, str, float]]:
        server_pids = self._server_pids()
        out: dict[int, tuple[str, str, float]] = {}
        for p in psutil.process_iter(["pid", "name", "cmdline", "cpu_times"]):
            ct = p.info["cpu_times"]
            if ct is None:
                continue
            cmd = " ".join(p.info["cmdline"] or [])
            name = p.info["name"] or "?"
            if p.pid == self.me:
                group = "client"
            elif p.pid in server_pids:
                group = "server"
            elif name == "postgres" or cmd.startswith("postgres"):
                group = "pg_bench" if self.db_name in cmd else "pg_other"
                if " -D " in f" {cmd} ":  # the postmaster: its exited children's CPU
                    # A backend that exits within the window (a connection the pool closed,
                    # an autovacuum worker) is gone at the end: its CPU is counted here, by
                    # the postmaster's children times, as the bench database's (the only
                    # one in use during the window).
                    children = getattr(ct, "children_user", 0) + getattr(ct, "children_system", 0)
                    out[-p.pid] = ("pg_bench", "postgres (exited backends)", children)
            else:
                group = "others"
            out[p.pid] = (group, name, ct.user + ct.system)
        return out

    def _count_connections(self) -> None:
        for pid in self._server_pids():
            with contextlib.suppress(psutil.Error):
                conns = psutil.Process(pid).net_connections(kind="tcp")
                n = sum(
                    1
                    for c in conns
                    if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == self.port
                )
                if n:
                    self.connections[pid] = n

    def __call__(self, edge: str) -> None:
        self.t[edge] = time.perf_counter()
        self.sys[edge] = psutil.cpu_times()
        self.snap[edge] = self._snapshot()
        if edge == "start":
            self._count_connections()
        else:
            self._compute()

    def _compute(self) -> None:
        wall = self.t["end"] - self.t["start"]
        start, end = self.snap["start"], self.snap["end"]
        res: dict[str, Any] = {"wall_s": wall, **dict.fromkeys(self.GROUPS, 0.0)}
        per_server: dict[str, float] = {}
        rest: list[tuple[float, str]] = []
        for pid, (group, name, cpu) in end.items():
            delta = cpu - start[pid][2] if pid in start else cpu
            res[group] += delta
            if group == "server" and delta > 0.05:
                per_server[str(pid)] = round(delta, 2)
            elif group == "others" and delta > 0.05:
                rest.append((delta, f"{name}[{pid}]"))
        a, b = self.sys["start"], self.sys["end"]
        fields = ("user", "nice", "system", "irq", "softirq", "steal")
        res["machine_busy"] = sum(getattr(b, f, 0) - getattr(a, f, 0) for f in fields)
        res["steal"] = getattr(b, "steal", 0) - getattr(a, "steal", 0)
        res["irq"] = sum(getattr(b, f, 0) - getattr(a, f, 0) for f in ("irq", "softirq"))
        res["server_per_process"] = per_server
        res["connections_per_worker"] = {str(k): v for k, v in sorted(self.connections.items())}
        res["top_others"] = [f"{n} {d:.2f}s" for d, n in sorted(rest, reverse=True)[:3]]
        self.result = res


# --------------------------------------------------------------------------- invariants


def check_invariants(db: Database, seeded: Seeded, calls: Calls) -> dict[str, int]:
    """Violation counts per invariant (all zero on a correct run)."""
    pid, overlap = seeded.project_id, seeded.overlap
    q: dict[str, str] = {
        "prompts over overlap (submitted annotations)": """
            SELECT count(*) FROM (SELECT prompt_id FROM annotation
              WHERE project_id = %(p)s AND status = 'submitted'
              GROUP BY prompt_id HAVING count(DISTINCT user_id) > %(o)s) x""",
        "annotation_count + open_leases > overlap": """
            SELECT count(*) FROM prompt
            WHERE project_id = %(p)s AND annotation_count + open_leases > %(o)s""",
        "annotation_count != submitted revision-1 rows": """
            SELECT count(*) FROM prompt p WHERE p.project_id = %(p)s AND p.annotation_count <>
              (SELECT count(*) FROM annotation a WHERE a.prompt_id = p.id
                 AND a.status = 'submitted' AND a.revision = 1)""",
        "open_leases != leases in status open": """
            SELECT count(*) FROM prompt p WHERE p.project_id = %(p)s AND p.open_leases <>
              (SELECT count(*) FROM lease l WHERE l.prompt_id = p.id AND l.status = 'open')""",
        "live leases + submitted > overlap": """
            SELECT count(*) FROM prompt p WHERE p.project_id = %(p)s AND
              (SELECT count(*) FROM lease l WHERE l.prompt_id = p.id AND l.status = 'open'
                 AND l.expires_at > now())
              + (SELECT count(*) FROM annotation a WHERE a.prompt_id = p.id
                 AND a.status = 'submitted' AND a.revision = 1) > %(o)s""",
        "(prompt, user) pairs with two leases": """
            SELECT count(*) FROM (SELECT 1 FROM lease WHERE project_id = %(p)s
              GROUP BY prompt_id, user_id HAVING count(*) > 1) x""",
        "(prompt, user) pairs with two revision-1 annotations": """
            SELECT count(*) FROM (SELECT 1 FROM annotation WHERE project_id = %(p)s
              AND revision = 1 GROUP BY prompt_id, user_id HAVING count(*) > 1) x""",
        "annotations whose lease is not submitted / another user's / another prompt's": """
            SELECT count(*) FROM annotation a LEFT JOIN lease l ON l.id = a.lease_id
            WHERE a.project_id = %(p)s AND a.status = 'submitted'
              AND (l.id IS NULL OR l.status <> 'submitted' OR l.user_id <> a.user_id
                   OR l.prompt_id <> a.prompt_id)""",
        "submitted leases without exactly one annotation": """
            SELECT count(*) FROM lease l WHERE l.project_id = %(p)s AND l.status = 'submitted'
              AND (SELECT count(*) FROM annotation a WHERE a.lease_id = l.id) <> 1""",
    }
    out: dict[str, int] = {}
    with psycopg.connect(db.libpq) as conn:
        args = {"p": pid, "o": overlap}
        for name, sql in q.items():
            row = conn.execute(sql, args).fetchone()
            out[name] = int(row[0]) if row else -1
        conn.execute(
            "CREATE TEMP TABLE bench_ok (annotation_id bigint, lease_id bigint, user_id bigint)"
        )
        with conn.cursor().copy("COPY bench_ok FROM STDIN") as cp:
            for rec in calls.ok:
                cp.write_row(rec)
        row = conn.execute(
            """SELECT count(*) FROM bench_ok b WHERE NOT EXISTS (SELECT 1 FROM annotation a
                 WHERE a.id = b.annotation_id AND a.lease_id = b.lease_id
                   AND a.user_id = b.user_id AND a.project_id = %(p)s)""",
            args,
        ).fetchone()
        out["201 answers without their row (id, lease, user)"] = int(row[0]) if row else -1
        out["201 answers repeating an annotation id"] = len(calls.ok) - len(
            {a for a, _, _ in calls.ok}
        )
        row = conn.execute(
            "SELECT count(*) FROM annotation WHERE project_id = %(p)s", args
        ).fetchone()
        rows = int(row[0]) if row else -1
        out["|annotation rows - 201 answers|"] = abs(rows - len(calls.ok))
        row = conn.execute("SELECT count(*) FROM lease WHERE project_id = %(p)s", args).fetchone()
        leases = int(row[0]) if row else -1
        out["|lease rows - distinct leases from next|"] = abs(leases - len(calls.leases))
    out["problems found by app.services.tasks.check_invariants"] = _service_check(db, pid)
    return out


def _service_check(db: Database, project_id: int) -> int:
    """The task service's own invariant check, as a second opinion (-1 when unavailable)."""
    try:
        from app.services.tasks import check_invariants as service_check
    except ImportError:
        return -1
    engine = make_engine(db.url, pool_size=1)
    try:
        with Session(engine) as s:
            return len(service_check(s, project_id=project_id))
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- one run


@dataclass
class LevelRun:
    n: int
    mode: str
    offered_rate: float | None
    duration_s: float
    submissions: int = 0
    rate: float = 0.0
    next_ms: dict[str, float] = field(default_factory=dict)
    submit_ms: dict[str, float] = field(default_factory=dict)
    next_calls: int = 0
    submit_calls: int = 0
    statuses: dict[str, dict[str, int]] = field(default_factory=dict)
    errors: int = 0
    exceptions: dict[str, int] = field(default_factory=dict)
    error_samples: list[str] = field(default_factory=list)
    violations: dict[str, int] = field(default_factory=dict)
    cpu: dict[str, Any] = field(default_factory=dict)
    client_cpu_us_per_call: float = 0.0
    loadavg_before: list[float] = field(default_factory=list)
    annotations: int = 0
    server_log: list[str] = field(default_factory=list)
    broken: str = ""

    @property
    def violation_count(self) -> int:
        return sum(v for v in self.violations.values() if v > 0)


def run_level(n: int, args: argparse.Namespace, rep: int) -> LevelRun:
    paced = n in args.paced and args.rate > 0
    period = n / args.rate if paced else 0.0
    run = LevelRun(
        n,
        f"paced {args.rate:g}/s" if paced else "closed loop",
        args.rate if paced else None,
        args.duration,
    )
    run.loadavg_before = [round(x, 2) for x in os.getloadavg()]
    workdir = Path(tempfile.mkdtemp(prefix="prefero-annotate-"))
    db: Database | None = None
    server: subprocess.Popen[bytes] | None = None
    try:
        db = Database(args.pg_url)
        env = {
            **os.environ,
            "PREFERO_DATA_DIR": str(workdir / "data"),
            "PREFERO_DATABASE_URL": db.url,
            "PREFERO_SECRET_KEY": secrets.token_urlsafe(32),
        }
        t0 = time.perf_counter()
        proc = subprocess.run(
            [prefero_command(), "db", "upgrade"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"prefero db upgrade failed:\n{proc.stdout}{proc.stderr}")
        seeded = seed(db, annotators=n, prompts=args.prompts, k=4, overlap=3, rng_seed=args.seed)
        port = free_port()
        log_path = workdir / "server.log"
        with log_path.open("wb") as server_log:  # the child keeps its own descriptor
            server = subprocess.Popen(
                [
                    prefero_command(),
                    "serve",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--workers",
                    str(WORKERS),
                    "--log-level",
                    "warning",
                ],
                env=env,
                cwd=ROOT,
                stdout=server_log,
                stderr=subprocess.STDOUT,
            )
        _wait_ready(port, server)
        print(
            f"  set-up {time.perf_counter() - t0:.1f} s (database, seed, server); load …",
            flush=True,
        )
        meter = CpuMeter(server.pid, db.name, port)
        profilers: list[subprocess.Popen[bytes]] = []

        def on_window(edge: str) -> None:
            meter(edge)
            if edge == "start" and args.profile:
                profilers.extend(_start_profilers(meter, args, n, rep))

        gc.collect()
        gc.freeze()
        cpu0 = time.process_time()
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            calls = runner.run(
                drive(
                    port,
                    seeded.users,
                    client_kind=args.client,
                    warmup_s=args.warmup,
                    duration_s=args.duration,
                    period_s=period,
                    ramp_s=args.ramp,
                    rng_seed=args.seed + rep,
                    on_window=on_window,
                )
            )
        client_cpu = time.process_time() - cpu0
        for prof in profilers:
            prof.wait(timeout=60)
        gc.unfreeze()
        if server.poll() is not None:
            run.broken = f"the server exited with status {server.returncode} during the load"
        _stop(server)
        server = None
        run.server_log = _log_summary(log_path)

        run.cpu = meter.result
        run.client_cpu_us_per_call = client_cpu / max(1, calls.all_calls) * 1e6
        run.submissions = calls.submitted
        run.rate = calls.submitted / args.duration
        nx, sb = sorted(calls.next_ns), sorted(calls.submit_ns)
        run.next_calls, run.submit_calls = len(nx), len(sb)
        for q in (50, 95, 99):
            run.next_ms[f"p{q}"] = round(_pct(nx, q), 2)
            run.submit_ms[f"p{q}"] = round(_pct(sb, q), 2)
        run.next_ms["max"] = round(nx[-1] / MS, 2) if nx else math.nan
        run.submit_ms["max"] = round(sb[-1] / MS, 2) if sb else math.nan
        run.statuses = {
            "next": {str(k): v for k, v in sorted(calls.next_status.items())},
            "submit": {str(k): v for k, v in sorted(calls.submit_status.items())},
        }
        run.errors = calls.errors
        run.exceptions = calls.exceptions
        run.error_samples = calls.error_samples
        run.annotations = len(calls.ok)
        run.violations = check_invariants(db, seeded, calls)
        if not calls.next_ns:
            run.broken = run.broken or "no call was measured"
    except Exception as e:  # report and carry on with the other levels
        run.broken = f"{type(e).__name__}: {e}"
    finally:
        if server is not None:
            _stop(server)
        try:
            if db is not None:
                db.drop()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    return run


def _py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def _start_profilers(
    meter: CpuMeter, args: argparse.Namespace, n: int, rep: int
) -> list[subprocess.Popen[bytes]]:
    """``py-spy record`` on every server worker for the window: samples of the thread holding
    the GIL only (``--gil``), i.e. where the worker's Python CPU time goes."""
    exe = _py_spy()
    assert exe is not None
    out = Path(args.profile)
    out.mkdir(parents=True, exist_ok=True)
    procs = []
    for pid in sorted(meter._server_pids() - {meter.server.pid}):
        dest = out / f"N{n}-run{rep + 1}-{pid}.txt"
        cmd = [exe, "record", "--pid", str(pid), "--duration", str(int(args.duration))]
        procs.append(
            subprocess.Popen(
                [*cmd, *PYSPY_ARGS, "--output", str(dest)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    return procs


def _log_summary(path: Path) -> list[str]:
    """The server's log lines, counted ("12 x database unavailable: TimeoutError")."""
    counts: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in path.read_text(errors="replace").splitlines():
            if line.strip():
                counts[line.strip()[:200]] = counts.get(line.strip()[:200], 0) + 1
    return [f"{n} x {line}" for line, n in sorted(counts.items(), key=lambda kv: -kv[1])][:8]


def _loop_factory():  # type: ignore[no-untyped-def]
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


# --------------------------------------------------------------------------- report


def _machine() -> str:
    mem = psutil.virtual_memory().total / 2**30
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (
        f"{platform.system()} {platform.release()} {platform.machine()}, {os.cpu_count()} CPUs"
        f" ({model or platform.processor() or '?'}), {mem:.1f} GiB RAM"
    )


def _versions(pg_url: str) -> str:
    def v(name: str) -> str:
        try:
            return importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            return "-"

    try:
        with psycopg.connect(libpq(pg_url), connect_timeout=5) as conn:
            row = conn.execute("SHOW server_version").fetchone()
        pg = f"PostgreSQL {row[0]}" if row else "PostgreSQL ?"
    except psycopg.Error as e:
        pg = f"PostgreSQL unavailable ({str(e).strip().splitlines()[0]})"
    return (
        f"Python {platform.python_version()}, {pg}, prefero {v('prefero')}, uvicorn {v('uvicorn')},"
        f" fastapi {v('fastapi')}, SQLAlchemy {v('sqlalchemy')}, psycopg {v('psycopg')},"
        f" httpx {v('httpx')}, uvloop {v('uvloop')}"
    )


HEADER = (
    f"{'N':>4} {'mode':<13} {'subm/s':>8} {'next p50':>9} {'p95':>7} {'p99':>7} "
    f"{'submit p50':>11} {'p95':>7} {'p99':>7} {'errors':>6} {'invariants':>10}"
)


def _row(label: str, r: LevelRun) -> str:
    inv = (
        "ok"
        if r.violation_count == 0 and r.violations
        else (f"{r.violation_count} BAD" if r.violations else "-")
    )
    return (
        f"{label:>4} {r.mode:<13} {r.rate:>8.1f} {r.next_ms.get('p50', math.nan):>9.1f} "
        f"{r.next_ms.get('p95', math.nan):>7.1f} {r.next_ms.get('p99', math.nan):>7.1f} "
        f"{r.submit_ms.get('p50', math.nan):>11.1f} {r.submit_ms.get('p95', math.nan):>7.1f} "
        f"{r.submit_ms.get('p99', math.nan):>7.1f} {r.errors:>6} {inv:>10}"
    )


def _detail(r: LevelRun) -> None:
    if r.broken:
        print(f"     BROKEN: {r.broken}")
    print(
        f"     {r.next_calls} next / {r.submit_calls} submit calls in the window, statuses "
        f"{r.statuses}; max next {r.next_ms.get('max', math.nan):.1f} ms, "
        f"max submit {r.submit_ms.get('max', math.nan):.1f} ms; load average before "
        f"{r.loadavg_before}"
    )
    if r.exceptions:
        print(f"     connection errors: {r.exceptions}")
    for line in r.server_log:
        print(f"     server log: {line}")
    for s in r.error_samples:
        print(f"     e.g. {s}")
    if r.cpu:
        c = r.cpu
        wall = c["wall_s"] or 1.0
        print(
            f"     CPU over the window, in cores: client {c['client'] / wall:.2f}, server "
            f"{c['server'] / wall:.2f}, PostgreSQL (bench db) {c['pg_bench'] / wall:.2f}, "
            f"PostgreSQL (other) {c['pg_other'] / wall:.2f}, rest of the machine "
            f"{c['others'] / wall:.2f}; busy {c['machine_busy'] / wall:.2f} of {os.cpu_count()}"
            f" (of which interrupts {c['irq'] / wall:.2f}, steal {c['steal'] / wall:.2f})"
        )
        per_proc = {pid: round(v / wall, 2) for pid, v in c["server_per_process"].items()}
        print(
            f"     server processes (cores): {per_proc}; client connections per server "
            f"process: {c['connections_per_worker']}"
            + (f"; busiest others: {', '.join(c['top_others'])}" if c["top_others"] else "")
        )
        if r.submissions:
            per = 1000 / r.submissions
            print(
                f"     CPU ms per submission (next + submit): server {c['server'] * per:.2f}, "
                f"PostgreSQL {c['pg_bench'] * per:.2f}, client {c['client'] * per:.2f} "
                f"(client {r.client_cpu_us_per_call:.0f} µs per call)"
            )
    bad = {k: v for k, v in r.violations.items() if v > 0}
    if bad:
        for k, v in bad.items():
            print(f"     VIOLATION {k}: {v}")
    elif r.violations:
        print(f"     invariants: {len(r.violations)} checks, all 0 ({r.annotations} annotations)")


def _median_run(runs: list[LevelRun]) -> LevelRun:
    m = LevelRun(runs[0].n, runs[0].mode, runs[0].offered_rate, runs[0].duration_s)
    m.rate = statistics.median(r.rate for r in runs)
    for key in ("p50", "p95", "p99"):
        m.next_ms[key] = statistics.median(r.next_ms[key] for r in runs)
        m.submit_ms[key] = statistics.median(r.submit_ms[key] for r in runs)
    m.errors = sum(r.errors for r in runs)
    m.violations = {k: sum(r.violations.get(k, 0) for r in runs) for k in runs[0].violations}
    return m


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--levels", default="1,32,200", help="annotator counts N (1,32,200)")
    ap.add_argument("--duration", type=float, default=20.0, help="measured seconds per run (20)")
    ap.add_argument("--warmup", type=float, default=3.0, help="uncounted seconds first (3)")
    ap.add_argument("--rate", type=float, default=350.0, help="offered submissions/s, paced levels")
    ap.add_argument("--paced", default="200", help="levels run at --rate with think time (200)")
    ap.add_argument(
        "--ramp",
        type=float,
        default=2.0,
        help="spread the annotators' first requests over this time (2 s; at most --warmup)",
    )
    ap.add_argument("--prompts", type=int, default=10_000, help="prompts seeded (10000)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per level (median reported)")
    ap.add_argument("--client", choices=("raw", "httpx"), default="raw", help="HTTP client (raw)")
    ap.add_argument("--seed", type=int, default=20261130, help="random seed")
    ap.add_argument(
        "--pg-url",
        default=os.environ.get("PREFERO_BENCH_PG_URL", PG_DEFAULT),
        help=f"PostgreSQL server to create the bench databases on ({PG_DEFAULT})",
    )
    ap.add_argument("--json", metavar="OUT", help="also write the figures to this JSON file")
    ap.add_argument(
        "--profile",
        metavar="DIR",
        help="sample the server workers with py-spy during the window (collapsed stacks in DIR)",
    )
    args = ap.parse_args(argv)
    try:
        levels = [int(x) for x in args.levels.split(",") if x.strip()]
        args.paced = {int(x) for x in args.paced.split(",") if x.strip()}
    except ValueError:
        ap.error("--levels and --paced take comma-separated integers")
    if args.profile and _py_spy() is None:
        ap.error("--profile needs py-spy (pip install py-spy)")
    if not levels or min(levels) < 1 or args.repeat < 1 or args.duration <= 0 or args.warmup < 0:
        ap.error("--levels >= 1, --repeat >= 1, --duration > 0, --warmup >= 0")
    if not 0 <= args.ramp <= args.warmup:
        ap.error("--ramp must be between 0 and --warmup (the window starts after the ramp)")

    started = datetime.now(UTC)
    load = os.getloadavg()
    print(f"date:    {started:%Y-%m-%d %H:%M:%S} UTC")
    print(f"machine: {_machine()}")
    print(
        f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
        + ("   (busy machine: figures will be noisy)" if load[0] >= 1.0 else "")
    )
    print(f"versions: {_versions(args.pg_url)}")
    overridden = {"PREFERO_DATA_DIR", "PREFERO_DATABASE_URL", "PREFERO_SECRET_KEY"}
    tuned = {
        k: v
        for k, v in os.environ.items()
        if k.startswith("PREFERO_") and k not in overridden and "KEY" not in k
    }
    if tuned:
        print(f"server environment: {tuned}")
    print(
        f"set-up:  {args.prompts:,} prompts x 4 completions, overlap 3, ties + Likert; "
        f"prefero serve --workers {WORKERS}; client {args.client} "
        f"({'uvloop' if _loop_factory() else 'asyncio'}), one connection per annotator; "
        f"warm-up {args.warmup:g} s, window {args.duration:g} s"
    )

    results: dict[int, list[LevelRun]] = {}
    for n in levels:
        for rep in range(args.repeat):
            print(f"[N={n}] run {rep + 1}/{args.repeat} …", flush=True)
            results.setdefault(n, []).append(run_level(n, args, rep))

    broken = False
    goals_ok = True
    print("\nlatencies in ms; subm/s = 201 answers per second of the window")
    print(HEADER)
    print("-" * len(HEADER))
    verdicts: list[str] = []
    summary: dict[int, LevelRun] = {}
    for n, runs in results.items():
        for i, r in enumerate(runs, 1):
            print(_row(str(n) if len(runs) == 1 else f"{n}#{i}", r))
            _detail(r)
            broken |= bool(r.broken)
        good = [r for r in runs if not r.broken]
        if not good:
            continue
        med = _median_run(good) if len(good) > 1 else good[0]
        if len(good) > 1:
            print(_row("med", med) + f"   (median of {len(good)} runs, N={n})")
        summary[n] = med
        if med.errors or med.violation_count:
            goals_ok = False
            verdicts.append(
                f"N={n}: errors {med.errors}, invariant violations {med.violation_count}: FAIL"
            )
    if GOAL_LEVEL in summary:
        m = summary[GOAL_LEVEL]
        checks = [
            (f"submissions/s >= {GOAL_RATE:g}", m.rate >= GOAL_RATE, f"{m.rate:.1f}"),
            (
                f"next p99 <= {GOAL_P99_MS:g} ms",
                m.next_ms["p99"] <= GOAL_P99_MS,
                f"{m.next_ms['p99']:.1f} ms",
            ),
            (
                f"submit p99 <= {GOAL_P99_MS:g} ms",
                m.submit_ms["p99"] <= GOAL_P99_MS,
                f"{m.submit_ms['p99']:.1f} ms",
            ),
            ("zero invariant violations", m.violation_count == 0, str(m.violation_count)),
        ]
        print()
        for name, ok, got in checks:
            print(f"goal N={GOAL_LEVEL} {name}: {'PASS' if ok else 'FAIL'} ({got})")
            goals_ok &= ok
    elif GOAL_LEVEL in levels:
        broken = True
    else:
        print(f"\n(goals apply to N={GOAL_LEVEL}, not run)")
    for v in verdicts:
        print(v)

    if args.json:
        out = {
            "date": started.isoformat(),
            "machine": _machine(),
            "cpus": os.cpu_count(),
            "loadavg_start": list(load),
            "versions": _versions(args.pg_url),
            "options": {k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(args).items()},
            "runs": {str(n): [asdict(r) for r in runs] for n, runs in results.items()},
            "median": {str(n): asdict(m) for n, m in summary.items()},
        }
        Path(args.json).write_bytes(
            orjson.dumps(out, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)
        )
        print(f"wrote {args.json}")
    if broken:
        print("RESULT: BROKEN RUN")
        return 2
    if not goals_ok:
        print("RESULT: FAIL")
        return 1
    print("RESULT: PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
