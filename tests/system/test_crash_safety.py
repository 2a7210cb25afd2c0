"""``prefero serve`` (2 workers) under 50 simulated annotators, killed with SIGKILL mid-run
(the whole process group, with requests in flight) and restarted on the same database, on
PostgreSQL and on SQLite (WAL): every submission answered 201 is stored exactly once, the
dead process's leases expire and their prompts are served again, no prompt exceeds its
overlap, and the prompt counters match the rows."""

from __future__ import annotations

import contextlib
import random
import sqlite3
import threading
import time

import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from app.db import make_engine
from app.models import Annotation, Lease, LeaseStatus, Prompt
from tests.conftest import create_database, migrate
from tests.system._harness import (
    Annotator,
    Ledger,
    Server,
    add_accounts,
    check_labels,
    join_all,
    retry_unanswered,
    seed_project,
    server_error_samples,
)

pytestmark = pytest.mark.slow

PROMPTS = 300
K = 4
OVERLAP = 3
LEASE_SECONDS = 30  # the smallest a project allows
ANNOTATORS = 50
HOLDERS = 10
"""Annotators who take a task and are still looking at it when the server dies."""
ACKS_BEFORE_KILL = 150


@pytest.fixture(params=["postgresql", "sqlite"])
def database(request, tmp_path):
    url, drop = create_database(request.param, tmp_path)
    migrate(url)
    yield request.param, url
    drop()


def _open_leases(url: str, project_id: int) -> list:
    engine = make_engine(url, pool_size=1)
    try:
        with Session(engine) as s:
            return s.execute(
                select(Lease.id, Lease.prompt_id, Lease.expires_at).where(
                    Lease.project_id == project_id, Lease.status == LeaseStatus.open
                )
            ).all()
    finally:
        engine.dispose()


def _complete_prompts(url: str, project_id: int) -> int:
    engine = make_engine(url, pool_size=1)
    try:
        with Session(engine) as s:
            query = select(func.count()).where(
                Prompt.project_id == project_id, Prompt.annotation_count >= OVERLAP
            )
            return int(s.scalar(query) or 0)
    finally:
        engine.dispose()


def test_kill_9_mid_run_loses_and_duplicates_nothing(database, tmp_path):
    kind, url = database
    t0 = time.monotonic()
    seeded = seed_project(
        url,
        prompts=PROMPTS,
        k=K,
        overlap=OVERLAP,
        lease_seconds=LEASE_SECONDS,
        annotators=ANNOTATORS,
    )
    newcomers = add_accounts(url, n=ANNOTATORS, prefix="new")
    server = Server(database_url=url, data_dir=tmp_path / "data", workers=2)
    ledger = Ledger()
    before, after = threading.Event(), threading.Event()
    rng = random.Random()
    try:
        server.start()
        started_at = time.monotonic()
        if kind == "sqlite":
            with contextlib.closing(sqlite3.connect(make_url(url).database)) as db:
                assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"

        # Phase 1: 50 annotators; 10 of them keep their task open. Kill at a random moment.
        first = [
            Annotator(server.base_url, seeded.slug, acc, ledger, before, hold=i < HOLDERS, seed=i)
            for i, acc in enumerate(seeded.accounts)
        ]
        for t in first:
            t.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            holding = all(t.holding.is_set() for t in first[:HOLDERS])
            if holding and len(ledger.acked) >= ACKS_BEFORE_KILL:
                break
            assert server.alive(), server.log()
            time.sleep(0.05)
        time.sleep(rng.uniform(0, 0.3))
        killed_at = time.monotonic()
        server.kill()
        before.set()
        join_all(first)
        with ledger.lock:
            in_flight = sum(1 for c in ledger.calls if c.status is None and c.started < killed_at)
            acked_before_kill = len(ledger.acked)
        unanswered_submits = len(ledger.unanswered)
        assert acked_before_kill >= 50, "too little load before the kill"
        assert in_flight > 0, "no request was in flight at the kill"

        # The database as the crash left it: counters match the rows, overlap held.
        at_crash = check_labels(url, project_id=seeded.project_id, ledger=ledger, all_acked=False)
        assert at_crash.problems == []

        # Restart on the same database; the clients retry the submits that got no answer.
        server.start()
        retries = retry_unanswered(server.base_url, ledger)
        # A retry is answered 201 (recorded now, or the earlier answer replayed), or 409 when
        # the lease expired meanwhile (then nothing had been recorded: see the checks below).
        expired = [c for c in ledger.calls if c.kind == "retry" and c.status == 409]
        assert set(retries) <= {201, 409}, retries
        assert all("expired" in c.body for c in expired), [c.body for c in expired]
        restarted_at = time.monotonic()
        orphans = _open_leases(url, seeded.project_id)
        assert len(orphans) >= HOLDERS

        # Phase 2: 50 other annotators until every prompt has its overlap; that needs the
        # dead process's leases to expire and their prompts to be served again.
        second = [
            Annotator(
                server.base_url,
                seeded.slug,
                acc,
                ledger,
                after,
                idle_poll=1.0,
                give_up_on_no_answer=False,
                seed=1000 + i,
            )
            for i, acc in enumerate(newcomers)
        ]
        for t in second:
            t.start()
        deadline = time.monotonic() + LEASE_SECONDS + 60
        while time.monotonic() < deadline:
            if _complete_prompts(url, seeded.project_id) == PROMPTS:
                break
            assert server.alive(), server.log()
            time.sleep(0.5)
        drained_at = time.monotonic()
        after.set()
        join_all(second)
    finally:
        before.set()
        after.set()
        server.stop()

    final = check_labels(url, project_id=seeded.project_id, ledger=ledger, all_acked=True)
    assert final.problems == []
    assert final.complete_prompts == PROMPTS, "the queue did not drain"
    assert final.open_leases == 0
    assert final.annotations == PROMPTS * OVERLAP == len(ledger.acked)

    engine = make_engine(url, pool_size=1)
    try:
        with Session(engine) as s:
            for lease_id, prompt_id, expires_at in orphans:
                assert s.scalar(select(Lease.status).where(Lease.id == lease_id)) == (
                    LeaseStatus.expired
                )
                latest = s.scalar(
                    select(Annotation.created_at)
                    .where(Annotation.prompt_id == prompt_id)
                    .order_by(Annotation.created_at.desc())
                    .limit(1)
                )
                assert latest is not None
                assert latest >= expires_at  # served again after the lease expired
    finally:
        engine.dispose()

    assert server_error_samples(ledger) == []
    statuses = {k: dict(ledger.statuses(k)) for k in ("next", "submit", "retry")}
    assert set(statuses["next"]) <= {200, 204, None}, statuses
    assert set(statuses["submit"]) <= {201, None}, statuses
    print(
        f"\n[{kind}] crash: {acked_before_kill} submissions acknowledged before kill -9, "
        f"{in_flight} requests in flight, {unanswered_submits} submits unanswered and retried "
        f"({ledger.replayed} replayed: committed before the crash), {len(orphans)} orphaned "
        f"leases expired and re-served; final {final.annotations} annotations = "
        f"{len(ledger.acked)} acknowledged, 0 lost, 0 duplicated, counters consistent; "
        f"statuses {statuses}; seed + start {started_at - t0:.1f} s, "
        f"load {killed_at - started_at:.1f} s, kill + restart + retries "
        f"{restarted_at - killed_at:.1f} s, drain {drained_at - restarted_at:.1f} s, "
        f"total {time.monotonic() - t0:.1f} s"
    )
