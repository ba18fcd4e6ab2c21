"""Paged KV cache kernels: scatter new keys/values into the cache, and one attention launch
for a batch mixing decode rows and prefill chunks (causal, GQA, variable lengths).

Attention tiling: a program owns one KV head and a tile of BLOCK_Q consecutive query
tokens of one sequence, with the GROUP query heads that share that KV head stacked into
the tile's BLOCK_M rows (BLOCK_Q = BLOCK_M // GROUP; leftover rows are masked). Decode
rows thus fill the matrix unit with heads instead of wasting it on one token, and every
key/value loaded serves the whole group. Keys/values stream
through in BLOCK_N-position chunks gathered through the block table (any paged block size
works, even one smaller than BLOCK_N), with an online softmax in float32.

The grid is sized from tensor shapes only (no device-to-host sync): sequence i gets tiles
starting at cu_seqlens_q[i] // BLOCK_Q + i, an over-count that always leaves room for
ceil(q_len / BLOCK_Q) tiles; each program finds its sequence by comparing its tile index
with those starts, and surplus programs do nothing.

When tiles x KV heads are too few to fill the GPU (small decode batches), a third grid
dimension splits each tile's KV range (flash-decoding); the splits store unnormalised
outputs with their softmax max/sum, and a second kernel merges them.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from llama_engine.kernels.triton._launch import (dot_operand_dtype, dot_precision,
                                                  is_interpreter, sm_count)

LOG2_E = 1.0 / math.log(2.0)
# tl.dot needs every dimension >= 16 when compiled.
MIN_DOT_DIM = 16
# Query rows of a prefill tile and KV positions a loop step covers, per execution mode:
# small under the interpreter (numpy cost grows with tile area), tensor-core sized on GPU.
PREFILL_BLOCK_M = {True: 16, False: 64}
BLOCK_N = {True: 16, False: 64}
ATTENTION_WARPS = 4
ATTENTION_STAGES = 2
# Split-KV (flash-decoding): aim for this many programs per SM, with at most this many
# splits of one tile's KV range.
PROGRAMS_PER_SM = 2
MAX_KV_SPLITS = 32
# cu_seqlens_q value given to padding lanes of the sequence search: past any tile index.
NO_SEQUENCE_START = tl.constexpr(2**30)


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
                     n_kv_heads, head_dim, k_token_stride, k_head_stride,
                     v_token_stride, v_head_stride, cache_block_stride, cache_slot_stride,
                     cache_head_stride, BLOCK_SIZE: tl.constexpr, HEADS_PAD: tl.constexpr,
                     D_PAD: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    # A negative slot marks a padding token that owns no cache slot.
    if slot >= 0:
        heads = tl.arange(0, HEADS_PAD)[:, None]
        dims = tl.arange(0, D_PAD)[None, :]
        mask = (heads < n_kv_heads) & (dims < head_dim)
        cache_offset = ((slot // BLOCK_SIZE) * cache_block_stride
                        + (slot % BLOCK_SIZE) * cache_slot_stride + heads * cache_head_stride
                        + dims)
        k = tl.load(k_ptr + token * k_token_stride + heads * k_head_stride + dims, mask=mask)
        v = tl.load(v_ptr + token * v_token_stride + heads * v_head_stride + dims, mask=mask)
        tl.store(k_cache_ptr + cache_offset, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + cache_offset, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write k, v [T, Hkv, D] into the paged caches [blocks, block_size, Hkv, D] at
    slot_mapping [T] (block * block_size + offset); negative slots are skipped."""
    n_tokens, n_kv_heads, head_dim = k.shape
    if n_tokens == 0:
        return
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache need the same layout with unit-stride heads")
    _store_kv_kernel[(n_tokens,)](
        k, v, k_cache, v_cache, slot_mapping.contiguous(), n_kv_heads, head_dim,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        BLOCK_SIZE=k_cache.shape[1], HEADS_PAD=triton.next_power_of_2(n_kv_heads),
        D_PAD=triton.next_power_of_2(head_dim))


