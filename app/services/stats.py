"""A project's quality statistics: progress, agreement, annotator biases and a model
leaderboard, for the admin dashboard, ``GET /api/v1/projects/{slug}/stats`` and its CSV.

Only *current* annotations count: the highest revision of each (prompt, annotator), submitted
(rankings, agreement, biases) or skipped (the skip rate). Four lean queries fetch plain columns
(JSON as text, parsed in one call per column), and the arithmetic is numpy, in ``app.metrics``
(definitions in ``docs/metrics.md``). On PostgreSQL two of the queries run on a second
connection in the same snapshot while the annotations are read (:func:`_begin_parallel`).
"""

from __future__ import annotations

import csv
import io
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

import numpy as np
import orjson
from sqlalchemy import (
    BigInteger,
    Date,
    Integer,
    LargeBinary,
    Text,
    case,
    cast,
    func,
    literal_column,
    select,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

from app import metrics
from app.models import Annotation, AnnotationStatus, Completion, Project, Prompt, User
from app.ranking import bradley_terry, pseudonym
from app.schemas import (
    AgreementStats,
    AnnotatorStats,
    BiasStats,
    DayCount,
    FlagCount,
    ModelPairStats,
    ModelStats,
    OutlierRule,
    PairwiseAgreementStats,
    ProgressStats,
    ProjectStats,
    SkipReasonCount,
)
from app.services.projects import get_project

CsvTable = Literal["annotators", "models", "pairs", "days", "summary"]
CSV_TABLES: tuple[str, ...] = ("annotators", "models", "pairs", "days", "summary")
MAX_MODELS = 10
"""The leaderboard ranks the models with the most ranked completions, at most this many."""
MAX_DAYS = 366
"""Days listed (the most recent ones, with the days without annotations in between)."""
MAX_SKIP_REASONS = 10
"""Most frequent skip reasons listed; the rest are summed under ``other``."""


def project_stats(
    session: Session,
    *,
    slug: str,
    secret: str,
    resamples: int = metrics.RESAMPLES,
    seed: int = metrics.SEED,
) -> ProjectStats:
    """Every statistic of the project ``slug``. ``secret`` keys the annotators' pseudonyms."""
    side = _begin_parallel(session)
    project = get_project(session, slug=slug)
    now = datetime.now(UTC)
    # PostgreSQL: the side queries run on a second connection while this one reads the
    # annotations. (Running the numpy metrics in threads too was slower: they contend for the
    # GIL more than they overlap.)
    with ThreadPoolExecutor(max_workers=1) as pool:
        later = pool.submit(_side_queries, *side, project) if side else None
        rows = _current_annotations(session, project)
        table = _rank_table(session, project, rows, np.flatnonzero(rows["submitted"]))
        if later is not None:
            (comp_ids, comp_group, comp_lengths, group_names), (skip_texts, flag_texts) = (
                later.result()
            )
        else:
            conn = session.connection()
            comp_ids, comp_group, comp_lengths, group_names = _completions(conn, project)
            skip_texts, flag_texts = _sparse_columns(conn, project)
    return _project_stats(
        session, project, now, secret, rows, table, comp_ids, comp_group, comp_lengths,
        group_names, skip_texts, flag_texts, resamples=resamples, seed=seed,
    )  # fmt: skip


def _project_stats(
    session: Session,
    project: Project,
    now: datetime,
    secret: str,
    rows: dict[str, Any],
    table: metrics.RankTable,
    comp_ids: np.ndarray,
    comp_group: np.ndarray,
    comp_lengths: np.ndarray,
    group_names: list[str | None],
    skip_texts: Keyed,
    flag_texts: Keyed,
    *,
    resamples: int,
    seed: int,
) -> ProjectStats:
    """The statistics from what :func:`project_stats` read."""
    submitted = rows["submitted"]
    skipped = ~submitted
    sub = np.flatnonzero(submitted)
    agree = metrics.agreement(table)
    bias = metrics.position_bias(table)
    lengths = table.per_slot(comp_ids, comp_lengths.astype(np.float64), np.nan)
    longer_won, length_pairs = metrics.length_bias(table, lengths)
    scores = _likert_scores(session, project, table, rows, sub)
    likert = metrics.likert_agreement(table, scores)
    flagged, flag_counts = _flags(flag_texts, rows, sub)

    # Annotators: everyone with a current annotation, submitted or skipped.
    user_keys, u_all, _ = metrics.unique_ids(rows["user"])
    usernames = _usernames(session, user_keys)
    u_sub = np.searchsorted(user_keys, table.annotator_keys)[table.annotator]
    n_users = user_keys.size
    durations = rows["duration"][sub]

    def per_user(values: Any) -> np.ndarray:
        return metrics.group_sum(u_sub, values, n_users)

    consensus_agree, consensus_compared = (
        per_user(agree.consensus_agree),
        per_user(agree.consensus_compared),
    )
    consensus = np.divide(
        consensus_agree,
        consensus_compared,
        out=np.full(n_users, np.nan),
        where=consensus_compared > 0,
    )
    low, threshold = metrics.low_outliers(consensus, consensus_compared >= metrics.MIN_PAIRS)
    eligible = (consensus_compared >= metrics.MIN_PAIRS) & ~np.isnan(consensus)
    median = float(np.median(consensus[eligible])) if eligible.any() else None
    known = bias.known.astype(np.float64)
    first_n, first_wins = per_user(known), per_user(bias.won & bias.known)
    expected_sum = per_user(np.where(bias.known, bias.expected, 0.0))
    medians = metrics.group_median(u_sub, durations, n_users)
    subs = metrics.group_sum(u_all, submitted, n_users)
    skips = metrics.group_sum(u_all, skipped, n_users)
    others_agree, others_compared = per_user(agree.others_agree), per_user(agree.others_compared)
    longer, pairs_n = per_user(longer_won), per_user(length_pairs)
    flags_n = per_user(flagged)

    annotators = []
    for u in range(n_users):
        b = _bias(first_wins[u], first_n[u], expected_sum[u], longer[u], pairs_n[u])
        reasons: list[Literal["low_agreement", "position_bias"]] = []
        if low[u]:
            reasons.append("low_agreement")
        if b.position_p is not None and b.position_p < metrics.BIAS_P:
            reasons.append("position_bias")
        user_id = int(user_keys[u])
        annotators.append(
            AnnotatorStats(
                **b.model_dump(),
                user_id=user_id,
                username=usernames.get(user_id, f"#{user_id}"),
                pseudonym=pseudonym(user_id, secret=secret),
                submitted=int(subs[u]),
                skipped=int(skips[u]),
                median_duration_ms=medians[u],
                agreement_agree=int(others_agree[u]),
                agreement_compared=int(others_compared[u]),
                agreement=metrics.ratio(others_agree[u], others_compared[u]),
                consensus_agree=int(consensus_agree[u]),
                consensus_compared=int(consensus_compared[u]),
                consensus=metrics.ratio(consensus_agree[u], consensus_compared[u]),
                flagged=int(flags_n[u]),
                flag_rate=metrics.ratio(flags_n[u], subs[u]),
                outlier=bool(reasons),
                outlier_reasons=reasons,
            )
        )
    annotators.sort(key=lambda a: (-a.submitted, a.username))

    pairwise_low, pairwise_high = metrics.ratio_interval(
        agree.prompt_agree, agree.prompt_compared, resamples=resamples, seed=seed
    )
    per_prompt = np.bincount(table.prompt, minlength=table.n_prompts)
    models, model_pairs = _leaderboard(
        table, comp_ids, comp_group, group_names, resamples=resamples, seed=seed
    )
    return ProjectStats(
        slug=project.slug,
        name=project.name,
        completions_per_task=project.completions_per_task,
        overlap=project.overlap,
        generated_at=now,
        progress=_progress(session, project, rows, submitted, skip_texts),
        agreement=AgreementStats(
            pairwise=PairwiseAgreementStats(
                agree=int(agree.prompt_agree.sum()),
                compared=int(agree.prompt_compared.sum()),
                rate=agree.rate,
                ci_low=pairwise_low,
                ci_high=pairwise_high,
                prompts=int((per_prompt >= 2).sum()),
            ),
            ranking_alpha=metrics.rank_alpha(table),
            likert_alpha=likert.alpha,
            likert_pairs=likert.pairs,
            likert_exact=likert.exact,
            likert_within_one=likert.within_one,
            resamples=resamples,
            seed=seed,
        ),
        bias=_bias(
            float((bias.won & bias.known).sum()),
            float(bias.known.sum()),
            float(bias.expected[bias.known].sum()),
            float(longer_won.sum()),
            float(length_pairs.sum()),
        ),
        annotators=annotators,
        models=models,
        model_pairs=model_pairs,
        flags=[FlagCount(flag=f, count=n) for f, n in flag_counts.most_common()],
        outlier_rule=OutlierRule(
            mads=metrics.OUTLIER_MADS,
            mad_floor=metrics.MAD_FLOOR,
            min_pairs=metrics.MIN_PAIRS,
            min_annotators=metrics.MIN_ANNOTATORS,
            bias_p=metrics.BIAS_P,
            median=median,
            threshold=threshold,
        ),
    )


# --------------------------------------------------------------------------- parallel reads

_SNAPSHOT_ID = re.compile(r"[0-9A-F]+-[0-9A-F]+(-[0-9A-F]+)?")


def _begin_parallel(session: Session) -> tuple[Engine, str] | None:
    """On PostgreSQL, make the session's transaction REPEATABLE READ and export its snapshot,
    so that a second connection can read the completions and the sparse columns *while* this
    one reads and parses the annotations, both seeing exactly the same data (the way
    ``pg_dump --jobs`` reads in parallel). Returns (engine, snapshot id), or None to read
    everything on the session: SQLite, or a session bound to a connection (whose own
    uncommitted work another connection could not see) or already inside a transaction."""
    bind = session.get_bind()
    if not isinstance(bind, Engine) or bind.dialect.name != "postgresql":
        return None
    if session.in_transaction():
        return None
    conn = session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
    snapshot = conn.exec_driver_sql("SELECT pg_export_snapshot()").scalar_one()
    return bind, snapshot


def _side_queries(
    engine: Engine, snapshot: str, project: Project
) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray, list[str | None]], tuple[Keyed, Keyed]]:
    """:func:`_completions` and :func:`_sparse_columns` on a connection of their own, in the
    exported ``snapshot`` (the pool's overflow has room: a request thread holds at most one
    pooled connection of its own)."""
    if not _SNAPSHOT_ID.fullmatch(snapshot):
        raise ValueError(f"unexpected snapshot id {snapshot!r}")
    with engine.connect() as conn:
        conn.execution_options(isolation_level="REPEATABLE READ")
        conn.exec_driver_sql(f"SET TRANSACTION SNAPSHOT '{snapshot}'")
        try:
            return _completions(conn, project), _sparse_columns(conn, project)
        finally:
            conn.rollback()


