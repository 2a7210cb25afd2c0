"""Many annotators at once against a real database (committed transactions, one session per
thread): the task invariants hold afterwards and nothing is lost or written twice.

PostgreSQL runs 60 threads (row locks with SKIP LOCKED), twice: with ordinary transactions and
with the labeling routes' sessions, whose statements commit one by one
(``make_statement_session_factory``); SQLite 12 (BEGIN IMMEDIATE)."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, func, select, update
from sqlalchemy.dialects.postgresql.psycopg import dialect as psycopg_dialect

from app.config import Settings
from app.db import (
    STATEMENT_POOL_REST_S,
    STATEMENT_POOL_WAIT_S,
    Precompiled,
    make_engine,
    make_session_factory,
    make_statement_session_factory,
)
from app.errors import Conflict, Forbidden, NotFound, TooManyRequests
from app.main import create_app
from app.models import (
    Annotation,
    AnnotationStatus,
    ApiToken,
    Completion,
    Lease,
    Project,
    Prompt,
    Role,
    User,
    WebSession,
    utcnow,
)
from app.schemas import SubmitAnnotation
from app.security import hash_token
from app.services import tasks, users
from tests.conftest import create_database, migrate
from tests.factories import auth, make_token

PROMPTS = 40
OVERLAP = 3


def seed(engine, *, prompts: int, users: int) -> None:
    """Project "load" (K = 4, overlap 3) with ``prompts`` prompts, users u0, u1, …"""
    with make_session_factory(engine)() as s:
        project = Project(name="Load", slug="load", overlap=OVERLAP, completions_per_task=4)
        s.add(project)
        s.flush()
        for i in range(prompts):
            prompt = Prompt(
                project_id=project.id,
                external_id=f"p{i}",
                messages=[{"role": "user", "content": f"prompt {i}"}],
            )
            prompt.completions = [
                Completion(external_id=f"c{j}", text=f"answer {j}") for j in range(4)
            ]
            s.add(prompt)
        s.add_all(User(username=f"u{i}", role=Role.annotator) for i in range(users))
        s.commit()


@pytest.fixture(
    params=[
        ("postgresql", 60, make_session_factory),
        ("postgresql", 60, make_statement_session_factory),
        ("sqlite", 12, make_session_factory),
    ],
    ids=["postgresql", "postgresql-statements", "sqlite"],
)
def crowd(request, tmp_path):
    kind, threads, make_factory = request.param
    url, drop = create_database(kind, tmp_path)
    try:
        migrate(url)
        engine = make_engine(url, pool_size=threads + 5)
        factory = make_factory(engine)
        seed(engine, prompts=PROMPTS, users=threads)
        yield factory, threads
        engine.dispose()
    finally:
        drop()


def annotate(factory, username: str, barrier: threading.Barrier, seed: int, out: dict) -> None:
    rng = random.Random(seed)
    submitted: list[int] = []
    errors: list[str] = []
    with factory() as session:
        user = session.scalar(select(User).where(User.username == username))
        session.rollback()
        barrier.wait()
        for _ in range(200):
            task = tasks.next_task(session, slug="load", user=user)
            if task is None:
                break
            roll = rng.random()
            try:
                if roll < 0.1:
                    tasks.skip(session, lease_id=task.lease_id, user=user, reason="busy")
                elif roll < 0.2:  # walks away: the lease expires and must be reclaimed
                    session.execute(
                        update(Lease)
                        .where(Lease.id == task.lease_id)
                        .values(expires_at=utcnow() - timedelta(seconds=1))
                    )
                    session.commit()
                else:
                    ids = [c.id for c in task.completions]
                    rng.shuffle(ids)
                    data = SubmitAnnotation(ranking=[[i] for i in ids])
                    result = tasks.submit(session, lease_id=task.lease_id, user=user, data=data)
                    submitted.append(result.annotation_id)
            except Conflict as e:  # pragma: no cover - would be a bug: report it
                errors.append(str(e))
    out[username] = (submitted, errors)


def test_concurrent_annotators_keep_the_invariants(crowd):
    factory, threads = crowd
    barrier = threading.Barrier(threads)
    out: dict[str, tuple[list[int], list[str]]] = {}
    workers = [
        threading.Thread(target=annotate, args=(factory, f"u{i}", barrier, i, out))
        for i in range(threads)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=300)
    assert not any(w.is_alive() for w in workers)
    assert len(out) == threads

    ids = [a for submitted, _ in out.values() for a in submitted]
    assert [e for _, errors in out.values() for e in errors] == []
    with factory() as session:
        assert tasks.check_invariants(session) == []
        # An annotator who got "nothing left" stopped, though slots freed later by others'
        # skips and expiries: one more pass, one annotator at a time, takes those.
        for user in session.scalars(select(User).order_by(User.id)).all():
            while (task := tasks.next_task(session, slug="load", user=user)) is not None:
                data = SubmitAnnotation(ranking=[[c.id] for c in task.completions])
                ids.append(
                    tasks.submit(
                        session, lease_id=task.lease_id, user=user, data=data
                    ).annotation_id
                )
        assert tasks.check_invariants(session) == []
        rows = session.execute(
            select(Annotation.id, Annotation.prompt_id).where(
                Annotation.status == AnnotationStatus.submitted
            )
        ).all()
        # Every 201 has its row and there is no other: nothing lost, nothing duplicated.
        assert sorted(r.id for r in rows) == sorted(ids)
        per_prompt = Counter(r.prompt_id for r in rows)
        # Enough annotators: every prompt reached its overlap, none went past it.
        assert len(per_prompt) == PROMPTS
        assert set(per_prompt.values()) == {OVERLAP}
        open_leases = session.scalar(select(func.sum(Prompt.open_leases)))
        assert open_leases == 0


# --------------------------------------------------------------------------- statement sessions


@pytest.fixture
def pg_project(tmp_path):
    """A committed PostgreSQL database with project "load" (5 prompts) and users u0, u1."""
    url, drop = create_database("postgresql", tmp_path)
    try:
        migrate(url)
        engine = make_engine(url)
        seed(engine, prompts=5, users=2)
        yield engine
        engine.dispose()
    finally:
        drop()


def test_the_labeling_statements_stay_short_enough_for_psycopgs_query_cache():
    """psycopg converts a query's %(name)s placeholders to PostgreSQL's $n once per query text,
    but keeps the conversion only for queries of up to 4,096 bytes and 50 parameters; a longer
    one is parsed again on every execution (measured: ~250 µs more client CPU per `next` when
    its statement was 4.8 kB)."""
    from psycopg import _queries

    max_bytes = getattr(_queries, "MAX_CACHED_STATEMENT_LENGTH", 4096)
    max_params = getattr(_queries, "MAX_CACHED_STATEMENT_PARAMS", 50)
    hot = {
        "next": tasks._NEXT_IN_ONE_STATEMENT.statement,
        "submit": tasks._VALIDATED_SUBMIT.statement,
        "submit (transactional)": tasks._RECORD_SUBMIT,
        "project and head": tasks._PROJECT_FOR_TASK["postgresql"],
        "lease": tasks._LOCK_LEASE,
        **{f"pick ({k})": v for k, v in tasks._PICK_AND_LEASE.items()},
    }
    dialect = psycopg_dialect()
    for name, statement in hot.items():
        compiled = statement.compile(dialect=dialect)
        assert len(str(compiled).encode()) <= max_bytes, name
        assert len(compiled.binds) <= max_params, name


def test_a_task_takes_one_statement_each_way_and_no_transaction_on_postgresql(
    pg_project, monkeypatch
):
    monkeypatch.setattr(tasks, "_last_reclaim", float("inf"))  # no periodic reclaim pass now
    seen: list[tuple[str, bool]] = []

    def after(conn, _cursor, statement, *_):
        # IDLE after the statement: it committed on its own (no BEGIN ... COMMIT around it)
        idle = conn.connection.dbapi_connection.info.transaction_status.name == "IDLE"
        seen.append((statement.split()[0], idle))

    event.listen(pg_project, "after_cursor_execute", after)
    with make_statement_session_factory(pg_project)() as session:
        user = session.scalar(select(User).where(User.username == "u0"))
        seen.clear()
        task = tasks.next_task(session, slug="load", user=user)
        assert task is not None
        assert len(task.completions) == 4
        assert seen == [("WITH", True)]  # project, queue head, pick and lease
        seen.clear()
        data = SubmitAnnotation(ranking=[[c.id] for c in task.completions])
        result = tasks.submit(session, lease_id=task.lease_id, user=user, data=data)
        assert seen == [("WITH", True)]  # lease and annotation checked + written
        assert not result.replayed
    with make_session_factory(pg_project)() as session:
        assert tasks.check_invariants(session) == []
        lease = session.get(Lease, task.lease_id)
        assert lease.display_order == [c.id for c in task.completions]
        annotation = session.get(Annotation, result.annotation_id)
        assert annotation.display_order == lease.display_order


def leases(engine) -> int:
    with make_session_factory(engine)() as s:
        return s.scalar(select(func.count()).select_from(Lease))


def test_next_in_one_statement_leases_from_the_head_or_writes_nothing(pg_project, monkeypatch):
    """The one-statement next (PostgreSQL's common case) leases only when the project exists,
    the user may label it, holds no lease to resume there and is below the open-lease limit;
    otherwise it writes nothing and next_task's other way answers (resume, 404, 403, 429)."""
    monkeypatch.setattr(tasks, "_last_reclaim", float("inf"))  # no periodic reclaim pass now
    factory = make_statement_session_factory(pg_project)

    def fast(session, user, *, slug="load", exclude=(), max_open_leases=None):
        return tasks._next_in_one_statement(
            session,
            slug=slug,
            user=user,
            exclude=list(exclude),
            max_open_leases=max_open_leases,
            now=utcnow(),
        )

    with factory() as session:
        u0, u1 = (session.scalar(select(User).where(User.username == n)) for n in ("u0", "u1"))
        first = fast(session, u0)
        assert first is not None
        assert [c.label for c in first.completions] == ["A", "B", "C", "D"]
        assert leases(pg_project) == 1
        assert fast(session, u0) is None  # a lease to resume: nothing written ...
        assert leases(pg_project) == 1
        assert tasks.next_task(session, slug="load", user=u0).lease_id == first.lease_id
        assert fast(session, u0, exclude=[first.lease_id], max_open_leases=1) is None
        with pytest.raises(TooManyRequests):
            tasks.next_task(
                session, slug="load", user=u0, exclude=[first.lease_id], max_open_leases=1
            )
        assert fast(session, u0, slug="nope") is None
        with pytest.raises(NotFound):
            tasks.next_task(session, slug="nope", user=u0)
        assert leases(pg_project) == 1

        # u1 is served the prompt u0 started: most annotated first (here: a live lease counts
        # nothing yet, so annotate it first)
        tasks.submit(
            session,
            lease_id=first.lease_id,
            user=u0,
            data=SubmitAnnotation(ranking=[[c.id] for c in first.completions]),
        )
        second = fast(session, u1)
        assert second is not None
        assert second.prompt.id == first.prompt.id
        session.execute(update(Project).values(members_only=True))
        session.commit()
        assert fast(session, u1, exclude=[second.lease_id]) is None  # not a member
        with pytest.raises(Forbidden):
            tasks.next_task(session, slug="load", user=u1, exclude=[second.lease_id])
        u1.role = Role.admin  # admins may label every project
        assert fast(session, u1, exclude=[second.lease_id]) is not None
        assert leases(pg_project) == 3
    with make_session_factory(pg_project)() as session:
        assert tasks.check_invariants(session) == []


def test_next_in_one_statement_finds_nothing_once_the_user_has_seen_every_prompt(
    pg_project, monkeypatch
):
    monkeypatch.setattr(tasks, "_last_reclaim", float("inf"))
    with make_statement_session_factory(pg_project)() as session:
        user = session.scalar(select(User).where(User.username == "u0"))
        seen = []
        while (task := tasks.next_task(session, slug="load", user=user, exclude=seen)) is not None:
            seen.append(task.lease_id)
        assert len(seen) == 5  # every prompt once
        assert (
            tasks._next_in_one_statement(
                session, slug="load", user=user, exclude=seen, max_open_leases=None, now=utcnow()
            )
            is None
        )
    assert leases(pg_project) == 5


def test_next_in_one_statement_takes_an_untouched_prompt_when_the_head_has_none_for_the_user(
    pg_project, monkeypatch
):
    """A lone annotator's own started prompts fill the head of the queue (they rank first):
    the one statement then leases the newest untouched prompt (here with a head of one)."""
    monkeypatch.setattr(tasks, "_last_reclaim", float("inf"))
    head_of_one = Precompiled(tasks._next_in_one_statement_query(1))
    monkeypatch.setattr(tasks, "_NEXT_IN_ONE_STATEMENT", head_of_one)
    with make_statement_session_factory(pg_project)() as session:
        user = session.scalar(select(User).where(User.username == "u0"))
        first = tasks.next_task(session, slug="load", user=user)
        data = SubmitAnnotation(ranking=[[c.id] for c in first.completions])
        tasks.submit(session, lease_id=first.lease_id, user=user, data=data)
        # the head (of one) is now the prompt u0 annotated
        second = tasks._next_in_one_statement(
            session, slug="load", user=user, exclude=[], max_open_leases=None, now=utcnow()
        )
        assert second is not None
        assert second.prompt.id != first.prompt.id
        counts = dict(session.execute(select(Prompt.id, Prompt.annotation_count)).all())
        assert counts[second.prompt.id] == 0
        newest_untouched = max(pid for pid, n in counts.items() if pid != first.prompt.id)
        assert second.prompt.id == newest_untouched
    with make_session_factory(pg_project)() as session:
        assert tasks.check_invariants(session) == []


def _just_before_the_write(engine, action) -> None:
    """Run ``action`` (in a session of its own, committed) once, just before the one-statement
    submit is sent: a concurrent request that got there first."""
    done: list[bool] = []

    def before(_conn, _cursor, statement, *_):
        if statement.startswith("WITH valid_lease") and not done:
            done.append(True)
            with make_session_factory(engine)() as other:
                action(other)

    event.listen(engine, "before_cursor_execute", before)


def test_a_lease_reclaimed_under_a_submit_is_a_409_and_nothing_is_written(pg_project):
    factory = make_statement_session_factory(pg_project)
    with factory() as session:
        user = session.scalar(select(User).where(User.username == "u0"))
        task = tasks.next_task(session, slug="load", user=user)

        def expire_and_reclaim(other) -> None:
            other.execute(
                update(Lease)
                .where(Lease.id == task.lease_id)
                .values(expires_at=utcnow() - timedelta(seconds=1))
            )
            assert tasks.reclaim_expired(other) == 1
            other.commit()

        _just_before_the_write(pg_project, expire_and_reclaim)
        data = SubmitAnnotation(ranking=[[c.id] for c in task.completions])
        with pytest.raises(Conflict, match="already expired"):
            tasks.submit(session, lease_id=task.lease_id, user=user, data=data)
    with make_session_factory(pg_project)() as session:
        assert tasks.check_invariants(session) == []
        assert session.scalar(select(func.count()).select_from(Annotation)) == 0
        assert session.scalar(select(func.sum(Prompt.open_leases))) == 0


def test_a_submit_retried_while_the_first_is_in_flight_is_recorded_once(pg_project):
    factory = make_statement_session_factory(pg_project)
    with factory() as session:
        user = session.scalar(select(User).where(User.username == "u0"))
        task = tasks.next_task(session, slug="load", user=user)
        data = SubmitAnnotation(ranking=[[c.id] for c in task.completions])
        first: list[tasks.Recorded] = []
        _just_before_the_write(
            pg_project,
            lambda other: first.append(
                tasks.submit(other, lease_id=task.lease_id, user=user, data=data)
            ),
        )
        retry = tasks.submit(session, lease_id=task.lease_id, user=user, data=data)
    assert retry.replayed
    assert retry.annotation_id == first[0].annotation_id
    with make_session_factory(pg_project)() as session:
        assert tasks.check_invariants(session) == []
        assert session.scalar(select(func.count()).select_from(Annotation)) == 1


# --------------------------------------------------------------------------- on the event loop


@pytest.fixture
def pg_app(pg_project, tmp_path):
    """The app on ``pg_project``'s committed database (its statement pool open), a bearer
    token each for u0 and u1, and the statements the app sent through SQLAlchemy."""
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=pg_project.url.render_as_string(hide_password=False),
        secret_key="test-secret",
        max_open_leases=3,
    )
    app = create_app(settings)
    sent: list[str] = []
    event.listen(app.state.engine, "before_cursor_execute", lambda *a: sent.append(a[2]))
    with make_session_factory(pg_project)() as s:
        users = {u.username: u for u in s.scalars(select(User))}
        headers = {name: auth(make_token(s, users[name])) for name in ("u0", "u1")}
    with TestClient(app) as client:
        assert app.state.statement_pool is not None
        yield client, headers, sent
    app.state.engine.dispose()


