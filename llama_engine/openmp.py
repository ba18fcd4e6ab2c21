"""OpenMP start-up policy, set by the programs that run the engine (the ``llama-engine``
command, which includes the server, and ``LLM``), never by importing the library.

The extension shares torch's OpenMP runtime (torch loads its libgomp.so.1 first, and the
extension's libgomp.so.1 dependency resolves to that copy). After a parallel region its
idle workers spin SPIN_COUNT iterations (~0.1 ms) before sleeping: long enough to bridge
the gaps between one decode step's kernel calls, where waking a sleeping worker cost tens of
microseconds per matmul (OMP_WAIT_POLICY=PASSIVE: 11 ms per SmolLM2 token instead of 4.8 on
2 cores), and short enough that an idle engine gives the cores back at once (libgomp's own
default spins ~300000 iterations).
"""
from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

SPIN_COUNT = 10_000


def configure_openmp(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Bounded spinning (GOMP_SPINCOUNT=SPIN_COUNT) unless the user chose a value.

    libgomp reads its environment once, when it loads with torch, so a program calls this
    first thing, before torch is imported. Returns whether that still held: False means
    this process keeps the runtime's policy as it started.
    """
    environ.setdefault("GOMP_SPINCOUNT", str(SPIN_COUNT))
    return "torch" not in sys.modules
