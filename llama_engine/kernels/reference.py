"""Plain torch reference for every hot op.

Every kernel (C++ on CPU, Triton on GPU) is tested against these functions, and the
dispatcher in ``llama_engine.kernels`` falls back to them when no kernel fits.

Shapes used throughout:
  tokens        T   (all sequences of a step flattened, variable lengths)
  heads         H (query), Hkv (key/value, GQA: H % Hkv == 0), head dim D
  KV cache      k_cache, v_cache: [num_blocks, block_size, Hkv, D]
  slot          block_id * block_size + offset inside the block
"""
from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm with the residual add fused in front of it.

    Returns (normed, new_residual) where new_residual = x + residual (or x when residual
    is None): the pre-norm transformer block needs both.
    """
    if residual is not None:
        x = x + residual
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (normed * weight.float()).to(x.dtype), x


def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
         cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding, HF ("rotate half") convention.

    q: [T, H, D], k: [T, Hkv, D], positions: [T] int, cos_sin: [max_pos, D] holding
    cos in the first D/2 columns and sin in the last D/2. Returns new tensors.
    """
    half = q.shape[-1] // 2
    cs = cos_sin[positions.long()]
    cos = cs[:, None, :half].float()
    sin = cs[:, None, half:].float()

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[..., :half].float(), x[..., half:].float()
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


def bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                gelu: bool = False) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T + bias [N], then GELU (erf form) if ``gelu``, all
    bfloat16 in and out: the products and the bias summed in float32, rounded once."""
    y = x.float() @ weight.float().t()
    if bias is not None:
        y += bias.float()
    return (torch.nn.functional.gelu(y) if gelu else y).to(torch.bfloat16)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU activation: gate_up is [..., 2*F] = concat(gate, up); returns silu(gate)*up."""
    gate, up = gate_up.chunk(2, dim=-1)
    # torch computes silu of bfloat16 / float16 in float32 and rounds once
    return torch.nn.functional.silu(gate) * up


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write new keys/values [T, Hkv, D] into the paged cache at slot_mapping [T]."""
    block_size = k_cache.shape[1]
    slots = slot_mapping.long()
    k_cache[slots // block_size, slots % block_size] = k.to(k_cache.dtype)
    v_cache[slots // block_size, slots % block_size] = v.to(v_cache.dtype)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, context_lens: torch.Tensor,
                    cu_seqlens_q: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of new query tokens over each sequence's paged KV cache.

    q: [T, H, D] for B sequences laid end to end; sequence i owns query rows
    cu_seqlens_q[i]:cu_seqlens_q[i+1] (its newest tokens; 1 row for a decode step, a chunk
    for prefill). context_lens[i] counts all of its tokens, the new ones included, whose
    keys/values are already stored in the cache. block_tables: [B, max_blocks] int32.
    Query row j of a sequence with q_len new tokens sits at position
    context_len - q_len + j and attends to keys at positions <= its own.
    """
    block_size = k_cache.shape[1]
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    for i in range(len(context_lens)):
        q_start, q_end = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1])
        ctx = int(context_lens[i])
        q_len = q_end - q_start
        if q_len == 0:
            continue
        n_blocks = (ctx + block_size - 1) // block_size
        blocks = block_tables[i, :n_blocks].long()
        k = k_cache[blocks].reshape(-1, num_kv_heads, k_cache.shape[-1])[:ctx].float()
        v = v_cache[blocks].reshape(-1, num_kv_heads, v_cache.shape[-1])[:ctx].float()
        k = k.repeat_interleave(group, dim=1)  # [ctx, H, D]
        v = v.repeat_interleave(group, dim=1)
        qi = q[q_start:q_end].float()  # [q_len, H, D]
        scores = torch.einsum("qhd,khd->hqk", qi, k) * scale
        q_pos = torch.arange(ctx - q_len, ctx, device=q.device)[:, None]
        k_pos = torch.arange(ctx, device=q.device)[None, :]
        scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
        probs = scores.softmax(-1)
        out[q_start:q_end] = torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)
    return out


