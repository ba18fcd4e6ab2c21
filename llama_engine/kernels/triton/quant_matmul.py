"""y = x @ dequantize(W).T straight from GGUF Q8_0 / Q4_0 / Q4_1 bytes.

Weights are dequantized tile by tile inside the K loop and never materialised. A 32-wide
quant block splits into two 16-wide halves (for Q4 formats: the low and the high nibbles
of the same 16 bytes), so each step handles the "low" and "high" halves of several blocks
as two separate K slices, with x gathered in the matching column order: every weight byte
is read once per step and the dot product stays a plain sum over K.

Two paths: a GEMV-shaped one for decode (few rows of x: broadcast-multiply-reduce on
CUDA cores, K split across programs so that small N still fills the GPU) and a tiled
tl.dot one for prefill.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from llama_engine.kernels.triton._launch import (dot_operand_dtype, dot_precision,
                                                  is_interpreter, sm_count)
from llama_engine.quant import BLOCK, BLOCK_BYTES, PackedWeight

Q8_0_ID = tl.constexpr(0)
Q4_0_ID = tl.constexpr(1)
Q4_1_ID = tl.constexpr(2)
QTYPE_IDS = {"Q8_0": Q8_0_ID.value, "Q4_0": Q4_0_ID.value, "Q4_1": Q4_1_ID.value}
# Block layout constants the kernels read (globals used inside @triton.jit are constexpr).
QUANT_BLOCK = tl.constexpr(BLOCK)
HALF_BLOCK = tl.constexpr(BLOCK // 2)
SCALE_BYTES = tl.constexpr(2)  # one float16 (d, and m for Q4_1)
Q4_0_OFFSET = tl.constexpr(8)
# Rows of x up to which the decode (GEMV) path runs.
DECODE_MAX_M = 8
# Decode tiles: quant blocks a K step covers, and output columns x rows a program holds.
DECODE_BLOCKS_PER_STEP = 4
DECODE_TILE_ELEMENTS = 64
DECODE_MIN_BLOCK_N = 16
# Fewest K steps a decode split gets, so that splitting never makes programs trivial.
DECODE_MIN_STEPS_PER_SPLIT = 4
# Split K in the decode path until this many programs per SM are in flight.
DECODE_PROGRAMS_PER_SM = 4
DECODE_WARPS = 4
# Prefill tiles under the interpreter (a GPU run autotunes over PREFILL_CONFIGS).
INTERPRETER_PREFILL = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCKS_PER_STEP": 2}
PREFILL_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCKS_PER_STEP": steps},
                  num_warps=warps, num_stages=stages)
    for bm, bn, steps, warps, stages in [
        (64, 64, 2, 4, 3), (64, 128, 2, 4, 3), (128, 128, 2, 8, 3), (128, 64, 4, 4, 3),
        (32, 128, 4, 4, 4)]
]


@triton.jit
def _dequant_halves(data_ptr, scales_ptr, row_offsets, blocks, half_index, mask,
                    QTYPE: tl.constexpr, BLOCK_BYTES: tl.constexpr):
    """Weights of the low (j < 16) and high (j >= 16) half of quant blocks, as float32.

    data_ptr: the packed bytes (uint8), scales_ptr: the same memory as float16.
    row_offsets, blocks, half_index (0..15) broadcast against each other."""
    block_start = row_offsets + blocks * BLOCK_BYTES
    scale = tl.load(scales_ptr + block_start // SCALE_BYTES, mask=mask, other=0.0)
    scale = scale.to(tl.float32)
    if QTYPE == Q8_0_ID:  # d, then 32 int8
        quants = data_ptr + block_start + SCALE_BYTES + half_index
        low = tl.load(quants, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)
        high = tl.load(quants + HALF_BLOCK, mask=mask, other=0).to(tl.int8, bitcast=True)
        return scale * low, scale * high.to(tl.float32)
    elif QTYPE == Q4_0_ID:  # d, then 16 bytes of nibbles centred on 8
        packed = tl.load(data_ptr + block_start + SCALE_BYTES + half_index, mask=mask, other=0)
        low = (packed & 0x0F).to(tl.float32) - Q4_0_OFFSET
        high = (packed >> 4).to(tl.float32) - Q4_0_OFFSET
        return scale * low, scale * high
    else:  # Q4_1: d, m, then 16 bytes of nibbles
        minimum = tl.load(scales_ptr + block_start // SCALE_BYTES + 1, mask=mask, other=0.0)
        packed = tl.load(data_ptr + block_start + 2 * SCALE_BYTES + half_index, mask=mask,
                         other=0)
        low = scale * (packed & 0x0F).to(tl.float32) + minimum.to(tl.float32)
        high = scale * (packed >> 4).to(tl.float32) + minimum.to(tl.float32)
        return low, high


@triton.jit
def _step_indices(step, n_blocks, BLOCKS_PER_STEP: tl.constexpr):
    """Quant block of each K slot of a step, its index inside the half, and validity."""
    slots = tl.arange(0, BLOCKS_PER_STEP * HALF_BLOCK)
    blocks = step + slots // HALF_BLOCK
    return blocks, slots % HALF_BLOCK, blocks < n_blocks


@triton.jit
def _load_x_halves(x_ptr, rows, row_mask, x_row_stride, blocks, half_index, k_mask):
    """x columns matching _dequant_halves: [rows, slots] for the low and the high half."""
    columns = blocks * QUANT_BLOCK + half_index
    pointers = x_ptr + rows[:, None].to(tl.int64) * x_row_stride + columns[None, :]
    mask = row_mask[:, None] & k_mask[None, :]
    return (tl.load(pointers, mask=mask, other=0.0),
            tl.load(pointers + HALF_BLOCK, mask=mask, other=0.0))


@triton.jit
def _decode_kernel(x_ptr, data_ptr, scales_ptr, out_ptr, m, n, n_blocks, x_row_stride,
                   row_bytes, blocks_per_split, QTYPE: tl.constexpr, BLOCK_BYTES: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCKS_PER_STEP: tl.constexpr):
    """out[split, :m, cols] = x[:, split's K range] @ W[cols, split's K range].T"""
    split = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n
    rows = tl.arange(0, BLOCK_M)
    row_mask = rows < m
    row_offsets = cols.to(tl.int64)[:, None] * row_bytes
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    first_block = split * blocks_per_split
    last_block = tl.minimum(first_block + blocks_per_split, n_blocks)
    for step in range(first_block, last_block, BLOCKS_PER_STEP):
        blocks, half_index, k_mask = _step_indices(step, last_block, BLOCKS_PER_STEP)
        x_low, x_high = _load_x_halves(x_ptr, rows, row_mask, x_row_stride, blocks,
                                       half_index, k_mask)
        w_low, w_high = _dequant_halves(data_ptr, scales_ptr, row_offsets, blocks[None, :],
                                        half_index[None, :],
                                        col_mask[:, None] & k_mask[None, :], QTYPE,
                                        BLOCK_BYTES)
        # [M, 1, K] * [1, N, K] summed over K: a GEMV on CUDA cores, exact in float32.
        acc += tl.sum(x_low.to(tl.float32)[:, None, :] * w_low[None, :, :], axis=2)
        acc += tl.sum(x_high.to(tl.float32)[:, None, :] * w_high[None, :, :], axis=2)
    out = out_ptr + split.to(tl.int64) * m * n + rows[:, None] * n + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _prefill_kernel(x_ptr, data_ptr, scales_ptr, out_ptr, m, n, n_blocks, x_row_stride,
                    row_bytes, QTYPE: tl.constexpr, BLOCK_BYTES: tl.constexpr,
                    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCKS_PER_STEP: tl.constexpr):
    """out[rows, cols] = x[rows] @ W[cols].T, tiled for tl.dot."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < m
    col_mask = cols < n
    row_offsets = cols.to(tl.int64)[None, :] * row_bytes
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for step in range(0, n_blocks, BLOCKS_PER_STEP):
        blocks, half_index, k_mask = _step_indices(step, n_blocks, BLOCKS_PER_STEP)
        x_low, x_high = _load_x_halves(x_ptr, rows, row_mask, x_row_stride, blocks,
                                       half_index, k_mask)
        w_low, w_high = _dequant_halves(data_ptr, scales_ptr, row_offsets, blocks[:, None],
                                        half_index[:, None],
                                        k_mask[:, None] & col_mask[None, :], QTYPE,
                                        BLOCK_BYTES)
        acc = tl.dot(x_low.to(DOT_DTYPE), w_low.to(DOT_DTYPE), acc,
                     input_precision=DOT_PRECISION)
        acc = tl.dot(x_high.to(DOT_DTYPE), w_high.to(DOT_DTYPE), acc,
                     input_precision=DOT_PRECISION)
    out = out_ptr + rows[:, None].to(tl.int64) * n + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


