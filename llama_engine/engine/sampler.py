"""Turns a step's logits into one token per sampling sequence (one fused kernel call for
the whole batch), with the chosen token's logprob and the requested top-k logprobs."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from llama_engine import kernels
from llama_engine.engine.sequence import Sequence


@dataclass
class SampledToken:
    token_id: int
    logprob: float
    top_logprobs: dict[int, float] | None


def _param_column(seqs: list[Sequence], name: str, dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor:
    """One sampling setting of every row, as a tensor."""
    return torch.tensor([getattr(s.params, name) for s in seqs], dtype=dtype, device=device)


def _penalty_inputs(seqs: list[Sequence], vocab: int, device: torch.device
                    ) -> tuple[torch.Tensor, ...]:
    """``kernels.apply_penalties``' inputs for these rows, built on ``device``: which tokens
    each prompt holds (bool [B, V]), how often each was generated (float32 [B, V]), and the
    three penalty columns. Token ids travel to the device once, as flat (row, id) lists."""
    def scatter_index(token_lists: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [row for row, ids in enumerate(token_lists) for _ in ids]
        ids = [t for ids in token_lists for t in ids]
        return (torch.tensor(rows, dtype=torch.long, device=device),
                torch.tensor(ids, dtype=torch.long, device=device))

    prompt_mask = torch.zeros(len(seqs), vocab, dtype=torch.bool, device=device)
    prompt_mask[scatter_index([s.token_ids[:s.prompt_len] for s in seqs])] = True
    counts = torch.zeros(len(seqs), vocab, dtype=torch.float32, device=device)
    rows, ids = scatter_index([s.output_token_ids for s in seqs])
    counts.index_put_((rows, ids), torch.ones(len(ids), device=device), accumulate=True)
    penalties = [_param_column(seqs, name, torch.float32, device) for name in
                 ("repetition_penalty", "presence_penalty", "frequency_penalty")]
    return (prompt_mask, counts, *penalties)


def penalized_logits(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """A penalised copy of logits [B, V] when any row asks for penalties, else logits."""
    if not any(s.params.needs_penalties for s in seqs):
        return logits
    return kernels.apply_penalties(logits.clone(), *_penalty_inputs(seqs, logits.shape[1],
                                                                    logits.device))


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[SampledToken]:
    """``logits`` [len(seqs), V] float32, row i for seqs[i]."""
    device = logits.device
    raw = logits
    logits = penalized_logits(logits, seqs)
    params = [s.params for s in seqs]
    # One uniform per sampled row from the sequence's own generator; greedy rows draw none.
    uniform = [0.0 if p.greedy else s.rng.random() for s, p in zip(seqs, params)]

    tokens = kernels.sample(logits.contiguous(),
                            _param_column(seqs, "temperature", torch.float32, device),
                            _param_column(seqs, "top_k", torch.int32, device),
                            _param_column(seqs, "top_p", torch.float32, device),
                            _param_column(seqs, "min_p", torch.float32, device),
                            torch.tensor(uniform, dtype=torch.float32, device=device))
    picked = token_logprobs(raw, tokens, [p.logprobs for p in params])
    return [SampledToken(token_id, logprob, top)
            for token_id, (logprob, top) in zip(tokens.tolist(), picked)]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, counts: list[int | None]
                   ) -> list[tuple[float, dict[int, float] | None]]:
    """Row i of logits [B, V] scores tokens[i] ([B] long, same device): its log-softmax
    logprob and, when counts[i] is not None, the counts[i] most likely tokens plus tokens[i]
    as {token id: logprob} (what the APIs report); None otherwise."""
    k = max((c or 0) for c in counts)
    chosen_lp, top_ids, top_lp = kernels.top_logprobs(logits, tokens, k)
    chosen, ids, values = chosen_lp.tolist(), top_ids.tolist(), top_lp.tolist()
    result = []
    for row, (token_id, count) in enumerate(zip(tokens.tolist(), counts)):
        top = None
        if count is not None:
            top = dict(zip(ids[row][:count], values[row][:count]))
            top[token_id] = chosen[row]
        result.append((chosen[row], top))
    return result
