"""Engine behaviour that the services rely on, on real databases (no rollback fixture here)."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
from datetime import UTC

import pytest
from anyio import to_thread
from fastapi.testclient import TestClient
from sqlalchemy import bindparam, event, func, insert, select, text, update
from sqlalchemy.exc import ArgumentError, IntegrityError, OperationalError

from app.config import Settings
from app.db import (
    Precompiled,
    engine_from_settings,
    in_autocommit,
    make_engine,
    make_session_factory,
    make_statement_session_factory,
    statement_pool,
)
from app.main import create_app
from app.models import Completion, Project, Prompt
from app.services import tasks
from app.services.imports import import_prompts
from app.services.transactions import write_transaction
from tests.conftest import create_database, migrate


@pytest.fixture(params=["sqlite", "postgresql"])
def committed_engine(request, tmp_path):
    url, drop = create_database(request.param, tmp_path)
    migrate(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()
    drop()


def test_sqlite_writer_transactions_begin_immediate(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'x.db'}")
    seen: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *a: seen.append(a[2]))
    factory = make_session_factory(engine)
    with factory() as s:
        write_transaction(s)
        s.execute(text("SELECT 1"))
        s.commit()
    with factory() as s:
        s.execute(text("SELECT 1"))
        s.commit()
    assert [q for q in seen if q.startswith(("BEGIN", "SELECT"))] == [
        "BEGIN IMMEDIATE",
        "SELECT 1",
        "BEGIN",
        "SELECT 1",
    ]
    with engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert c.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    engine.dispose()


def test_concurrent_imports_of_the_same_file_never_duplicate(committed_engine):
    factory = make_session_factory(committed_engine)
    with factory() as s:
        s.add(Project(name="P", slug="p"))
        s.commit()
    n = 300
    data = "".join(
        json.dumps({"id": f"q{i}", "prompt": f"question {i}", "completions": [f"a{i}", f"b{i}"]})
        + "\n"
        for i in range(n)
    ).encode()
    results, errors = [], []

    def worker() -> None:
        try:
            with factory() as s:
                results.append(
                    import_prompts(s, project_slug="p", source=io.BytesIO(data), max_bytes=10**8)
                )
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sum(r.created for r in results) == n
    assert sum(r.skipped for r in results) == 3 * n
    assert sum(r.completions_created for r in results) == 2 * n
    with factory() as s:
        assert s.scalar(select(func.count()).select_from(Prompt)) == n
        assert s.scalar(select(func.count()).select_from(Completion)) == 2 * n


def test_postgres_checkout_needs_no_round_trip_and_drops_a_connection_the_server_closed(
    tmp_path,
):
    url, drop = create_database("postgresql", tmp_path)
    engine = make_engine(url, pool_size=1)
    admin = make_engine(url, pool_size=1)
    sent: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *a: sent.append(a[2]))
    try:
        with engine.connect() as conn:
            pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        sent.clear()
        with engine.connect() as conn:  # the pooled connection, with no ping before it
            assert conn.exec_driver_sql("SELECT pg_backend_pid()").scalar() == pid
        assert sent == ["SELECT pg_backend_pid()"]

        # The server ends that backend while it sits in the pool (as a restart or an idle
        # timeout would): the next checkout sees the socket readable, drops the connection
        # and connects anew, with no error for the caller.
        with admin.connect() as conn:
            assert conn.exec_driver_sql(f"SELECT pg_terminate_backend({pid})").scalar()
            for _ in range(100):  # the backend exits asynchronously
                gone = not conn.exec_driver_sql(
                    f"SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}"
                ).scalar()
                if gone:
                    break
                time.sleep(0.02)
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT pg_backend_pid()").scalar() != pid
    finally:
        engine.dispose()
        admin.dispose()
        drop()


def test_statement_sessions_commit_each_statement_until_a_write_transaction(committed_engine):
    """The labeling routes' sessions (``make_statement_session_factory``): on PostgreSQL each
    statement commits by itself (a rollback keeps it); ``write_transaction`` gives back an
    ordinary transaction (a rollback undoes it), and the next statements commit one by one
    again. On SQLite they are ordinary sessions."""
    postgres = committed_engine.dialect.name == "postgresql"
    factory = make_statement_session_factory(committed_engine)
    with factory() as s:
        assert in_autocommit(s) is postgres
        s.execute(insert(Project).values(name="A", slug="a"))
        s.rollback()
        write_transaction(s)
        assert not in_autocommit(s)
        s.execute(insert(Project).values(name="B", slug="b"))
        s.rollback()
        s.execute(insert(Project).values(name="C", slug="c"))
        assert in_autocommit(s) is postgres
        s.rollback()
    with make_session_factory(committed_engine)() as s:
        kept = s.scalars(select(Project.slug).order_by(Project.slug)).all()
    assert kept == (["a", "c"] if postgres else [])


@pytest.mark.parametrize(("pool_size", "threads"), [(2, 4), (5, 5), (12, 12)])
def test_the_pool_keeps_a_connection_for_every_request_thread(pool_size, threads, tmp_path):
    """Threads and kept connections are one number (at least 4): with more threads than kept
    connections, the pool's overflow connections were opened and closed on every burst (a
    PostgreSQL backend forked each time: 2.9 instead of 1.2 ms of PostgreSQL CPU per labeled
    task at pool size 3)."""
    settings = Settings(
        data_dir=tmp_path,
        database_url="postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
        secret_key="x",
        db_pool_size=pool_size,
    )
    assert settings.request_threads == threads
    engine = engine_from_settings(settings)
    try:
        assert engine.pool.size() == threads
    finally:
        engine.dispose()
    app = create_app(settings)
    with TestClient(app) as client:
        limiter = client.portal.call(to_thread.current_default_thread_limiter)
        assert limiter.total_tokens == threads
    app.state.engine.dispose()


# --------------------------------------------------------------------------- Precompiled


@pytest.fixture
def pg_engine(tmp_path):
    url, drop = create_database("postgresql", tmp_path)
    migrate(url)
    engine = make_engine(url, pool_size=2)
    yield engine
    engine.dispose()
    drop()


_RENAME = Precompiled(
    update(Project)
    .where(Project.slug == bindparam("old"))
    .values(slug=bindparam("new"), flags=bindparam("flags"))
    .returning(Project.id, Project.slug, Project.flags, Project.created_at)
)


def _projects(engine, *slugs: str) -> None:
    with make_session_factory(engine)() as s:
        s.add_all(Project(name=slug, slug=slug) for slug in slugs)
        s.commit()


def _slugs(engine) -> list[str]:
    with make_session_factory(engine)() as s:
        return sorted(s.scalars(select(Project.slug)))


def _terminate(engine, pid: int) -> None:
    """End backend ``pid`` as a server restart would, and wait until it is gone."""
    with engine.connect() as conn:
        assert conn.exec_driver_sql(f"SELECT pg_terminate_backend({pid})").scalar()
        for _ in range(100):  # the backend exits asynchronously
            alive = conn.exec_driver_sql(
                f"SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}"
            ).scalar()
            if not alive:
                return
            time.sleep(0.02)


def test_precompiled_sends_sqlalchemys_statement_and_answers_with_its_exceptions(pg_engine):
    """The hot path's statements run on the driver's cursor: the SQL SQLAlchemy would send,
    its parameter conversions (JSON here) and constants, named-tuple rows; listeners still see
    the statement; a driver error is SQLAlchemy's exception (the app's handlers answer it)."""
    _projects(pg_engine, "a", "b")
    sent: list[str] = []
    event.listen(pg_engine, "before_cursor_execute", lambda *a: sent.append(a[2]))
    with pg_engine.connect() as conn:
        conn.exec_driver_sql("SET TIME ZONE 'Asia/Tokyo'")
        sql = _RENAME.compiled(conn.dialect).sql
        assert sql == str(_RENAME.statement.compile(dialect=conn.dialect))
        sent.clear()
        row = _RENAME.first(conn, {"old": "a", "new": "c", "flags": ["too long"]})
        assert (row.slug, row.flags) == ("c", ["too long"])
        assert row.created_at.tzinfo == UTC  # the column type's own conversion
        assert sent == [sql]
        assert _RENAME.first(conn, {"old": "a", "new": "d", "flags": []}) is None
        with pytest.raises(IntegrityError):  # slug b is taken
            _RENAME.first(conn, {"old": "c", "new": "b", "flags": []})
        conn.rollback()
        with pytest.raises(ArgumentError, match="missing parameters: new"):
            _RENAME.first(conn, {"old": "b", "flags": []})
    assert _slugs(pg_engine) == ["a", "b"]  # the rename was rolled back with the transaction
    with pytest.raises(ValueError, match="Python-side defaults"):  # created_at=utcnow() …
        Precompiled(insert(Project).values(name="x", slug="x")).compiled()


def test_the_hot_statements_compile_alike_for_a_connected_engine_and_the_default_dialect(
    pg_engine,
):
    """The statement pool's connections compile with a dialect that never connected: the SQL
    must be what the engine's own (initialised on connect) would send."""
    with pg_engine.connect():
        pass
    for statement in (tasks._NEXT_IN_ONE_STATEMENT, tasks._VALIDATED_SUBMIT):
        assert statement.compiled().sql == statement.compiled(pg_engine.dialect).sql


