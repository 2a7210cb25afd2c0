"""Test fixtures: every database test runs on SQLite and on PostgreSQL.

- ``database_url`` (session scope, parametrised ``sqlite`` / ``postgresql``): a fresh database
  migrated to head with Alembic. PostgreSQL comes from ``PREFERO_TEST_DATABASE_URL`` (default
  ``postgresql+psycopg://postgres@127.0.0.1:5432/postgres``); the suite creates its own
  database there and drops it at the end. Without a reachable server the PostgreSQL tests are
  skipped locally, and fail when ``PREFERO_CI=1`` (CI must never skip them).
- ``session``: one connection per test inside a transaction that is rolled back afterwards;
  services' ``commit()`` only releases a SAVEPOINT.
- ``client``: a TestClient whose requests use that same session.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest
import sqlalchemy as sa
from alembic import command
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import make_engine
from app.main import create_app
from app.services.health import alembic_config
from tests.factories import use_session

PG_DEFAULT = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
IN_CI = os.environ.get("PREFERO_CI") == "1"


def pg_server_url() -> str:
    return os.environ.get("PREFERO_TEST_DATABASE_URL", PG_DEFAULT)


def unavailable(what: str, reason: str) -> NoReturn:
    """Skip a test whose requirement is missing locally; with PREFERO_CI=1 fail instead."""
    if IN_CI:
        pytest.fail(f"{what} is required in CI (PREFERO_CI=1): {reason}")
    pytest.skip(f"{what} not available: {reason}")  # only when PREFERO_CI is unset


def pg_unavailable(reason: str) -> NoReturn:
    unavailable("PostgreSQL", reason)


def create_database(kind: str, tmp_dir: Path) -> tuple[str, object]:
    """A new empty database; returns its URL and a callable that drops it."""
    if kind == "sqlite":
        path = tmp_dir / f"prefero-{uuid.uuid4().hex[:8]}.db"
        return f"sqlite:///{path}", lambda: None
    server = make_url(pg_server_url())
    name = f"prefero_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(
        server, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5}
    )
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except sa.exc.OperationalError as e:
        admin.dispose()
        pg_unavailable(str(e).splitlines()[0])

    def drop() -> None:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()

    return server.set(database=name).render_as_string(hide_password=False), drop


def migrate(url: str, revision: str = "head") -> None:
    cfg = alembic_config()
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["configure_logger"] = False
    command.upgrade(cfg, revision)


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def database_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    url, drop = create_database(request.param, tmp_path_factory.mktemp("db"))
    try:
        migrate(url)
        yield url
    finally:
        drop()


@pytest.fixture(scope="session")
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def session(engine: Engine) -> Iterator[Session]:
    conn = engine.connect()
    trans = conn.begin()
    session = Session(
        bind=conn, join_transaction_mode="create_savepoint", expire_on_commit=False, autoflush=False
    )
    try:
        yield session
    finally:
        session.close()
        if trans.is_active:
            trans.rollback()
        conn.close()


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", database_url=database_url, secret_key="test-secret")


@pytest.fixture
def app(settings: Settings, session: Session):
    app = create_app(settings)
    use_session(app, session)
    yield app
    app.state.engine.dispose()


@pytest.fixture
def client(app) -> Iterator[TestClient]:
    with TestClient(app) as c:
        yield c


@pytest.fixture
def backend(database_url: str) -> str:
    return "postgresql" if database_url.startswith("postgresql") else "sqlite"
