"""Token sampling: torch.sort ranks each row, one Triton program per row does the rest
(temperature softmax, top-k / top-p / min-p filtering, renormalisation and the walk to
the token picked by that row's uniform number), streaming the ranked row in tiles.

Ranking logits is ranking probabilities (softmax is monotonic), and a stable descending
sort puts the lower id first among equal logits, as the reference does.

The arithmetic is float64 like the reference's: in float32, rounding in the running
sums moves the walk's boundaries enough to change about one pick in a thousand.

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
SAMPLE_TILE = {True: 256, False: 2048}
SAMPLE_WARPS = 8


@triton.jit
def _weights(sorted_logits_row, ranks, n_valid, temperature, top_scaled):
    """exp(logit / T - top_logit / T) of the given ranks in float64, 0 past n_valid."""
    logits = tl.load(sorted_logits_row + ranks, mask=ranks < n_valid, other=float("-inf"))
    return tl.exp(logits.to(tl.float64) / temperature - top_scaled)


@triton.jit
def _kept_mass(sorted_logits_row, vocab, temperature, top_scaled, top_k, top_p, min_p,
               normaliser, TILE: tl.constexpr):
    """Pass 2: (number of kept ranks, their probability mass), walking ranks in order."""
    kept_count = 0
    kept_mass = tl.zeros([], tl.float64)
    mass_before_tile = tl.zeros([], tl.float64)
    for tile_start in range(0, vocab, TILE):
        ranks = tile_start + tl.arange(0, TILE)
        in_vocab = ranks < vocab
        probs = _weights(sorted_logits_row, ranks, vocab, temperature, top_scaled) / normaliser
        mass_before = mass_before_tile + tl.cumsum(probs, axis=0) - probs
        # The top rank's weight is exp(0) = 1, so p_max = 1 / normaliser.
        keep = in_vocab & (mass_before < top_p) & (probs >= min_p * (1.0 / normaliser))
        keep = keep & ((top_k <= 0) | (ranks < top_k))
        kept_count += tl.sum(keep.to(tl.int32), axis=0)
        kept_mass += tl.sum(tl.where(keep, probs, tl.zeros_like(probs)), axis=0)
        mass_before_tile += tl.sum(probs, axis=0)
    return kept_count, kept_mass


@triton.jit
def _sample_kernel(sorted_logits_ptr, order_ptr, temperature_ptr, top_k_ptr, top_p_ptr,
                   min_p_ptr, uniform_ptr, out_ptr, vocab, row_stride, order_row_stride,
                   TILE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    sorted_logits_row = sorted_logits_ptr + row * row_stride
    order_row = order_ptr + row * order_row_stride
    temperature = tl.load(temperature_ptr + row).to(tl.float64)
    chosen_rank = 0  # greedy: the first rank is the argmax, lowest id on ties
    if temperature != 0.0:
        top_scaled = tl.load(sorted_logits_row).to(tl.float64) / temperature
        # Pass 1: softmax normaliser relative to the top logit.
        normaliser = tl.zeros([], tl.float64)
        for tile_start in range(0, vocab, TILE):
            ranks = tile_start + tl.arange(0, TILE)
            normaliser += tl.sum(_weights(sorted_logits_row, ranks, vocab, temperature,
                                          top_scaled), axis=0)
        kept_count, kept_mass = _kept_mass(
            sorted_logits_row, vocab, temperature, top_scaled, tl.load(top_k_ptr + row),
            tl.load(top_p_ptr + row).to(tl.float64), tl.load(min_p_ptr + row).to(tl.float64),
            normaliser, TILE)
        target = tl.load(uniform_ptr + row).to(tl.float64) * kept_mass
        # Pass 3: count kept ranks whose running sum stays <= target.
        chosen_rank = 0
        running_before_tile = tl.zeros([], tl.float64)
        for tile_start in range(0, kept_count, TILE):
            ranks = tile_start + tl.arange(0, TILE)
            probs = _weights(sorted_logits_row, ranks, kept_count, temperature,
                             top_scaled) / normaliser
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
    # Per-row parameters may come from the host; the kernel reads them with unit stride.
    params = [p.to(logits.device).contiguous()
              for p in (temperature, top_k, top_p, min_p, uniform)]
    tile = min(SAMPLE_TILE[is_interpreter()], triton.next_power_of_2(vocab))
    _sample_kernel[(n_rows,)](
        sorted_logits, order, *params, out, vocab, sorted_logits.stride(0), order.stride(0),
        TILE=tile, num_warps=SAMPLE_WARPS)
    return out