# --------------------------------------------------------------------------- queries


NUMERIC = ("prompt", "user", "revision", "submitted", "duration", "day", "first")


def _current_annotations(session: Session, project: Project) -> dict[str, Any]:
    """The project's annotations, keeping the current one of each (prompt, annotator).

    The database aggregates the columns into three strings (numbers as CSV, then the rankings
    and the Likert scores as ``;``-joined JSON), read by numpy: no Python object per row. All
    aggregates of one query see the rows in the same order, so the three line up."""
    a = Annotation
    if session.get_bind().dialect.name == "postgresql":  # days since 1970-01-01, UTC
        day: Any = cast(func.timezone("UTC", a.created_at), Date) - literal_column(
            "DATE '1970-01-01'"
        )
    else:  # stored as naive UTC text
        day = cast(func.julianday(a.created_at) - 2440587.5, Integer)
    fields = [
        a.prompt_id,
        a.user_id,
        a.revision,
        case((a.status == AnnotationStatus.submitted, 1), else_=0),
        func.coalesce(a.duration_ms, -1),
        day,
        func.coalesce(cast(a.display_order[0].as_string(), BigInteger), -1),  # ids are BIGINT
    ]
    numeric: Any = cast(fields[0], Text)
    for field in fields[1:]:
        numeric = numeric + "," + cast(field, Text)
    query = select(
        func.count(),
        func.aggregate_strings(numeric, ","),
        func.aggregate_strings(func.coalesce(cast(a.ranking, Text), "[]"), ";"),
        func.aggregate_strings(func.coalesce(cast(a.likert, Text), "{}"), ";"),
    ).where(a.project_id == project.id)
    count, numbers, rankings, likerts = _fetch(session.connection(), query)[0]
    values = np.fromstring(numbers or "", dtype=np.int64, sep=",")  # text mode: C parser
    if values.size != count * len(NUMERIC):
        raise ValueError("the aggregated annotation columns do not line up")
    values = values.reshape(-1, len(NUMERIC))
    columns = dict(zip(NUMERIC, values.T, strict=True))
    prompt, user, revision = columns["prompt"], columns["user"], columns["revision"]
    # The highest revision of each (prompt, user): the last of each group sorted that way.
    order = np.lexsort((revision, user, prompt))
    last = np.ones(order.size, dtype=bool)
    if order.size > 1:
        same = (prompt[order][1:] == prompt[order][:-1]) & (user[order][1:] == user[order][:-1])
        last[:-1] = ~same
    keep = np.sort(order[last])
    out: dict[str, Any] = {name: column[keep] for name, column in columns.items()}
    out["submitted"] = out["submitted"] == 1
    out["duration"] = np.where(out["duration"] >= 0, out["duration"], np.nan)
    out["rows"] = keep  # the position of each in the aggregated strings
    out["n_rows"] = int(count)
    # A ';' inside a stored string would shift the texts: then read them row by row.
    aligned = {
        k: bool(count) and t.count(";") == count - 1 for k, t in (("r", rankings), ("l", likerts))
    }
    out["ranking"] = metrics.parse_int_text(rankings) if aligned["r"] else None
    out["likert"] = metrics.parse_int_text(likerts) if aligned["l"] else None
    return out


def _row_texts(
    session: Session, project: Project, column: Any, rows: dict[str, Any], index: np.ndarray
) -> list[str | None]:
    """One JSON column of the annotations at ``index``, fetched row by row (the slow way, for
    data the bulk reader does not take: written outside the labeling service)."""
    a = Annotation
    query = select(a.prompt_id, a.user_id, a.revision, cast(column, Text)).where(
        a.project_id == project.id
    )
    by_key = {(p, u, r): text for p, u, r, text in _fetch(session.connection(), query)}
    return [by_key.get(key) for key in _keys(rows, index)]


Keyed = dict[tuple[int, int, int], str | None]


def _sparse_columns(conn: Connection, project: Project) -> tuple[Keyed, Keyed]:
    """(prompt, user, revision) → skip reason of the skipped annotations, and → flags (JSON
    text) of the flagged ones: the few rows that have either, in one query."""
    a = Annotation
    if conn.dialect.name == "postgresql":  # jsonb: no text conversion per row
        some_flags = a.flags.op("<>")(literal_column("'{}'::jsonb"))
    else:
        some_flags = cast(a.flags, Text) != "{}"
    skipped = a.status == AnnotationStatus.skipped
    query = select(
        a.prompt_id,
        a.user_id,
        a.revision,
        case((skipped, 1), else_=0),
        a.skip_reason,
        cast(a.flags, Text),
    ).where(a.project_id == project.id, skipped | some_flags)
    reasons: Keyed = {}
    flags: Keyed = {}
    for p, u, r, is_skip, reason, flag_text in _fetch(conn, query):
        if is_skip:
            reasons[(p, u, r)] = reason
        else:
            flags[(p, u, r)] = flag_text
    return reasons, flags


