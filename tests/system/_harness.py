"""Shared by the system tests: a real ``prefero serve`` in its own process group, a seeded
project with annotator accounts, simulated annotators (httpx, one thread each) that record
every answer, the database checks made afterwards, and a private PostgreSQL cluster that a
test may stop and start."""

from __future__ import annotations

import contextlib
import os
import pwd
import random
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import psutil
import psycopg
from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from app.db import make_engine
from app.models import (
    Annotation,
    ApiToken,
    Completion,
    Lease,
    LeaseStatus,
    Project,
    Prompt,
    Role,
    User,
    WebSession,
    utcnow,
)
from app.security import hash_token, new_token
from app.services.tasks import check_invariants
from bench._support import free_port, libpq, prefero_command
from tests.conftest import unavailable

REQUEST_TIMEOUT_S = 30.0


# --------------------------------------------------------------------------- seeding


@dataclass(frozen=True)
class Account:
    user_id: int
    username: str
    token: str


@dataclass
class Seeded:
    project_id: int
    slug: str
    overlap: int
    prompts: int
    accounts: list[Account]


def seed_project(
    url: str,
    *,
    prompts: int,
    k: int = 4,
    overlap: int = 3,
    lease_seconds: int = 30,
    annotators: int = 50,
    slug: str = "crash",
) -> Seeded:
    """One project of ``prompts`` prompts with ``k`` completions each, and ``annotators``
    annotator accounts with an API token each."""
    engine = make_engine(url, pool_size=1)
    try:
        with Session(engine) as s:
            project = Project(
                name="System test",
                slug=slug,
                completions_per_task=k,
                overlap=overlap,
                allow_ties=True,
                likert=False,
                require_rationale=False,
                lease_seconds=lease_seconds,
            )
            s.add(project)
            s.flush()
            pid = project.id
            prompt_ids = s.scalars(
                insert(Prompt).returning(Prompt.id, sort_by_parameter_order=True),
                [
                    {
                        "project_id": pid,
                        "external_id": f"p{i:05d}",
                        "messages": [{"role": "user", "content": f"Question {i}?"}],
                        "metadata_": {},
                    }
                    for i in range(prompts)
                ],
            ).all()
            s.execute(
                insert(Completion),
                [
                    {"prompt_id": p, "external_id": str(j), "text": f"Answer {j} to {p}."}
                    for p in prompt_ids
                    for j in range(k)
                ],
            )
            s.commit()
    finally:
        engine.dispose()
    return Seeded(pid, slug, overlap, prompts, add_accounts(url, n=annotators, prefix="ann"))


def add_accounts(url: str, *, n: int, prefix: str, role: Role = Role.annotator) -> list[Account]:
    """``n`` new active users, each with one API token."""
    engine = make_engine(url, pool_size=1)
    try:
        with Session(engine) as s:
            names = [f"{prefix}-{i:03d}" for i in range(n)]
            ids = s.scalars(
                insert(User).returning(User.id, sort_by_parameter_order=True),
                [{"username": u, "role": role, "active": True} for u in names],
            ).all()
            secrets_ = [new_token() for _ in ids]
            s.execute(
                insert(ApiToken),
                [
                    {"user_id": uid, "name": "system-test", "token_hash": hash_token(sec)}
                    for uid, sec in zip(ids, secrets_, strict=True)
                ],
            )
            s.commit()
    finally:
        engine.dispose()
    return [Account(i, u, t) for i, u, t in zip(ids, names, secrets_, strict=True)]


def add_web_session(url: str, *, user_id: int) -> str:
    """A browser login for ``user_id``; returns the ``prefero_session`` cookie value."""
    secret = new_token()
    engine = make_engine(url, pool_size=1)
    try:
        with Session(engine) as s:
            s.add(
                WebSession(
                    token_hash=hash_token(secret),
                    user_id=user_id,
                    csrf_token=new_token(),
                    expires_at=utcnow() + timedelta(days=30),
                )
            )
            s.commit()
    finally:
        engine.dispose()
    return secret


# --------------------------------------------------------------------------- the server


