"""Turns a step's logits into one token per sampling sequence (one fused kernel call for
the whole batch), with the chosen token's logprob and the requested top-k logprobs."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from llama_engine import kernels
from llama_engine.engine.sequence import Sequence
from llama_engine.kernels import reference


@dataclass
class SampledToken:
    token_id: int
    logprob: float
    top_logprobs: dict[int, float] | None


def _param_column(seqs: list[Sequence], name: str, dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor:
    """One sampling setting of every row, as a tensor."""
    return torch.tensor([getattr(s.params, name) for s in seqs], dtype=dtype, device=device)


def _penalty_inputs(seqs: list[Sequence], vocab: int, device: torch.device):
    prompt_mask = torch.zeros(len(seqs), vocab, dtype=torch.bool, device=device)
    counts = torch.zeros(len(seqs), vocab, dtype=torch.float32, device=device)
    for row, seq in enumerate(seqs):
        prompt_mask[row, torch.tensor(seq.token_ids[:seq.prompt_len], dtype=torch.long)] = True
        out = seq.output_token_ids
        if out:
            counts[row].index_add_(0, torch.tensor(out, dtype=torch.long),
                                   torch.ones(len(out), device=device))
    penalties = [_param_column(seqs, name, torch.float32, device) for name in
                 ("repetition_penalty", "presence_penalty", "frequency_penalty")]
    return (prompt_mask, counts, *penalties)


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[SampledToken]:
    """``logits`` [len(seqs), V] float32, row i for seqs[i]."""
    device = logits.device
    raw = logits
    if any(s.params.needs_penalties for s in seqs):
        logits = reference.apply_penalties(logits.clone(), *_penalty_inputs(
            seqs, logits.shape[1], device))
    params = [s.params for s in seqs]
    # One uniform per sampled row from the sequence's own generator; greedy rows draw none.
    uniform = [0.0 if p.greedy else s.rng.random() for s, p in zip(seqs, params)]

    tokens = kernels.sample(logits.contiguous(),
                            _param_column(seqs, "temperature", torch.float32, device),
                            _param_column(seqs, "top_k", torch.int32, device),
                            _param_column(seqs, "top_p", torch.float32, device),
                            _param_column(seqs, "min_p", torch.float32, device),
                            torch.tensor(uniform, dtype=torch.float32, device=device))
    k = max((p.logprobs or 0) for p in params)
    chosen_lp, top_ids, top_lp = reference.top_logprobs(raw, tokens, k)
    result = []
    for row, p in enumerate(params):
        top = None
        if p.logprobs is not None:
            top = dict(zip(top_ids[row, :p.logprobs].tolist(), top_lp[row, :p.logprobs].tolist()))
            top[int(tokens[row])] = float(chosen_lp[row])
        result.append(SampledToken(int(tokens[row]), float(chosen_lp[row]), top))
    return result