def _next(client, headers, **params):
    return client.get("/api/v1/projects/load/tasks/next", headers=headers, params=params)


def _submit(client, headers, task, ranking=None):
    ranking = ranking or [[c["id"]] for c in task["completions"]]
    return client.post(
        f"/api/v1/leases/{task['lease_id']}/submit", headers=headers, json={"ranking": ranking}
    )


def test_a_recently_checked_token_labels_with_no_statement_through_sqlalchemy(pg_app):
    """A bearer token this process checked within the cache time gets its task and records
    its annotation in one statement each, on the event loop (the statement pool): nothing goes
    through SQLAlchemy's engine and its worker threads. The first request checks the token."""
    client, headers, sent = pg_app
    first = _next(client, headers["u0"])
    assert first.status_code == 200
    assert any("api_token" in s for s in sent)  # the token read (and its last use written)
    assert _submit(client, headers["u0"], first.json()).status_code == 201

    sent.clear()
    task = _next(client, headers["u0"]).json()
    ranking = [[c["id"]] for c in reversed(task["completions"])]
    recorded = _submit(client, headers["u0"], task, ranking)
    assert recorded.status_code == 201
    assert "Idempotent-Replayed" not in recorded.headers
    assert sent == []
    with make_session_factory(client.app.state.engine)() as s:
        assert tasks.check_invariants(s) == []
        annotation = s.get(Annotation, recorded.json()["annotation_id"])
        lease = s.get(Lease, task["lease_id"])
        assert lease.status.value == "submitted"
        assert annotation.ranking == ranking
        assert annotation.display_order == [c["id"] for c in task["completions"]]
        assert annotation.user_id == lease.user_id


