"""One dispatch point per hot op.

Each function here picks the implementation for its inputs: Triton kernels for CUDA
tensors, the C++ extension (``llama_engine._C``) for float32 CPU tensors, and the plain
torch reference (``reference.py``) otherwise. ``LLAMA_ENGINE_KERNELS=torch`` forces the
reference everywhere (for debugging and for A/B checks).
"""
from __future__ import annotations

import os
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from llama_engine.kernels import reference
from llama_engine.quant import PackedWeight

FORCE_TORCH = os.environ.get("LLAMA_ENGINE_KERNELS", "") == "torch"

try:
    from llama_engine.kernels import cpu as _cpu
except ImportError:  # extension not built: the torch reference still runs everything
    _cpu = None


def _needs_grad(t: Tensor) -> bool:
    """The kernels compute no gradient: a tensor that autograd tracks takes the reference."""
    return t.requires_grad and torch.is_grad_enabled()


def _use_triton(t: Tensor) -> bool:
    return t.is_cuda and not FORCE_TORCH and not _needs_grad(t)


def _use_cpu(t: Tensor) -> bool:
    return (_cpu is not None and not FORCE_TORCH and t.device.type == "cpu"
            and t.dtype == torch.float32 and not _needs_grad(t))


def _triton():
    from llama_engine.kernels import triton as triton_kernels
    return triton_kernels


def rms_norm(x: Tensor, weight: Tensor, eps: float,
             residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
    if _use_triton(x):
        return _triton().rms_norm(x, weight, eps, residual)
    if _use_cpu(x):
        return _cpu.rms_norm(x, weight, eps, residual)
    return reference.rms_norm(x, weight, eps, residual)


def rope(q: Tensor, k: Tensor, positions: Tensor, cos_sin: Tensor) -> tuple[Tensor, Tensor]:
    if _use_triton(q):
        return _triton().rope(q, k, positions, cos_sin)
    if _use_cpu(q):
        return _cpu.rope(q, k, positions, cos_sin)
    return reference.rope(q, k, positions, cos_sin)


def silu_and_mul(gate_up: Tensor) -> Tensor:
    if _use_triton(gate_up):
        return _triton().silu_and_mul(gate_up)
    if _use_cpu(gate_up):
        return _cpu.silu_and_mul(gate_up)
    return reference.silu_and_mul(gate_up)


def store_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
             slot_mapping: Tensor) -> None:
    if _use_triton(k):
        return _triton().store_kv(k, v, k_cache, v_cache, slot_mapping)
    if _use_cpu(k) and k_cache.dtype == torch.float32:
        return _cpu.store_kv(k, v, k_cache, v_cache, slot_mapping)
    return reference.store_kv(k, v, k_cache, v_cache, slot_mapping)


def paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                    context_lens: Tensor, cu_seqlens_q: Tensor, scale: float) -> Tensor:
    if _use_triton(q):
        return _triton().paged_attention(q, k_cache, v_cache, block_tables, context_lens,
                                         cu_seqlens_q, scale)
    if _use_cpu(q) and k_cache.dtype == torch.float32:
        return _cpu.paged_attention(q, k_cache, v_cache, block_tables, context_lens,
                                    cu_seqlens_q, scale)
    return reference.paged_attention(q, k_cache, v_cache, block_tables, context_lens,
                                     cu_seqlens_q, scale)


def store_kv_and_attend(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
                        slot_mapping: Tensor, block_tables: Tensor, context_lens: Tensor,
                        cu_seqlens_q: Tensor, scale: float) -> Tensor:
    """store_kv of the step's new keys and values, then paged_attention over the caches
    (one extension call on the CPU, where decode runs the pair in every layer)."""
    if _use_cpu(q) and k_cache.dtype == torch.float32:
        return _cpu.store_kv_and_attend(q, k, v, k_cache, v_cache, slot_mapping, block_tables,
                                        context_lens, cu_seqlens_q, scale)
    store_kv(k, v, k_cache, v_cache, slot_mapping)
    return paged_attention(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q,
                           scale)


def linear(x: Tensor, weight: Tensor | PackedWeight) -> Tensor:
    """y = x @ W^T for a dense or packed (GGUF block format) weight."""
    if isinstance(weight, PackedWeight):
        if _use_triton(x):
            return _triton().quant_matmul(x, weight)
        if _use_cpu(x):
            return _cpu.quant_matmul(x, weight)
        return x @ dequantize(weight).to(x.dtype).t()
    return torch.nn.functional.linear(x, weight)