def apply_penalties(logits: torch.Tensor, prompt_mask: torch.Tensor, output_counts: torch.Tensor,
                    repetition: torch.Tensor, presence: torch.Tensor,
                    frequency: torch.Tensor) -> torch.Tensor:
    """OpenAI/vLLM-style penalties, in place on logits [B, V].

    prompt_mask [B, V] bool marks tokens of the prompt, output_counts [B, V] counts each
    generated token. Repetition penalty (CTRL) acts on prompt and output tokens alike;
    presence and frequency penalties act on output tokens only.
    """
    seen = prompt_mask | (output_counts > 0)
    rep = repetition[:, None].expand_as(logits)
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits.copy_(torch.where(seen, penalised, logits))
    logits -= frequency[:, None] * output_counts + presence[:, None] * (output_counts > 0)
    return logits


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
           top_p: torch.Tensor, min_p: torch.Tensor, uniform: torch.Tensor
           ) -> torch.Tensor:
    """Pick one token per row of logits [B, V] (float32) with one uniform number per row.

    Row i: temperature[i] == 0 means greedy (argmax, lowest id on ties). Otherwise
    p = softmax(logits / temperature), ranked by probability (ties: lower id first);
    rank r is kept when r < top_k (top_k <= 0: no limit), the probability of the ranks
    before it sums to less than top_p, and p >= min_p * p_max. The kept set is
    renormalised and walked in rank order; the first token whose running sum exceeds
    uniform[i] * total is chosen. A fixed uniform gives a fixed token, so a per-request
    seed fixes the text whatever else is in the batch.
    """
    out = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    for i in range(logits.shape[0]):
        row = logits[i].double()
        if float(temperature[i]) == 0.0:
            out[i] = int(torch.argmax(row))
            continue
        probs = torch.softmax(row / float(temperature[i]), dim=-1)
        order = torch.sort(probs, descending=True, stable=True).indices
        ranked = probs[order]
        keep = torch.ones_like(ranked, dtype=torch.bool)
        if int(top_k[i]) > 0:
            keep[int(top_k[i]):] = False
        before = torch.cumsum(ranked, 0) - ranked
        keep &= before < float(top_p[i])
        keep &= ranked >= float(min_p[i]) * ranked[0]
        kept = torch.where(keep, ranked, torch.zeros_like(ranked))
        running = torch.cumsum(kept, 0)
        target = float(uniform[i]) * float(running[-1])
        pick = int(torch.searchsorted(running, torch.tensor([target], dtype=running.dtype),
                                      right=True)[0])
        pick = min(pick, int(keep.sum()) - 1)
        out[i] = order[pick]
    return out