def test_the_event_loop_path_leaves_every_other_case_to_the_full_services(pg_app):
    """Whatever the one statement does not do — resume a lease, a retried submit, refusals
    that must name their reason, the open-lease limit, someone else's lease — is answered by
    the full services, exactly as before, and writes nothing twice."""
    client, headers, sent = pg_app
    u0, u1 = headers["u0"], headers["u1"]
    _next(client, u1)  # both tokens checked now
    task = _next(client, u0).json()

    sent.clear()
    assert _next(client, u0).json()["lease_id"] == task["lease_id"]  # a reload resumes
    assert sent  # by the full service

    ids = [c["id"] for c in task["completions"]]
    missing = _submit(client, u0, task, [[i] for i in ids[:-1]])
    assert missing.status_code == 422
    assert "missing" in missing.json()["errors"][0]["message"]
    assert _submit(client, u1, task).status_code == 403  # not u1's lease

    recorded = _submit(client, u0, task)
    assert recorded.status_code == 201
    retried = _submit(client, u0, task)
    assert retried.status_code == 201
    assert retried.headers["Idempotent-Replayed"] == "true"
    assert retried.json() == recorded.json()
    other = [[i] for i in reversed(ids)]
    assert _submit(client, u0, task, other).status_code == 409  # used, with another answer

    held = [_next(client, u0, exclude=[]).json()["lease_id"]]
    while len(held) < 3:  # max_open_leases = 3
        held.append(_next(client, u0, exclude=held).json()["lease_id"])
    limited = _next(client, u0, exclude=held)
    assert limited.status_code == 429
    assert "Retry-After" in limited.headers
    assert client.get("/api/v1/projects/nope/tasks/next", headers=u0).status_code == 404
    with make_session_factory(client.app.state.engine)() as s:
        assert tasks.check_invariants(s) == []
        assert s.scalar(select(func.count()).select_from(Annotation)) == 1


