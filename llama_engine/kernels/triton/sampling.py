"""Token sampling: torch.sort ranks each row, one Triton program per row does the rest
(temperature softmax, top-k / top-p / min-p filtering, renormalisation and the walk to
the token picked by that row's uniform number), streaming the ranked row in tiles.

Ranking logits is ranking probabilities (softmax is monotonic), and a stable descending
sort puts the lower id first among equal logits, as the reference does.

Every filter keeps a prefix of the ranking (rank < top_k; the mass before a rank grows
with it; probabilities fall with it), so the kept set is the first n_keep ranks, and the
chosen rank is the number of kept ranks whose running sum is <= uniform * kept total.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from llama_engine.kernels.triton._launch import is_interpreter

# Ranked logits a loop step of the sampling kernel reads, per execution mode.
SAMPLE_BLOCK = {True: 256, False: 2048}
SAMPLE_WARPS = 8


@triton.jit
def _kept_mass(sorted_logits_row, vocab, inv_temperature, top_k, top_p, min_p, normaliser,
               BLOCK: tl.constexpr):
    """Pass 2: (number of kept ranks, their probability mass), walking ranks in order."""
    kept_count = 0
    kept_mass = 0.0
    mass_before_tile = 0.0
    top_logit = tl.load(sorted_logits_row)
    for tile_start in range(0, vocab, BLOCK):
        ranks = tile_start + tl.arange(0, BLOCK)
        in_vocab = ranks < vocab
        logits = tl.load(sorted_logits_row + ranks, mask=in_vocab, other=float("-inf"))
        weights = tl.exp((logits - top_logit) * inv_temperature)
        probs = weights / normaliser
        mass_before = mass_before_tile + tl.cumsum(probs, axis=0) - probs
        # p >= min_p * p_max, with p_max = 1 / normaliser: compare unnormalised weights.
        keep = in_vocab & (mass_before < top_p) & (weights >= min_p)
        keep = keep & ((top_k <= 0) | (ranks < top_k))
        kept_count += tl.sum(keep.to(tl.int32), axis=0)
        kept_mass += tl.sum(tl.where(keep, probs, 0.0), axis=0)
        mass_before_tile += tl.sum(probs, axis=0)
    return kept_count, kept_mass


@triton.jit
def _sample_kernel(sorted_logits_ptr, order_ptr, temperature_ptr, top_k_ptr, top_p_ptr,
                   min_p_ptr, uniform_ptr, out_ptr, vocab, row_stride, order_row_stride,
                   BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    sorted_logits_row = sorted_logits_ptr + row * row_stride
    order_row = order_ptr + row * order_row_stride
    temperature = tl.load(temperature_ptr + row).to(tl.float32)
    chosen_rank = 0  # greedy: the first rank is the argmax, lowest id on ties
    if temperature != 0.0:
        inv_temperature = 1.0 / temperature
        top_logit = tl.load(sorted_logits_row)
        # Pass 1: softmax normaliser relative to the top logit.
        normaliser = 0.0
        for tile_start in range(0, vocab, BLOCK):
            ranks = tile_start + tl.arange(0, BLOCK)
            logits = tl.load(sorted_logits_row + ranks, mask=ranks < vocab,
                             other=float("-inf"))
            normaliser += tl.sum(tl.exp((logits - top_logit) * inv_temperature), axis=0)
        kept_count, kept_mass = _kept_mass(
            sorted_logits_row, vocab, inv_temperature, tl.load(top_k_ptr + row),
            tl.load(top_p_ptr + row).to(tl.float32), tl.load(min_p_ptr + row).to(tl.float32),
            normaliser, BLOCK)
        target = tl.load(uniform_ptr + row).to(tl.float32) * kept_mass
        # Pass 3: count kept ranks whose running sum stays <= target.
        chosen_rank = 0
        running_before_tile = 0.0
        for tile_start in range(0, kept_count, BLOCK):
            ranks = tile_start + tl.arange(0, BLOCK)
            logits = tl.load(sorted_logits_row + ranks, mask=ranks < kept_count,
                             other=float("-inf"))
            probs = tl.exp((logits - top_logit) * inv_temperature) / normaliser
            running = running_before_tile + tl.cumsum(probs, axis=0)
            chosen_rank += tl.sum(((running <= target) & (ranks < kept_count)).to(tl.int32),
                                  axis=0)
            running_before_tile += tl.sum(probs, axis=0)
        # The reference clamps to the last kept rank (index -1, the last rank, if none).
        chosen_rank = tl.minimum(chosen_rank, kept_count - 1)
        chosen_rank = tl.where(chosen_rank < 0, chosen_rank + vocab, chosen_rank)
    tl.store(out_ptr + row, tl.load(order_row + chosen_rank).to(tl.int64))


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
           top_p: torch.Tensor, min_p: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One token id per row of logits [B, V] with one uniform per row; the same contract
    as ``reference.sample``. Returns int64 [B]."""
    n_rows, vocab = logits.shape
    out = torch.empty(n_rows, dtype=torch.long, device=logits.device)
    if n_rows == 0:
        return out
    sorted_logits, order = torch.sort(logits.float(), dim=-1, descending=True, stable=True)
    block = min(SAMPLE_BLOCK[is_interpreter()], triton.next_power_of_2(vocab))
    _sample_kernel[(n_rows,)](
        sorted_logits, order, temperature, top_k, top_p, min_p, uniform, out, vocab,
        sorted_logits.stride(0), order.stride(0), BLOCK=block, num_warps=SAMPLE_WARPS)
    return out
