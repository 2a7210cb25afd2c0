"""Consistent backups of the database while the service runs, and restores into an empty one.

- SQLite: the online backup API (``sqlite3.Connection.backup``) copies every page in one step
  under a read transaction, so the copy is the database as of one instant, whatever is being
  written meanwhile (WAL mode: writers are not blocked). The copy is a single file in rollback
  journal mode, checked with ``PRAGMA quick_check``.
- PostgreSQL: ``pg_dump --format=custom`` (from ``PATH``), which dumps from one repeatable-read
  snapshot; restored with ``pg_restore`` in a single transaction.

Backups are written to ``OUT.part`` and renamed when complete: ``OUT`` is never half-written.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import inspect
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import SQLAlchemyError

from app.db import make_engine
from app.errors import BackupFailed
from app.services.health import readiness

SQLITE_MAGIC = b"SQLite format 3\x00"
PGDUMP_MAGIC = b"PGDMP"


@dataclass(frozen=True, slots=True)
class BackupResult:
    path: Path
    bytes: int
    seconds: float
    kind: str
    """``sqlite`` or ``postgresql``."""


def backup_database(database_url: str, *, out: Path) -> BackupResult:
    """Write a consistent snapshot of the database at ``database_url`` to ``out``."""
    url = make_url(database_url)
    started = time.monotonic()
    out = out.expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(out.name + ".part")
    try:
        if url.get_backend_name() == "sqlite":
            _backup_sqlite(_sqlite_path(url), part)
            kind = "sqlite"
        elif url.get_backend_name() == "postgresql":
            _run_pg("pg_dump", url, ["--format=custom", "--no-password", f"--file={part}"])
            kind = "postgresql"
        else:
            raise BackupFailed(f"cannot back up a {url.get_backend_name()} database")
        part.replace(out)
    finally:
        part.unlink(missing_ok=True)
    return BackupResult(out, out.stat().st_size, time.monotonic() - started, kind)


@dataclass(frozen=True, slots=True)
class RestoreResult:
    kind: str
    revision: str | None
    """The restored schema's migration."""
    at_head: bool
    """False: run ``prefero db upgrade`` before serving."""


def restore_database(database_url: str, *, source: Path) -> RestoreResult:
    """Load the backup ``source`` into the (empty) database at ``database_url``. A non-empty
    target is refused: nothing is overwritten."""
    url = make_url(database_url)
    if not source.is_file():
        raise BackupFailed(f"{source}: no such file")
    with source.open("rb") as f:
        magic = f.read(16)
    backend = url.get_backend_name()
    if backend == "sqlite":
        if not magic.startswith(SQLITE_MAGIC):
            raise BackupFailed(f"{source} is not a SQLite backup (the database is SQLite)")
        target = _sqlite_path(url)
        target.parent.mkdir(parents=True, exist_ok=True)
        _require_empty(database_url)
        _restore_sqlite(source, target)
    elif backend == "postgresql":
        if not magic.startswith(PGDUMP_MAGIC):
            raise BackupFailed(
                f"{source} is not a pg_dump custom-format backup (the database is PostgreSQL)"
            )
        _require_empty(database_url)
        _run_pg(
            "pg_restore",
            url,
            [
                "--no-owner",
                "--no-privileges",
                "--single-transaction",
                "--exit-on-error",
                "--no-password",
                str(source),
            ],
        )
    else:
        raise BackupFailed(f"cannot restore into a {backend} database")
    engine = make_engine(database_url)
    try:
        ready, _, revision = readiness(engine)
    finally:
        engine.dispose()
    return RestoreResult(backend, revision, ready)


# --------------------------------------------------------------------------- SQLite


def _sqlite_path(url: URL) -> Path:
    if not url.database or url.database == ":memory:":
        raise BackupFailed("an in-memory SQLite database cannot be backed up or restored")
    return Path(url.database).expanduser().resolve()


def _backup_sqlite(source: Path, part: Path) -> None:
    if not source.is_file():
        raise BackupFailed(f"{source}: no such database file")
    part.unlink(missing_ok=True)
    src = sqlite3.connect(source, timeout=30)
    dst = sqlite3.connect(part)
    try:
        src.backup(dst)  # all pages in one step: one consistent snapshot
        dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
        ok = dst.execute("PRAGMA quick_check").fetchone()[0]
        if ok != "ok":
            raise BackupFailed(f"the backup failed its integrity check: {ok}")
    except sqlite3.Error as e:
        raise BackupFailed(f"SQLite backup failed: {e}") from e
    finally:
        dst.close()
        src.close()


def _restore_sqlite(source: Path, target: Path) -> None:
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    dst = sqlite3.connect(target, timeout=30)
    try:
        ok = src.execute("PRAGMA quick_check").fetchone()[0]
        if ok != "ok":
            raise BackupFailed(f"{source} failed its integrity check: {ok}")
        src.backup(dst)
    except sqlite3.Error as e:
        raise BackupFailed(f"SQLite restore failed: {e}") from e
    finally:
        dst.close()
        src.close()


# --------------------------------------------------------------------------- PostgreSQL


def _run_pg(program: str, url: URL, args: list[str]) -> None:
    exe = shutil.which(program)
    if exe is None:
        raise BackupFailed(
            f"{program} is not on PATH: install the PostgreSQL client tools (the same major "
            "version as the server or newer), e.g. apt-get install postgresql-client"
        )
    # The password goes in the environment, never on the command line (visible in ps).
    env = {**os.environ, "PGPASSWORD": url.password or os.environ.get("PGPASSWORD", "")}
    if not env["PGPASSWORD"]:
        del env["PGPASSWORD"]
    conninfo = url.set(drivername="postgresql", password=None).render_as_string(hide_password=False)
    proc = subprocess.run(
        [exe, f"--dbname={conninfo}", *args], env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        detail = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "no output"
        raise BackupFailed(f"{program} failed (exit {proc.returncode}): {detail}")


# --------------------------------------------------------------------------- checks


def _require_empty(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        tables = inspect(engine).get_table_names()
    except SQLAlchemyError as e:
        raise BackupFailed(f"cannot open the target database: {type(e.orig or e).__name__}") from e
    finally:
        engine.dispose()
    if tables:
        raise BackupFailed(
            f"the target database is not empty ({len(tables)} tables): restore needs an empty "
            "database; create a new one (or move the SQLite file away) and point "
            "PREFERO_DATABASE_URL at it"
        )
