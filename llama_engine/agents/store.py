"""Agents that outlive the process: one row per agent in ``agents.sqlite3`` under the state
directory (WAL, fsync on commit), its configuration as JSON."""
from __future__ import annotations

import json
import os
import sqlite3
import threading
import time

from llama_engine.agents.config import AgentConfig
from llama_engine.errors import NotFoundError
from llama_engine.state import open_database, resolve_state_dir

DATABASE_FILE = "agents.sqlite3"
SCHEMA = """
CREATE TABLE IF NOT EXISTS agents (
    uuid TEXT PRIMARY KEY,
    config TEXT NOT NULL,
    created_at REAL NOT NULL
)
"""


class AgentNotFoundError(NotFoundError):
    default_message = "agent not found"


class AgentExistsError(ValueError):
    """An agent uuid that is already taken."""


class AgentStore:
    """Create, read and delete agents; every write is one committed transaction."""

    def __init__(self, state_dir: str | os.PathLike | None = None):
        self._conn = open_database(resolve_state_dir(state_dir) / DATABASE_FILE)
        self._conn.execute(SCHEMA)
        self._lock = threading.Lock()

    def create(self, config: AgentConfig) -> None:
        """Store ``config``; raises AgentExistsError if its uuid is taken."""
        with self._lock:
            try:
                self._conn.execute("INSERT INTO agents (uuid, config, created_at) VALUES (?, ?, ?)",
                                   (config.uuid, json.dumps(config.to_json()), time.time()))
            except sqlite3.IntegrityError:
                raise AgentExistsError(f"uuid: agent {config.uuid!r} already exists") from None

    def get(self, agent_uuid: str) -> AgentConfig:
        """The agent's configuration; raises AgentNotFoundError."""
        with self._lock:
            row = self._conn.execute("SELECT config FROM agents WHERE uuid = ?", (agent_uuid,)).fetchone()
        if row is None:
            raise AgentNotFoundError(f"no agent {agent_uuid!r}")
        return AgentConfig.from_json(json.loads(row[0]))

    def delete(self, agent_uuid: str) -> None:
        """Forget the agent; raises AgentNotFoundError."""
        with self._lock:
            deleted = self._conn.execute("DELETE FROM agents WHERE uuid = ?", (agent_uuid,)).rowcount
        if not deleted:
            raise AgentNotFoundError(f"no agent {agent_uuid!r}")

    def close(self) -> None:
        with self._lock:
            self._conn.close()
