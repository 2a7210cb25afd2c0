"""Export a project's annotations: pairs, rankings, consensus or HH-RLHF, as JSONL or Parquet.

One service behind ``GET /api/v1/projects/{slug}/export`` and ``prefero export``:
:func:`open_export` checks the parameters, opens a consistent snapshot and finds the project
(so a bad request fails before the first byte), and returns an :class:`Export` whose
:meth:`Export.chunks` streams the file.

How it stays fast and flat in memory for any size:

- one read-only snapshot for the whole export (PostgreSQL: ``REPEATABLE READ READ ONLY``; SQLite:
  one read transaction), so annotations written meanwhile are either all in or all out;
- the current annotations (highest revision per prompt and user, status submitted) are read
  with one query ordered by prompt and annotation id, through a server-side cursor
  (``yield_per``); a prompt's annotations are therefore adjacent, which is what the per-prompt
  filters (split, agreement) and the consensus need;
- they are processed in batches of about :data:`BATCH_ANNOTATIONS`: each batch's prompts and
  completions come with two queries, each prompt and completion text is serialised to JSON once
  (``orjson.Fragment``) however many pairs repeat it, and rows are written in chunks of
  :data:`CHUNK_BYTES`.

Row contents (ids, shapes, margins) are built by the pure ``app.exporting``; the contract is
in ``docs/export.md`` and ``tests/fixtures/README.md``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import groupby
from typing import IO, Any

import orjson
from sqlalchemy import (
    BigInteger,
    Connection,
    Text,
    any_,
    bindparam,
    cast,
    exists,
    literal,
    null,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session, aliased

from app.errors import InvalidInput
from app.exporting import (
    JSON_OPTIONS,
    AnnotationData,
    PromptData,
    agreement_fraction,
    consensus_row,
    hh_rows,
    is_single_turn,
    pair_lines,
    pair_rows,
    ranking_row,
)
from app.models import Annotation, AnnotationStatus, Completion, Project, Prompt, User
from app.ranking import pseudonym, split_of
from app.schemas import ExportParams
from app.services import audit
from app.services.projects import get_project
from app.services.transactions import write_transaction

BATCH_ANNOTATIONS = 2000
"""Annotations per batch (their prompts and completions are loaded together)."""
CHUNK_BYTES = 256 * 1024
"""JSON Lines are handed to the caller in chunks of about this size."""
PARQUET_ROWS = 20_000
"""Rows per Parquet row group."""
MEDIA_TYPES = {"jsonl": "application/x-ndjson", "parquet": "application/vnd.apache.parquet"}


@dataclass(slots=True)
class ExportStats:
    """Counted while the export streams (final once :meth:`Export.chunks` is exhausted)."""

    prompts: int = 0
    annotations: int = 0
    rows: int = 0


@dataclass(slots=True)
class Export:
    """An export ready to stream; its snapshot is open until the chunks are exhausted."""

    project_slug: str
    params: ExportParams
    chat: bool
    """Prompts are message lists (a chat project, or ``prompt_format=chat``)."""
    _rows: Callable[[bool], Iterator[Any]]
    _session: Session
    stats: ExportStats = field(default_factory=ExportStats)

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.params.file]

    @property
    def filename(self) -> str:
        split = "" if self.params.split == "all" else f"-{self.params.split}"
        return f"{self.project_slug}-{self.params.format}{split}.{self.params.file}"

    def chunks(self) -> Iterator[bytes]:
        """The file's bytes. Parquet is written to a temporary file first (its footer comes
        last), then streamed from it."""
        if self.params.file == "parquet":
            with tempfile.TemporaryFile() as tmp:
                self.write(tmp)
                tmp.seek(0)
                while chunk := tmp.read(CHUNK_BYTES):
                    yield chunk
            return
        try:
            yield from _jsonl(self._rows(True), self.stats)
        finally:
            self._end()

    def write(self, out: IO[bytes]) -> ExportStats:
        """Write the whole file to ``out`` (a binary file object) and return the counts."""
        if self.params.file == "parquet":
            try:
                _write_parquet(out, self._rows(False), self.params.format, self.chat, self.stats)
            finally:
                self._end()
        else:
            for chunk in self.chunks():
                out.write(chunk)
        return self.stats

    def rows(self) -> Iterator[dict[str, Any]]:
        """The rows as Python values (what Parquet is made of), instead of :meth:`chunks`."""
        try:
            yield from self._rows(False)
        finally:
            self._end()

    def _end(self) -> None:
        self._session.rollback()  # a read-only snapshot: nothing to keep


def open_export(
    session: Session,
    *,
    project_slug: str,
    params: ExportParams,
    secret: str,
    batch_size: int | None = None,
    actor: User | None = None,
) -> Export:
    """Check ``params``, open the snapshot, find the project; raise before anything streams.

    ``secret`` keys the annotators' pseudonyms (``Settings.get_secret_key()``). The export
    (who, which project, which parameters) is first recorded in the audit log in a short
    transaction of its own (``actor`` None: the command line)."""
    _check(params)
    _record_export(session, project_slug=project_slug, params=params, actor=actor)
    _begin_snapshot(session)
    try:
        project = get_project(session, slug=project_slug)
        chat = params.prompt_format == "chat" or _has_chat_prompts(session, project.id)
    except BaseException:
        session.rollback()
        raise
    export = Export(project.slug, params, chat, lambda frag: iter(()), session)
    snapshot = session.get_transaction()
    batch_size = batch_size or BATCH_ANNOTATIONS
    pseudonyms: dict[int, str] = {}

    def annotator(user_id: int) -> str:
        name = pseudonyms.get(user_id)
        if name is None:
            name = pseudonyms[user_id] = pseudonym(user_id, secret=secret)
        return name

    def rows(fragments: bool) -> Iterator[dict[str, Any] | bytes]:
        groups = _prompt_groups(
            session, project, params, chat=chat, fragments=fragments, batch_size=batch_size
        )
        fmt, ties, stats = params.format, params.ties, export.stats
        for prompt, all_rows, shown_rows in groups:
            if session.get_transaction() is not snapshot:
                # The web framework closed the session before the body streamed: the rest
                # would come from another snapshot. Fail loudly instead.
                raise RuntimeError("the export's session was closed while it streamed")
            stats.prompts += 1
            stats.annotations += len(shown_rows)
            shown = [_annotation(r, annotator(r[_USER])) for r in shown_rows]
            if fmt == "pairs" and fragments:  # JSON Lines: the hot path, as bytes
                for a in shown:
                    data, n = pair_lines(a, prompt, ties=ties)
                    stats.rows += n
                    yield data
            elif fmt == "pairs":
                for a in shown:
                    yield from pair_rows(a, prompt, ties=ties)
            elif fmt == "rankings":
                for a in shown:
                    yield ranking_row(a, prompt)
            elif fmt == "consensus":
                anns = shown if all_rows is shown_rows else [_annotation(r, "") for r in all_rows]
                yield consensus_row(anns, prompt)
            else:
                for a in shown:
                    yield from hh_rows(a, prompt)

    export._rows = rows
    return export


def _record_export(
    session: Session, *, project_slug: str, params: ExportParams, actor: User | None
) -> None:
    """Exports only read, and their snapshot is read-only: the audit row commits first."""
    write_transaction(session)
    try:
        project = get_project(session, slug=project_slug)
        audit.record_project(
            session,
            actor=actor,
            action="project.export",
            project=project,
            **params.model_dump(mode="json"),
        )
    except BaseException:
        session.rollback()
        raise
    session.commit()


def _check(params: ExportParams) -> None:
    errors = []
    if params.ties == "keep" and params.format != "pairs":
        errors.append({"field": "ties", "message": "ties=keep applies to format=pairs only"})
    if params.split != "all" and params.test_fraction in (0.0, 1.0):
        side = "test" if params.test_fraction == 0.0 else "train"
        if params.split == side:
            errors.append(
                {
                    "field": "test_fraction",
                    "message": f"split={side} with test_fraction={params.test_fraction} "
                    "is always empty",
                }
            )
    if errors:
        raise InvalidInput(f"invalid export parameter: {errors[0]['field']}", errors=errors)


def _begin_snapshot(session: Session) -> None:
    """Start the export's read-only snapshot transaction.

    SQLite: one (deferred) read transaction sees one snapshot of the WAL from its first read.
    PostgreSQL: ``REPEATABLE READ, READ ONLY`` — every query of the export sees the database
    as of its first query. A session already inside an outer transaction (the test suite's
    per-test transaction) keeps that one."""
    if session.in_transaction():
        if session.new or session.dirty or session.deleted:
            raise RuntimeError("open_export() needs a session without pending changes")
        session.rollback()
    bind = session.get_bind()
    nested = isinstance(bind, Connection) and bind.in_transaction()
    if bind.dialect.name == "postgresql" and not nested:
        session.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"))
    else:
        session.connection()


_CHAT_SQL = {
    "postgresql": "jsonb_array_length(messages) <> 1 OR messages->0->>'role' <> 'user'",
    "sqlite": "json_array_length(messages) <> 1 OR json_extract(messages, '$[0].role') <> 'user'",
}


def _has_chat_prompts(session: Session, project_id: int) -> bool:
    """Whether any prompt of the project is more than one user message (the export's prompt
    shape is decided once per project, so that every export of it has the same columns)."""
    cond = text(f"({_CHAT_SQL[session.get_bind().dialect.name]})")
    stmt = select(exists().where(Prompt.project_id == project_id, cond))
    return bool(session.scalar(stmt))


def _annotation_query(project: Project, params: ExportParams, *, need_all: bool) -> Any:
    """Current submitted annotations of the project, ordered by prompt then id.

    With ``since`` and ``need_all`` (agreement or consensus need every annotator of a prompt)
    it returns all current annotations of the prompts that have one newer than ``since``;
    otherwise only the newer ones."""
    a = Annotation.__table__
    b = aliased(Annotation.__table__)
    p = Prompt.__table__
    newer_revision = (
        select(literal(1))
        .where(b.c.prompt_id == a.c.prompt_id, b.c.user_id == a.c.user_id)
        .where(b.c.revision > a.c.revision)
    )
    stmt = (
        select(
            a.c.prompt_id,
            p.c.external_id,
            a.c.id,
            a.c.user_id,
            # JSON as text, decoded by orjson: several times faster than the drivers' json.
            cast(a.c.ranking, Text),
            cast(a.c.likert, Text),
            cast(a.c.flags, Text) if params.format == "rankings" else null(),
            a.c.rationale if params.format == "rankings" else literal(""),
            cast(a.c.display_order, Text),
            a.c.duration_ms,
            a.c.strength,
            a.c.both_bad,
            a.c.created_at,
        )
        .join(p, p.c.id == a.c.prompt_id)
        .where(a.c.project_id == project.id, a.c.status == AnnotationStatus.submitted)
        .where(~exists(newer_revision))
        .order_by(a.c.prompt_id, a.c.id)
    )
    if params.since is not None:
        since = _utc(params.since)
        if need_all:
            c = aliased(Annotation.__table__)
            touched = select(c.c.prompt_id).where(
                c.c.project_id == project.id,
                c.c.status == AnnotationStatus.submitted,
                c.c.created_at > since,
            )
            stmt = stmt.where(a.c.prompt_id.in_(touched))
        else:
            stmt = stmt.where(a.c.created_at > since)
    return stmt


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


Group = tuple[PromptData, list[tuple[Any, ...]], list[tuple[Any, ...]]]


def _prompt_groups(
    session: Session,
    project: Project,
    params: ExportParams,
    *,
    chat: bool,
    fragments: bool,
    batch_size: int,
) -> Iterator[Group]:
    """``(prompt, its current annotations, those to export)`` per prompt, in prompt order;
    the annotations as raw rows of the annotation query (parse with ``_annotation``)."""
    min_agreement = params.min_agreement or 0.0
    need_all = min_agreement > 0 or params.format == "consensus"
    since = _utc(params.since) if params.since is not None else None
    split = params.split
    seed, fraction = params.seed, params.test_fraction
    listing = params.format in ("rankings", "consensus")
    stmt = _annotation_query(project, params, need_all=need_all)
    # A server-side cursor on PostgreSQL (``yield_per``): rows arrive batch by batch.
    result = session.connection().execute(stmt.execution_options(yield_per=batch_size))
    # Raw rows (plain tuples of str / int / datetime) wait in the batch, and are parsed only
    # when their rows are built: the parsed lists and dicts then die young. Holding thousands
    # of them per batch made the garbage collector's full passes over the whole server heap
    # a third of the export's CPU time.
    pending: list[tuple[int, str, list[tuple[Any, ...]], list[tuple[Any, ...]]]] = []
    count = 0
    for (prompt_id, external_id), rows in groupby(result, key=lambda r: (r[0], r[1])):
        if split != "all" and split_of(external_id, seed=seed, test_fraction=fraction) != split:
            continue
        anns = [tuple(r) for r in rows]
        if min_agreement > 0:
            agreed = agreement_fraction([orjson.loads(r[_RANKING]) for r in anns])
            if agreed is None or agreed < min_agreement:
                continue
        shown = anns if since is None else [r for r in anns if r[_CREATED] > since]
        if not shown:
            continue
        pending.append((prompt_id, external_id, anns, shown))
        count += len(anns)
        if count >= batch_size:
            yield from _with_prompts(
                session, pending, chat=chat, fragments=fragments, listing=listing
            )
            pending, count = [], 0
    if pending:
        yield from _with_prompts(session, pending, chat=chat, fragments=fragments, listing=listing)


def _with_prompts(
    session: Session,
    pending: list[tuple[int, str, list[tuple[Any, ...]], list[tuple[Any, ...]]]],
    *,
    chat: bool,
    fragments: bool,
    listing: bool,
) -> Iterator[Group]:
    """Load the batch's prompts and completions (two queries) and pair them with their
    annotations."""
    ids = [p[0] for p in pending]
    conn = session.connection()  # Core rows: no ORM bookkeeping per row
    p, c = Prompt.__table__, Completion.__table__
    q_messages = select(p.c.id, cast(p.c.messages, Text)).where(_among(session, p.c.id, ids))
    messages = dict(conn.execute(q_messages).all())
    completions: dict[int, list[tuple[int, str, str, str | None]]] = {i: [] for i in ids}
    q = (
        select(c.c.prompt_id, c.c.id, c.c.external_id, c.c.text, c.c.model)
        .where(_among(session, c.c.prompt_id, ids))
        .order_by(c.c.prompt_id, c.c.id)
    )
    for part in conn.execute(q).partitions(1000):  # rows die young: see _prompt_groups
        for prompt_id, cid, ext, body, model in part:
            completions[prompt_id].append((cid, ext, body, model))
    for prompt_id, external_id, anns, shown in pending:
        msgs = orjson.loads(messages[prompt_id])
        prompt = PromptData.build(
            id=prompt_id,
            external_id=external_id,
            messages=msgs,
            completions=completions[prompt_id],
            chat=chat or not is_single_turn(msgs),
            fragments=fragments,
            listing=listing,
        )
        yield prompt, anns, shown


def loads(value: str | None) -> Any:
    return orjson.loads(value) if value is not None else None


# Columns of the annotation query's rows (see ``_annotation_query``).
_USER, _RANKING, _CREATED = 3, 4, 12


def _annotation(row: tuple[Any, ...], annotator: str) -> AnnotationData:
    return AnnotationData(
        row[2],  # id
        row[0],  # prompt id
        row[3],  # user id
        loads(row[4]),  # ranking
        loads(row[5]),  # likert
        loads(row[6]),  # flags
        row[7],  # rationale
        loads(row[8]),  # display order
        row[9],  # duration_ms
        row[10],  # strength
        row[11],  # both_bad
        row[12],  # created_at
        annotator,
    )


def _among(session: Session, column: Any, ids: list[int]) -> Any:
    """``column IN ids``; on PostgreSQL ``= ANY(array)``: one statement text whatever the
    number of ids, so the driver parses and the server plans it once."""
    if session.get_bind().dialect.name == "postgresql":
        return column == any_(bindparam(None, ids, type_=ARRAY(BigInteger)))
    return column.in_(ids)


def _jsonl(rows: Iterator[dict[str, Any] | bytes], stats: ExportStats) -> Iterator[bytes]:
    """Rows (or ready JSON Lines, as bytes) in chunks of about :data:`CHUNK_BYTES`; counts
    the rows it serialises. Each byte is copied once here (the join)."""
    dumps, options = orjson.dumps, JSON_OPTIONS
    parts: list[bytes] = []
    size = n = 0
    try:
        for row in rows:
            if isinstance(row, bytes):  # ready lines, counted by their maker
                line = row
            else:
                line = dumps(row, option=options)
                n += 1
            parts.append(line)
            size += len(line)
            if size >= CHUNK_BYTES:
                yield b"".join(parts)
                parts.clear()
                size = 0
        if parts:
            yield b"".join(parts)
    finally:
        stats.rows += n


def _parquet_schema(fmt: str, chat: bool) -> Any:
    import pyarrow as pa  # only Parquet exports pay for loading pyarrow

    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    prompt = pa.list_(message) if chat else pa.string()
    answer = pa.list_(message) if chat else pa.string()
    when = pa.timestamp("us", tz="UTC")
    completion = pa.struct([("id", pa.string()), ("text", pa.string()), ("model", pa.string())])
    completions = pa.list_(completion)
    ranking = pa.list_(pa.list_(pa.string()))
    fields: dict[str, list[tuple[str, Any]]] = {
        "pairs": [
            ("prompt", prompt),
            ("chosen", answer),
            ("rejected", answer),
            ("margin", pa.float64()),
            ("tie", pa.bool_()),
            ("prompt_id", pa.string()),
            ("chosen_id", pa.string()),
            ("rejected_id", pa.string()),
            ("group_id", pa.string()),
            ("annotator", pa.string()),
            ("annotation_id", pa.int64()),
            ("likert_chosen", pa.int64()),
            ("likert_rejected", pa.int64()),
            ("position_chosen", pa.int64()),
            ("position_rejected", pa.int64()),
            ("created_at", when),
        ],
        "rankings": [
            ("annotation_id", pa.int64()),
            ("prompt", prompt),
            ("prompt_id", pa.string()),
            ("completions", completions),
            ("ranking", ranking),
            ("likert", pa.map_(pa.string(), pa.int64())),
            ("flags", pa.map_(pa.string(), pa.list_(pa.string()))),
            ("rationale", pa.string()),
            ("strength", pa.int64()),
            ("both_bad", pa.bool_()),
            ("annotator", pa.string()),
            ("duration_ms", pa.int64()),
            ("display_order", pa.list_(pa.string())),
            ("created_at", when),
        ],
        "consensus": [
            ("prompt_id", pa.string()),
            ("prompt", prompt),
            ("completions", completions),
            ("ranking", ranking),
            ("scores", pa.map_(pa.string(), pa.float64())),
            ("annotators", pa.int64()),
            ("agreement", pa.float64()),
            ("compared_pairs", pa.int64()),
            ("annotation_ids", pa.list_(pa.int64())),
        ],
        "hh": [("chosen", pa.string()), ("rejected", pa.string())],
    }
    return pa.schema(fields[fmt])


def _write_parquet(
    out: IO[bytes], rows: Iterator[dict[str, Any]], fmt: str, chat: bool, stats: ExportStats
) -> None:
    import pyarrow as pa  # only Parquet exports pay for loading pyarrow
    import pyarrow.parquet as pq

    schema = _parquet_schema(fmt, chat)
    batch: list[dict[str, Any]] = []
    with pq.ParquetWriter(out, schema, compression="zstd") as writer:
        for row in rows:
            batch.append(row)
            if len(batch) >= PARQUET_ROWS:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                stats.rows += len(batch)
                batch.clear()
        if batch or stats.rows == 0:
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
            stats.rows += len(batch)