def test_the_statement_pool_runs_precompiled_statements_and_drops_dead_connections(
    pg_engine, tmp_path
):
    settings = Settings(
        data_dir=tmp_path,
        database_url=pg_engine.url.render_as_string(hide_password=False),
        secret_key="x",
        db_pool_size=4,
    )
    assert statement_pool(settings.model_copy(update={"database_url": "sqlite://"})) is None

    async def scenario() -> None:
        pool = statement_pool(settings)
        assert pool is not None
        assert pool.max_size == 4
        await pool.open(wait=True)
        try:
            async with pool.connection() as conn:
                assert conn.autocommit
                pid = conn.info.backend_pid
                row = await _RENAME.first_async(conn, {"old": "a", "new": "c", "flags": ["x"]})
                assert (row.slug, row.flags) == ("c", ["x"])
                with pytest.raises(IntegrityError):
                    await _RENAME.first_async(conn, {"old": "c", "new": "b", "flags": []})
                timeout = await conn.execute("SHOW statement_timeout")
                assert (await timeout.fetchone())[0] == "30s"
            # the server ends the idle connection: the next request gets another, no error
            await to_thread.run_sync(_terminate, pg_engine, pid)
            async with pool.connection() as conn:
                assert conn.info.backend_pid != pid
                row = await _RENAME.first_async(conn, {"old": "c", "new": "d", "flags": []})
                assert row.slug == "d"
                # one that dies in use: the statement fails as a lost connection (a 503)
                await to_thread.run_sync(_terminate, pg_engine, conn.info.backend_pid)
                with pytest.raises(OperationalError) as lost:
                    await _RENAME.first_async(conn, {"old": "d", "new": "e", "flags": []})
                assert lost.value.connection_invalidated
        finally:
            await pool.close()

    _projects(pg_engine, "a", "b")
    asyncio.run(scenario())
    assert _slugs(pg_engine) == ["b", "d"]  # each statement committed by itself


def test_precompiled_leaves_other_drivers_to_sqlalchemy(tmp_path):
    url, drop = create_database("sqlite", tmp_path)
    migrate(url)
    engine = make_engine(url)
    try:
        _projects(engine, "a")
        with engine.connect() as conn:
            row = _RENAME.first(conn, {"old": "a", "new": "b", "flags": ["x"]})
            assert (row.slug, row.flags) == ("b", ["x"])
            conn.commit()
        assert _slugs(engine) == ["b"]
    finally:
        engine.dispose()
        drop()