@triton.jit
def _find_sequence(tile, cu_seqlens_q_ptr, n_seqs, BLOCK_Q: tl.constexpr,
                   TILE_SLACK: tl.constexpr, SEQS_PAD: tl.constexpr):
    """Index of the sequence whose tile range holds `tile` (see the module docstring)."""
    seq_ids = tl.arange(0, SEQS_PAD)
    starts = tl.load(cu_seqlens_q_ptr + seq_ids, mask=seq_ids < n_seqs,
                     other=NO_SEQUENCE_START)
    first_tiles = starts // BLOCK_Q + seq_ids * TILE_SLACK
    return tl.sum((first_tiles <= tile).to(tl.int32), axis=0) - 1


@triton.jit
def _attend(q, q_positions, kv_lo, kv_hi, k_cache_ptr, v_cache_ptr, block_table_row,
            kv_head_offset, cache_block_stride, cache_slot_stride, dims, dim_valid, scale_log2,
            BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            D_PAD: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online softmax of q's rows over cache positions [kv_lo, kv_hi), causally masked.
    Returns (unnormalised output, row sums, row maxima); log2 domain."""
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    for kv_start in range(kv_lo, kv_hi, BLOCK_N):
        kv_positions = kv_start + tl.arange(0, BLOCK_N)
        kv_valid = kv_positions < kv_hi
        physical_blocks = tl.load(block_table_row + kv_positions // BLOCK_SIZE,
                                  mask=kv_valid, other=0).to(tl.int64)
        kv_offsets = (physical_blocks * cache_block_stride
                      + (kv_positions % BLOCK_SIZE) * cache_slot_stride + kv_head_offset)
        kv_pointers = kv_offsets[:, None] + dims[None, :]
        kv_mask = kv_valid[:, None] & dim_valid[None, :]
        k = tl.load(k_cache_ptr + kv_pointers, mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision=DOT_PRECISION)
        scores = scores * scale_log2
        visible = (kv_positions[None, :] <= q_positions[:, None]) & kv_valid[None, :]
        scores = tl.where(visible, scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        # A row that has seen no visible key yet keeps max -inf; shift it by 0 instead of
        # computing -inf - -inf.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        correction = tl.exp2(row_max - shift)
        probs = tl.exp2(scores - shift[:, None])
        row_sum = row_sum * correction + tl.sum(probs, axis=1)
        v = tl.load(v_cache_ptr + kv_pointers, mask=kv_mask, other=0.0)
        acc = acc * correction[:, None] + tl.dot(probs.to(DOT_DTYPE), v.to(DOT_DTYPE),
                                                 input_precision=DOT_PRECISION)
        row_max = new_max
    return acc, row_sum, row_max


@triton.jit
def _paged_attention_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, partial_out_ptr, partial_stats_ptr,
        block_tables_ptr, context_lens_ptr, cu_seqlens_q_ptr, scale_log2, n_seqs, head_dim,
        n_heads, rows_per_split, q_token_stride, q_head_stride, out_token_stride,
        out_head_stride, cache_block_stride, cache_slot_stride, cache_head_stride,
        block_table_stride,
        GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr,
        TILE_SLACK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        D_PAD: tl.constexpr, SEQS_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr,
        DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq = _find_sequence(tile, cu_seqlens_q_ptr, n_seqs, BLOCK_Q, TILE_SLACK, SEQS_PAD)
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    context_len = tl.load(context_lens_ptr + seq)
    q_tile_start = (tile - (q_start // BLOCK_Q + seq * TILE_SLACK)) * BLOCK_Q
    if q_tile_start < q_len:
        rows = tl.arange(0, BLOCK_M)
        q_in_seq = q_tile_start + rows // GROUP
        row_valid = (rows < BLOCK_Q * GROUP) & (q_in_seq < q_len)
        heads = kv_head * GROUP + rows % GROUP
        # Absolute position of each query row: it sees keys at positions <= its own.
        q_positions = context_len - q_len + q_in_seq
        dims = tl.arange(0, D_PAD)
        dim_valid = dims < head_dim
        tokens = (q_start + q_in_seq).to(tl.int64)
        row_mask = row_valid[:, None] & dim_valid[None, :]
        q = tl.load(q_ptr + tokens[:, None] * q_token_stride + heads[:, None] * q_head_stride
                    + dims[None, :], mask=row_mask, other=0.0)
        # Causal: the tile's last query row bounds the keys any row of it can see. Splits
        # cut that range into equal BLOCK_N-aligned chunks.
        kv_end = context_len - q_len + tl.minimum(q_tile_start + BLOCK_Q, q_len)
        chunk = tl.cdiv(tl.cdiv(kv_end, NUM_SPLITS), BLOCK_N) * BLOCK_N
        kv_lo = split * chunk
        acc, row_sum, row_max = _attend(
            q.to(DOT_DTYPE), q_positions, kv_lo, tl.minimum(kv_lo + chunk, kv_end),
            k_cache_ptr, v_cache_ptr,
            block_tables_ptr + seq.to(tl.int64) * block_table_stride,
            kv_head * cache_head_stride, cache_block_stride, cache_slot_stride, dims,
            dim_valid, scale_log2, BLOCK_SIZE, BLOCK_M, BLOCK_N, D_PAD, DOT_DTYPE,
            DOT_PRECISION)
        if NUM_SPLITS == 1:
            out = acc / tl.where(row_valid, row_sum, 1.0)[:, None]
            tl.store(out_ptr + tokens[:, None] * out_token_stride
                     + heads[:, None] * out_head_stride + dims[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=row_mask)
        else:
            partial_rows = split * rows_per_split + tokens * n_heads + heads
            tl.store(partial_out_ptr + partial_rows[:, None] * head_dim + dims[None, :], acc,
                     mask=row_mask)
            tl.store(partial_stats_ptr + partial_rows * 2, row_max, mask=row_valid)
            tl.store(partial_stats_ptr + partial_rows * 2 + 1, row_sum, mask=row_valid)


@triton.jit
def _combine_splits_kernel(partial_out_ptr, partial_stats_ptr, out_ptr, n_heads, head_dim,
                           rows_per_split, out_token_stride, out_head_stride,
                           NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
                           D_PAD: tl.constexpr):
    """Merge the per-split softmax states of one (token, head) row into the output."""
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS_PAD)
    split_valid = splits < NUM_SPLITS
    partial_rows = splits * rows_per_split + token * n_heads + head
    row_max = tl.load(partial_stats_ptr + partial_rows * 2, mask=split_valid,
                      other=float("-inf"))
    row_sum = tl.load(partial_stats_ptr + partial_rows * 2 + 1, mask=split_valid, other=0.0)
    # Split 0 always holds position 0, so the overall maximum is finite.
    weights = tl.exp2(row_max - tl.max(row_max, axis=0))
    dims = tl.arange(0, D_PAD)
    dim_valid = dims < head_dim
    acc = tl.load(partial_out_ptr + partial_rows[:, None] * head_dim + dims[None, :],
                  mask=split_valid[:, None] & dim_valid[None, :], other=0.0)
    out = tl.sum(acc * weights[:, None], axis=0) / tl.sum(row_sum * weights, axis=0)
    tl.store(out_ptr + token * out_token_stride + head * out_head_stride + dims,
             out.to(out_ptr.dtype.element_ty), mask=dim_valid)


def _query_tile(n_tokens: int, n_seqs: int, group: int) -> tuple[int, int]:
    """(BLOCK_Q, BLOCK_M): one token a tile for a pure decode batch, else a prefill tile."""
    decode_only = n_tokens == n_seqs
    block_m = max(MIN_DOT_DIM, triton.next_power_of_2(group))
    if not decode_only:
        block_m = max(block_m, PREFILL_BLOCK_M[is_interpreter()])
    block_q = 1 if decode_only else block_m // group
    return block_q, block_m


def _kv_splits_for(n_programs: int, device: torch.device) -> int:
    """Split the KV range when tiles x heads alone would leave SMs idle (small decode
    batches over long contexts), up to MAX_KV_SPLITS."""
    wanted_programs = PROGRAMS_PER_SM * sm_count(device)
    return max(1, min(MAX_KV_SPLITS, wanted_programs // n_programs))


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, context_lens: torch.Tensor,
                    cu_seqlens_q: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of q [T, H, D] over each sequence's paged KV cache; see
    ``reference.paged_attention`` for the exact contract. Returns [T, H, D] in q's dtype."""
    return paged_attention_split_kv(q, k_cache, v_cache, block_tables, context_lens,
                                    cu_seqlens_q, scale, num_kv_splits=None)


def paged_attention_split_kv(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             block_tables: torch.Tensor, context_lens: torch.Tensor,
                             cu_seqlens_q: torch.Tensor, scale: float,
                             num_kv_splits: int | None) -> torch.Tensor:
    """paged_attention with each tile's KV range cut into num_kv_splits parts (None: pick
    from the grid size and the SM count) whose softmax states a second kernel merges."""
    n_tokens, n_heads, head_dim = q.shape
    n_seqs, n_kv_heads = context_lens.shape[0], k_cache.shape[2]
    group = n_heads // n_kv_heads
    out = torch.empty_like(q)
    if n_tokens == 0 or n_seqs == 0:
        return out
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache need the same layout with unit-stride heads")
    # The kernel indexes these with unit inner strides (no-ops when already so).
    block_tables = block_tables if block_tables.stride(-1) == 1 else block_tables.contiguous()
    context_lens, cu_seqlens_q = context_lens.contiguous(), cu_seqlens_q.contiguous()
    block_q, block_m = _query_tile(n_tokens, n_seqs, group)
    # With one token a tile, tiles map to tokens exactly and need no per-sequence slack.
    tile_slack = 1 if block_q > 1 else 0
    n_tiles = n_tokens // block_q + n_seqs * tile_slack
    splits = num_kv_splits or _kv_splits_for(n_tiles * n_kv_heads, q.device)
    rows_per_split = n_tokens * n_heads
    partial_out = torch.empty((splits, rows_per_split, head_dim) if splits > 1 else (0,),
                              dtype=torch.float32, device=q.device)
    partial_stats = torch.empty((splits, rows_per_split, 2) if splits > 1 else (0,),
                                dtype=torch.float32, device=q.device)
    d_pad = max(MIN_DOT_DIM, triton.next_power_of_2(head_dim))
    _paged_attention_kernel[(n_tiles, n_kv_heads, splits)](
        q, k_cache, v_cache, out, partial_out, partial_stats, block_tables, context_lens,
        cu_seqlens_q, scale * LOG2_E, n_seqs, head_dim, n_heads, rows_per_split,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0),
        k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=group, BLOCK_SIZE=k_cache.shape[1], BLOCK_Q=block_q, TILE_SLACK=tile_slack,
        BLOCK_M=block_m, BLOCK_N=BLOCK_N[is_interpreter()], D_PAD=d_pad,
        SEQS_PAD=triton.next_power_of_2(n_seqs), NUM_SPLITS=splits,
        DOT_DTYPE=dot_operand_dtype(q.dtype), DOT_PRECISION=dot_precision(q.dtype),
        num_warps=ATTENTION_WARPS, num_stages=ATTENTION_STAGES)
    if splits > 1:
        _combine_splits_kernel[(n_tokens, n_heads)](
            partial_out, partial_stats, out, n_heads, head_dim, rows_per_split,
            out.stride(0), out.stride(1), NUM_SPLITS=splits,
            SPLITS_PAD=triton.next_power_of_2(splits), D_PAD=d_pad)
    return out
