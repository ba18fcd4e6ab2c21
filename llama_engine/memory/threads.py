"""Small work runs on one core: waking a second OpenMP thread for a 10-token query or a scan
of a few thousand vectors costs more than it saves, and on a busy machine each parallel
region waits for a descheduled partner (a short query took 0.9 s on two threads, 62 ms on
one, with the 2-core machine at load 14). torch's thread count is per calling thread, so
this leaves the engine's threads alone."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def single_threaded(enabled: bool = True) -> Iterator[None]:
    """Run torch ops (and the MKL they call) of the calling thread on one core while inside."""
    if not enabled:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