class Server:
    """``prefero serve`` in a process group of its own (so that ``kill`` reaches every
    worker), with its log appended to ``data_dir/serve.log`` across restarts."""

    def __init__(
        self,
        *,
        database_url: str,
        data_dir: Path,
        workers: int = 2,
        args: tuple[str, ...] = (),
        **settings: str,
    ) -> None:
        self.args = args  # more `prefero serve` options
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.workers = workers
        data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = data_dir / "serve.log"
        self.env = {
            **os.environ,
            "PREFERO_DATABASE_URL": database_url,
            "PREFERO_DATA_DIR": str(data_dir),
            "PREFERO_SECRET_KEY": "system-test-secret-key",
            **{f"PREFERO_{k.upper()}": v for k, v in settings.items()},
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 90.0) -> None:
        cmd = [prefero_command(), "serve", "--port", str(self.port)]
        cmd += ["--workers", str(self.workers), "--log-level", "warning", *self.args]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                raise AssertionError(f"prefero serve exited ({code}):\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.base_url}/readyz", timeout=2).status_code == 200:
                    return
            time.sleep(0.1)
        raise AssertionError(f"/readyz did not answer 200 within {timeout:.0f} s:\n{self.log()}")

    def kill(self) -> None:
        """SIGKILL to the whole process group: the supervisor and every worker at once."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        deadline = time.monotonic() + 10
        while _group_alive(self.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def worker_pids(self) -> set[int]:
        assert self.proc is not None
        with contextlib.suppress(psutil.Error):
            kids = psutil.Process(self.proc.pid).children(recursive=True)
            return {p.pid for p in kids if "python" in p.name() or "prefero" in p.name()}
        return set()

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-4000:]
        return ""


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


# --------------------------------------------------------------------------- annotators


@dataclass
class Call:
    kind: str
    status: int | None  # None: no answer (connection refused, reset, timed out)
    started: float
    ended: float
    retry_after: str | None = None
    content_type: str = ""
    body: str = ""  # kept for answers other than 200, 201 and 204
    error: str = ""

    @property
    def seconds(self) -> float:
        return self.ended - self.started


@dataclass
class Ledger:
    """What the clients saw, shared by their threads."""

    calls: list[Call] = field(default_factory=list)
    leases: dict[int, int] = field(default_factory=dict)  # lease id -> user id (200 next)
    acked: dict[int, int] = field(default_factory=dict)  # annotation id -> lease id (201)
    replayed: int = 0
    unanswered: list[tuple[Account, int, dict[str, Any]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, call: Call) -> None:
        with self.lock:
            self.calls.append(call)

    def ack(self, response: httpx.Response) -> None:
        body = response.json()
        with self.lock:
            earlier = self.acked.setdefault(body["annotation_id"], body["lease_id"])
            assert earlier == body["lease_id"], f"annotation id answered for two leases: {body}"
            if response.headers.get("Idempotent-Replayed") == "true":
                self.replayed += 1

    def statuses(self, kind: str | None = None) -> Counter[int | None]:
        with self.lock:
            return Counter(c.status for c in self.calls if kind is None or c.kind == kind)


def send(
    client: httpx.Client, kind: str, method: str, url: str, **kw: Any
) -> tuple[httpx.Response | None, Call]:
    """One request and what was seen of it; the response is None when no answer came."""
    started = time.monotonic()
    try:
        r = client.request(method, url, **kw)
    except httpx.TransportError as e:
        return None, Call(kind, None, started, time.monotonic(), error=type(e).__name__)
    keep = "" if r.status_code in (200, 201, 204) else r.text[:2000]
    return r, Call(
        kind,
        r.status_code,
        started,
        time.monotonic(),
        retry_after=r.headers.get("retry-after"),
        content_type=r.headers.get("content-type", ""),
        body=keep,
    )


def timed(
    client: httpx.Client, ledger: Ledger, kind: str, method: str, url: str, **kw: Any
) -> httpx.Response | None:
    """One request, recorded in ``ledger``; None when no answer came."""
    r, call = send(client, kind, method, url, **kw)
    ledger.record(call)
    return r


class Annotator(threading.Thread):
    """Loops ``next`` → ``submit`` with a random ranking until ``stop`` is set; an iteration
    always ends with its submit. On 503 it waits a little and repeats the same call.

    ``hold``: take one task and keep it until ``stop`` (an annotator who walked away).
    ``idle_poll``: on 204 ask again after that many seconds (else stop).
    ``give_up_on_no_answer``: leave at the first call that got no answer (the server died);
    the submit, if it was one, goes to ``ledger.unanswered`` for a later retry."""

    def __init__(
        self,
        base_url: str,
        slug: str,
        account: Account,
        ledger: Ledger,
        stop: threading.Event,
        *,
        hold: bool = False,
        idle_poll: float | None = None,
        give_up_on_no_answer: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(daemon=True, name=f"annotator-{account.username}")
        self.base_url, self.slug, self.account, self.ledger, self.stop = (
            base_url,
            slug,
            account,
            ledger,
            stop,
        )
        self.hold, self.idle_poll, self.give_up = hold, idle_poll, give_up_on_no_answer
        self.rng = random.Random(seed)
        self.holding = threading.Event()
        self.crashed: BaseException | None = None

    def run(self) -> None:
        try:
            with httpx.Client(
                base_url=self.base_url,
                headers={"Authorization": f"Bearer {self.account.token}"},
                timeout=REQUEST_TIMEOUT_S,
            ) as client:
                self._loop(client)
        except BaseException as e:  # surfaced by the test
            self.crashed = e

    def _loop(self, client: httpx.Client) -> None:
        next_url = f"/api/v1/projects/{self.slug}/tasks/next"
        while not self.stop.is_set():
            r = timed(client, self.ledger, "next", "GET", next_url)
            if r is None:
                if self.give_up:
                    return
                time.sleep(0.2)
                continue
            if r.status_code == 503:
                time.sleep(0.2)
                continue
            if r.status_code == 204:
                if self.idle_poll is None:
                    return
                self.stop.wait(self.idle_poll)
                continue
            if r.status_code != 200:
                time.sleep(0.2)
                continue
            task = r.json()
            with self.ledger.lock:
                self.ledger.leases[task["lease_id"]] = self.account.user_id
            if self.hold:
                self.holding.set()
                self.stop.wait()
                return
            ids = [c["id"] for c in task["completions"]]
            self.rng.shuffle(ids)
            payload = {"ranking": [[i] for i in ids], "duration_ms": self.rng.randint(500, 9000)}
            if not self._submit(client, task["lease_id"], payload):
                return

    def _submit(self, client: httpx.Client, lease_id: int, payload: dict[str, Any]) -> bool:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            r = timed(
                client,
                self.ledger,
                "submit",
                "POST",
                f"/api/v1/leases/{lease_id}/submit",
                json=payload,
            )
            if r is None:
                with self.ledger.lock:
                    self.ledger.unanswered.append((self.account, lease_id, payload))
                if self.give_up:
                    return False
            elif r.status_code == 201:
                self.ledger.ack(r)
                return True
            elif r.status_code != 503:
                return True  # recorded; the test judges it
            time.sleep(0.2)
        return True


def retry_unanswered(base_url: str, ledger: Ledger) -> Counter[int | None]:
    """Send again every submit that got no answer (the client's retry after an outage)."""
    out: Counter[int | None] = Counter()
    with ledger.lock:
        pending, ledger.unanswered = list(ledger.unanswered), []
    for account, lease_id, payload in pending:
        with httpx.Client(
            base_url=base_url,
            headers={"Authorization": f"Bearer {account.token}"},
            timeout=REQUEST_TIMEOUT_S,
        ) as client:
            r = timed(
                client, ledger, "retry", "POST", f"/api/v1/leases/{lease_id}/submit", json=payload
            )
        out[r.status_code if r is not None else None] += 1
        if r is not None and r.status_code == 201:
            ledger.ack(r)
    return out


def join_all(threads: list[Annotator], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.1, deadline - time.monotonic()))
    stuck = [t.name for t in threads if t.is_alive()]
    assert not stuck, f"annotators still running: {stuck[:5]}"
    crashed = [f"{t.name}: {t.crashed!r}" for t in threads if t.crashed is not None]
    assert not crashed, crashed[:5]


