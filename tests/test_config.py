"""Settings: defaults, and a secret key that is generated once, never hard-coded."""

from __future__ import annotations

import stat

from app.config import Settings


def test_defaults_put_sqlite_in_the_data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("PREFERO_DATABASE_URL", raising=False)
    s = Settings(data_dir=tmp_path)
    assert s.database_url == f"sqlite:///{tmp_path / 'prefero.db'}"
    assert s.is_sqlite
    assert s.max_import_bytes == 200 * 1024 * 1024


def test_environment_prefix(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFERO_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("PREFERO_DATABASE_URL", "postgresql+psycopg://u@h/db")
    s = Settings()
    assert s.data_dir == tmp_path
    assert not s.is_sqlite


def test_secret_key_generated_once_with_0600(tmp_path):
    s = Settings(data_dir=tmp_path / "d")
    key = s.get_secret_key()
    path = tmp_path / "d" / "secret_key"
    assert len(key) >= 48
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Settings(data_dir=tmp_path / "d").get_secret_key() == key
    assert Settings(data_dir=tmp_path / "other").get_secret_key() != key


def test_configured_secret_key_wins(tmp_path):
    s = Settings(data_dir=tmp_path, secret_key="from-env")
    assert s.get_secret_key() == "from-env"
    assert not (tmp_path / "secret_key").exists()
    assert "from-env" not in repr(s)
