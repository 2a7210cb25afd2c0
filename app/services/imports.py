"""Import prompts and completions into a project, all or nothing.

The stream is parsed and validated record by record (``app.importer``) and written in batches
inside one transaction. If any record is invalid the transaction is rolled back and
:class:`ImportRejected` lists the first 100 problems with their line numbers. Records whose id
already exists in the project are skipped (new completions for them are added), so a failed or
interrupted import can simply be retried.
"""

from __future__ import annotations

import zlib
from itertools import islice
from typing import IO, Any

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from app.db import write_transaction
from app.errors import ImportRejected, RecordError
from app.importer import PromptIn, open_source, parse_records
from app.models import Completion, Prompt, utcnow
from app.schemas import ImportResult
from app.services.projects import get_project

MAX_ERRORS = 100
BATCH_RECORDS = 1000


def _insert(session: Session, table: Any) -> Any:
    dialect = session.get_bind().dialect.name
    return (postgresql if dialect == "postgresql" else sqlite).insert(table)


def import_prompts(
    session: Session, *, project_slug: str, source: IO[bytes], max_bytes: int
) -> ImportResult:
    """Import a JSONL / JSON-array / HH-RLHF stream (gzip allowed) into ``project_slug``."""
    write_transaction(session)
    try:
        project = get_project(session, slug=project_slug)
        result = _import(session, project.id, source, max_bytes)
    except BaseException:
        session.rollback()
        raise
    session.commit()
    return result


def _import(session: Session, project_id: int, source: IO[bytes], max_bytes: int) -> ImportResult:
    stream = open_source(source, max_bytes=max_bytes)
    errors: list[RecordError] = []
    total_errors = 0
    writer = _BatchWriter(session, project_id)
    batch: list[PromptIn] = []
    records = parse_records(stream)
    last_line = 0
    while True:
        try:
            item = next(records, None)
        except (OSError, EOFError, zlib.error) as e:  # corrupt or truncated gzip
            total_errors += 1
            errors.append(RecordError(last_line + 1, None, f"unreadable compressed data: {e}"))
            break
        if item is None:
            break
        if isinstance(item, RecordError):
            total_errors += 1
            if len(errors) < MAX_ERRORS:
                errors.append(item)
            last_line = item.line
            continue
        last_line = item.line
        if total_errors:
            continue  # keep validating to report every problem, but stop writing
        batch.append(item)
        if len(batch) >= BATCH_RECORDS:
            writer.write(batch)
            batch = []
    if not total_errors and batch:
        writer.write(batch)
    if not total_errors and writer.records == 0:
        total_errors = 1
        errors.append(RecordError(1, None, "the upload contains no records"))
    if total_errors:
        raise ImportRejected(errors, total=total_errors)
    return ImportResult(
        created=writer.created,
        skipped=writer.skipped,
        completions_created=writer.completions_created,
        completions_skipped=writer.completions_skipped,
    )


class _BatchWriter:
    """Writes validated records with set-based, conflict-tolerant inserts."""

    def __init__(self, session: Session, project_id: int) -> None:
        self.session = session
        self.project_id = project_id
        self.now = utcnow()
        # external id -> database id of prompts seen in this import (records without an id
        # that repeat a prompt are merged into it).
        self.known: dict[str, int] = {}
        self.records = self.created = self.skipped = 0
        self.completions_created = self.completions_skipped = 0
        table = Prompt.__table__
        self.prompt_stmt = (
            _insert(session, table)
            .on_conflict_do_nothing(index_elements=[table.c.project_id, table.c.external_id])
            .returning(table.c.id, table.c.external_id)
        )
        ctable = Completion.__table__
        self.completion_stmt = (
            _insert(session, ctable)
            .on_conflict_do_nothing(index_elements=[ctable.c.prompt_id, ctable.c.external_id])
            .returning(ctable.c.id)
        )

    def write(self, batch: list[PromptIn]) -> None:
        self.records += len(batch)
        new: dict[str, PromptIn] = {}
        for rec in batch:
            if rec.external_id not in self.known and rec.external_id not in new:
                new[rec.external_id] = rec
        if new:
            rows = [
                {
                    "project_id": self.project_id,
                    "external_id": ext,
                    "messages": rec.messages,
                    "metadata": rec.metadata,
                    "created_at": self.now,
                }
                for ext, rec in new.items()
            ]
            inserted = self.session.execute(self.prompt_stmt, rows).all()
            for pid, ext in inserted:
                self.known[ext] = pid
            self.created += len(inserted)
            missing = [ext for ext in new if ext not in self.known]
            if missing:  # already in the project before this import: skipped
                self.skipped += len(missing)
                for chunk in _chunks(missing, 500):
                    q = select(Prompt.id, Prompt.external_id).where(
                        Prompt.project_id == self.project_id, Prompt.external_id.in_(chunk)
                    )
                    for pid, ext in self.session.execute(q):
                        self.known[ext] = pid
        rows = [
            {
                "prompt_id": self.known[rec.external_id],
                "external_id": c.external_id,
                "text": c.text,
                "model": c.model,
                "params": c.params,
                "created_at": self.now,
            }
            for rec in batch
            for c in rec.completions
        ]
        if rows:
            n = len(self.session.execute(self.completion_stmt, rows).all())
            self.completions_created += n
            self.completions_skipped += len(rows) - n


def _chunks(items: list[str], size: int) -> Any:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk
