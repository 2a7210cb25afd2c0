"""Transaction helpers shared by the services (the only code that commits)."""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.db import in_autocommit

READ_COMMITTED = "READ COMMITTED"


def write_transaction(session: Session) -> None:
    """Start the session's transaction as a writer. Call it first thing in a service that writes.

    On SQLite this issues ``BEGIN IMMEDIATE`` (one writer at a time, waiting up to the busy
    timeout), so a service that reads before it writes never fails half-way with
    ``SQLITE_BUSY``: SQLite cannot upgrade a read transaction while another connection writes.
    A read-only transaction left open by earlier work on the session (authentication, a
    lookup) is ended first. On PostgreSQL row locks do this job: nothing changes, except in a
    session whose statements commit one by one (:func:`app.db.make_statement_session_factory`),
    which gets an ordinary transaction (on a connection taken afresh from the pool).
    """
    if session.get_bind().dialect.name != "sqlite":
        if in_autocommit(session):
            _end_reads(session)
            session.connection(execution_options={"isolation_level": READ_COMMITTED})
        return
    _end_reads(session)
    session.connection(execution_options={"sqlite_immediate": True})


def _end_reads(session: Session) -> None:
    if session.in_transaction():
        if session.new or session.dirty or session.deleted:
            raise RuntimeError("write_transaction() must come before any change to the session")
        session.commit()  # ends the read-only transaction; loaded objects stay usable
