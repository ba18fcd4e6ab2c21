"""The Llama model, whole, in one file: GQA attention, RoPE (llama3 scaling), SwiGLU,
RMSNorm, tied or untied output head, or a ``score`` head instead (a reward model, HF
``LlamaForSequenceClassification``).

The decoder layer is written out step by step as in gpt-fast: norm, fused QKV projection,
RoPE, attend, output projection, norm, fused gate/up projection, SiLU-and-multiply, down
projection. Every hot op goes through ``llama_engine.kernels``, and attention over past
tokens is the caller's business: ``forward`` takes an ``Attention`` (layer index, q, k, v ->
output) that the model runner builds over its paged KV cache, so nothing here knows how the
cache is laid out.

Two seams hang off the layer:
  * adapters: each projection is a ``Linear`` that adds the step's ``Adapters`` (LoRA and
    friends) to its output; with none, the path is the base model's;
  * the fused kernel: where ``kernels.fused_decoder_layer`` has one for the layer's weights
    (packed weights on the CPU), the layer runs as one kernel call, the step's adapters
    inside it (where the Adapters offer ``fused``), as long as no gradient is involved.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from llama_engine import kernels
from llama_engine.config import ModelConfig, rope_inv_freq
from llama_engine.quant import PackedWeight

Weight = torch.Tensor | PackedWeight


def concat_rows(weights: list[Weight]) -> Weight:
    """Stack [N_i, K] weights into one [sum N_i, K] so fused projections run as one matmul."""
    if all(isinstance(w, PackedWeight) for w in weights) and len({w.qtype for w in weights}) == 1:
        data = torch.cat([w.data for w in weights])
        return PackedWeight(data, weights[0].qtype, data.shape[0], weights[0].cols)
    dense = [kernels.dequantize(w) if isinstance(w, PackedWeight) else w for w in weights]
    return torch.cat(dense)


class Adapters(Protocol):
    """The adapters of one step, as the projections see them.

    ``adapters(linear, x, y)`` returns y [T, N] plus each token's adapter update on that
    projection: for the tokens served by adapter i, s_i * (x @ A_i^T) @ B_i^T on the output
    columns of each module it targets (``linear.parts`` maps the PEFT module names of a
    fused projection, e.g. q_proj / k_proj / v_proj, to their column ranges). Tokens with no
    adapter get nothing added. The output head (``Llama.compute_logits``) is a Linear with
    layer -1 and no parts, and its adapters are given the rows whose logits are computed. A batched LoRA kernel (shrink, expand by token segment)
    implements it; ``None`` instead of an Adapters runs the base model.
    """

    def __call__(self, linear: Linear, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...

    # Optional: ``fused(layer) -> kernels.LayerLoRA | None``, the same adapters of one decoder
    # layer for the fused decoder-layer kernel, or None where they cannot run inside it.
    # Adapters without it (training's) run their layers op by op.


class Linear(nn.Module):
    """y = x @ W^T (+ the step's adapters), W [N, K] dense or packed.

    A dense W is the parameter ``weight``. A packed W (GGUF block format or NF4) is the
    uint8 buffer ``qweight`` [N, row bytes] with its format and shape as attributes, so
    ``state_dict()``, ``.to()`` and ``buffers()`` see it. ``layer`` and ``parts`` (PEFT
    module name -> output column range) tell an ``Adapters`` which projection this is.
    ``compute_dtype`` (None: x's) is the matmul's precision (``kernels.linear``): training
    sets it to bfloat16 over a frozen base. After ``round_to_bf16`` W is ``bf16`` alone (an
    inference-time copy in oneDNN's layout, which neither ``state_dict()`` nor ``.to()`` sees).
    """

    def __init__(self, weight: Weight, layer: int = -1,
                 parts: dict[str, tuple[int, int]] | None = None):
        super().__init__()
        self.layer = layer
        self.parts = parts or {}
        self.compute_dtype: torch.dtype | None = None
        if isinstance(weight, PackedWeight):
            self.weight = None
            self.register_buffer("qweight", weight.data)
            self.qtype, self.rows, self.cols = weight.qtype, weight.rows, weight.cols
        else:
            self.weight = nn.Parameter(weight, requires_grad=False)
            self.qweight = None
        self.bf16: kernels.BF16Weight | None = None

    @property
    def packed(self) -> PackedWeight | None:
        if self.qweight is None:
            return None
        return PackedWeight(self.qweight, self.qtype, self.rows, self.cols)

    @property
    def matrix(self) -> Weight | kernels.BF16Weight:
        if self.bf16 is not None:
            return self.bf16
        return self.weight if self.qweight is None else self.packed

    def round_to_bf16(self) -> None:
        """Replace W by W rounded to bfloat16 (a packed W dequantized first), so ``forward``
        multiplies in bfloat16 (``kernels.bf16_matmul``). Inference only: the float32 or
        packed W is dropped."""
        self.bf16 = kernels.pack_bf16(self.weight if self.packed is None
                                      else kernels.dequantize(self.packed))
        self.weight, self.qweight = None, None

    def forward(self, x: torch.Tensor, adapters: Adapters | None = None,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """y [..., N] of x [..., K], cast to ``out_dtype`` (None: as the matmul gives it)
        before the adapters add their update to it."""
        y = kernels.linear(x, self.matrix, self.compute_dtype)
        if out_dtype is not None:
            y = y.to(out_dtype)
        return y if adapters is None else adapters(self, x, y)


class Embedding(nn.Module):
    """Token embedding rows, dense (parameter ``weight``) or packed (buffer ``qweight``)."""

    def __init__(self, weight: Weight):
        super().__init__()
        self.table = Linear(weight)  # same storage rules as a projection's weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return kernels.embedding(ids, self.table.matrix)


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight.float(), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(RMSNorm(x + residual), x + residual): the pre-norm layer needs both."""
        return kernels.rms_norm(x, self.weight, self.eps, residual)


class DecoderLayer(nn.Module):
    """Attention, then the SwiGLU MLP, each with a pre-norm and a residual."""

    def __init__(self, config: ModelConfig, w: dict[str, Weight], layer: int):
        super().__init__()
        eps = config.rms_norm_eps
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.input_layernorm = RMSNorm(w["attn_norm"], eps)
        self.qkv_proj = Linear(concat_rows([w["wq"], w["wk"], w["wv"]]), layer, _parts(
            q_proj=self.q_size, k_proj=self.kv_size, v_proj=self.kv_size))
        self.o_proj = Linear(w["wo"], layer, _parts(o_proj=config.hidden_size))
        self.post_attention_layernorm = RMSNorm(w["ffn_norm"], eps)
        ffn = config.intermediate_size
        self.gate_up_proj = Linear(concat_rows([w["w_gate"], w["w_up"]]), layer,
                                   _parts(gate_proj=ffn, up_proj=ffn))
        self.down_proj = Linear(w["w_down"], layer, _parts(down_proj=config.hidden_size))
        self._fused: kernels.FusedDecoderLayer | None = None
        self._fused_checked = False  # asked kernels for a fused kernel yet
        # what the projections take (round_matmuls_to_bf16: bfloat16); None: x's dtype
        self.matmul_dtype: torch.dtype | None = None
        # what they give, their adapters' update added in it; None: as their matmul gives it
        self.projection_dtype: torch.dtype | None = None

    def forward(self, layer: int, x: torch.Tensor, residual: torch.Tensor | None,
                positions: torch.Tensor, cos_sin: torch.Tensor, attend: kernels.Attention,
                adapters: Adapters | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x, residual [T, C] (residual None in the first layer); returns (layer output,
        new residual)."""
        fused = self._fused_kernel()
        if fused is not None and fused.runs(x):
            fuse = getattr(adapters, "fused", None)
            lora = fuse(layer) if fuse is not None and fused.takes_lora(layer, attend) else None
            if adapters is None or lora is not None:
                return fused(layer, x, residual, positions, cos_sin, attend, lora)
        # With bfloat16 matmuls, norms, RoPE and attention stay in x's dtype; the MLP's
        # activations stay bfloat16 between its two projections (one rounding fewer each way)
        # unless projection_dtype says otherwise.
        tokens, dtype, matmul_dtype = x.shape[0], x.dtype, self.matmul_dtype or x.dtype
        out = self.projection_dtype
        h, residual = self.input_layernorm(x, residual)
        q, k, v = self.qkv_proj(h.to(matmul_dtype), adapters, out).split(
            [self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = kernels.rope(q.reshape(tokens, self.num_heads, self.head_dim).to(dtype).contiguous(),
                            k.reshape(tokens, self.num_kv_heads, self.head_dim).to(dtype).contiguous(),
                            positions, cos_sin)
        v = v.reshape(tokens, self.num_kv_heads, self.head_dim).to(dtype).contiguous()
        attn = attend(layer, q, k, v)
        h, residual = self.post_attention_layernorm(
            self.o_proj(attn.reshape(tokens, -1).to(matmul_dtype), adapters, out).to(dtype),
            residual)
        gate_up = self.gate_up_proj(h.to(matmul_dtype), adapters, out)
        return self.down_proj(kernels.silu_and_mul(gate_up), adapters, out).to(dtype), residual

    def round_matmuls_to_bf16(self) -> None:
        """The four projections multiply in bfloat16 (``Linear.round_to_bf16``); the layer
        then runs op by op (the fused kernel takes packed weights)."""
        for linear in (self.qkv_proj, self.o_proj, self.gate_up_proj, self.down_proj):
            linear.round_to_bf16()
        self._fused, self._fused_checked = None, False
        self.matmul_dtype = torch.bfloat16

    def _fused_kernel(self) -> kernels.FusedDecoderLayer | None:
        if not self._fused_checked:
            projections = (self.qkv_proj, self.o_proj, self.gate_up_proj, self.down_proj)
            if any(p.compute_dtype is not None for p in projections):
                # the fused kernel multiplies in float32: a lower compute_dtype (training
                # over a bfloat16 base) must round the same in every pass, DPO's reference too
                self._fused_checked = True
                return None
            self._fused = kernels.fused_decoder_layer(kernels.DecoderLayerWeights(
                self.input_layernorm.weight, self.qkv_proj.matrix, self.o_proj.matrix,
                self.post_attention_layernorm.weight, self.gate_up_proj.matrix,
                self.down_proj.matrix, self.input_layernorm.eps, self.num_heads,
                self.num_kv_heads))
            self._fused_checked = True
        return self._fused

    def _apply(self, fn, recurse=True):
        # .to() and friends replace the tensors: ask for the fused kernel again
        self._fused, self._fused_checked = None, False
        return super()._apply(fn, recurse)


def _parts(**widths: int) -> dict[str, tuple[int, int]]:
    """Consecutive output column ranges of a fused projection, by PEFT module name."""
    parts, start = {}, 0
    for name, width in widths.items():
        parts[name] = (start, start + width)
        start += width
    return parts


def rope_cache(config: ModelConfig, max_positions: int) -> torch.Tensor:
    """[max_positions, head_dim]: cos in the first half of the columns, sin in the second."""
    inv_freq = torch.tensor(rope_inv_freq(config), dtype=torch.float64)
    angles = torch.arange(max_positions, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=-1).float()


class Llama(nn.Module):
    def __init__(self, config: ModelConfig, weights: dict[str, Weight]):
        super().__init__()
        self.config = config
        self.embed = Embedding(weights["embed"])
        self.layers = nn.ModuleList(
            DecoderLayer(config, _layer_weights(weights, i), i)
            for i in range(config.num_layers))
        self.norm = RMSNorm(weights["norm"], config.rms_norm_eps)
        # A sequence classifier (reward model) has a score head [num_labels, C] and no LM head.
        self.score = Linear(weights["score"]) if "score" in weights else None
        if self.score is not None:
            self.lm_head = None
        elif config.tie_word_embeddings:  # one tensor for both (a parameter stays shared)
            self.lm_head = Linear(weights["embed"])
            if self.embed.table.weight is not None:
                self.lm_head.weight = self.embed.table.weight
        else:
            self.lm_head = Linear(weights["lm_head"])
        self.register_buffer("cos_sin", rope_cache(config, config.max_position_embeddings),
                             persistent=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attend: kernels.Attention, adapters: Adapters | None = None) -> torch.Tensor:
        """input_ids, positions: [T] for all tokens of the step; returns hidden [T, C]."""
        x = self.embed(input_ids)
        residual = None
        for i, layer in enumerate(self.layers):
            x, residual = layer(i, x, residual, positions, self.cos_sin, attend, adapters)
        return self.norm(x, residual)[0]

    def round_matmuls_to_bf16(self) -> None:
        """Mixed precision, as vLLM's CPU backend runs ``dtype=bfloat16`` on CPUs with AMX /
        AVX512-BF16, but keeping float32 wherever bfloat16 saves no time: every decoder-layer
        projection and the LM head multiply in bfloat16 (float32 sums, ``kernels.bf16_matmul``);
        the embedding, RMSNorm, RoPE, attention, the KV cache, the residual stream and a
        reward model's score head stay float32 (so a score is not rounded to bfloat16's three
        digits). Inference only: the float32 or packed weights are dropped."""
        for layer in self.layers:
            layer.round_matmuls_to_bf16()
        if self.lm_head is not None:
            self.lm_head.round_to_bf16()

    def compute_logits(self, hidden: torch.Tensor, adapters: Adapters | None = None
                       ) -> torch.Tensor:
        """hidden [N, C] -> float32 [N, vocab] next-token logits; for a reward model [N,
        num_labels] scores, what HF ``LlamaForSequenceClassification`` calls its logits.

        adapters: the output head's adapters over these N rows (PEFT's ``lm_head`` target),
        added to the float32 logits so that bfloat16 activations do not round the update.
        With tied embeddings they adapt the head only, as in PEFT: the embedding lookup
        stays the base's."""
        if self.score is not None:
            return self.score(hidden).float()
        logits = self.lm_head(hidden).float()
        return logits if adapters is None else adapters(self.lm_head, hidden, logits)


def _layer_weights(weights: dict[str, Weight], i: int) -> dict[str, Weight]:
    prefix = f"layers.{i}."
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
