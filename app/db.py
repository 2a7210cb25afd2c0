"""Database plumbing: declarative base with a naming convention, engines and sessions.

SQLite is tuned for a web service (WAL, foreign keys, busy timeout) and its driver is put in
explicit-transaction mode so that savepoints and ``BEGIN IMMEDIATE`` work.
"""

from __future__ import annotations

import select
import time
from typing import Any

from psycopg.rows import namedtuple_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from sqlalchemy import (
    JSON,
    BigInteger,
    Connection,
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
from sqlalchemy.dialects.postgresql import psycopg as _psycopg_dialect
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
    if _readable(dbapi_connection.fileno()):
        raise exc.DisconnectionError("the server closed the connection")


def _readable(fd: int) -> bool:
    """Whether the socket ``fd`` has something to read now (without waiting)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLPRI)
    return bool(poller.poll(0))


def _connect_args(statement_timeout_ms: int) -> dict[str, Any]:
    """psycopg's connection arguments besides the URL's."""
    args: dict[str, Any] = {"connect_timeout": 5}
    if statement_timeout_ms:
        args["options"] = f"-c statement_timeout={int(statement_timeout_ms)}"
    return args


def make_engine(url: str, *, pool_size: int = 10, statement_timeout_ms: int = 0) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, pool_pre_ping=False
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    connect_args = _connect_args(statement_timeout_ms)
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


class Precompiled:
    """A Core statement compiled once per dialect and run straight on a driver connection: the
    labeling hot path's statements (PostgreSQL, psycopg), for which SQLAlchemy's execution
    (cache key of a large statement, execution context, result wrapping) would cost more
    client CPU than the driver itself. The SQL, the parameters' conversions (SQLAlchemy's own
    bind processors: enums, JSON) and the statement's constants are worked out once; rows come
    back as named tuples, converted as SQLAlchemy would (its result processors: UTC datetimes,
    enums). Driver errors become SQLAlchemy's exceptions (``IntegrityError``,
    ``OperationalError`` …), which the app answers like any other.

    - :meth:`first` runs on a SQLAlchemy ``Connection`` (its transaction, if any): a lost
      connection is invalidated, and the connection's ``before/after_cursor_execute``
      listeners still see the statement;
    - :meth:`first_async` runs on a psycopg ``AsyncConnection`` from :func:`statement_pool`,
      so the event loop needs no worker thread for it.

    Not for statements with expanding (``IN``) or literal-execute parameters, nor for those
    that need Python-side column defaults (SQLAlchemy computes them at execution): refused
    when compiled."""

    __slots__ = ("_compiled", "statement")

    def __init__(self, statement: Any) -> None:
        self.statement = statement
        self._compiled: dict[Any, _Compiled] = {}

    def compiled(self, dialect: Any = None) -> _Compiled:
        """The statement compiled for ``dialect`` (default: PostgreSQL with psycopg)."""
        dialect = dialect or _PSYCOPG
        compiled = self._compiled.get(dialect)
        if compiled is None:
            compiled = self._compiled[dialect] = _Compiled(self.statement, dialect)
        return compiled

    def first(self, connection: Connection, params: dict[str, Any]) -> Any:
        """The statement's first row (a named tuple), or None. With a driver other than
        psycopg, SQLAlchemy runs it."""
        if connection.dialect.driver != "psycopg":
            return connection.execute(self.statement, params).first()
        compiled = self.compiled(connection.dialect)
        values = compiled.values(params)
        driver_connection = connection.connection.driver_connection
        dispatch = connection.dispatch
        cursor = driver_connection.cursor(row_factory=namedtuple_row)
        try:
            if dispatch.before_cursor_execute:
                dispatch.before_cursor_execute(
                    connection, cursor, compiled.sql, values, None, False
                )
            cursor.execute(compiled.sql, values)
            if dispatch.after_cursor_execute:
                dispatch.after_cursor_execute(connection, cursor, compiled.sql, values, None, False)
            return compiled.row(cursor.fetchone() if cursor.description is not None else None)
        except compiled.driver_error as e:
            lost = compiled.dialect.is_disconnect(e, driver_connection, cursor)
            if lost:
                connection.invalidate(e)
            raise compiled.translated(e, values, lost) from e
        finally:
            cursor.close()

    async def first_async(self, connection: Any, params: dict[str, Any]) -> Any:
        """:meth:`first` on a psycopg ``AsyncConnection`` (autocommit: the statement commits
        by itself)."""
        compiled = self.compiled()
        values = compiled.values(params)
        try:
            async with connection.cursor(row_factory=namedtuple_row) as cursor:
                await cursor.execute(compiled.sql, values)
                row = await cursor.fetchone() if cursor.description is not None else None
            return compiled.row(row)
        except compiled.driver_error as e:
            lost = compiled.dialect.is_disconnect(e, connection, None)
            raise compiled.translated(e, values, lost) from e


class _Compiled:
    """:class:`Precompiled`'s statement for one dialect."""

    __slots__ = (
        "columns",
        "constants",
        "dialect",
        "driver_error",
        "processors",
        "required",
        "result_processors",
        "sql",
    )

    def __init__(self, statement: Any, dialect: Any) -> None:
        compiled = statement.compile(dialect=dialect)
        if compiled.post_compile_params or compiled.literal_execute_params:
            raise ValueError("Precompiled runs no statement with expanding parameters")
        if compiled.insert_prefetch or compiled.update_prefetch:
            raise ValueError("Precompiled runs no statement that needs Python-side defaults")
        if compiled.escaped_bind_names or dialect.paramstyle != "pyformat":
            raise ValueError("Precompiled needs %(name)s parameters with plain names")
        self.sql: str = compiled.string
        self.dialect = dialect
        self.driver_error: type[Exception] = dialect.loaded_dbapi.Error
        self.processors: dict[str, Any] = dict(compiled._bind_processors)
        self.required = frozenset(b.key for b in compiled.binds.values() if b.required)
        self.constants = {
            name: self._processed(name, value)
            for name, value in compiled.construct_params(_check=False).items()
            if name not in self.required
        }
        # SQLAlchemy's conversions of the result's columns (UTC datetimes, enums), if any
        result_types = [column[3] for column in compiled._result_columns]
        self.columns = len(result_types)
        processors = [t.result_processor(dialect, None) for t in result_types]
        self.result_processors = processors if any(processors) else None

    def _processed(self, name: str, value: Any) -> Any:
        processor = self.processors.get(name)
        return value if processor is None else processor(value)

    def values(self, params: dict[str, Any]) -> dict[str, Any]:
        """The driver's parameters: the constants and ``params``, converted."""
        if missing := self.required - params.keys():
            raise exc.ArgumentError(f"missing parameters: {', '.join(sorted(missing))}")
        values = dict(self.constants)
        processors = self.processors
        for name, value in params.items():
            processor = processors.get(name)
            values[name] = value if processor is None else processor(value)
        return values

    def row(self, row: Any) -> Any:
        """A driver's row (named tuple) with SQLAlchemy's conversions applied."""
        if row is None or self.result_processors is None:
            return row
        if len(row) != self.columns:
            raise ValueError(f"expected {self.columns} columns, got {len(row)}")
        return row._make(
            value if process is None else process(value)
            for process, value in zip(self.result_processors, row, strict=True)
        )

    def translated(self, error: Exception, values: dict[str, Any], lost: bool) -> Exception:
        return exc.DBAPIError.instance(
            self.sql,
            values,
            error,
            self.driver_error,
            connection_invalidated=lost,
            dialect=self.dialect,
            ismulti=False,
        )


