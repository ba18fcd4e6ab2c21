"""Thin torch wrappers over the C++ kernels in ``llama_engine._C`` (float32, CPU)."""
from __future__ import annotations

from llama_engine import _C  # noqa: F401  (ImportError here selects the torch reference)
