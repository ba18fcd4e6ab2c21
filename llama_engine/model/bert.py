"""A BERT encoder, whole, in one file: learned absolute positions, post-norm layers
(attention, then a GELU MLP, each followed by a residual add and LayerNorm), bidirectional
attention over the unpadded tokens of each sequence.

Two forwards: ``forward`` runs a padded batch in float32 (documents: embeddings equal
sentence-transformers' to float32 rounding); ``forward_bf16`` runs one unpadded sequence
(a search query, where latency counts) with bfloat16 matmuls on AMX / AVX512-BF16 and the
residual stream, LayerNorm and softmax in float32: a query's ~34 word pieces are bound by
streaming the 42 MB of float32 weights, which bfloat16 halves, and the result stays
within cosine 0.9999 of float32's (tests/test_memory_embeddings.py).

It reads an HF ``BertModel`` checkpoint (config.json + model.safetensors) such as
all-MiniLM-L6-v2, the memory banks' embedding model. Architecture: Devlin et al. 2019,
"BERT: Pre-training of Deep Bidirectional Transformers" (arXiv:1810.04805). The projections
go through ``kernels.linear``; LayerNorm, GELU and attention (with a padding mask) are
torch's own, since the engine's kernels are RMSNorm/SwiGLU/causal-paged ones.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from llama_engine import kernels

SUPPORTED_MODEL_TYPES = {"bert"}


@dataclass(frozen=True)
class BertConfig:
    """The fields of an HF BERT config.json that shape the network."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_positions: int
    type_vocab_size: int
    layer_norm_eps: float

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "BertConfig":
        """Read ``folder/config.json``. Raises ValueError for a non-BERT or non-GELU model."""
        with open(os.path.join(folder, "config.json")) as handle:
            c = json.load(handle)
        if c.get("model_type") not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"{folder}: model_type {c.get('model_type')!r} is not a BERT model")
        if c.get("hidden_act", "gelu") != "gelu" or c.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{folder}: only GELU, absolute-position BERT models are supported")
        return cls(c["vocab_size"], c["hidden_size"], c["num_hidden_layers"],
                   c["num_attention_heads"], c["intermediate_size"],
                   c["max_position_embeddings"], c.get("type_vocab_size", 2),
                   c.get("layer_norm_eps", 1e-12))


class LayerNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)