_PSYCOPG = _psycopg_dialect.dialect(dbapi=_psycopg_dialect.dialect.import_dbapi())


STATEMENT_POOL_WAIT_S = 0.5
"""How long a request waits for a connection of :func:`statement_pool` before its service
takes the way of the worker threads instead (``psycopg_pool.PoolTimeout``): all busy, or the
database unreachable — the pool reconnects in the background, while the engine's pool
connects on demand and fails at once, a quick 503."""
STATEMENT_POOL_REST_S = 1.0
"""After such a wait, the pool is not asked again for this long (requests go the other way at
once): while the database is down, or until the pool has reconnected after it came back."""


class StatementPool(AsyncConnectionPool):
    """:func:`statement_pool`'s pool."""

    _resting_until = 0.0

    async def first(self, statement: Precompiled, params: dict[str, Any]) -> Any:
        """:meth:`Precompiled.first_async` on one of the pool's connections. ``PoolTimeout``
        when none comes within :data:`STATEMENT_POOL_WAIT_S`, and then at once for
        :data:`STATEMENT_POOL_REST_S`."""
        if time.monotonic() < self._resting_until:
            raise PoolTimeout("the statement pool is resting after a timeout")
        try:
            async with self.connection() as connection:
                return await statement.first_async(connection, params)
        except PoolTimeout:
            self._resting_until = time.monotonic() + STATEMENT_POOL_REST_S
            raise


def statement_pool(settings: Settings) -> StatementPool | None:
    """PostgreSQL: a pool of asyncio connections in autocommit mode for the labeling hot path's
    single statements (:meth:`Precompiled.first_async`), which then need no worker thread —
    the thread hand-off costs the event loop more than the statement's own client work. Up to
    ``db_pool_size`` connections, made as the engine's are (statement timeout included), one
    kept open when idle; a connection the server closed is dropped when taken, without a round
    trip (as :func:`_drop_dead_connection`). Not opened: the app's lifespan opens and closes
    it. SQLite: None."""
    if settings.is_sqlite:
        return None
    url = make_url(settings.database_url)
    _, params = url.set(drivername="postgresql+psycopg").get_dialect()().create_connect_args(url)
    return StatementPool(
        kwargs={
            **params,
            **_connect_args(settings.db_statement_timeout_ms),
            "autocommit": True,
        },
        min_size=1,
        max_size=settings.request_threads,
        open=False,
        check=_still_open,
        timeout=STATEMENT_POOL_WAIT_S,
        name="prefero-statements",
    )


async def _still_open(connection: Any) -> None:
    """The statement pool's check when a connection is taken: one the server closed is closed
    here too (so the pool discards it rather than handing it out again) and refused."""
    if connection.closed or connection.broken or _readable(connection.fileno()):
        await connection.close()
        raise exc.DisconnectionError("the server closed the connection")
