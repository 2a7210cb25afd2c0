"""Settings, read from the environment (prefix ``PREFERO_``).

Nothing here has an insecure default: when ``PREFERO_SECRET_KEY`` is unset a random key is
generated once and stored in the data directory with 0600 permissions.
"""

from __future__ import annotations

import os
import secrets
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ROOT = Path(__file__).resolve().parent.parent
"""The repository root: ``migrations/``, ``templates/`` and ``alembic.ini`` live here."""

SECRET_FILE_NAME = "secret_key"


MIN_REQUEST_THREADS = 4
"""Request threads per app process at least (slow non-database work must not hold them all)."""


class Settings(BaseSettings):
    """Service settings. Every field is documented in the README's configuration table."""

    model_config = SettingsConfigDict(env_prefix="PREFERO_", extra="ignore")

    data_dir: Path = Field(
        default=Path(".prefero"),
        description="Directory for the SQLite database, the generated secret key and caches.",
    )
    database_url: str = Field(
        default="",
        description="SQLAlchemy URL. Default: sqlite:///<data dir>/prefero.db. "
        "PostgreSQL: postgresql+psycopg://user:password@host:5432/dbname.",
    )
    secret_key: str = Field(
        default="",
        description="Key for signing sessions and CSRF tokens. If unset, generated once and "
        "stored in <data dir>/secret_key (mode 0600).",
        repr=False,
    )
    max_import_bytes: int = Field(
        default=200 * 1024 * 1024,
        description="Largest accepted import body in bytes (compressed and uncompressed); "
        "larger requests get 413.",
    )
    max_request_bytes: int = Field(
        default=1024 * 1024,
        description="Largest accepted request body in bytes for every route but the imports "
        "(which allow max_import_bytes); larger requests get 413.",
    )
    max_open_leases: int = Field(
        default=6,
        description="Live leases one user may hold at once, across projects; asking for a new "
        "task beyond that gets 429.",
    )
    token_cache_seconds: float = Field(
        default=5.0,
        ge=0,
        description="Seconds an app process may rely on its last check of an API token, "
        "saving a database round trip per request: a token revoked or an account deactivated "
        "through another process is refused within this time (at once by the process that "
        "did it). 0 checks every request against the database.",
    )
    log_format: Literal["auto", "json", "text"] = Field(
        default="auto",
        description="Log lines of `prefero serve`: json (one object per line), text, or auto "
        "(json unless standard error is a terminal).",
    )
    db_pool_size: int = Field(
        default=5,
        description="Connections kept per app process, and the number of threads it runs "
        "database work in (at least 4); on PostgreSQL up to as many more for the labeling "
        "routes' statements on the event loop.",
    )
    db_statement_timeout_ms: int = Field(
        default=30_000,
        description="PostgreSQL statement timeout for request work, in milliseconds (0 = none).",
    )

    session_max_age_s: int = Field(
        default=7 * 24 * 3600, description="Lifetime of a browser login session, in seconds."
    )
    session_cookie_secure: bool = Field(
        default=False,
        description=(
            "Always mark cookies Secure. Requests seen as HTTPS (directly, or by "
            "X-Forwarded-Proto from a trusted proxy) get Secure cookies anyway."
        ),
    )
    login_max_failures: int = Field(
        default=10,
        description="Failed logins allowed per minute per username and per client IP; "
        "further attempts get 429.",
    )

    generation_threads: int = Field(
        default=0, description="CPU threads for local generation (0 = all cores)."
    )
    openai_base_url: str = Field(
        default="",
        description="Base URL of an OpenAI-compatible server for the 'openai' generation backend "
        "(vLLM, TGI, llama.cpp server), e.g. http://127.0.0.1:8080/v1.",
    )
    openai_api_key: str = Field(
        default="", description="API key sent to that server (never logged).", repr=False
    )
    openai_max_concurrency: int = Field(
        default=8, description="Concurrent requests to the OpenAI-compatible server."
    )
    openai_timeout_s: float = Field(
        default=60.0, description="Timeout of one request to the OpenAI-compatible server."
    )

    @model_validator(mode="after")
    def _defaults(self) -> Settings:
        self.data_dir = self.data_dir.expanduser().resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'prefero.db'}"
        return self

    @property
    def request_threads(self) -> int:
        """Threads per app process for request work, and connections its pool keeps: the
        same number (``db_pool_size``, at least 4), so a thread never waits for a connection
        and none is opened and closed per request (the pool's overflow)."""
        return max(MIN_REQUEST_THREADS, self.db_pool_size)

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    def ensure_data_dir(self) -> Path:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return self.data_dir

    def get_secret_key(self) -> str:
        """The configured key, or the one stored in the data dir (created on first use)."""
        if self.secret_key:
            return self.secret_key
        path = self.ensure_data_dir() / SECRET_FILE_NAME
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            key = path.read_text().strip()
            if key:
                return key
            raise RuntimeError(f"{path} is empty; delete it or set PREFERO_SECRET_KEY") from None
        key = secrets.token_urlsafe(48)
        with os.fdopen(fd, "w") as f:
            f.write(key + "\n")
        return key


@lru_cache
def get_settings() -> Settings:
    return Settings()
