"""Post-training jobs: their state in SQLite under the state directory (status, timestamps,
resources, checkpoints, one log record per step) and the manager that runs them one at a
time, each in its own worker process, so a crash in training never takes the server down.

A job is ``scheduled`` until the device is free, ``running`` while its worker lives, then
``completed`` or ``failed`` (a crash, an error, or a cancel; the reason is in its logs). A
job still ``running`` when the server comes back from a restart is scheduled again and its
worker resumes from the job's last checkpoint.

An FSDP job's worker runs torch's launcher (``torch.distributed.run``), which starts one
worker process per rank; a cancel stops the launcher, which stops its ranks (and a rank dies
with its launcher whatever happens to it); a failed rank fails the job with the launcher's
reason, naming the rank and its signal or exception."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from llama_engine.errors import NotFoundError
from llama_engine.state import open_database

DATABASE_FILE = "post_training.sqlite3"
JOBS_DIR = "post_training"
SCHEDULED, RUNNING, COMPLETED, FAILED = "scheduled", "running", "completed", "failed"
FINISHED = (COMPLETED, FAILED)
POLL_INTERVAL_S = 0.2
WORKER_MODULE = "llama_engine.training.worker"
CANCEL_GRACE_S = 5.0  # SIGTERM, then SIGKILL if the worker is still there
LOG = logging.getLogger("llama_engine.training.jobs")
SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_uuid TEXT PRIMARY KEY,
    spec TEXT NOT NULL,            -- JSON: what the worker runs (worker.py)
    status TEXT NOT NULL,
    scheduled_at REAL NOT NULL,
    started_at REAL,
    completed_at REAL,
    resources TEXT,                -- JSON
    output_dir TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    job_uuid TEXT NOT NULL REFERENCES jobs(job_uuid),
    iters INTEGER NOT NULL,
    path TEXT NOT NULL,
    PRIMARY KEY (job_uuid, iters)
);
CREATE TABLE IF NOT EXISTS logs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_uuid TEXT NOT NULL REFERENCES jobs(job_uuid),
    record TEXT NOT NULL           -- JSON, one per step or lifecycle event
);
CREATE INDEX IF NOT EXISTS logs_by_job ON logs (job_uuid, id);
"""


class JobExistsError(ValueError):
    pass


class JobNotFoundError(NotFoundError):
    default_message = "job not found"


@dataclass(frozen=True)
class JobRecord:
    job_uuid: str
    spec: dict[str, Any]
    status: str
    scheduled_at: float
    started_at: Optional[float]
    completed_at: Optional[float]
    resources: Optional[dict[str, Any]]
    output_dir: Path
    checkpoints: list[tuple[int, Path]]


def job_dir(state_dir: Path, job_uuid: str) -> Path:
    """Where a job's checkpoints and data copies live (a hash: uuids may hold any text)."""
    return Path(state_dir) / JOBS_DIR / hashlib.sha256(job_uuid.encode()).hexdigest()[:24]


