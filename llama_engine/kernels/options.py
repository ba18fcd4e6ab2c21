"""Kernel options: which implementations run, and at what precision.

Read by the dispatch functions each time they choose, never frozen at import. They start
from the environment the first time a kernel asks (``LLAMA_ENGINE_KERNELS=torch``: the torch
reference everywhere; ``LLAMA_ENGINE_INT8_ACTIVATIONS=1``: int8 activations in the CPU
quantized matmuls, see ``kernels/cpu/quant.py``), and a program may set them at start-up
with ``configure``.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

BACKENDS = ("auto", "torch")


@dataclass(frozen=True)
class KernelOptions:
    """backend "auto": Triton for CUDA tensors, the C++ extension for float32 CPU tensors,
    the torch reference otherwise; "torch": the reference everywhere (debugging, A/B checks).
    int8_activations: the CPU quant matmuls round activations to int8 (faster for many rows,
    ~1-2 % output error: off by default)."""

    backend: str = "auto"
    int8_activations: bool = False

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {self.backend!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> KernelOptions:
        """LLAMA_ENGINE_KERNELS (auto | torch) and LLAMA_ENGINE_INT8_ACTIVATIONS (0 | 1)."""
        return cls(backend=environ.get("LLAMA_ENGINE_KERNELS", "") or "auto",
                   int8_activations=environ.get("LLAMA_ENGINE_INT8_ACTIVATIONS", "0") == "1")


_current: KernelOptions | None = None


def options() -> KernelOptions:
    """The options in force (from the environment until ``configure`` is called)."""
    global _current
    if _current is None:
        _current = KernelOptions.from_env()
    return _current


def configure(new: KernelOptions) -> KernelOptions:
    """Set the options for every later kernel call; returns the previous ones."""
    previous = options()
    global _current
    _current = new
    return previous
