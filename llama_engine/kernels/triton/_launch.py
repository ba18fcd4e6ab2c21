"""Launch helpers shared by the Triton kernels: interpreter detection and device facts."""
from __future__ import annotations

import functools
import os

import torch
import triton.language as tl

# SM count assumed when no CUDA device answers (interpreter runs on the CPU): small, so
# the grid heuristics pick the same shapes the tests exercise.
INTERPRETER_SM_COUNT = 4


def is_interpreter() -> bool:
    """True when Triton runs kernels in its numpy interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of the tensor's device (a small constant off CUDA)."""
    if device.type != "cuda":
        return INTERPRETER_SM_COUNT
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_sm_count(index)


def rows_view(t: torch.Tensor) -> torch.Tensor:
    """[..., C] -> [R, C] with a unit stride on the last dim (copying only if needed)."""
    flat = t.reshape(-1, t.shape[-1])
    return flat if flat.stride(-1) == 1 else flat.contiguous()


_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def dot_operand_dtype(dtype: torch.dtype) -> tl.dtype:
    """The dtype tl.dot operands are cast to for inputs of `dtype`: their own, except
    bfloat16 under the interpreter, whose tl.dot multiplies bfloat16's raw uint16 storage
    (triton 3.9), so there the operands go through float32 instead."""
    if dtype == torch.bfloat16 and is_interpreter():
        return tl.float32
    return _TL_DTYPES[dtype]


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: exact for float32 inputs (no silent TF32 rounding)."""
    return "ieee" if dtype == torch.float32 else "tf32"
