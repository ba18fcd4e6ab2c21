"""The state directory and its SQLite connections."""
import pytest

from llama_engine.state import default_state_dir, open_database, resolve_state_dir


def test_default_state_dir_follows_env_then_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("LLAMA_ENGINE_STATE_DIR", str(tmp_path / "explicit"))
    assert default_state_dir() == tmp_path / "explicit"
    monkeypatch.delenv("LLAMA_ENGINE_STATE_DIR")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_state_dir() == tmp_path / "xdg" / "llama-engine"


def test_resolve_state_dir_creates_it_and_refuses_a_file(tmp_path):
    assert resolve_state_dir(tmp_path / "a" / "b").is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="file"):
        resolve_state_dir(tmp_path / "file")


def test_open_database_is_wal_with_full_sync(tmp_path):
    conn = open_database(tmp_path / "x.sqlite")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    conn.execute("CREATE TABLE t (x)")
    conn.execute("INSERT INTO t VALUES (1)")  # autocommit: visible to a second connection
    other = open_database(tmp_path / "x.sqlite")
    assert other.execute("SELECT x FROM t").fetchall() == [(1,)]


def test_resolve_state_dir_makes_a_relative_path_absolute(monkeypatch, tmp_path):
    """Job records keep paths under it, served as file:// URLs (which must be absolute)."""
    monkeypatch.chdir(tmp_path)
    state = resolve_state_dir("state")
    assert state.is_absolute() and state == tmp_path / "state" and state.is_dir()