_prefill_kernel_tuned = triton.autotune(PREFILL_CONFIGS, key=["n", "n_blocks", "QTYPE"])(
    _prefill_kernel)


def _decode(x_rows: torch.Tensor, weight: PackedWeight, scales: torch.Tensor,
            qtype_id: int) -> torch.Tensor:
    m, n, n_blocks = x_rows.shape[0], weight.rows, weight.cols // BLOCK
    block_m = triton.next_power_of_2(m)
    block_n = max(DECODE_MIN_BLOCK_N, DECODE_TILE_ELEMENTS // block_m)
    n_tiles = triton.cdiv(n, block_n)
    # Split K so that enough programs run, each still doing a few steps of work.
    wanted_splits = triton.cdiv(DECODE_PROGRAMS_PER_SM * sm_count(x_rows.device), n_tiles)
    max_splits = triton.cdiv(n_blocks, DECODE_MIN_STEPS_PER_SPLIT * DECODE_BLOCKS_PER_STEP)
    splits = max(1, min(wanted_splits, max_splits))
    steps_per_split = triton.cdiv(triton.cdiv(n_blocks, DECODE_BLOCKS_PER_STEP), splits)
    blocks_per_split = steps_per_split * DECODE_BLOCKS_PER_STEP
    splits = triton.cdiv(n_blocks, blocks_per_split)
    out_dtype = x_rows.dtype if splits == 1 else torch.float32
    partial = torch.empty((splits, m, n), dtype=out_dtype, device=x_rows.device)
    _decode_kernel[(n_tiles, splits)](
        x_rows, weight.data, scales, partial, m, n, n_blocks, x_rows.stride(0),
        weight.data.stride(0), blocks_per_split, QTYPE=qtype_id,
        BLOCK_BYTES=BLOCK_BYTES[weight.qtype], BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCKS_PER_STEP=DECODE_BLOCKS_PER_STEP, num_warps=DECODE_WARPS)
    return partial[0] if splits == 1 else partial.sum(0).to(x_rows.dtype)


def _prefill(x_rows: torch.Tensor, weight: PackedWeight, scales: torch.Tensor,
             qtype_id: int) -> torch.Tensor:
    m, n = x_rows.shape[0], weight.rows
    out = torch.empty((m, n), dtype=x_rows.dtype, device=x_rows.device)
    args = (x_rows, weight.data, scales, out, m, n, weight.cols // BLOCK, x_rows.stride(0),
            weight.data.stride(0))
    common = {"QTYPE": qtype_id, "BLOCK_BYTES": BLOCK_BYTES[weight.qtype],
              "DOT_DTYPE": dot_operand_dtype(x_rows.dtype),
              "DOT_PRECISION": dot_precision(x_rows.dtype)}
    if is_interpreter():
        tiles = INTERPRETER_PREFILL
        grid = (triton.cdiv(m, tiles["BLOCK_M"]), triton.cdiv(n, tiles["BLOCK_N"]))
        _prefill_kernel[grid](*args, **common, **tiles)
    else:
        def grid(meta: dict) -> tuple[int, int]:
            return triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"])
        _prefill_kernel_tuned[grid](*args, **common)
    return out


def quant_matmul(x: torch.Tensor, weight: PackedWeight) -> torch.Tensor:
    """x [..., K] @ dequantize(weight).T -> [..., N] in x's dtype (float32 accumulation)."""
    if weight.qtype not in QTYPE_IDS:
        raise ValueError(f"unsupported packed format {weight.qtype!r}")
    if x.shape[-1] != weight.cols:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {weight.cols}")
    x_rows = x.reshape(-1, weight.cols)
    if x_rows.stride(-1) != 1:
        x_rows = x_rows.contiguous()
    out_shape = (*x.shape[:-1], weight.rows)
    if x_rows.shape[0] == 0:
        return torch.empty(out_shape, dtype=x.dtype, device=x.device)
    data = weight.data if weight.data.is_contiguous() else weight.data.contiguous()
    weight = PackedWeight(data, weight.qtype, weight.rows, weight.cols)
    # Scales are float16 at even byte offsets (every block and row size is even).
    scales = data.view(torch.float16)
    path = _decode if x_rows.shape[0] <= DECODE_MAX_M else _prefill
    return path(x_rows, weight, scales, QTYPE_IDS[weight.qtype]).reshape(out_shape)
