"""A benchmark's sides (ours, each peer configuration), each a live process of its own, so
that the sides can take turns in rounds: a slow window of a shared machine then falls on
every side alike, and each round gives a ratio of its own. A side is spawned fresh (its
peak RSS is its own, no import or thread pool of another side is in it), builds once
(model loading untimed), then answers requests until closed."""
from __future__ import annotations

import multiprocessing
import time
from typing import Any, Callable

from llama_engine.training.worker import peak_rss_bytes

Build = Callable[..., Callable[[Any], Any]]


def _serve(build: Build, build_args: tuple, conn) -> None:
    """A side's process: ``serve = build(*build_args)``, say so, then answer each request r
    the parent sends with (serve(r), seconds it took); None ends it, answered with the peak
    RSS in bytes. A failed build answers its error (a string) instead."""
    try:
        serve = build(*build_args)
    except Exception as e:  # the peer cannot run this configuration here: the parent says so
        conn.send(f"{type(e).__name__}: {e}")
        return
    conn.send(None)
    while (request := conn.recv()) is not None:
        started = time.perf_counter()
        result = serve(request)
        conn.send((result, time.perf_counter() - started))
    conn.send(peak_rss_bytes())


class Side:
    """One side's process, spawned and built (``build(*build_args)`` runs in it and returns
    the function that serves its requests; build, its arguments and the requests and results
    must pickle). ``error``: None once built, else why the build failed."""

    def __init__(self, build: Build, *build_args):
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        # daemonic: when the parent fails, its sides end with it instead of waiting for a
        # request forever (and the parent's exit waiting for them)
        self.process = context.Process(target=_serve, args=(build, build_args, child), daemon=True)
        self.process.start()
        self.error: str | None = self.conn.recv()

    def __call__(self, request: Any) -> tuple[Any, float]:
        """The side's answer to ``request`` and the seconds its process took for it."""
        self.conn.send(request)
        return self.conn.recv()

    def close(self) -> int | None:
        """End the process; its peak RSS in bytes (None when its build failed)."""
        peak = None
        if self.error is None:
            self.conn.send(None)
            peak = self.conn.recv()
        self.process.join()
        return peak


def in_child(fn: Callable, *fn_args) -> Any:
    """``fn(*fn_args)`` in a fresh spawned process (its memory is freed when it ends)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, fn_args)
