"""Torch-facing wrappers of the C++ batched LoRA kernels (csrc/lora.cpp).

Same results as ``reference.lora_shrink`` / ``reference.lora_expand`` for float32 CPU
activations; the stacked adapter weights are float32 or bfloat16 (half the bytes to stream,
float32 arithmetic), scales and ratios float32; the segment tensors may be int32 or int64
(converted here). As for the other ops (``ops.py``), the extension takes every tensor as a
view and checks its device, dtype, shape and layout, and the segments' values, before any
memory is written: what does not fit is a ValueError naming the tensor.
"""
from __future__ import annotations

import functools

import torch

from llama_engine import _C
from llama_engine.kernels.cpu.ops import F32, I32, I64, dense, dense_as

# The instruction sets the kernels are compiled for (csrc/lora_simd.h), best first.
ISAS = ("avx512", "avx2", "scalar")


def isa_supported(isa: str) -> bool:
    """Whether this CPU runs the kernels built for `isa` (one of ``ISAS``)."""
    try:
        _C.lora_isa(isa)
    except ValueError:
        return False
    return True


@functools.lru_cache(maxsize=256)
def _offsets_tensor(slice_offsets: tuple[int, ...]) -> torch.Tensor:
    """slice_offsets as the extension takes them (int64), made once per distinct tuple."""
    return torch.tensor(slice_offsets, dtype=I64)


def _rows(t: torch.Tensor) -> int:
    """The leading size of a tensor meant to be [T, ...] (0 for a scalar, which the
    extension then rejects by name)."""
    return t.shape[0] if t.dim() else 0


def lora_shrink(x: torch.Tensor, a_stack: torch.Tensor, seg_indptr: torch.Tensor,
                seg_slots: torch.Tensor, *, isa: str = "auto") -> torch.Tensor:
    """h [T, P*R] float32 = x [T, K] @ a_stack[slot]^T per segment (a_stack [slots, P*R, K]);
    zero rows where the slot is -1. isa: the kernels' instruction set (``ISAS``; auto: the
    best this CPU runs). Raises ValueError for mismatched shapes, bad segments or an isa
    this CPU lacks."""
    x = dense(x)
    h = torch.empty(_rows(x), a_stack.shape[1] if a_stack.dim() == 3 else 0, dtype=F32)
    _C.lora_shrink(x, a_stack, dense_as(seg_indptr, I32), dense_as(seg_slots, I32), h, isa)
    return h


def lora_expand(y: torch.Tensor, h: torch.Tensor, b_stack: torch.Tensor,
                slice_offsets: tuple[int, ...], scales: torch.Tensor, seg_indptr: torch.Tensor,
                seg_slots: torch.Tensor, magnitude_ratio: torch.Tensor | None = None, *,
                isa: str = "auto") -> torch.Tensor:
    """In place on y [T, N] (dense float32): y = ratio * (y + scale * h_slice @
    b_stack[slot]) per segment and output slice (see ``reference.lora_expand``). Returns y.
    Raises ValueError for mismatched shapes, a y that is not dense float32, bad segments or
    an isa this CPU lacks."""
    _C.lora_expand(y, dense(h), b_stack, _offsets_tensor(tuple(slice_offsets)), scales,
                   magnitude_ratio, dense_as(seg_indptr, I32), dense_as(seg_slots, I32), isa)
    return y


def add_lora(y: torch.Tensor, x: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor,
             slice_offsets: tuple[int, ...], scales: torch.Tensor, seg_indptr: torch.Tensor,
             seg_slots: torch.Tensor, magnitude_ratio: torch.Tensor | None = None, *,
             isa: str = "auto") -> torch.Tensor:
    """lora_expand(y, lora_shrink(x)) in one extension call (h never reaches torch: at
    decode the per-call cost is most of the work). a_stack and b_stack share a dtype.
    Returns y, updated in place."""
    _C.lora_add(y, dense(x), a_stack, b_stack, _offsets_tensor(tuple(slice_offsets)), scales,
                magnitude_ratio, dense_as(seg_indptr, I32), dense_as(seg_slots, I32), isa)
    return y


def lora_segments(seg_indptr: torch.Tensor, seg_slots: torch.Tensor) -> _C.LoRASegments:
    """A step's adapter segments (int32 or int64 [S + 1] token offsets and [S] slots, -1:
    none) for ``decoder_layer``, checked once a step. Raises ValueError for bad segments."""
    return _C.LoRASegments(dense_as(seg_indptr, I32), dense_as(seg_slots, I32))


def lora_projection(a_stack: torch.Tensor, b_stack: torch.Tensor,
                    slice_offsets: tuple[int, ...], scales: torch.Tensor,
                    magnitude_ratio: torch.Tensor | None) -> _C.LoRAProjection:
    """One projection's stacked adapters (kernels.LoRAStack's layout: A [slots, P*R, K] and
    B^T [slots, R, N] float32 or bfloat16, scales float32 [slots, P], DoRA ratio float32
    [slots, N] or None) for ``decoder_layer``. Raises ValueError for mismatched shapes."""
    return _C.LoRAProjection(a_stack, b_stack, _offsets_tensor(tuple(slice_offsets)), scales,
                             magnitude_ratio)
