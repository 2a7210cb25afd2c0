"""Database plumbing: declarative base with a naming convention, engines and sessions.

SQLite is tuned for a web service (WAL, foreign keys, busy timeout) and its driver is put in
explicit-transaction mode so that savepoints and ``BEGIN IMMEDIATE`` work.
"""

from __future__ import annotations

import select
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Engine,
    Integer,
    MetaData,
    create_engine,
    event,
    exc,
    make_url,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

from app.config import Settings

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# JSON everywhere, JSONB on PostgreSQL; 64-bit ids on PostgreSQL, INTEGER (rowid alias) on SQLite.
JSONType = JSON().with_variant(JSONB(), "postgresql")
IdType = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: dict[Any, Any] = {dict[str, Any]: JSONType, list[Any]: JSONType}


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # Explicit transactions: the driver must not BEGIN behind SQLAlchemy's back.
    dbapi_connection.isolation_level = None
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def _sqlite_begin(conn: Any) -> None:
    # ``session.connection(execution_options={"sqlite_immediate": True})`` takes the write lock
    # up front, so a read-then-write transaction cannot fail with SQLITE_BUSY half-way.
    if conn.get_execution_options().get("sqlite_immediate"):
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    else:
        conn.exec_driver_sql("BEGIN")


def _drop_dead_connection(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    """Pool checkout on PostgreSQL: hand out a connection only if it is still open, without a
    round trip (``pool_pre_ping`` sends a query on every checkout: one more round trip per
    request). An idle connection has nothing to read; a readable socket means the server
    closed it or is closing it (a restart, ``pg_terminate_backend``, an idle timeout: the
    server sends an error and closes), so the pool drops it and connects anew
    (``DisconnectionError``). A connection that dies after this check fails its statement;
    SQLAlchemy then invalidates it as a disconnect and the request gets a 503."""
    if dbapi_connection.closed or dbapi_connection.broken:
        raise exc.DisconnectionError("connection closed")
    poller = select.poll()
    poller.register(dbapi_connection.fileno(), select.POLLIN | select.POLLPRI)
    if poller.poll(0):
        raise exc.DisconnectionError("the server closed the connection")


def make_engine(url: str, *, pool_size: int = 10, statement_timeout_ms: int = 0) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, pool_pre_ping=False
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    connect_args: dict[str, Any] = {"connect_timeout": 5}
    if statement_timeout_ms:
        connect_args["options"] = f"-c statement_timeout={int(statement_timeout_ms)}"
    psycopg3 = make_url(url).get_dialect().driver == "psycopg"
    engine = create_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=not psycopg3,  # another driver: a round trip per checkout
        pool_timeout=10,
        connect_args=connect_args,
    )
    if psycopg3:
        event.listen(engine, "checkout", _drop_dead_connection)
    return engine


def engine_from_settings(settings: Settings) -> Engine:
    if settings.is_sqlite:
        settings.ensure_data_dir()
    return make_engine(
        settings.database_url,
        pool_size=settings.request_threads,
        statement_timeout_ms=settings.db_statement_timeout_ms,
    )


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False, autoflush=False)


AUTOCOMMIT = "AUTOCOMMIT"


def make_statement_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions for the labeling hot path, whose services are written so that each of their
    statements stands alone: on PostgreSQL every statement commits by itself (the connection
    in autocommit mode), which saves the ``BEGIN`` and ``COMMIT`` round trips (4 of the 11 a
    labeled task took). A service that needs several statements to be atomic calls
    :func:`app.services.transactions.write_transaction` first, which gives the session an
    ordinary transaction. SQLite: the ordinary factory (its round trips cost nothing)."""
    if engine.dialect.name != "postgresql":
        return make_session_factory(engine)
    return make_session_factory(engine.execution_options(isolation_level=AUTOCOMMIT))


def in_autocommit(session: Session) -> bool:
    """Whether the session's statements commit one by one (see
    :func:`make_statement_session_factory`): its current connection's isolation level, or
    the one its bind would give a new connection."""
    if session.in_transaction():
        options = session.connection().get_execution_options()
    else:
        options = session.get_bind().get_execution_options()
    return options.get("isolation_level") == AUTOCOMMIT


def insert_skipping_duplicates(session: Session, table: Any, *unique_columns: Any) -> Any:
    """``INSERT … ON CONFLICT (unique_columns) DO NOTHING`` for the session's database: rows
    that already exist are skipped, which makes retried writes idempotent."""
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    return dialect.insert(table).on_conflict_do_nothing(index_elements=list(unique_columns))