def test_with_no_pooled_connection_soon_the_worker_threads_answer_at_once(pg_app, monkeypatch):
    """All the statement pool's connections busy (or the database unreachable): a request waits
    STATEMENT_POOL_WAIT_S for one, then the full services answer; for STATEMENT_POOL_REST_S
    after that the pool is not asked (no wait), then it is again."""
    client, headers, sent = pg_app
    monkeypatch.setattr(tasks, "_last_reclaim", float("inf"))  # no periodic reclaim pass now
    pool = client.app.state.statement_pool
    _next(client, headers["u0"], exclude=[])  # the token checked
    taken = [client.portal.call(pool.getconn) for _ in range(pool.max_size)]
    try:
        sent.clear()
        started = time.monotonic()
        waited = _next(client, headers["u0"], exclude=[1])
        assert waited.status_code == 200
        assert time.monotonic() - started >= STATEMENT_POOL_WAIT_S
        assert sent  # answered by the full service
        started = time.monotonic()
        rested = _next(client, headers["u1"])
        assert rested.status_code == 200
        assert time.monotonic() - started < STATEMENT_POOL_WAIT_S  # resting: no wait
    finally:
        for conn in taken:
            client.portal.call(pool.putconn, conn)
    time.sleep(STATEMENT_POOL_REST_S + 0.2)
    sent.clear()  # on the pool again:
    assert _submit(client, headers["u1"], rested.json()).status_code == 201
    assert _next(client, headers["u1"]).status_code == 200  # a new lease
    assert sent == []


