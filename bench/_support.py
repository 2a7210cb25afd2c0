"""Helpers shared by the benchmark scripts (run as ``python bench/NAME.py``, so this module is
importable as ``_support``)."""

from __future__ import annotations

import shutil
import socket
import sys
from pathlib import Path

from sqlalchemy.engine import make_url


def libpq(sqlalchemy_url: str) -> str:
    """A libpq connection string from a SQLAlchemy ``postgresql+psycopg://`` URL."""
    url = make_url(sqlalchemy_url)
    parts = {
        "host": url.host or "127.0.0.1",
        "port": str(url.port or 5432),
        "user": url.username or "postgres",
        "dbname": url.database or "postgres",
    }
    if url.password:
        parts["password"] = str(url.password)
    return " ".join(f"{k}={v}" for k, v in parts.items())


def prefero_command() -> str:
    """The ``prefero`` executable of the running virtual environment."""
    exe = Path(sys.executable).parent / "prefero"
    if exe.exists():
        return str(exe)
    found = shutil.which("prefero")
    if not found:
        raise SystemExit("the `prefero` command was not found: activate the project's venv")
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
