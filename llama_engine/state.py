"""The state directory: where everything that must outlive the process lives (datasets,
post-training jobs and checkpoints, memory banks, agents), one SQLite database per concern.

Every database is opened in WAL mode with ``synchronous=FULL``: a transaction that has
returned from ``commit()`` is on disk, so a ``kill -9`` right after a 200 loses nothing.
"""
from __future__ import annotations

import os
import sqlite3
from pathlib import Path

STATE_DIR_ENV = "LLAMA_ENGINE_STATE_DIR"
APP_NAME = "llama-engine"
BUSY_TIMEOUT_MS = 10_000  # a writer waits this long for another writer before "locked"


def default_state_dir() -> Path:
    """``$LLAMA_ENGINE_STATE_DIR``, else ``$XDG_DATA_HOME/llama-engine``, else
    ``~/.local/share/llama-engine`` (the XDG base-directory default)."""
    if os.environ.get(STATE_DIR_ENV):
        return Path(os.environ[STATE_DIR_ENV])
    data_home = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return Path(data_home) / APP_NAME


def resolve_state_dir(path: str | os.PathLike | None = None) -> Path:
    """The state directory ``path`` (or the default), created if missing.

    Raises NotADirectoryError when ``path`` exists and is not a directory."""
    # absolute: job records keep paths under it, served as file:// URLs after a restart
    state_dir = (Path(path) if path is not None else default_state_dir()).absolute()
    if state_dir.exists() and not state_dir.is_dir():
        raise NotADirectoryError(f"state directory {state_dir} is not a directory")
    state_dir.mkdir(parents=True, exist_ok=True)
    return state_dir


def open_database(path: str | os.PathLike) -> sqlite3.Connection:
    """A connection to the SQLite database at ``path`` in WAL mode, fsync on every commit
    (``synchronous=FULL``), foreign keys enforced, waiting up to BUSY_TIMEOUT_MS for locks.

    ``check_same_thread`` is off so one connection can serve an asyncio server's executor
    threads; callers serialise writes on it (a lock) or open one connection per thread."""
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False,
                           isolation_level=None)  # explicit BEGIN/COMMIT, no implicit ones
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    return conn
