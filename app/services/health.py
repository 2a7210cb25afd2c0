"""Readiness: the database answers and its schema is at the migrations' head."""

from __future__ import annotations

from functools import lru_cache

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, text

from app.config import ROOT


def alembic_config() -> Config:
    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(ROOT / "migrations"))
    return cfg


@lru_cache
def head_revisions() -> frozenset[str]:
    return frozenset(ScriptDirectory.from_config(alembic_config()).get_heads())


def readiness(engine: Engine) -> tuple[bool, str, str | None]:
    """``(ready, detail, current revision)``; never raises."""
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            current = frozenset(MigrationContext.configure(conn).get_current_heads())
    except Exception as e:  # any driver error means "not ready"
        return False, f"database unreachable: {type(e).__name__}", None
    rev = ",".join(sorted(current)) or None
    if current != head_revisions():
        return (
            False,
            "database schema is not at the latest migration (run `prefero db upgrade`)",
            rev,
        )
    return True, "ready", rev
