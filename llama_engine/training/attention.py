"""A differentiable causal attention for packed training batches: ``attend(layer, q, k, v)``
as the model calls it, over the step's own tokens (there is no KV cache in training)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from llama_engine.training.batching import PackedBatch


class PackedCausalAttention:
    """Scaled dot-product attention where each token sees the tokens of its own sequence at
    positions up to its own: a block-diagonal causal mask over the packed batch. GQA key/value
    heads are repeated to the query heads as HF's ``repeat_kv`` does."""

    def __init__(self, batch: PackedBatch):
        same_seq = batch.seq_index[:, None] == batch.seq_index[None, :]
        causal = batch.positions[None, :] <= batch.positions[:, None]
        self.mask = same_seq & causal  # [T, T] bool, True = may attend

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                 ) -> torch.Tensor:
        """q [T, H, D], k and v [T, Hkv, D] -> [T, H, D]."""
        group = q.shape[1] // k.shape[1]
        q_, k_, v_ = (t.transpose(0, 1)[None] for t in (q, k, v))  # [1, heads, T, D]
        if group > 1:
            k_, v_ = k_.repeat_interleave(group, dim=1), v_.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q_, k_, v_, attn_mask=self.mask)
        return out[0].transpose(0, 1)
