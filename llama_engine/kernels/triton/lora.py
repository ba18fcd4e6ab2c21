"""Batched LoRA on the GPU: segmented shrink and expand (Punica's SGMV, S-LoRA).

Programs are laid out over (segment, block of its tokens, block of outputs), so every
program reads the weights of one adapter slot; a block past its segment's end does
nothing (the grid is sized by the longest segment, known on the host). Both products run
on tl.dot with float32 accumulation; h stays float32 between the two kernels.
Semantics: ``reference.lora_shrink`` / ``reference.lora_expand``.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from llama_engine.kernels.triton._launch import dot_operand_dtype, dot_precision

# tl.dot needs every tile dim >= 16; the rank tile is padded up to this.
MIN_DOT_TILE = 16
SHRINK_BLOCK_M, SHRINK_BLOCK_K, SHRINK_MAX_BLOCK_R = 16, 64, 64
EXPAND_BLOCK_M, EXPAND_BLOCK_N = 16, 64


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, h_ptr, seg_indptr_ptr, seg_slots_ptr, k, rows, x_stride,
                   DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """h[tokens, r block] = x[tokens] @ a[slot, r block]^T for one block of a segment."""
    segment = tl.program_id(0)
    end = tl.load(seg_indptr_ptr + segment + 1)
    first = tl.load(seg_indptr_ptr + segment) + tl.program_id(1) * BLOCK_M
    if first < end:
        slot = tl.load(seg_slots_ptr + segment)
        tokens = first + tl.arange(0, BLOCK_M)
        token_mask = tokens < end
        r = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
        r_mask = r < rows
        acc = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
        if slot >= 0:  # no adapter: the rows stay zero
            a_base = a_ptr + slot.to(tl.int64) * rows * k
            for k0 in range(0, k, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_mask = ks < k
                x = tl.load(x_ptr + tokens[:, None].to(tl.int64) * x_stride + ks[None, :],
                            mask=token_mask[:, None] & k_mask[None, :], other=0.0)
                a = tl.load(a_base + r[None, :] * k + ks[:, None],
                            mask=k_mask[:, None] & r_mask[None, :], other=0.0)
                acc = tl.dot(x.to(DOT_DTYPE), a.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)
        tl.store(h_ptr + tokens[:, None].to(tl.int64) * rows + r[None, :], acc,
                 mask=token_mask[:, None] & r_mask[None, :])


@triton.jit
def _expand_kernel(y_ptr, h_ptr, b_ptr, offsets_ptr, scales_ptr, ratio_ptr, seg_indptr_ptr,
                   seg_slots_ptr, n, rank, h_stride, num_slices, col_blocks,
                   HAS_RATIO: tl.constexpr, DOT_DTYPE: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_R: tl.constexpr):
    """y[tokens, cols] = ratio * (y + scale * h[tokens, slice's ranks] @ b[slot, :, cols])
    for one block of a segment and one column block of one output slice."""
    segment = tl.program_id(0)
    end = tl.load(seg_indptr_ptr + segment + 1)
    first = tl.load(seg_indptr_ptr + segment) + tl.program_id(1) * BLOCK_M
    slot = tl.load(seg_slots_ptr + segment)
    out_slice = tl.program_id(2) // col_blocks
    slice_end = tl.load(offsets_ptr + out_slice + 1)
    col0 = tl.load(offsets_ptr + out_slice) + (tl.program_id(2) % col_blocks) * BLOCK_N
    if (first < end) & (col0 < slice_end) & (slot >= 0):
        tokens = first + tl.arange(0, BLOCK_M)
        token_mask = tokens < end
        cols = col0 + tl.arange(0, BLOCK_N)
        col_mask = cols < slice_end
        r = tl.arange(0, BLOCK_R)
        r_mask = r < rank
        h = tl.load(h_ptr + tokens[:, None].to(tl.int64) * h_stride + out_slice * rank + r[None, :],
                    mask=token_mask[:, None] & r_mask[None, :], other=0.0)
        b = tl.load(b_ptr + slot.to(tl.int64) * rank * n + r[:, None] * n + cols[None, :],
                    mask=r_mask[:, None] & col_mask[None, :], other=0.0)
        delta = tl.dot(h.to(DOT_DTYPE), b.to(DOT_DTYPE), input_precision=DOT_PRECISION)
        scale = tl.load(scales_ptr + slot * num_slices + out_slice).to(tl.float32)
        y_ptrs = y_ptr + tokens[:, None].to(tl.int64) * n + cols[None, :]
        mask = token_mask[:, None] & col_mask[None, :]
        out = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32) + scale * delta
        if HAS_RATIO:
            ratio = tl.load(ratio_ptr + slot.to(tl.int64) * n + cols, mask=col_mask, other=1.0)
            out = out * ratio.to(tl.float32)[None, :]
        tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=mask)


def _rank_tile(rank: int) -> int:
    return max(MIN_DOT_TILE, triton.next_power_of_2(rank))


@functools.lru_cache(maxsize=256)
def _offsets_tensor(slice_offsets: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(slice_offsets, dtype=torch.int32, device=device)


def lora_shrink(x: torch.Tensor, a_stack: torch.Tensor, seg_indptr: torch.Tensor,
                seg_slots: torch.Tensor, max_seg_len: int) -> torch.Tensor:
    """h [T, P*R] float32 = x [T, K] @ a_stack[slot]^T per segment (zero where the slot is
    -1); max_seg_len bounds the segments' lengths."""
    if x.dim() != 2 or x.shape[1] != a_stack.shape[2]:
        raise ValueError(f"x: expected [T, {a_stack.shape[2]}], got {tuple(x.shape)}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    a_stack = a_stack.contiguous()
    tokens, rows, k = x.shape[0], a_stack.shape[1], x.shape[1]
    h = torch.empty((tokens, rows), dtype=torch.float32, device=x.device)
    if tokens == 0 or seg_slots.numel() == 0:
        return h.zero_()
    block_r = min(SHRINK_MAX_BLOCK_R, _rank_tile(rows))
    grid = (seg_slots.numel(), triton.cdiv(max_seg_len, SHRINK_BLOCK_M), triton.cdiv(rows, block_r))
    _shrink_kernel[grid](x, a_stack, h, seg_indptr, seg_slots, k, rows, x.stride(0),
                         DOT_DTYPE=dot_operand_dtype(a_stack.dtype),
                         DOT_PRECISION=dot_precision(a_stack.dtype), BLOCK_M=SHRINK_BLOCK_M,
                         BLOCK_R=block_r, BLOCK_K=SHRINK_BLOCK_K)
    return h


def lora_expand(y: torch.Tensor, h: torch.Tensor, b_stack: torch.Tensor,
                slice_offsets: tuple[int, ...], scales: torch.Tensor, seg_indptr: torch.Tensor,
                seg_slots: torch.Tensor, max_seg_len: int,
                magnitude_ratio: torch.Tensor | None = None) -> torch.Tensor:
    """In place on y [T, N] (contiguous): y = ratio * (y + scale * h_slice @ b_stack[slot])
    per segment and output slice, as ``reference.lora_expand``. Returns y."""
    if not y.is_contiguous():
        raise ValueError("y: must be contiguous (it is written in place)")
    _, rank, n = b_stack.shape
    num_slices = len(slice_offsets) - 1
    if y.dim() != 2 or y.shape[1] != n or slice_offsets[0] != 0 or slice_offsets[-1] != n:
        raise ValueError(f"y {tuple(y.shape)} and slice_offsets {slice_offsets} must cover "
                         f"b_stack's {n} columns")
    if y.shape[0] == 0 or seg_slots.numel() == 0:
        return y
    h = h if h.stride(-1) == 1 else h.contiguous()
    widest = max(b - a for a, b in zip(slice_offsets, slice_offsets[1:]))
    col_blocks = triton.cdiv(widest, EXPAND_BLOCK_N)
    grid = (seg_slots.numel(), triton.cdiv(max_seg_len, EXPAND_BLOCK_M), num_slices * col_blocks)
    _expand_kernel[grid](
        y, h, b_stack.contiguous(), _offsets_tensor(tuple(slice_offsets), y.device),
        scales.contiguous(), magnitude_ratio.contiguous() if magnitude_ratio is not None else y,
        seg_indptr, seg_slots, n, rank, h.stride(0), num_slices, col_blocks,
        HAS_RATIO=magnitude_ratio is not None, DOT_DTYPE=dot_operand_dtype(b_stack.dtype),
        DOT_PRECISION=dot_precision(b_stack.dtype), BLOCK_M=EXPAND_BLOCK_M,
        BLOCK_N=EXPAND_BLOCK_N, BLOCK_R=_rank_tile(rank))
    return y
