"""The code interpreter's sandbox (issue 14 section 3): what code can and cannot do in the jail,
and the limits, timeout and process-group kill that also hold in the unsafe mode."""
from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import shutil
import socket
import struct
import tempfile
import threading
import time

import pytest

from llama_engine.agents import sandbox
from llama_engine.agents.sandbox import (CodeInterpreter, SandboxLimits,
                                         SandboxUnavailableError, sandbox_unavailable_reason)
from llama_engine.errors import RequestValidationError

UNAVAILABLE = sandbox_unavailable_reason()
needs_jail = pytest.mark.skipif(UNAVAILABLE is not None,
                                reason=f"bubblewrap cannot start the jail here: {UNAVAILABLE}")
# Small limits keep the hostile snippets cheap on a shared 2-core machine.
LIMITS = SandboxLimits(cpu_seconds=5, address_space_mb=512, processes=16, file_size_mb=1,
                       wall_seconds=3, output_chars=200)
MODES = [pytest.param(False, marks=needs_jail, id="jail"), pytest.param(True, id="unsafe")]


@pytest.fixture
def jail(tmp_path):
    interpreter = CodeInterpreter(tmp_path / "scratch", LIMITS)
    yield interpreter
    interpreter.close()


@pytest.fixture
def unjailed(tmp_path, monkeypatch):
    """An interpreter that believes bubblewrap is missing and was given the unsafe flag."""
    monkeypatch.setattr(sandbox, "sandbox_unavailable_reason", lambda: "pretend: no bwrap")
    interpreter = CodeInterpreter(tmp_path / "scratch", LIMITS, allow_unsafe=True)
    yield interpreter
    interpreter.close()


@pytest.fixture(params=MODES)
def interpreter(request):
    return request.getfixturevalue("unjailed" if request.param else "jail")


def processes_in(directory) -> list[int]:
    """Host pids whose working directory is ``directory``: every process a session starts."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.readlink(f"/proc/{pid}/cwd") == str(directory):
                found.append(int(pid))
        except OSError:
            continue
    return found


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (PNG spec, section 11.2.2)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_stdout_stderr_and_the_last_expression(interpreter):
    result = interpreter.run("s", "import sys\nprint(6 * 7)\nprint('oops', file=sys.stderr)\n"
                                  "[n * n for n in range(4)]")
    assert (result.stdout, result.stderr, result.error) == ("42\n[0, 1, 4, 9]\n", "oops\n", None)
    assert not result.timed_out


def test_output_of_child_processes_is_captured_and_truncated(interpreter):
    result = interpreter.run("s", "import os\nos.system('echo from-a-child')\nprint('x' * 1000)")
    assert result.stdout.startswith("from-a-child\n" + "x" * (200 - 13))
    assert result.stdout.endswith(f"[... {13 + 1001 - 200} characters truncated]")


def test_variables_persist_within_a_session_and_not_across(interpreter):
    assert interpreter.run("a", "secret = 'alpha'").error is None
    assert interpreter.run("a", "print(secret.upper())").stdout == "ALPHA\n"
    assert "NameError" in interpreter.run("b", "secret").error


def test_a_session_outlives_the_thread_that_started_it(interpreter):
    starter = threading.Thread(target=interpreter.run, args=("s", "kept = 'still here'"))
    starter.start()
    starter.join()
    time.sleep(0.2)  # a worker bound to the ended thread would be dying by now
    assert interpreter.run("s", "kept").stdout == "'still here'\n"


def test_calls_of_one_session_run_one_at_a_time(interpreter):
    interpreter.run("s", "count = 0")

    def add() -> None:
        for _ in range(10):
            interpreter.run("s", "before = count\nimport time\ntime.sleep(0.001)\n"
                                 "count = before + 1")
    threads = [threading.Thread(target=add) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert interpreter.run("s", "count").stdout == "30\n"


def test_a_worker_that_cannot_start_is_an_error_result(interpreter, monkeypatch):
    monkeypatch.setattr(sandbox, "WORKER_SCRIPT", interpreter.scratch_root / "missing.py")
    result = interpreter.run("s", "print(1)")
    assert result.error.startswith("killed: worker failed to start") and result.stdout == ""
    assert "missing.py" in result.error  # the interpreter's own message says what went wrong
    monkeypatch.undo()
    assert interpreter.run("s", "print(1)").stdout == "1\n"


def test_an_exception_is_a_traceback_of_the_user_code(interpreter):
    error = interpreter.run("s", "def f():\n    return 1 / 0\nf()").error
    assert error.startswith("Traceback") and error.endswith("ZeroDivisionError: division by zero\n")
    assert "return 1 / 0" in error and "sandbox_worker" not in error


def test_endless_loop_times_out_and_the_next_call_works(interpreter):
    interpreter.run("s", "kept = 1")
    result = interpreter.run("s", "while True:\n    pass")
    assert result.timed_out and result.error == "timed out after 3 s"
    after = interpreter.run("s", "print('alive')\nkept")
    assert after.stdout == "alive\n" and "NameError" in after.error  # a fresh worker


def test_the_cpu_limit_ends_the_call_but_keeps_the_session(tmp_path):
    limits = SandboxLimits(cpu_seconds=1, wall_seconds=30)
    mode = CodeInterpreter(tmp_path, limits, allow_unsafe=True)
    try:
        mode.run("s", "kept = 7")
        result = mode.run("s", "while True:\n    pass")
        assert not result.timed_out and result.error == "killed: CPU time limit of 1 s exceeded"
        assert mode.run("s", "kept").stdout == "7\n"
    finally:
        mode.close()


def test_a_timeout_kills_the_whole_process_group(interpreter):
    directory = interpreter.scratch_root / "s"
    interpreter.run("s", "import subprocess\nsubprocess.Popen(['sleep', '600'])")
    assert len(processes_in(directory)) >= 2  # the worker and its child (+ bwrap's two)
    result = interpreter.run("s", "subprocess.Popen(['sleep', '600'])\nwhile True:\n    pass")
    assert result.timed_out
    assert processes_in(directory) == []


def test_matplotlib_figures_come_back_as_png(interpreter):
    # Importing pyplot can take seconds on a loaded machine: not the timeout under test here.
    interpreter.limits = dataclasses.replace(LIMITS, wall_seconds=120)
    result = interpreter.run("s", "import matplotlib.pyplot as plt\n"
                                  "plt.figure(figsize=(2, 1), dpi=50)\nplt.plot([1, 3, 2])\n"
                                  "plt.figure(figsize=(3, 2), dpi=40)\nplt.show()")
    assert result.error is None
    assert [(mime, png_size(data)) for mime, data in result.attachments] == [
        ("image/png", (100, 50)), ("image/png", (120, 80))]
    assert interpreter.run("s", "plt.get_fignums()").stdout == "[]\n"  # closed after the call


def test_scratch_directory_is_per_session_and_removed_on_close(interpreter):
    interpreter.run("s", "open('notes.txt', 'w').write('kept')")
    directory = interpreter.scratch_root / "s"
    assert (directory / "notes.txt").read_text() == "kept"
    assert interpreter.run("s", "print(open('notes.txt').read())").stdout == "kept\n"
    interpreter.close_session("s")
    assert not directory.exists()


@pytest.mark.parametrize("session_id", ["", "../up", "a/b", ".hidden", "x" * 129])
def test_session_ids_must_be_plain_names(jail, session_id):
    with pytest.raises(RequestValidationError) as raised:
        jail.run(session_id, "pass")
    assert raised.value.field == "session_id"


def test_without_a_sandbox_it_refuses_unless_unsafe(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(sandbox, "sandbox_unavailable_reason", lambda: "pretend: no bwrap")
    with caplog.at_level(logging.WARNING, logger=sandbox.__name__):
        refusing = CodeInterpreter(tmp_path / "a")
    assert "disabled" in caplog.text and "pretend: no bwrap" in caplog.text
    with pytest.raises(SandboxUnavailableError, match="pretend: no bwrap"):
        refusing.run("s", "print(1)")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=sandbox.__name__):
        unsafe = CodeInterpreter(tmp_path / "b", allow_unsafe=True)
    assert "WITHOUT a sandbox" in caplog.text
    try:
        assert unsafe.run("s", "print(1)").stdout == "1\n"
    finally:
        unsafe.close()


@pytest.fixture
def listener():
    """A loopback TCP port that accepts connections from this (unjailed) process."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    yield server.getsockname()[1]
    server.close()


@needs_jail
def test_no_network(jail, unjailed, listener):
    connect = f"import socket\nsocket.create_connection(('127.0.0.1', {listener}), timeout=2)"
    assert unjailed.run("s", connect).error is None  # the port is open to an unjailed process
    assert "ConnectionRefusedError" in jail.run("s", connect).error
    interfaces = jail.run("s", "import socket\n[name for _, name in socket.if_nameindex()]")
    assert interfaces.stdout == "['lo']\n"


@needs_jail
def test_no_writes_outside_scratch(jail):
    # A host directory anyone may write to, outside the jail's private tmpfs mounts (so not
    # under /tmp, where a clone of this repo may well live): only the read-only root can stop
    # the write.
    private = ("/tmp", "/var/tmp", "/dev/shm")
    # (not the home folder: the jail shows its scratch directory there)
    candidates = [pathlib.Path(__file__).resolve().parent,
                  *map(pathlib.Path, ["/var/lib", "/opt", "/srv", "/usr/local"])]
    parent = next((c for c in candidates if not str(c).startswith(private)
                   and os.access(c, os.W_OK)), None)
    if parent is None:
        pytest.skip(f"no writable host directory outside {private} among {candidates}")
    outside = pathlib.Path(tempfile.mkdtemp(dir=parent))
    try:
        outside.chmod(0o777)
        result = jail.run("s", f"open({str(outside / 'x')!r}, 'w')")
        assert "Read-only file system" in result.error and not (outside / "x").exists()
    finally:
        shutil.rmtree(outside)
    home = jail.run("s", "import os\nopen(os.path.expanduser('~/in-home'), 'w').write('y')")
    assert home.error is None and (jail.scratch_root / "s" / "in-home").exists()
    # /tmp in the jail is a private tmpfs: a write there never reaches the host's /tmp.
    marker = f"/tmp/llama-engine-sandbox-{os.getpid()}-{time.time_ns()}"
    assert jail.run("s", f"open({marker!r}, 'w').write('z')").error is None
    assert not os.path.exists(marker)


@needs_jail
def test_sessions_cannot_see_each_other_or_hidden_paths(tmp_path):
    hidden = tmp_path / "state"
    hidden.mkdir()
    (hidden / "agents.sqlite").write_text("private")
    jail = CodeInterpreter(tmp_path / "scratch", LIMITS, hidden_paths=[hidden])
    try:
        jail.run("a", "open('mine.txt', 'w').write('a')")
        listing = jail.run("b", f"import os\nprint(os.listdir({str(tmp_path / 'scratch')!r}))\n"
                                f"print(os.listdir({str(hidden)!r}))")
        assert listing.stdout == "['b']\n[]\n"
    finally:
        jail.close()


@needs_jail
def test_fork_bomb_is_contained_and_killed(jail):
    result = jail.run("s", "import os\nwhile True:\n    try:\n        os.fork()\n"
                           "    except OSError:\n        pass")
    assert result.timed_out
    assert processes_in(jail.scratch_root / "s") == []
    assert jail.run("s", "print('alive')").stdout == "alive\n"


@needs_jail
def test_the_process_limit_stops_fork(jail):
    result = jail.run("s", "import os, time\nchildren = 0\ntry:\n"
                           "    while True:\n        if os.fork() == 0:\n"
                           "            time.sleep(30)\n            os._exit(0)\n"
                           "        children += 1\nexcept BlockingIOError:\n    print(children)")
    # The worker is one of the session's processes, every other slot went to a child; when
    # the server is not root, bwrap's init shares the session's uid (in a user namespace of
    # the session's own, so nothing outside the jail counts) and takes one more.
    others = 1 if os.geteuid() == 0 else 2
    assert result.error is None and int(result.stdout) == LIMITS.processes - others
    # Another session has a budget of its own while the first one's children still live.
    other = jail.run("t", "import os\npid = os.fork()\nif pid == 0:\n    os._exit(0)\n"
                          "os.waitpid(pid, 0)[1]")
    assert other.stdout == "0\n"
    jail.close_session("s")


@needs_jail
def test_memory_hog_fails_and_the_session_survives(jail):
    jail.run("s", "kept = 3")
    result = jail.run("s", "hog = bytearray(1024 * 1024 * 1024)")
    assert result.error.rstrip().endswith("MemoryError")
    grow = jail.run("s", "blocks = []\nwhile True:\n    blocks.append(bytearray(16 * 1024 * 1024))")
    assert grow.error.rstrip().endswith("MemoryError")
    assert jail.run("s", "del blocks\nkept").stdout == "3\n"


@needs_jail
def test_file_size_limit(jail):
    result = jail.run("s", "open('big', 'wb').write(b'0' * (2 * 1024 * 1024))")
    assert "File too large" in result.error