class JobStore:
    """The jobs table; one instance per process (server and each worker), safe across
    threads. SQLite in WAL mode lets the worker write while the server reads."""

    def __init__(self, state_dir: str | os.PathLike):
        self.state_dir = Path(state_dir)
        self._db = open_database(self.state_dir / DATABASE_FILE)
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()

    def _execute(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._db.execute(sql, args)

    def create(self, job_uuid: str, spec: dict[str, Any]) -> JobRecord:
        """Register a scheduled job. Raises JobExistsError."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.execute(
                    "INSERT INTO jobs (job_uuid, spec, status, scheduled_at, output_dir) "
                    "VALUES (?, ?, ?, ?, ?)", (job_uuid, json.dumps(spec), SCHEDULED, time.time(),
                                               spec["output_dir"]))
            except sqlite3.IntegrityError:
                self._db.execute("ROLLBACK")
                raise JobExistsError(f"job {job_uuid!r} already exists") from None
            self._db.execute("INSERT INTO logs (job_uuid, record) VALUES (?, ?)",
                             (job_uuid, json.dumps({"event": SCHEDULED})))
            self._db.execute("COMMIT")
        return self.get(job_uuid)

    def exists(self, job_uuid: str) -> bool:
        return self._execute("SELECT 1 FROM jobs WHERE job_uuid = ?", (job_uuid,)).fetchone() is not None

    def get(self, job_uuid: str) -> JobRecord:
        """Raises JobNotFoundError."""
        row = self._execute(
            "SELECT job_uuid, spec, status, scheduled_at, started_at, completed_at, resources, "
            "output_dir FROM jobs WHERE job_uuid = ?", (job_uuid,)).fetchone()
        if row is None:
            raise JobNotFoundError(f"job {job_uuid!r} not found")
        checkpoints = self._execute(
            "SELECT iters, path FROM checkpoints WHERE job_uuid = ? ORDER BY iters",
            (job_uuid,)).fetchall()
        return JobRecord(row[0], json.loads(row[1]), row[2], row[3], row[4], row[5],
                         json.loads(row[6]) if row[6] else None, Path(row[7]),
                         [(iters, Path(path)) for iters, path in checkpoints])

    def jobs_with_status(self, status: str) -> list[str]:
        rows = self._execute("SELECT job_uuid FROM jobs WHERE status = ? ORDER BY scheduled_at",
                             (status,)).fetchall()
        return [r[0] for r in rows]

    def set_status(self, job_uuid: str, status: str, record: Optional[dict] = None,
                   only_from: Optional[str] = None) -> bool:
        """Move the job to ``status`` (stamping started_at / completed_at) and log ``record``;
        with ``only_from``, only if the job is in that status now. Returns whether it moved."""
        now = time.time()
        stamp = {RUNNING: ", started_at = COALESCE(started_at, ?)",
                 COMPLETED: ", completed_at = ?", FAILED: ", completed_at = ?"}.get(status, "")
        args: list[Any] = [status] + ([now] if stamp else []) + [job_uuid]
        guard = ""
        if only_from is not None:
            guard, args = " AND status = ?", args + [only_from]
        with self._lock:
            self._db.execute("BEGIN")
            moved = self._db.execute(f"UPDATE jobs SET status = ?{stamp} WHERE job_uuid = ?{guard}",
                                     args).rowcount == 1
            if moved and record is not None:
                self._db.execute("INSERT INTO logs (job_uuid, record) VALUES (?, ?)",
                                 (job_uuid, json.dumps(record)))
            self._db.execute("COMMIT")
        return moved

    def set_resources(self, job_uuid: str, resources: dict[str, Any]) -> None:
        self._execute("UPDATE jobs SET resources = ? WHERE job_uuid = ?",
                      (json.dumps(resources), job_uuid))

    def append_log(self, job_uuid: str, record: dict) -> None:
        self._execute("INSERT INTO logs (job_uuid, record) VALUES (?, ?)",
                      (job_uuid, json.dumps(record)))

    def logs_after(self, job_uuid: str, after_id: int = 0) -> list[tuple[int, str]]:
        """(id, JSON record) of the job's log records past ``after_id``, in order."""
        return self._execute("SELECT id, record FROM logs WHERE job_uuid = ? AND id > ? ORDER BY id",
                             (job_uuid, after_id)).fetchall()

    def add_checkpoint(self, job_uuid: str, iters: int, path: Path) -> None:
        self._execute("INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?)",
                      (job_uuid, iters, str(path)))

    def close(self) -> None:
        self._db.close()


class JobManager:
    """Starts scheduled jobs one at a time (one device), each as
    ``python -m llama_engine.training.worker``, watches them, and cancels them."""

    def __init__(self, state_dir: str | os.PathLike, max_running: int = 1):
        self.state_dir = Path(state_dir)
        self.store = JobStore(state_dir)
        self.max_running = max_running
        self._workers: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        """Reschedule jobs a previous server left running, then start the scheduling thread."""
        for job_uuid in self.store.jobs_with_status(RUNNING):
            job = self.store.get(job_uuid)
            last = job.checkpoints[-1][0] if job.checkpoints else 0
            self.store.set_status(job_uuid, SCHEDULED, {"event": "resuming after a server restart",
                                                        "from_checkpoint_iters": last})
        self._thread = threading.Thread(target=self._run, name="post-training-jobs", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and the workers; their jobs stay ``running`` and resume from their
        last checkpoint when a server starts on this state directory again."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            workers = list(self._workers.values())
            self._workers.clear()
        for process in workers:
            _terminate(process)
        self.store.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._reap()
                self._launch()
            except Exception:  # keep scheduling whatever one job did
                LOG.exception("post-training scheduler step failed")
            self._stop.wait(POLL_INTERVAL_S)

    def _reap(self) -> None:
        with self._lock:
            finished = [(u, p) for u, p in self._workers.items() if p.poll() is not None]
            for job_uuid, _ in finished:
                del self._workers[job_uuid]
        for job_uuid, process in finished:  # a worker that ends its job sets its status first
            self.store.set_status(job_uuid, FAILED, {
                "event": FAILED, "reason": f"the worker process exited with code {process.returncode}"},
                only_from=RUNNING)

    def _launch(self) -> None:
        with self._lock:  # cancel() takes the same lock: a job is claimed and spawned at once
            free = self.max_running - len(self._workers)
            for job_uuid in self.store.jobs_with_status(SCHEDULED)[:max(free, 0)]:
                if not self.store.set_status(job_uuid, RUNNING, {"event": RUNNING}, only_from=SCHEDULED):
                    continue
                args = ["--state-dir", str(self.state_dir), "--job-uuid", job_uuid]
                recipe = self.store.get(job_uuid).spec["recipe"]
                if recipe.get("fsdp"):  # the worker runs torch's launcher, which runs the ranks
                    args += ["--nproc-per-node", str(recipe.get("nproc_per_node", 1))]
                command = [sys.executable, "-m", WORKER_MODULE, *args]
                # stdin is a pipe the worker watches: when this process dies, however it
                # dies, the pipe closes and the worker exits rather than train unsupervised.
                self._workers[job_uuid] = subprocess.Popen(command, stdin=subprocess.PIPE,
                                                           start_new_session=True)

    def cancel(self, job_uuid: str) -> None:
        """Fail a scheduled or running job now (its worker is stopped within seconds); a
        finished job is left as it is. Raises JobNotFoundError."""
        with self._lock:
            if self.store.get(job_uuid).status in FINISHED:
                return
            process = self._workers.pop(job_uuid, None)
            # failed first: the worker, stopping, must not report the job completed
            self.store.set_status(job_uuid, FAILED, {"event": FAILED, "reason": "cancelled by the user"})
        if process is not None:
            _terminate(process)


def _terminate(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(CANCEL_GRACE_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
