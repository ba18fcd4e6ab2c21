"""The long-lived Python process behind one code-interpreter session. Started by
``sandbox.CodeInterpreter`` (inside bubblewrap when it works) as ``python -I sandbox_worker.py
REQUEST_FD REPLY_FD LIMITS_JSON``; it imports nothing from llama_engine, so it starts in tens of
milliseconds and the sandbox needs no view of the engine.

Protocol: one JSON object per line. Request on REQUEST_FD: ``{"code": str}``. Reply on REPLY_FD:
``{"stdout": str, "stderr": str, "error": str | null, "attachments": [[mime, base64], ...]}``.
The very first line the worker writes is ``{"ready": true}``, after its limits are in place.
stdin is /dev/null and fds 1 and 2 are redirected to memfds around each call, so user code,
its C extensions and its child processes can neither read nor corrupt the protocol pipes.
"""
import ast
import base64
import io
import json
import linecache
import os
import resource
import signal
import sys
import traceback
import warnings

MB = 1024 * 1024
STDOUT_FD, STDERR_FD = 1, 2
TRUNCATION_NOTE = "\n[... {} characters truncated]"
CELL_PREFIX = "<cell "


def apply_limits(limits: dict) -> None:
    """rlimits that hold for this worker and every process it starts. The CPU limit is set per
    call (see ``arm_cpu_limit``); the others are fixed for the worker's life (soft == hard, so
    user code cannot raise them)."""
    for name, value in ((resource.RLIMIT_AS, limits["address_space_mb"] * MB),
                        (resource.RLIMIT_NPROC, limits["processes"]),
                        (resource.RLIMIT_FSIZE, limits["file_size_mb"] * MB)):
        resource.setrlimit(name, (value, value))
    # Past the file-size limit a write fails with EFBIG (an OSError in Python) rather than
    # SIGXFSZ killing the worker.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


class CPULimitExceeded(Exception):
    """Raised inside user code when the call's CPU seconds run out (SIGXCPU)."""


IN_CALL = False  # SIGXCPU repeats every CPU second past the soft limit; only user code gets it


def on_sigxcpu(signum, frame):
    if IN_CALL:
        raise CPULimitExceeded("CPU time limit exceeded")


def arm_cpu_limit(cpu_seconds: int) -> None:
    """RLIMIT_CPU counts the process's whole life, so each call gets ``cpu_seconds`` more than
    it has used. The soft limit sends SIGXCPU (a Python exception above, so the session's
    variables survive); code stuck in C meets the wall-clock timeout instead. An unprivileged
    process may raise its soft limit but never its hard one, so the hard limit is the worker's
    lifetime budget, set at start: past it the kernel kills the worker."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    used = int(usage.ru_utime + usage.ru_stime) + 1
    soft, hard = resource.getrlimit(resource.RLIMIT_CPU)
    resource.setrlimit(resource.RLIMIT_CPU, (min(used + cpu_seconds, hard), hard))


def drop_privileges(uid: int, gid: int) -> None:
    """Become ``uid``: RLIMIT_NPROC does not apply to uid 0 (the kernel exempts the root user
    even inside namespaces), it counts every process of a uid (so each session has its own),
    and a non-root uid loses every capability."""
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)


def read_capped(fd: int, max_chars: int) -> str:
    """The text written to a memfd, cut to ``max_chars`` with a note saying how much was cut."""
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            break
        chunks.append(chunk)
    text = b"".join(chunks).decode("utf-8", errors="replace")
    if len(text) > max_chars:
        text = text[:max_chars] + TRUNCATION_NOTE.format(len(text) - max_chars)
    return text


def collect_figures() -> list:
    """Every open matplotlib figure as a base64 PNG, then closed. Only when user code imported
    pyplot: importing matplotlib here would cost every call a few hundred milliseconds."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is None:
        return []
    attachments = []
    for number in pyplot.get_fignums():
        buffer = io.BytesIO()
        pyplot.figure(number).savefig(buffer, format="png")
        attachments.append(["image/png", base64.b64encode(buffer.getvalue()).decode("ascii")])
    pyplot.close("all")
    return attachments