def _positions(
    rows: dict[str, Any], index: np.ndarray, keys: list[tuple[int, int, int]]
) -> np.ndarray:
    """For each (prompt, user, revision) key, its position in ``index`` (−1: not there)."""
    if not keys:
        return np.zeros(0, dtype=np.int64)
    p, u, r = (np.asarray(c, dtype=np.int64) for c in zip(*keys, strict=True))
    users = np.unique(np.concatenate([rows["user"][index], u]))
    width = users.size
    prompts = rows["prompt"][index]
    code = prompts * width + np.searchsorted(users, rows["user"][index])
    wanted = p * width + np.searchsorted(users, u)
    order = np.argsort(code)
    at = np.clip(np.searchsorted(code[order], wanted), 0, max(code.size - 1, 0))
    if code.size == 0:
        return np.full(p.size, -1, dtype=np.int64)
    j = order[at]
    hit = (code[j] == wanted) & (rows["revision"][index][j] == r)
    return np.where(hit, j, -1)


def _keys(rows: dict[str, Any], index: np.ndarray) -> list[tuple[int, int, int]]:
    return list(
        zip(
            rows["prompt"][index].tolist(),
            rows["user"][index].tolist(),
            rows["revision"][index].tolist(),
            strict=True,
        )
    )


def _fetch(conn: Connection, query: Any) -> list[tuple[Any, ...]]:
    """The rows as the driver returns them: plain tuples, without building a SQLAlchemy row
    per tuple (a third of the time on 250,000 rows). The columns selected need no result
    processing (integers, text)."""
    result = conn.execute(query)
    try:
        return result.cursor.fetchall()
    finally:
        result.close()