class Linear(nn.Module):
    """y = x @ W^T + b through ``kernels.linear``; ``bf16`` runs it in bfloat16 on a copy of
    W and b rounded and laid out once (``kernels.pack_bf16``)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False)
        self.packed_bf16 = kernels.pack_bf16(weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.weight).add_(self.bias)

    def bf16(self, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
        """x bfloat16 [M, K] -> bfloat16 [M, N], GELU applied if ``gelu``."""
        return kernels.bf16_linear(x, self.packed_bf16, gelu)


class EncoderLayer(nn.Module):
    """Self-attention and the GELU MLP, each followed by residual + LayerNorm (post-norm)."""

    def __init__(self, config: BertConfig, w: dict[str, torch.Tensor]):
        super().__init__()
        self.num_heads = config.num_heads
        # q, k and v as one [3H, H] matmul
        self.wqkv = Linear(torch.cat([w["attention.self.query.weight"], w["attention.self.key.weight"],
                                      w["attention.self.value.weight"]]),
                           torch.cat([w["attention.self.query.bias"], w["attention.self.key.bias"],
                                      w["attention.self.value.bias"]]))
        self.wo = Linear(w["attention.output.dense.weight"], w["attention.output.dense.bias"])
        self.attn_norm = LayerNorm(w["attention.output.LayerNorm.weight"],
                                   w["attention.output.LayerNorm.bias"], config.layer_norm_eps)
        self.w_up = Linear(w["intermediate.dense.weight"], w["intermediate.dense.bias"])
        self.w_down = Linear(w["output.dense.weight"], w["output.dense.bias"])
        self.ffn_norm = LayerNorm(w["output.LayerNorm.weight"], w["output.LayerNorm.bias"],
                                  config.layer_norm_eps)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        """x [B, S, H] float; attn_mask [B, 1, 1, S] bool, True where a key is a real token."""
        batch, seq, hidden = x.shape
        head_dim = hidden // self.num_heads
        qkv = self.wqkv(x).view(batch, seq, 3, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=attn_mask)
        attn = attn.transpose(1, 2).reshape(batch, seq, hidden)
        x = self.attn_norm(self.wo(attn).add_(x))
        return self.ffn_norm(self.w_down(F.gelu(self.w_up(x))).add_(x))

    def forward_bf16(self, x: torch.Tensor) -> torch.Tensor:
        """x [S, H] float32, one sequence, every token real -> [S, H] float32. The
        projections take bfloat16; attention, residual adds and LayerNorm run in float32."""
        seq, hidden = x.shape
        qkv = self.wqkv.bf16(x.to(torch.bfloat16)).view(1, seq, 3, self.num_heads, hidden // self.num_heads)
        # float32 attention over the bfloat16 q, k, v: as fast at these sizes, and exact softmax;
        # 4-D [1, heads, S, head_dim] so SDPA takes its fused CPU kernel
        q, k, v = qkv.float().permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(seq, hidden)
        x = self.attn_norm(self.wo.bf16(attn.to(torch.bfloat16)).float().add_(x))
        up = self.w_up.bf16(x.to(torch.bfloat16), gelu=True)
        return self.ffn_norm(self.w_down.bf16(up).float().add_(x))


class BertModel(nn.Module):
    """The encoder stack without the pooler: token ids -> last hidden states."""

    def __init__(self, config: BertConfig, weights: dict[str, torch.Tensor]):
        super().__init__()
        self.config = config
        self.word_embeddings = nn.Parameter(weights["embeddings.word_embeddings.weight"], requires_grad=False)
        self.position_embeddings = nn.Parameter(weights["embeddings.position_embeddings.weight"],
                                                requires_grad=False)
        # every input is one segment: token type 0's row is folded into the positions' rows
        self.position_embeddings.data += weights["embeddings.token_type_embeddings.weight"][0]
        self.embed_norm = LayerNorm(weights["embeddings.LayerNorm.weight"],
                                    weights["embeddings.LayerNorm.bias"], config.layer_norm_eps)
        self.layers = nn.ModuleList(
            EncoderLayer(config, {name.removeprefix(f"encoder.layer.{i}."): t
                                  for name, t in weights.items() if name.startswith(f"encoder.layer.{i}.")})
            for i in range(config.num_layers))

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "BertModel":
        """Load config.json and model.safetensors from an HF BERT folder (float32, CPU)."""
        config = BertConfig.from_folder(folder)
        with safe_open(os.path.join(folder, "model.safetensors"), framework="pt") as f:
            prefix = "bert." if any(k.startswith("bert.") for k in f.keys()) else ""
            weights = {k.removeprefix(prefix): f.get_tensor(k).float() for k in f.keys()}
        return cls(config, weights).eval()

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids [B, S] int64, attention_mask [B, S] (1 = token, 0 = padding) ->
        hidden states [B, S, H] float32. Raises ValueError past max_positions tokens."""
        x = self._embed(input_ids)
        keys = attention_mask.bool()[:, None, None, :]
        for layer in self.layers:
            x = layer(x, keys)
        return x

    @property
    def bf16_is_native(self) -> bool:
        """Whether ``forward_bf16`` runs on oneDNN's native bfloat16 matmuls (else it runs
        the torch reference in float32 arithmetic: correct, and slower than ``forward``)."""
        return self.layers[0].wqkv.packed_bf16.onednn

    @torch.inference_mode()
    def forward_bf16(self, input_ids: torch.Tensor) -> torch.Tensor:
        """One sequence without padding, bfloat16 matmuls (see the module docstring):
        input_ids [S] int64 -> hidden states [S, H] float32. Raises ValueError past
        max_positions tokens."""
        x = self._embed(input_ids)
        for layer in self.layers:
            x = layer.forward_bf16(x)
        return x

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [..., S] -> normalized token + position embeddings [..., S, H].
        Raises ValueError past max_positions tokens."""
        seq = input_ids.shape[-1]
        if seq > self.config.max_positions:
            raise ValueError(f"{seq} tokens exceed the model's {self.config.max_positions} positions")
        return self.embed_norm(kernels.embedding(input_ids, self.word_embeddings) + self.position_embeddings[:seq])


def mean_pool_normalized(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers makes them for mean-pooling models:
    the mean of the real tokens' hidden states, scaled to unit L2 norm.
    hidden [B, S, H], attention_mask [B, S] -> [B, H] float32."""
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    summed = (hidden * mask).sum(dim=1)
    mean = summed / mask.sum(dim=1).clamp(min=1e-9)
    return F.normalize(mean, p=2, dim=-1)
