"""Import prompts and completions into a project, all or nothing.

The stream is parsed and validated record by record (``app.importer``) and written in batches
inside one transaction. If any record is invalid the transaction is rolled back and
:class:`ImportRejected` lists the first 100 problems with their line numbers. Records whose id
already exists in the project are skipped (new completions for them are added), so a failed or
interrupted import can simply be retried.

On PostgreSQL each batch is streamed with ``COPY`` into temporary staging tables and moved with
one ``INSERT … SELECT … ON CONFLICT DO NOTHING`` per table; SQLite uses multi-row ``INSERT``s.
Both give the same rows, ids (in file order) and counts.
"""

from __future__ import annotations

import zlib
from itertools import islice
from typing import IO, Any

import orjson
import psycopg
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session

from app.db import insert_skipping_duplicates
from app.errors import ImportRejected, RecordError
from app.importer import PromptIn, open_source, parse_records
from app.models import Completion, Prompt, User, utcnow
from app.schemas import ImportResult
from app.services import audit
from app.services.projects import get_project
from app.services.transactions import write_transaction

MAX_ERRORS = 100
BATCH_RECORDS = 1000
ANALYZE_AFTER_ROWS = 1000
"""Imports writing at least this many rows refresh PostgreSQL's statistics afterwards."""


def import_prompts(
    session: Session,
    *,
    project_slug: str,
    source: IO[bytes],
    max_bytes: int,
    actor: User | None = None,
) -> ImportResult:
    """Import a JSONL / JSON-array / HH-RLHF stream (gzip allowed) into ``project_slug``.
    A successful import is recorded in the audit log with its counts."""
    write_transaction(session)
    try:
        project = get_project(session, slug=project_slug)
        result = _import(session, project.id, source, max_bytes)
        audit.record_project(
            session, actor=actor, action="prompts.import", project=project, **result.model_dump()
        )
    except BaseException:
        session.rollback()
        raise
    session.commit()
    if result.created + result.completions_created >= ANALYZE_AFTER_ROWS:
        _refresh_statistics(session)
    return result


def _refresh_statistics(session: Session) -> None:
    """Update PostgreSQL's planner statistics after a bulk load, as the documentation advises
    ("Populating a Database"), instead of planning the task queue for an empty table until
    autovacuum gets to it. SQLite plans without statistics; nothing to do there."""
    if session.get_bind().dialect.name != "postgresql":
        return
    try:
        session.execute(text("ANALYZE prompt, completion"))
        session.commit()
    except OperationalError:  # a busy server: autovacuum will do it
        session.rollback()


def _import(session: Session, project_id: int, source: IO[bytes], max_bytes: int) -> ImportResult:
    stream = open_source(source, max_bytes=max_bytes)
    errors: list[RecordError] = []
    total_errors = 0

    def reject(*problems: RecordError) -> None:
        nonlocal total_errors
        total_errors += len(problems)
        errors.extend(problems[: MAX_ERRORS - len(errors)])

    pg = session.get_bind().dialect.name == "postgresql"
    writer = (_PgCopyWriter if pg else _BatchWriter)(session, project_id)
    batch: list[PromptIn] = []
    records = parse_records(stream)
    last_line = 0

    def flush() -> None:
        writer.write(batch)
        reject(*writer.conflicts)
        writer.conflicts.clear()
        batch.clear()

    while True:
        try:
            item = next(records, None)
        except (OSError, EOFError, zlib.error) as e:  # corrupt or truncated gzip
            reject(RecordError(last_line + 1, None, f"unreadable compressed data: {e}"))
            break
        if item is None:
            break
        last_line = item.line
        if isinstance(item, RecordError):
            reject(item)
            continue
        if total_errors:
            continue  # keep validating to report every problem, but stop writing
        batch.append(item)
        if len(batch) >= writer.batch_records:
            flush()
    if not total_errors and batch:
        flush()
    if not total_errors and writer.records == 0:
        reject(RecordError(1, None, "the upload contains no records"))
    if total_errors:
        raise ImportRejected(errors, total=total_errors)
    return ImportResult(
        created=writer.created,
        skipped=writer.skipped,
        completions_created=writer.completions_created,
        completions_skipped=writer.completions_skipped,
    )