# --------------------------------------------------------------------------- database checks


@dataclass
class LabelCheck:
    problems: list[str]
    annotations: int
    open_leases: int
    complete_prompts: int


def check_labels(url: str, *, project_id: int, ledger: Ledger, all_acked: bool) -> LabelCheck:
    """Every acknowledged submission is in the database once, with its lease; the prompt
    counters match the rows; no prompt exceeds its overlap; nobody annotated a prompt twice.
    ``all_acked``: also require that every annotation row was acknowledged (no phantom)."""
    engine = make_engine(url, pool_size=1)
    problems: list[str] = []
    try:
        with Session(engine) as s:
            rows = s.execute(
                select(Annotation.id, Annotation.lease_id, Annotation.user_id).where(
                    Annotation.project_id == project_id
                )
            ).all()
            by_id = {r.id: r for r in rows}
            lease_users = dict(s.execute(select(Lease.id, Lease.user_id)).all())
            with ledger.lock:
                acked, leases = dict(ledger.acked), dict(ledger.leases)
            for aid, lid in acked.items():
                row = by_id.get(aid)
                if row is None:
                    problems.append(f"annotation {aid} (201 for lease {lid}) is missing")
                elif row.lease_id != lid:
                    problems.append(f"annotation {aid}: lease {row.lease_id}, answered {lid}")
            if all_acked:
                phantom = sorted(set(by_id) - set(acked))
                if phantom:
                    problems.append(f"{len(phantom)} annotations never acknowledged: {phantom[:5]}")
            lease_ids = [r.lease_id for r in rows]
            if len(lease_ids) != len(set(lease_ids)):
                problems.append("a lease has two annotations")
            missing_leases = [lid for lid in leases if lid not in lease_users]
            if missing_leases:
                problems.append(f"leases handed out but missing: {missing_leases[:5]}")
            wrong_user = [lid for lid, uid in leases.items() if lease_users.get(lid, uid) != uid]
            if wrong_user:
                problems.append(f"leases with another user than answered: {wrong_user[:5]}")
            problems += check_invariants(s, project_id=project_id)
            overlap = s.scalar(select(Project.overlap).where(Project.id == project_id))
            complete = s.scalar(
                select(func.count()).where(
                    Prompt.project_id == project_id, Prompt.annotation_count >= overlap
                )
            )
            open_leases = s.scalar(
                select(func.count()).where(
                    Lease.project_id == project_id, Lease.status == LeaseStatus.open
                )
            )
    finally:
        engine.dispose()
    return LabelCheck(problems, len(rows), int(open_leases or 0), int(complete or 0))


