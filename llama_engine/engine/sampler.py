"""Turns a step's logits into one token per sampling sequence (one fused kernel call for
the whole batch), with the chosen token's logprob and the requested top-k logprobs."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from llama_engine import kernels
from llama_engine.engine.sequence import Sequence


# What a banned token's logit drops by: below every finite logit (it may reach -inf), so
# softmax gives it probability 0 and argmax never picks it. Subtracting a 0/1 mask times
# this is several times faster on the CPU than masked_fill with a bool mask.
BANNED_LOGIT_DROP = torch.finfo(torch.float32).max
BITMASK_SHIFTS = torch.arange(32, dtype=torch.int32)  # bit k of an int32 bitmask word


@dataclass
class TokenBitmask:
    """Allowed next tokens of some rows of the batch (structured outputs): ``rows[i]`` is
    the logits row that ``bitmask[i]`` (int32 [words], bit t % 32 of word t // 32 set =
    token t allowed) applies to."""

    rows: list[int]
    bitmask: torch.Tensor


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


def _banned_tokens(bitmask: torch.Tensor, vocab: int, device: torch.device) -> torch.Tensor:
    """A bitmask int32 [B, words] (set bit = allowed) as float32 [B, vocab] on ``device``,
    1 where the token is banned and 0 where it is allowed."""
    if device.type == "cpu":  # numpy's unpackbits is one vectorised pass over the bytes
        bits = np.unpackbits(np.invert(bitmask.numpy()).view(np.uint8), axis=1, count=vocab,
                             bitorder="little")
        return torch.from_numpy(bits).to(torch.float32)
    words = torch.bitwise_not(bitmask.to(device, non_blocking=True))
    bits = (words.unsqueeze(-1) >> BITMASK_SHIFTS.to(device)) & 1
    return bits.view(words.shape[0], -1)[:, :vocab].to(torch.float32)


def apply_token_bitmask(logits: torch.Tensor, mask: TokenBitmask) -> None:
    """Ban, in place, the tokens each masked row of ``logits`` [B, V] float32 does not
    allow: their logits drop below every finite value (BANNED_LOGIT_DROP)."""
    banned = _banned_tokens(mask.bitmask, logits.shape[1], logits.device)
    if len(mask.rows) == logits.shape[0]:
        logits.sub_(banned, alpha=BANNED_LOGIT_DROP)
        return
    rows = torch.tensor(mask.rows, device=logits.device)
    logits[rows] = logits[rows].sub_(banned, alpha=BANNED_LOGIT_DROP)


def apply_logit_bias(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """Add each row's ``logit_bias`` (token id -> value in [-100, 100], OpenAI's field) to
    ``logits`` [len(seqs), V] float32, in place."""
    rows, tokens, biases = [], [], []
    for row, seq in enumerate(seqs):
        for token, bias in (seq.params.logit_bias or {}).items():
            rows.append(row)
            tokens.append(token)
            biases.append(float(bias))
    device = logits.device
    logits.index_put_((torch.tensor(rows, dtype=torch.long, device=device),
                       torch.tensor(tokens, dtype=torch.long, device=device)),
                      torch.tensor(biases, dtype=logits.dtype, device=device), accumulate=True)


def _constrain(logits: torch.Tensor, raw: torch.Tensor, seqs: list[Sequence],
               token_bitmask: TokenBitmask | None) -> torch.Tensor:
    """logit_bias, then the structured-output masks; ``raw`` (kept for logprobs) is
    copied before the first change."""
    biased = any(s.params.logit_bias for s in seqs)
    if (biased or token_bitmask is not None) and logits is raw:
        logits = logits.clone()
    if biased:
        apply_logit_bias(logits, seqs)
    if token_bitmask is not None:
        apply_token_bitmask(logits, token_bitmask)
    return logits


def sample(logits: torch.Tensor, seqs: list[Sequence],
           token_bitmask: TokenBitmask | None = None) -> list[SampledToken]:
    """``logits`` [len(seqs), V] float32, row i for seqs[i]; ``token_bitmask`` limits the
    rows under a structured-output constraint to the tokens their grammar allows."""
    device = logits.device
    raw = logits
    logits = _constrain(penalized_logits(logits, seqs), raw, seqs, token_bitmask)
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
