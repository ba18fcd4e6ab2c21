"""Torch-facing wrappers of the C++ batched LoRA kernels (csrc/lora.cpp).

Same results as ``reference.lora_shrink`` / ``reference.lora_expand`` for float32 CPU
activations; the stacked adapter weights are float32 or bfloat16 (half the bytes to stream,
float32 arithmetic), scales and ratios float32; the segment tensors may be int32 or int64.
As the other hot ops do, the extension gets addresses, and every check that keeps them safe
happens here; the segment values themselves are checked in C++.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from llama_engine import _C
from llama_engine.kernels.cpu.ops import F32, I32, I64, _converted, _dense_float32, _fail

WEIGHT_DTYPES = (F32, torch.bfloat16)


def _segments(seg_indptr: torch.Tensor, seg_slots: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    seg_indptr = _converted(seg_indptr, I32, "seg_indptr", 1)
    seg_slots = _converted(seg_slots, I32, "seg_slots", 1)
    if seg_indptr.numel() != seg_slots.numel() + 1:
        _fail("seg_indptr", "needs one more entry than seg_slots")
    return seg_indptr, seg_slots


def _weights(t: torch.Tensor, name: str, ndim: int,
             dtypes: tuple[torch.dtype, ...] = (F32,)) -> torch.Tensor:
    """Stacked adapter weights are laid out once by their owner: dense, of `dtypes`."""
    if not (t.dtype in dtypes and t.is_cpu and t.is_contiguous() and t.dim() == ndim):
        _fail(name, f"expected a C-contiguous CPU tensor of {' or '.join(map(str, dtypes))} "
                    f"with {ndim} dims, got {t.dtype} {tuple(t.shape)} on {t.device}")
    return t


@functools.lru_cache(maxsize=256)
def _offsets_tensor(slice_offsets: tuple[int, ...]) -> torch.Tensor:
    return torch.tensor(slice_offsets, dtype=I64)


def lora_shrink(x: torch.Tensor, a_stack: torch.Tensor, seg_indptr: torch.Tensor,
                seg_slots: torch.Tensor) -> torch.Tensor:
    """h [T, P*R] float32 = x [T, K] @ a_stack[slot]^T per segment; zero rows where the
    slot is -1. Raises ValueError for mismatched shapes or bad segments."""
    x = _dense_float32(x, "x")
    a_stack = _weights(a_stack, "a_stack", 3, WEIGHT_DTYPES)
    if x.dim() != 2 or x.shape[1] != a_stack.shape[2]:
        _fail("x", f"expected [T, {a_stack.shape[2]}], got {tuple(x.shape)}")
    seg_indptr, seg_slots = _segments(seg_indptr, seg_slots)
    tokens, rows = x.shape[0], a_stack.shape[1]
    h = torch.empty((tokens, rows), dtype=F32)
    _C.lora_shrink(x.data_ptr(), tokens, x.shape[1], a_stack.data_ptr(),
                   a_stack.dtype is torch.bfloat16, a_stack.shape[0], rows,
                   seg_indptr.data_ptr(), seg_slots.data_ptr(), seg_slots.numel(), h.data_ptr())
    return h


class _ExpandArgs(NamedTuple):
    """The checked expand-side arguments, as the extension takes them."""
    y: torch.Tensor
    b_stack: torch.Tensor
    bf16: bool
    num_slots: int
    rank: int
    offsets: torch.Tensor
    num_slices: int
    scales: torch.Tensor
    ratio_ptr: int


def _expand_args(y: torch.Tensor, b_stack: torch.Tensor, slice_offsets: tuple[int, ...],
                 scales: torch.Tensor, magnitude_ratio: torch.Tensor | None) -> _ExpandArgs:
    if not (y.dtype is F32 and y.is_cpu and y.is_contiguous() and y.dim() == 2):
        _fail("y", "must be a C-contiguous float32 [T, N] CPU tensor (it is written in place)")
    b_stack = _weights(b_stack, "b_stack", 3, WEIGHT_DTYPES)
    num_slots, rank, n = b_stack.shape
    num_slices = len(slice_offsets) - 1
    if (num_slices < 1 or slice_offsets[0] != 0 or slice_offsets[-1] != n
            or any(b < a for a, b in zip(slice_offsets, slice_offsets[1:]))):
        _fail("slice_offsets", f"must rise from 0 to {n}, got {slice_offsets}")
    if y.shape[1] != n:
        _fail("y", f"expected {n} columns, got {y.shape[1]}")
    scales = _weights(scales, "scales", 2)
    if tuple(scales.shape) != (num_slots, num_slices):
        _fail("scales", f"expected [{num_slots}, {num_slices}], got {tuple(scales.shape)}")
    ratio_ptr = 0
    if magnitude_ratio is not None:
        magnitude_ratio = _weights(magnitude_ratio, "magnitude_ratio", 2)
        if tuple(magnitude_ratio.shape) != (num_slots, n):
            _fail("magnitude_ratio", f"expected [{num_slots}, {n}], got "
                                     f"{tuple(magnitude_ratio.shape)}")
        ratio_ptr = magnitude_ratio.data_ptr()
    return _ExpandArgs(y, b_stack, b_stack.dtype is torch.bfloat16, num_slots, rank,
                       _offsets_tensor(tuple(slice_offsets)), num_slices, scales, ratio_ptr)


def lora_expand(y: torch.Tensor, h: torch.Tensor, b_stack: torch.Tensor,
                slice_offsets: tuple[int, ...], scales: torch.Tensor, seg_indptr: torch.Tensor,
                seg_slots: torch.Tensor, magnitude_ratio: torch.Tensor | None = None
                ) -> torch.Tensor:
    """In place on y [T, N]: y = ratio * (y + scale * h_slice @ b_stack[slot]) per segment
    and output slice (see ``reference.lora_expand``). Returns y. Raises ValueError for
    mismatched shapes, a y that is not dense float32, or bad segments."""
    e = _expand_args(y, b_stack, slice_offsets, scales, magnitude_ratio)
    h = _dense_float32(h, "h")
    if h.dim() != 2 or h.shape[0] != y.shape[0] or h.shape[1] < e.num_slices * e.rank:
        _fail("h", f"expected [{y.shape[0]}, >= {e.num_slices * e.rank}], got {tuple(h.shape)}")
    seg_indptr, seg_slots = _segments(seg_indptr, seg_slots)
    _C.lora_expand(y.data_ptr(), y.shape[0], y.shape[1], h.data_ptr(), h.shape[1],
                   e.b_stack.data_ptr(), e.bf16, e.num_slots, e.rank, e.offsets.data_ptr(),
                   e.num_slices, e.scales.data_ptr(), e.ratio_ptr, seg_indptr.data_ptr(),
                   seg_slots.data_ptr(), seg_slots.numel())
    return y


def add_lora(y: torch.Tensor, x: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor,
             slice_offsets: tuple[int, ...], scales: torch.Tensor, seg_indptr: torch.Tensor,
             seg_slots: torch.Tensor, magnitude_ratio: torch.Tensor | None = None
             ) -> torch.Tensor:
    """lora_expand(y, lora_shrink(x)) in one extension call (h never reaches torch: at
    decode the per-call cost is most of the work). a_stack and b_stack share a dtype.
    Returns y, updated in place."""
    e = _expand_args(y, b_stack, slice_offsets, scales, magnitude_ratio)
    x = _dense_float32(x, "x")
    a_stack = _weights(a_stack, "a_stack", 3, (b_stack.dtype,))
    if tuple(a_stack.shape[:2]) != (e.num_slots, e.num_slices * e.rank):
        _fail("a_stack", f"expected [{e.num_slots}, {e.num_slices * e.rank}, K], got "
                         f"{tuple(a_stack.shape)}")
    if x.dim() != 2 or tuple(x.shape) != (y.shape[0], a_stack.shape[2]):
        _fail("x", f"expected [{y.shape[0]}, {a_stack.shape[2]}], got {tuple(x.shape)}")
    seg_indptr, seg_slots = _segments(seg_indptr, seg_slots)
    _C.lora_add(y.data_ptr(), x.data_ptr(), x.shape[0], x.shape[1], y.shape[1],
                a_stack.data_ptr(), e.b_stack.data_ptr(), e.bf16, e.num_slots, e.rank,
                e.offsets.data_ptr(), e.num_slices, e.scales.data_ptr(), e.ratio_ptr,
                seg_indptr.data_ptr(), seg_slots.data_ptr(), seg_slots.numel())
    return y