def server_error_samples(ledger: Ledger) -> list[str]:
    """Answers no client should ever see: 5xx other than 503, or a body with a traceback."""
    with ledger.lock:
        calls = list(ledger.calls)
    bad = [
        c
        for c in calls
        if (c.status is not None and c.status >= 500 and c.status != 503)
        or "Traceback" in c.body
        or 'File "' in c.body
    ]
    return [f"{c.kind} {c.status}: {c.body[:300]}" for c in bad[:5]]


# --------------------------------------------------------------------------- private cluster


def _pg_bindir() -> Path | None:
    env = os.environ.get("PREFERO_TEST_PG_BINDIR")
    if env:
        return Path(env)
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), reverse=True)
    if found:
        return found[0].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class PrivateCluster:
    """A throwaway PostgreSQL cluster (``initdb`` into a temporary directory, a free port,
    trust authentication), which a test may stop, start and restart without disturbing the
    shared server. Run as user ``postgres`` through ``runuser`` when the tests run as root."""

    def __init__(self) -> None:
        bindir = _pg_bindir()
        if bindir is None or not (bindir / "pg_ctl").exists():
            unavailable("a private PostgreSQL cluster", "initdb/pg_ctl not found")
        self.bindir = bindir
        self.prefix: list[str] = []
        owner = None
        if os.geteuid() == 0:
            runuser = shutil.which("runuser")
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                owner = None
            if runuser is None or owner is None:
                unavailable("a private PostgreSQL cluster", "runuser or user postgres missing")
            self.prefix = [runuser, "-u", "postgres", "--"]
        self.dir = Path(tempfile.mkdtemp(prefix="prefero-pg-"))
        if owner is not None:
            os.chown(self.dir, owner.pw_uid, owner.pw_gid)
        self.data = self.dir / "data"
        self.port = free_port()
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
            "--no-instructions",
        )

    def _run(self, tool: str, *args: str, timeout: float = 60.0) -> None:
        out = subprocess.run(
            [*self.prefix, str(self.bindir / tool), *args],
            capture_output=True,
            timeout=timeout,
            cwd=self.dir,
        )
        if out.returncode != 0:
            raise AssertionError(
                f"{tool} {' '.join(args)} failed ({out.returncode}): "
                f"{out.stderr.decode(errors='replace')[-2000:]}\n{self.log()}"
            )

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
            " -c max_connections=100"
        )
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.dir / "postgres.log"),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
        )

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        with psycopg.connect(libpq(self.url()), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.dir / "postgres.log").read_text(errors="replace")[-2000:]
        return ""

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            if self.running():
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)


CSRF_FIELD = re.compile(r'name="csrf_token" value="([^"]+)"')