def test_a_token_revoked_or_deactivated_in_this_process_is_refused_at_once(pg_app):
    """The event loop path trusts only a token the cache holds; a revocation or deactivation
    made by this process clears the cache, so the very next request is checked again (by the
    full services) and refused. A browser session labels too (by the full services)."""
    client, headers, sent = pg_app
    assert _next(client, headers["u0"]).status_code == 200
    assert _next(client, headers["u1"]).status_code == 200
    unknown = _next(client, auth("not-a-token"))
    assert unknown.status_code == 401
    assert unknown.headers["WWW-Authenticate"] == "Bearer"

    factory = make_session_factory(client.app.state.engine)
    with factory() as s:
        token = s.scalar(select(ApiToken).join(User).where(User.username == "u0"))
        users.revoke_token(s, token_id=token.id)
    assert _next(client, headers["u0"]).json()["detail"] == "token revoked"
    with factory() as s:
        users.set_user_active(s, username="u1", active=False)
    assert _next(client, headers["u1"]).json()["detail"] == "account deactivated"

    with factory() as s:
        user = s.scalar(select(User).where(User.username == "u0"))
        s.add(
            WebSession(
                token_hash=hash_token("cookie"),
                user_id=user.id,
                csrf_token="csrf",
                expires_at=utcnow() + timedelta(hours=1),
            )
        )
        s.commit()
    sent.clear()
    client.cookies.set("prefero_session", "cookie")
    assert _next(client, {}).status_code == 200
    assert sent  # the full services