def _rank_table(
    session: Session, project: Project, rows: dict[str, Any], sub: np.ndarray
) -> metrics.RankTable:
    prompts, users, first = rows["prompt"][sub], rows["user"][sub], rows["first"][sub]
    parsed = rows["ranking"]
    if parsed is not None:
        table = metrics.encode_ranking_lists(
            prompts,
            users,
            parsed.take(rows["rows"][sub], rows["n_rows"]),
            sub.size,
            first_shown=first,
        )
        if table is not None:
            return table
    texts = _row_texts(session, project, Annotation.ranking, rows, sub)
    rankings = [_ranking_or_empty(orjson.loads(t) if t else []) for t in texts]
    table = metrics.encode_rankings(prompts, users, rankings)
    table.first[:] = np.where(first >= 0, table.slots_of(first), -1)
    return table


def _ranking_or_empty(value: Any) -> list[list[int]]:
    if not isinstance(value, list) or not all(isinstance(g, list) for g in value):
        return []
    groups = [[c for c in g if isinstance(c, int) and not isinstance(c, bool)] for g in value]
    return [g for g in groups if g]


def _completions(
    conn: Connection, project: Project
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str | None]]:
    """Id, model (an index into the returned names) and length (UTF-8 bytes) of the project's
    completions: one row per model, "id:length,…" aggregated by the database and read by
    numpy. Bytes, not characters: counting characters decodes every text (four times the
    time of the whole query on PostgreSQL), and which of two answers is longer rarely
    differs."""
    if conn.dialect.name == "postgresql":
        size: Any = func.octet_length(Completion.text)
    else:  # SQLite < 3.43 has no octet_length()
        size = func.length(cast(Completion.text, LargeBinary))
    pair = cast(Completion.id, Text) + ":" + cast(size, Text)
    query = (
        select(Completion.model, func.aggregate_strings(pair, ","))
        .join(Prompt, Completion.prompt_id == Prompt.id)
        .where(Prompt.project_id == project.id)
        .group_by(Completion.model)
    )
    ids, lengths, groups, names = [], [], [], []
    for model, text in _fetch(conn, query):
        parsed = metrics.parse_int_json([text])
        if parsed is None:  # cannot happen: "digits:digits,…"
            raise ValueError("unexpected completion lengths")
        ids.append(parsed.value[0::2])
        lengths.append(parsed.value[1::2])
        groups.append(np.full(parsed.value.size // 2, len(names), dtype=np.int64))
        names.append(model)
    if not ids:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), []
    return (
        np.concatenate(ids),
        np.concatenate(groups),
        np.concatenate(lengths).astype(np.float64),
        names,
    )


def _usernames(session: Session, user_ids: np.ndarray) -> dict[int, str]:
    if user_ids.size == 0:
        return {}
    ids = [int(u) for u in user_ids]
    query = select(User.id, User.username).where(User.id.in_(ids))
    return {user_id: name for user_id, name in session.execute(query)}


def _progress(
    session: Session,
    project: Project,
    rows: dict[str, Any],
    submitted: np.ndarray,
    skip_reasons: Keyed,
) -> ProgressStats:
    overlap = project.overlap
    total, complete, started = session.execute(
        select(
            func.count(),
            func.coalesce(func.sum(case((Prompt.annotation_count >= overlap, 1), else_=0)), 0),
            func.coalesce(
                func.sum(
                    case(
                        (
                            (Prompt.annotation_count < overlap)
                            & ((Prompt.annotation_count > 0) | (Prompt.open_leases > 0)),
                            1,
                        ),
                        else_=0,
                    )
                ),
                0,
            ),
        ).where(Prompt.project_id == project.id)
    ).one()
    n_sub, n_skip = int(submitted.sum()), int((~submitted).sum())
    durations = rows["duration"][submitted]
    durations = durations[~np.isnan(durations)]
    reasons = Counter(
        (skip_reasons.get(key) or "").strip().casefold() or None
        for key in _keys(rows, np.flatnonzero(~submitted))
    )
    top = reasons.most_common(MAX_SKIP_REASONS)
    listed = [SkipReasonCount(reason=r, count=n) for r, n in top]
    rest = n_skip - sum(n for _, n in top)
    if rest:
        listed.append(SkipReasonCount(reason="other", count=rest))
    return ProgressStats(
        prompts=int(total),
        complete=int(complete),
        in_progress=int(started),
        untouched=int(total) - int(complete) - int(started),
        submitted=n_sub,
        skipped=n_skip,
        skip_rate=metrics.ratio(n_skip, n_sub + n_skip),
        median_duration_ms=float(np.median(durations)) if durations.size else None,
        skip_reasons=listed,
        days=_days(rows["day"], submitted),
    )


def _days(day: np.ndarray, submitted: np.ndarray) -> list[DayCount]:
    if day.size == 0:
        return []
    first, last = int(day.min()), int(day.max())
    first = max(first, last - MAX_DAYS + 1)
    span = last - first + 1
    inside = day >= first
    sub = np.bincount(day[inside & submitted] - first, minlength=span)
    skip = np.bincount(day[inside & ~submitted] - first, minlength=span)
    origin = date(1970, 1, 1)
    return [
        DayCount(
            day=origin + timedelta(days=first + i), submitted=int(sub[i]), skipped=int(skip[i])
        )
        for i in range(span)
    ]


# --------------------------------------------------------------------------- pieces


def _likert_scores(
    session: Session,
    project: Project,
    table: metrics.RankTable,
    rows: dict[str, Any],
    sub: np.ndarray,
) -> np.ndarray:
    """(A, K) Likert score per slot (NaN = none), from each annotation's {"<id>": score}."""
    scores = np.full((table.n, table.k), np.nan)
    if table.k == 0:
        return scores
    parsed = rows["likert"]
    if parsed is not None:
        parsed = parsed.take(rows["rows"][sub], rows["n_rows"])
        per_row = np.bincount(parsed.row, minlength=sub.size)
        if not (per_row % 2).any():
            # Every text holds an even count (key, score, key, score…), so each starts at an
            # even position of the flat array: keys are exactly the even positions.
            is_key = np.arange(parsed.value.size) % 2 == 0
            owner = parsed.row[is_key]
            cids, values = parsed.value[is_key], parsed.value[~is_key].astype(np.float64)
            slots = table.slots_of(cids)
            ok = slots >= 0
            scores[owner[ok], slots[ok]] = values[ok]
            return scores
    texts = _row_texts(session, project, Annotation.likert, rows, sub)
    for a, text in enumerate(texts):
        value = orjson.loads(text) if text else {}
        for key, score in value.items() if isinstance(value, dict) else ():
            if str(key).isdigit() and isinstance(score, int | float):
                slot = int(table.slots_of(np.asarray([int(key)]))[0])
                if slot >= 0:
                    scores[a, slot] = score
    return scores


def _flags(texts: Keyed, rows: dict[str, Any], sub: np.ndarray) -> tuple[np.ndarray, Counter[str]]:
    """Per submitted annotation: has at least one flag; and how often each flag was given."""
    flagged = np.zeros(sub.size, dtype=bool)
    counts: Counter[str] = Counter()
    if not texts:
        return flagged, counts
    where = _positions(rows, sub, list(texts))
    for key, i in zip(texts, where, strict=True):
        value = orjson.loads(texts[key] or "null") if i >= 0 else None
        if not isinstance(value, dict):
            continue
        labels = [f for fs in value.values() if isinstance(fs, list) for f in fs]
        flagged[i] = bool(labels)
        counts.update(str(f) for f in labels)
    return flagged, counts


def _bias(wins: float, n: float, expected_sum: float, longer: float, pairs: float) -> BiasStats:
    expected = expected_sum / n if n else None
    return BiasStats(
        first_shown_wins=int(wins),
        first_shown_n=int(n),
        position_rate=metrics.ratio(wins, n),
        position_expected=expected,
        position_p=metrics.binomial_p(int(wins), int(n), expected) if expected else None,
        longer_wins=int(longer),
        length_pairs=int(pairs),
        length_rate=metrics.ratio(longer, pairs),
        length_p=metrics.binomial_p(int(longer), int(pairs), 0.5) if pairs else None,
    )


def _leaderboard(
    table: metrics.RankTable,
    comp_ids: np.ndarray,
    comp_group: np.ndarray,
    group_names: list[str | None],
    *,
    resamples: int,
    seed: int,
) -> tuple[list[ModelStats], list[ModelPairStats]]:
    """Bradley–Terry strengths of the models from their strict pairs, with bootstrap intervals
    (prompts resampled), and each model's win rate against each other."""
    if table.n == 0 or comp_ids.size == 0:
        return [], []
    ranked = table.slots_of(comp_ids) >= 0
    counts = np.bincount(comp_group[ranked], minlength=len(group_names))
    usage = Counter({m: int(counts[g]) for g, m in enumerate(group_names) if m and counts[g]})
    names = sorted(m for m, _ in usage.most_common(MAX_MODELS))
    if len(names) < 2:
        return [], []
    index = {m: i for i, m in enumerate(names)}
    code_of_group = np.asarray([index.get(m, -1) if m else -1 for m in group_names], np.int64)
    models = table.per_slot(comp_ids, code_of_group[comp_group], -1)
    rows, pairs = metrics.model_wins(table, models, len(names))
    m = len(names)
    wins = metrics.win_matrix(rows.sum(0), pairs, m)
    strengths = bradley_terry(
        m, [(w, lo, float(wins[w, lo])) for w in range(m) for lo in range(m) if wins[w, lo]]
    )
    samples = metrics.bradley_terry_many(
        metrics.win_matrix(metrics.resample_sums(rows, resamples=resamples, seed=seed), pairs, m)
    )
    order = sorted(range(m), key=lambda i: (-strengths[i], names[i]))
    out = []
    for rank, i in enumerate(order, start=1):
        low, high = metrics.interval(samples[:, i])
        won, played = wins[i].sum(), wins[i].sum() + wins[:, i].sum()
        out.append(
            ModelStats(
                model=names[i],
                rank=rank,
                strength=strengths[i],
                ci_low=low,
                ci_high=high,
                wins=int(won),
                comparisons=int(played),
                win_rate=metrics.ratio(won, played),
            )
        )
    matrix = [
        ModelPairStats(
            model=names[i],
            opponent=names[j],
            wins=int(wins[i, j]),
            losses=int(wins[j, i]),
            win_rate=metrics.ratio(wins[i, j], wins[i, j] + wins[j, i]),
        )
        for i in order
        for j in order
        if i != j and wins[i, j] + wins[j, i] > 0
    ]
    return out, matrix


# --------------------------------------------------------------------------- CSV


def stats_csv(
    session: Session, *, slug: str, secret: str, table: CsvTable = "annotators"
) -> tuple[str, str]:
    """One table of :func:`project_stats` as CSV: ``(file name, text)``."""
    stats = project_stats(session, slug=slug, secret=secret)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    if table == "annotators":
        header = [
            "username",
            "pseudonym",
            "submitted",
            "skipped",
            "median_duration_ms",
            "agreement",
            "agreement_compared",
            "consensus",
            "consensus_compared",
            "position_rate",
            "position_expected",
            "position_p",
            "length_rate",
            "length_pairs",
            "length_p",
            "flag_rate",
            "outlier",
            "outlier_reasons",
        ]
        writer.writerow(header)
        for a in stats.annotators:
            row = a.model_dump()
            row["outlier_reasons"] = " ".join(a.outlier_reasons)
            writer.writerow([_cell(row[h]) for h in header])
    elif table == "models":
        header = ["rank", "model", "strength", "ci_low", "ci_high", "wins", "comparisons"]
        writer.writerow([*header, "win_rate"])
        for m in stats.models:
            row = m.model_dump()
            writer.writerow([_cell(row[h]) for h in [*header, "win_rate"]])
    elif table == "pairs":
        header = ["model", "opponent", "wins", "losses", "win_rate"]
        writer.writerow(header)
        for p in stats.model_pairs:
            row = p.model_dump()
            writer.writerow([_cell(row[h]) for h in header])
    elif table == "days":
        writer.writerow(["day", "submitted", "skipped"])
        for d in stats.progress.days:
            writer.writerow([d.day.isoformat(), d.submitted, d.skipped])
    else:
        writer.writerow(["metric", "value"])
        for name, value in _summary(stats):
            writer.writerow([name, _cell(value)])
    return f"{stats.slug}-{table}.csv", buffer.getvalue()


def _summary(stats: ProjectStats) -> list[tuple[str, Any]]:
    p, a, b = stats.progress, stats.agreement, stats.bias
    return [
        ("prompts", p.prompts),
        ("complete", p.complete),
        ("in_progress", p.in_progress),
        ("untouched", p.untouched),
        ("submitted", p.submitted),
        ("skipped", p.skipped),
        ("skip_rate", p.skip_rate),
        ("median_duration_ms", p.median_duration_ms),
        ("pairwise_agreement", a.pairwise.rate),
        ("pairwise_agreement_ci_low", a.pairwise.ci_low),
        ("pairwise_agreement_ci_high", a.pairwise.ci_high),
        ("pairwise_compared", a.pairwise.compared),
        ("ranking_alpha_ordinal", a.ranking_alpha),
        ("likert_alpha_interval", a.likert_alpha),
        ("likert_exact", a.likert_exact),
        ("likert_within_one", a.likert_within_one),
        ("position_rate", b.position_rate),
        ("position_expected", b.position_expected),
        ("length_rate", b.length_rate),
    ]


def _cell(value: Any) -> Any:
    """Numbers as they are (floats to 6 significant digits), None as empty; text that a
    spreadsheet would run as a formula gets a leading apostrophe."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value