def top_logprobs(logits: torch.Tensor, chosen: torch.Tensor, k: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-softmax of the raw logits [B, V]: the chosen tokens' logprobs [B] and the k best
    (ids [B, k], logprobs [B, k]), as the API reports them."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen_lp = logprobs.gather(1, chosen[:, None]).squeeze(1)
    top_lp, top_ids = logprobs.topk(k, dim=-1) if k > 0 else (logprobs[:, :0], chosen[:, None][:, :0])
    return chosen_lp, top_ids, top_lp


# ---- batched LoRA ----------------------------------------------------------------------------
# A step's tokens come in segments (a sequence's tokens, or a run of sequences), each using
# one adapter slot of the stacked weights, or -1 for none: Punica's SGMV layout (Chen et al.
# 2023, "Punica: Multi-Tenant LoRA Serving"; S-LoRA, Sheng et al. 2023).
#   seg_indptr  int [S + 1]   token offsets of the segments, 0 .. T
#   seg_slots   int [S]       adapter slot of each segment, -1: no adapter
# A (possibly fused) projection with P output slices (q, k, v of the fused QKV; P = 1
# otherwise) and adapter rank R stacks its slots as
#   a_stack     [slots, P * R, K]   the P sub-projections' A, one under the other
#   b_stack     [slots, R, N]       B^T, the P sub-projections side by side along N
#   scales      [slots, P]          alpha / r (alpha / sqrt(r) for rsLoRA) per sub-projection
# so that slice p (columns slice_offsets[p]:slice_offsets[p + 1]) reads h's columns
# p*R:(p+1)*R: a block-diagonal B stored without its zero blocks.

def lora_token_slots(seg_indptr: torch.Tensor, seg_slots: torch.Tensor,
                     num_tokens: int) -> torch.Tensor:
    """The adapter slot of every token, int64 [T] (-1: no adapter), from the segments."""
    lengths = (seg_indptr[1:] - seg_indptr[:-1]).long()
    return torch.repeat_interleave(seg_slots.long(), lengths, output_size=num_tokens)


def lora_shrink(x: torch.Tensor, a_stack: torch.Tensor, seg_indptr: torch.Tensor,
                seg_slots: torch.Tensor) -> torch.Tensor:
    """h = x @ A_slot^T per token: x [T, K], a_stack [slots, P*R, K] -> h [T, P*R] float32,
    zero for tokens with no adapter. Computed in float32 from the inputs' values."""
    slots = lora_token_slots(seg_indptr, seg_slots, x.shape[0])
    a = a_stack[slots.clamp(min=0)].float()  # [T, P*R, K]
    h = torch.einsum("tk,trk->tr", x.float(), a)
    return torch.where((slots >= 0)[:, None], h, torch.zeros_like(h))


def lora_expand(y: torch.Tensor, h: torch.Tensor, b_stack: torch.Tensor,
                slice_offsets: tuple[int, ...], scales: torch.Tensor, seg_indptr: torch.Tensor,
                seg_slots: torch.Tensor, magnitude_ratio: torch.Tensor | None = None
                ) -> torch.Tensor:
    """In place on y [T, N] (the base projection's output), for tokens with slot s >= 0 and
    each output slice p:

        y[t, cols_p] = ratio[s, cols_p]
                       * (y[t, cols_p] + scales[s, p] * h[t, p*R:(p+1)*R] @ b_stack[s][:, cols_p])

    h [T, P*R] (float32, from lora_shrink), b_stack [slots, R, N], scales [slots, P],
    magnitude_ratio [slots, N] (DoRA; None: 1). Tokens with no adapter keep y. Returns y.
    """
    slots = lora_token_slots(seg_indptr, seg_slots, y.shape[0])
    rows = torch.nonzero(slots >= 0).squeeze(1)
    s = slots[rows]
    rank = b_stack.shape[1]
    out = y[rows].float()
    for p in range(len(slice_offsets) - 1):
        lo, hi = slice_offsets[p], slice_offsets[p + 1]
        delta = torch.einsum("tr,trn->tn", h[rows, p * rank:(p + 1) * rank].float(),
                             b_stack[s, :, lo:hi].float())
        out[:, lo:hi] += scales[s, p].float()[:, None] * delta
    if magnitude_ratio is not None:
        out *= magnitude_ratio[s].float()
    y[rows] = out.to(y.dtype)
    return y


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor,
                  with_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per row of logits [rows, vocab] (float32 or bfloat16): loss [rows] float32 =
    logsumexp(logits) - logits[label] (0 where label < 0) and, ``with_grad``, the gradient
    scale[r] * (softmax(logits[r]) - one_hot(label)) in the logits' dtype (zero rows where
    label < 0). labels int64 [rows], scale float32 [rows]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    counted = labels >= 0
    target = labels.clamp(min=0)[:, None]
    loss = -logp.gather(1, target).squeeze(1) * counted
    if not with_grad:
        return loss, None
    grad = logp.exp_().scatter_add_(1, target, torch.full_like(target, -1, dtype=logp.dtype))
    return loss, grad.mul_((scale * counted)[:, None]).to(logits.dtype)