# ---- decoder-block ops ---------------------------------------------------------------------
# Packed weights on the CPU run each of these as one fused extension call (at decode every
# op inside is cheaper than a Python call); everything else composes the ops above.

# attend(layer, q [T, H, D], k, v [T, Hkv, D]) -> attention output [T, H, D]
AttendFn = Callable[[int, Tensor, Tensor, Tensor], Tensor]

def _packed_on_cpu(*weights: Tensor | PackedWeight) -> bool:
    for w in weights:
        if not (isinstance(w, PackedWeight) and w.data.is_cpu):
            return False
    return True


def qkv_projection(x: Tensor, residual: Tensor | None, norm_weight: Tensor, eps: float,
                   wqkv: Tensor | PackedWeight, positions: Tensor, cos_sin: Tensor,
                   num_heads: int, num_kv_heads: int
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """RMSNorm(x + residual) -> fused QKV projection -> RoPE on q and k.

    Returns q [T, H, D], k and v [T, Hkv, D] (D = cos_sin's width) and the new residual
    (x + residual; x itself when residual is None).
    """
    if _use_cpu(x) and _packed_on_cpu(wqkv):
        return _cpu.qkv_projection(x, residual, norm_weight, eps, wqkv, positions, cos_sin,
                                   num_heads, num_kv_heads)
    h, residual = rms_norm(x, norm_weight, eps, residual)
    head_dim = cos_sin.shape[1]
    kv_size = num_kv_heads * head_dim
    q, k, v = linear(h, wqkv).split([num_heads * head_dim, kv_size, kv_size], dim=-1)
    q, k = rope(q.reshape(-1, num_heads, head_dim).contiguous(),
                k.reshape(-1, num_kv_heads, head_dim).contiguous(), positions, cos_sin)
    return q, k, v.reshape(-1, num_kv_heads, head_dim).contiguous(), residual


def block_output(attn: Tensor, residual: Tensor, wo: Tensor | PackedWeight,
                 norm_weight: Tensor, eps: float, w_gate_up: Tensor | PackedWeight,
                 w_down: Tensor | PackedWeight) -> tuple[Tensor, Tensor]:
    """Output projection, then RMSNorm with the residual add, then the SwiGLU MLP.

    attn is [T, A] or [T, H, D]; returns (MLP output, new residual), both [T, C].
    """
    if _use_cpu(attn) and _packed_on_cpu(wo, w_gate_up, w_down):
        return _cpu.block_output(attn, residual, wo, norm_weight, eps, w_gate_up, w_down)
    h, residual = rms_norm(linear(attn.reshape(attn.shape[0], -1), wo), norm_weight, eps,
                           residual)
    return linear(silu_and_mul(linear(h, w_gate_up)), w_down), residual


class PagedAttention:
    """``attend(layer, q, k, v)`` over paged KV caches for one step: stores the step's new
    keys and values at their slots, then attends (``store_kv_and_attend``). The model only
    calls it; ``decoder_layer`` recognises it and, on the CPU, runs the whole block with it
    in one extension call."""

    def __init__(self, k_caches: list[Tensor], v_caches: list[Tensor], slot_mapping: Tensor,
                 block_tables: Tensor, context_lens: Tensor, cu_seqlens_q: Tensor,
                 scale: float):
        self.k_caches, self.v_caches = k_caches, v_caches
        self.slot_mapping, self.block_tables = slot_mapping, block_tables
        self.context_lens, self.cu_seqlens_q, self.scale = context_lens, cu_seqlens_q, scale
        self.cpu_step = None  # the CPU kernels' checked arguments, the same every layer

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return store_kv_and_attend(q, k, v, self.k_caches[layer], self.v_caches[layer],
                                   self.slot_mapping, self.block_tables, self.context_lens,
                                   self.cu_seqlens_q, self.scale)


class BlockWeights(NamedTuple):
    """One decoder block's parameters, as ``decoder_layer`` takes them."""
    attn_norm: Tensor
    wqkv: Tensor | PackedWeight
    wo: Tensor | PackedWeight
    ffn_norm: Tensor
    w_gate_up: Tensor | PackedWeight
    w_down: Tensor | PackedWeight
    eps: float
    num_heads: int
    num_kv_heads: int


def decoder_layer(layer: int, x: Tensor, residual: Tensor | None, positions: Tensor,
                  cos_sin: Tensor, weights: BlockWeights, attend: AttendFn
                  ) -> tuple[Tensor, Tensor]:
    """One pre-norm decoder block: qkv_projection, attend(layer, q, k, v), block_output.
    Returns (block output, new residual). Packed weights on the CPU with PagedAttention run
    it as one extension call."""
    w = weights
    if (_use_cpu(x) and isinstance(attend, PagedAttention)
            and attend.k_caches[layer].dtype == torch.float32
            and _packed_on_cpu(w.wqkv, w.wo, w.w_gate_up, w.w_down)):
        return _cpu.decoder_layer(layer, x, residual, positions, cos_sin, w, attend)
    q, k, v, residual = qkv_projection(x, residual, w.attn_norm, w.eps, w.wqkv, positions,
                                       cos_sin, w.num_heads, w.num_kv_heads)
    return block_output(attend(layer, q, k, v), residual, w.wo, w.ffn_norm, w.eps,
                        w.w_gate_up, w.w_down)


def dequantize(weight: PackedWeight) -> Tensor:
    if _cpu is not None and not FORCE_TORCH and weight.data.device.type == "cpu":
        return _cpu.dequantize(weight)
    from llama_engine.quant import dequantize as torch_dequantize
    return torch_dequantize(weight)


def embedding(ids: Tensor, weight: Tensor | PackedWeight) -> Tensor:
    if isinstance(weight, PackedWeight):
        return dequantize(weight.select_rows(ids.long()))
    return torch.nn.functional.embedding(ids, weight)


def sample(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor,
           min_p: Tensor, uniform: Tensor) -> Tensor:
    if _use_triton(logits):
        return _triton().sample(logits, temperature, top_k, top_p, min_p, uniform)
    if _use_cpu(logits):
        return _cpu.sample(logits, temperature, top_k, top_p, min_p, uniform)
    return reference.sample(logits, temperature, top_k, top_p, min_p, uniform)


# ---- penalties and logprobs ----------------------------------------------------------------
# A few elementwise and top-k torch ops over [B, V]: one implementation runs on every device,
# but the sampler still reaches them here, so a kernel can take over without touching it.

def apply_penalties(logits: Tensor, prompt_mask: Tensor, output_counts: Tensor,
                    repetition: Tensor, presence: Tensor, frequency: Tensor) -> Tensor:
    """Repetition (CTRL), presence and frequency (OpenAI) penalties, in place on logits
    [B, V] float32; every input on logits' device. See ``reference.apply_penalties``."""
    return reference.apply_penalties(logits, prompt_mask, output_counts, repetition, presence,
                                     frequency)


def top_logprobs(logits: Tensor, chosen: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Log-softmax of logits [B, V]: the chosen [B] tokens' logprobs [B] and the k best
    (ids [B, k], logprobs [B, k]). See ``reference.top_logprobs``."""
    return reference.top_logprobs(logits, chosen, k)


# ---- batched LoRA --------------------------------------------------------------------------
# One step mixes tokens of many adapters and of the base model. The adapters resident on
# the device are stacked per projection (LoRAStack); LoRAMapping says which slot each of
# the step's tokens uses. Layouts and formulas: the batched LoRA section of reference.py.

# Adapter weight dtypes the C++ kernels read (with float32 activations).
LORA_CPU_WEIGHT_DTYPES = (torch.float32, torch.bfloat16)


class LoRAMapping(NamedTuple):
    """Which adapter slot each token of one step uses; the same for every layer.

    seg_indptr int32 [S + 1] token offsets of S segments; seg_slots int32 [S], -1 for no
    adapter; max_seg_len, the longest segment, sizes GPU grids without a device sync.
    """
    seg_indptr: Tensor
    seg_slots: Tensor
    max_seg_len: int


def lora_mapping(seg_lens: list[int], seg_slots: list[int],
                 device: torch.device | str = "cpu") -> LoRAMapping:
    """The mapping of a step whose tokens are laid out as segments of the given lengths (a
    scheduled sequence's new tokens each, in batch order) using the given slots (-1: none).
    Neighbouring segments of the same slot merge, so a run of decodes of one adapter reads
    its weights once. Raises ValueError for mismatched lists or negative lengths."""
    if len(seg_lens) != len(seg_slots) or any(n < 0 for n in seg_lens):
        raise ValueError("seg_lens and seg_slots: one non-negative length per slot expected")
    lens: list[int] = []
    slots: list[int] = []
    for n, slot in zip(seg_lens, seg_slots):
        if slots and slots[-1] == slot:
            lens[-1] += n
        else:
            lens.append(n)
            slots.append(slot)
    indptr = [0]
    for n in lens:
        indptr.append(indptr[-1] + n)
    return LoRAMapping(torch.tensor(indptr, dtype=torch.int32, device=device),
                       torch.tensor(slots, dtype=torch.int32, device=device), max(lens, default=0))


class LoRAStack(NamedTuple):
    """The resident adapters' weights for one (possibly fused) projection, one slot each.

    a_stack [slots, P*R, K], b_stack [slots, R, N] (B^T), scales float32 [slots, P],
    slice_offsets: P + 1 output column offsets (0 .. N; P sub-projections, e.g. q, k, v),
    magnitude_ratio [slots, N] (DoRA: m / ||W + s B A|| per output row, 1 for LoRA slots)
    or None when no resident adapter uses DoRA.
    """
    a_stack: Tensor
    b_stack: Tensor
    scales: Tensor
    slice_offsets: tuple[int, ...]
    magnitude_ratio: Tensor | None


def _lora_needs_grad(*tensors: Tensor | None) -> bool:
    """The kernels write without autograd: a step that needs gradients takes the reference."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def lora_shrink(x: Tensor, a_stack: Tensor, mapping: LoRAMapping) -> Tensor:
    """h [T, P*R] float32 = x [T, K] @ A_slot^T per token, zero for tokens with no adapter
    (Punica's SGMV shrink)."""
    if _lora_needs_grad(x, a_stack):
        return reference.lora_shrink(x, a_stack, mapping.seg_indptr, mapping.seg_slots)
    if _use_triton(x):
        return _triton().lora_shrink(x, a_stack, mapping.seg_indptr, mapping.seg_slots,
                                     mapping.max_seg_len)
    if _use_cpu(x) and a_stack.dtype in LORA_CPU_WEIGHT_DTYPES:
        return _cpu.lora_shrink(x, a_stack, mapping.seg_indptr, mapping.seg_slots)
    return reference.lora_shrink(x, a_stack, mapping.seg_indptr, mapping.seg_slots)


def lora_expand(y: Tensor, h: Tensor, stack: LoRAStack, mapping: LoRAMapping) -> Tensor:
    """In place on y [T, N], the base projection's output: for tokens with slot s and each
    output slice p, y = ratio_s * (y + scale_{s,p} * h[:, p*R:(p+1)*R] @ B_{s,p}^T)
    (Punica's SGMV expand; DoRA's per-row ratio fused in). Returns y."""
    args = (stack.b_stack, stack.slice_offsets, stack.scales, mapping.seg_indptr,
            mapping.seg_slots)
    if _lora_needs_grad(y, h, stack.b_stack):
        return reference.lora_expand(y, h, *args, stack.magnitude_ratio)
    if _use_triton(y):
        return _triton().lora_expand(y, h, *args, mapping.max_seg_len, stack.magnitude_ratio)
    if _use_cpu(y) and stack.b_stack.dtype in LORA_CPU_WEIGHT_DTYPES and y.is_contiguous():
        return _cpu.lora_expand(y, h, *args, stack.magnitude_ratio)
    return reference.lora_expand(y, h, *args, stack.magnitude_ratio)


def add_lora(y: Tensor, x: Tensor, stack: LoRAStack, mapping: LoRAMapping) -> Tensor:
    """y (= x @ W^T, [T, N]) updated in place to the adapted projection of x [T, K]:
    lora_expand(y, lora_shrink(x)), one extension call on the CPU. Returns y."""
    if (_use_cpu(x) and not _lora_needs_grad(x, y, stack.a_stack, stack.b_stack)
            and stack.a_stack.dtype in LORA_CPU_WEIGHT_DTYPES
            and stack.b_stack.dtype == stack.a_stack.dtype and y.is_contiguous()):
        return _cpu.add_lora(y, x, stack.a_stack, stack.b_stack, stack.slice_offsets,
                             stack.scales, mapping.seg_indptr, mapping.seg_slots,
                             stack.magnitude_ratio)
    return lora_expand(y, lora_shrink(x, stack.a_stack, mapping), stack, mapping)