def run_cell(code: str, filename: str, namespace: dict) -> None:
    """Execute ``code``; a final expression statement has its repr printed when not None, as
    in a notebook cell (models often end with a bare expression and expect to see it)."""
    # Tracebacks show the cell's source lines, and later cells' functions keep theirs.
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    module = ast.parse(code, filename)
    last = module.body[-1] if module.body and isinstance(module.body[-1], ast.Expr) else None
    if last is not None:
        module.body.pop()
    exec(compile(module, filename, "exec"), namespace)
    if last is not None:
        value = eval(compile(ast.Expression(last.value), filename, "eval"), namespace)
        if value is not None:
            print(repr(value))


def user_traceback(error: BaseException) -> str:
    """The traceback from the first frame of user code on: the worker's own frames say nothing
    to the model reading it. A SyntaxError has no user frame and keeps its caret lines."""
    tb = error.__traceback__
    while tb is not None and not tb.tb_frame.f_code.co_filename.startswith(CELL_PREFIX):
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(error), error, tb))


def execute(code: str, cell: int, namespace: dict, limits: dict) -> dict:
    """Run ``code`` (the session's ``cell``-th call) in the session's namespace with fds 1/2
    captured to memfds."""
    global IN_CALL
    saved = os.dup(STDOUT_FD), os.dup(STDERR_FD)
    captures = os.memfd_create("stdout"), os.memfd_create("stderr")
    os.dup2(captures[0], STDOUT_FD)
    os.dup2(captures[1], STDERR_FD)
    error = None
    attachments = []
    worker_pid = os.getpid()
    try:
        arm_cpu_limit(limits["cpu_seconds"])
        IN_CALL = True
        run_cell(code, f"{CELL_PREFIX}{cell}>", namespace)
    except CPULimitExceeded:
        error = f"killed: CPU time limit of {limits['cpu_seconds']} s exceeded"
    except BaseException as raised:  # SystemExit and KeyboardInterrupt end the call only
        error = user_traceback(raised)
    finally:
        IN_CALL = False
    if os.getpid() != worker_pid:
        # A child the code forked came back out of it: it must not answer requests.
        if error is not None:
            sys.stderr.write(error)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0 if error is None else 1)
    try:
        attachments = collect_figures()
    except Exception:
        error = (error or "") + traceback.format_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], STDOUT_FD)
        os.dup2(saved[1], STDERR_FD)
        for fd in saved:
            os.close(fd)
    out = [read_capped(fd, limits["output_chars"]) for fd in captures]
    for fd in captures:
        os.close(fd)
    return {"stdout": out[0], "stderr": out[1], "error": error, "attachments": attachments}


def main() -> None:
    request_fd, reply_fd = int(sys.argv[1]), int(sys.argv[2])
    limits = json.loads(sys.argv[3])
    apply_limits(limits)
    resource.setrlimit(resource.RLIMIT_CPU, (limits["cpu_seconds"], limits["worker_cpu_seconds"]))
    signal.signal(signal.SIGXCPU, on_sigxcpu)
    if limits.get("uid") is not None:
        drop_privileges(limits["uid"], limits["gid"])
    # Agg renders without a display; plt.show() under it only warns, which is noise here.
    warnings.filterwarnings("ignore", message=".*non-interactive.*")
    requests = os.fdopen(request_fd, "r", encoding="utf-8")
    replies = os.fdopen(reply_fd, "w", encoding="utf-8")
    replies.write('{"ready": true}\n')
    replies.flush()
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    for cell, line in enumerate(requests, start=1):
        reply = execute(json.loads(line)["code"], cell, namespace, limits)
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


if __name__ == "__main__":
    main()