class _BatchWriter:
    """Writes validated records with set-based, conflict-tolerant inserts (any dialect)."""

    batch_records = BATCH_RECORDS

    def __init__(self, session: Session, project_id: int) -> None:
        self.session = session
        self.project_id = project_id
        self.now = utcnow()
        # external id -> database id of prompts seen in this import (records without an id
        # that repeat a prompt are merged into it).
        self.known: dict[str, int] = {}
        self.records = self.created = self.skipped = 0
        self.completions_created = self.completions_skipped = 0
        # Records whose id exists in the project with a different prompt (reported as errors).
        self.conflicts: list[RecordError] = []

    def write(self, batch: list[PromptIn]) -> None:
        self.records += len(batch)
        known = self.known
        new: dict[str, PromptIn] = {}
        for rec in batch:
            ext = rec.external_id
            if ext not in known and ext not in new:
                new[ext] = rec
        if new:
            inserted = self._insert_prompts(new)
            for pid, ext in inserted:
                known[ext] = pid
            self.created += len(inserted)
            missing = [ext for ext in new if ext not in known]
            if missing:  # already in the project before this import: skipped
                self.skipped += len(missing)
                for chunk in _chunks(missing, 500):
                    q = select(Prompt.id, Prompt.external_id, Prompt.messages).where(
                        Prompt.project_id == self.project_id, Prompt.external_id.in_(chunk)
                    )
                    for pid, ext, messages in self.session.execute(q):
                        known[ext] = pid
                        rec = new[ext]
                        if messages != rec.messages:  # same id, other prompt: a mistake
                            self.conflicts.append(
                                RecordError(
                                    rec.line,
                                    "id",
                                    f"id {ext!r} already exists in this project with a "
                                    "different prompt",
                                )
                            )
            if self.conflicts:
                return
        total = sum(len(rec.completions) for rec in batch)
        if total:
            n = self._insert_completions(batch)
            self.completions_created += n
            self.completions_skipped += total - n

    def _insert_prompts(self, new: dict[str, PromptIn]) -> list[Any]:
        """Insert the prompts not yet seen; return ``(id, external_id)`` of those created."""
        table = Prompt.__table__
        stmt = insert_skipping_duplicates(
            self.session, table, table.c.project_id, table.c.external_id
        ).returning(table.c.id, table.c.external_id)
        project_id, now = self.project_id, self.now
        rows = [
            {
                "project_id": project_id,
                "external_id": ext,
                "messages": rec.messages,
                "metadata": rec.metadata,
                "created_at": now,
            }
            for ext, rec in new.items()
        ]
        return self.session.execute(stmt, rows).all()

    def _insert_completions(self, batch: list[PromptIn]) -> int:
        """Insert the batch's completions, skipping existing ones; return how many were new."""
        table = Completion.__table__
        stmt = insert_skipping_duplicates(
            self.session, table, table.c.prompt_id, table.c.external_id
        ).returning(table.c.id)
        known, now = self.known, self.now
        rows = [
            {
                "prompt_id": known[rec.external_id],
                "external_id": c.external_id,
                "text": c.text,
                "model": c.model,
                "params": c.params,
                "created_at": now,
            }
            for rec in batch
            for c in rec.completions
        ]
        return len(self.session.execute(stmt, rows).all())


# PostgreSQL: rows are streamed with COPY into temporary staging tables (dropped at commit) and
# moved with one ``INSERT … SELECT … ON CONFLICT DO NOTHING`` per table and batch. Same result as
# the generic writer; ``ORDER BY ord`` keeps ids in file order.
_PG_STAGE = (
    "CREATE TEMP TABLE IF NOT EXISTS prefero_import_prompt (ord integer NOT NULL,"
    " external_id text NOT NULL, messages jsonb NOT NULL, metadata jsonb NOT NULL)"
    " ON COMMIT DROP",
    "CREATE TEMP TABLE IF NOT EXISTS prefero_import_completion (ord integer NOT NULL,"
    " prompt_id bigint NOT NULL, external_id text NOT NULL, text text NOT NULL, model text,"
    " params jsonb NOT NULL) ON COMMIT DROP",
)
_PG_TRUNCATE = "TRUNCATE prefero_import_prompt, prefero_import_completion"
_PG_COPY_PROMPTS = "COPY prefero_import_prompt (ord, external_id, messages, metadata) FROM STDIN"
_PG_INSERT_PROMPTS = (
    "INSERT INTO prompt (project_id, external_id, messages, metadata, created_at)"
    " SELECT %(project_id)s::bigint, external_id, messages, metadata, %(now)s::timestamptz"
    " FROM prefero_import_prompt ORDER BY ord"
    " ON CONFLICT (project_id, external_id) DO NOTHING RETURNING id, external_id"
)
_PG_COPY_COMPLETIONS = (
    "COPY prefero_import_completion (ord, prompt_id, external_id, text, model, params) FROM STDIN"
)
_PG_INSERT_COMPLETIONS = (
    "INSERT INTO completion (prompt_id, external_id, text, model, params, created_at)"
    " SELECT prompt_id, external_id, text, model, params, %(now)s::timestamptz"
    " FROM prefero_import_completion ORDER BY ord"
    " ON CONFLICT (prompt_id, external_id) DO NOTHING"
)


class _PgCopyWriter(_BatchWriter):
    """The PostgreSQL writer: COPY into staging tables, then set-based inserts."""

    def __init__(self, session: Session, project_id: int) -> None:
        super().__init__(session, project_id)
        self.conn = session.connection()
        for ddl in _PG_STAGE:
            self.conn.exec_driver_sql(ddl)
        self.params = {"project_id": project_id, "now": self.now}

    def write(self, batch: list[PromptIn]) -> None:
        self.conn.exec_driver_sql(_PG_TRUNCATE)  # also clears a previous import's rows
        super().write(batch)

    def _copy(self, sql: str, rows: Any) -> None:
        try:
            with self.conn.connection.driver_connection.cursor() as cur, cur.copy(sql) as copy:
                write_row = copy.write_row
                for row in rows:
                    write_row(row)
        except psycopg.Error as e:  # as SQLAlchemy would raise it
            raise DBAPIError.instance(sql, None, e, psycopg.Error) from e

    def _insert_prompts(self, new: dict[str, PromptIn]) -> list[Any]:
        self._copy(
            _PG_COPY_PROMPTS,
            (
                (i, ext, _json(rec.messages), _json(rec.metadata))
                for i, (ext, rec) in enumerate(new.items())
            ),
        )
        return self.conn.exec_driver_sql(_PG_INSERT_PROMPTS, self.params).all()

    def _insert_completions(self, batch: list[PromptIn]) -> int:
        known = self.known
        self._copy(
            _PG_COPY_COMPLETIONS,
            (
                (i, known[rec.external_id], c.external_id, c.text, c.model, _json(c.params))
                for i, (rec, c) in enumerate((rec, c) for rec in batch for c in rec.completions)
            ),
        )
        return self.conn.exec_driver_sql(_PG_INSERT_COMPLETIONS, self.params).rowcount


def _json(value: Any) -> str:
    # Validation already proved that orjson can encode every metadata / params object.
    return orjson.dumps(value).decode()


def _chunks(items: list[str], size: int) -> Any:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk
