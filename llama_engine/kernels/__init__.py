"""One dispatch point per hot op.

Each function here picks the implementation for its inputs: Triton kernels for CUDA
tensors, the C++ extension (``llama_engine._C``) for float32 CPU tensors (and bfloat16
ones where its kernel takes them: ``silu_and_mul``, ``dequantize``), and the plain
torch reference (``reference.py``) otherwise. The choice follows ``KernelOptions``
(``options.py``): ``LLAMA_ENGINE_KERNELS=torch`` forces the reference everywhere (for
debugging and for A/B checks). When a gradient is needed (grad mode on and an input or
weight that requires grad) every op takes a differentiable path: the torch reference, or
for packed weights ``PackedLinear``, whose backward multiplies by one dequantized matrix
at a time. The native kernels compute no gradients.

A build whose extension fails to import is not silently slow: importing warns, and the
first op that needed the extension raises, unless the options ask for the reference.
"""
from __future__ import annotations

import warnings
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from llama_engine.kernels import autograd as _autograd
from llama_engine.kernels import reference
from llama_engine.kernels.options import KernelOptions, configure, options  # noqa: F401
from llama_engine.quant import PackedWeight

try:
    from llama_engine.kernels import cpu as _cpu
    _cpu_import_error: ImportError | None = None
except ImportError as error:
    _cpu, _cpu_import_error = None, error
    warnings.warn(f"llama_engine._C cannot be imported ({error}): the CPU kernels are "
                  "missing and CPU ops will fail. Build them with `python setup.py "
                  "build_ext --inplace`, or set LLAMA_ENGINE_KERNELS=torch to run the slow "
                  "torch reference instead.", RuntimeWarning, stacklevel=2)


def needs_grad(*tensors: Tensor | None) -> bool:
    """Whether autograd would record an op over these tensors."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _use_triton(t: Tensor) -> bool:
    return t.is_cuda and options().backend == "auto"


FLOAT32 = (torch.float32,)
FLOAT32_BFLOAT16 = (torch.float32, torch.bfloat16)


def _use_cpu(t: Tensor, dtypes: tuple[torch.dtype, ...] = FLOAT32) -> bool:
    """Whether t goes to the C++ kernels: a CPU tensor of one of the kernel's dtypes."""
    if t.device.type != "cpu" or t.dtype not in dtypes or options().backend != "auto":
        return False
    if _cpu is None:
        raise RuntimeError(f"llama_engine._C cannot be imported ({_cpu_import_error}): rebuild "
                           "it (`python setup.py build_ext --inplace`) or set "
                           "LLAMA_ENGINE_KERNELS=torch to run the torch reference")
    return True


def _triton():
    from llama_engine.kernels import triton as triton_kernels
    return triton_kernels


def rms_norm(x: Tensor, weight: Tensor, eps: float,
             residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """RMSNorm(x + residual) * weight and the new residual; see reference.rms_norm."""
    if needs_grad(x, weight, residual):
        return _autograd.rms_norm(x, weight, eps, residual,
                                  _cpu.rms_norm if _use_cpu(x) else None)
    if _use_triton(x):
        return _triton().rms_norm(x, weight, eps, residual)
    if _use_cpu(x):
        return _cpu.rms_norm(x, weight, eps, residual)
    return reference.rms_norm(x, weight, eps, residual)


def rope(q: Tensor, k: Tensor, positions: Tensor, cos_sin: Tensor) -> tuple[Tensor, Tensor]:
    """Rotary embedding of q [T, H, D] and k [T, Hkv, D]; see reference.rope (the native
    kernels rotate in place)."""
    if needs_grad(q, k):
        return _autograd.rope(q, k, positions, cos_sin, _cpu.rope if _use_cpu(q) else None)
    if _use_triton(q):
        return _triton().rope(q, k, positions, cos_sin)
    if _use_cpu(q):
        return _cpu.rope(q, k, positions, cos_sin)
    return reference.rope(q, k, positions, cos_sin)


def silu_and_mul(gate_up: Tensor) -> Tensor:
    """SwiGLU: [..., 2F] = concat(gate, up) -> silu(gate) * up [..., F]."""
    if needs_grad(gate_up):
        if _use_cpu(gate_up, FLOAT32_BFLOAT16):
            return _autograd.silu_and_mul(gate_up, _cpu.silu_and_mul, _cpu.silu_and_mul_backward)
        return _autograd.silu_and_mul(gate_up)
    if _use_triton(gate_up):
        return _triton().silu_and_mul(gate_up)
    if _use_cpu(gate_up, FLOAT32_BFLOAT16):
        return _cpu.silu_and_mul(gate_up)
    return reference.silu_and_mul(gate_up)


def cross_entropy(logits: Tensor, labels: Tensor, scale: Tensor,
                  with_grad: bool) -> tuple[Tensor, Tensor | None]:
    """Per-row softmax cross-entropy of logits [rows, vocab] (float32 or bfloat16) and its
    scaled gradient in the logits' dtype; see reference.cross_entropy. Not differentiable:
    the training loss (``losses.linear_cross_entropy``) uses the gradient it returns."""
    if logits.device.type == "cpu" and options().backend == "auto" and _cpu is not None:
        return _cpu.cross_entropy(logits, labels, scale, with_grad)
    return reference.cross_entropy(logits, labels, scale, with_grad)


def store_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
             slot_mapping: Tensor) -> None:
    """Write k, v [T, Hkv, D] into the paged caches at slot_mapping [T]."""
    if needs_grad(k, v):
        return reference.store_kv(k, v, k_cache, v_cache, slot_mapping)
    if _use_triton(k):
        return _triton().store_kv(k, v, k_cache, v_cache, slot_mapping)
    if _use_cpu(k) and k_cache.dtype == torch.float32:
        return _cpu.store_kv(k, v, k_cache, v_cache, slot_mapping)
    return reference.store_kv(k, v, k_cache, v_cache, slot_mapping)


def paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                    context_lens: Tensor, cu_seqlens_q: Tensor, scale: float) -> Tensor:
    """Causal GQA attention of q [T, H, D] over paged caches; see reference.paged_attention."""
    if needs_grad(q, k_cache, v_cache):
        return reference.paged_attention(q, k_cache, v_cache, block_tables, context_lens,
                                         cu_seqlens_q, scale)
    if _use_triton(q):
        return _triton().paged_attention(q, k_cache, v_cache, block_tables, context_lens,
                                         cu_seqlens_q, scale)
    if _use_cpu(q) and k_cache.dtype == torch.float32:
        return _cpu.paged_attention(q, k_cache, v_cache, block_tables, context_lens,
                                    cu_seqlens_q, scale)
    return reference.paged_attention(q, k_cache, v_cache, block_tables, context_lens,
                                     cu_seqlens_q, scale)


class AttentionMetadata:
    """One step's paged-attention metadata (vLLM's names), the same for every layer.

    slot_mapping int64 [T]: cache slot of each new token (block_id * block_size + offset;
    negative: padding). block_tables int32 [S, max_blocks]; context_lens int32 [S] (each
    sequence's tokens in the cache once the step's are stored); cu_seqlens_q int32 [S + 1]
    (each sequence's query rows); scale: the softmax scale (head_dim ** -0.5). Either int
    width is accepted and converted once here. ``native`` is the C++ kernels' checked copy
    (None off the CPU), built here once a step rather than once a layer.
    """

    def __init__(self, slot_mapping: Tensor, block_tables: Tensor, context_lens: Tensor,
                 cu_seqlens_q: Tensor, scale: float):
        self.slot_mapping = slot_mapping.to(torch.int64)
        self.block_tables = block_tables.to(torch.int32)
        self.context_lens = context_lens.to(torch.int32)
        self.cu_seqlens_q = cu_seqlens_q.to(torch.int32)
        self.scale = scale
        on_cpu = self.slot_mapping.device.type == "cpu" and options().backend == "auto"
        self.native = (_cpu.attention_metadata(self.slot_mapping, self.block_tables,
                                               self.context_lens, self.cu_seqlens_q, scale)
                       if on_cpu and _cpu is not None else None)


def store_kv_and_attend(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
                        metadata: AttentionMetadata) -> Tensor:
    """store_kv of the step's new keys and values, then paged_attention over the caches
    (one extension call on the CPU, where decode runs the pair in every layer)."""
    if (metadata.native is not None and not needs_grad(q, k, v) and _use_cpu(q)
            and k_cache.dtype == torch.float32):
        return _cpu.store_kv_and_attend(q, k, v, k_cache, v_cache, metadata.native)
    m = metadata
    store_kv(k, v, k_cache, v_cache, m.slot_mapping)
    return paged_attention(q, k_cache, v_cache, m.block_tables, m.context_lens,
                           m.cu_seqlens_q, m.scale)


class PagedKV(NamedTuple):
    """A layer's paged caches and the step's metadata: what a fused decoder-layer kernel
    needs to store the new keys and values and attend by itself."""
    k_cache: Tensor
    v_cache: Tensor
    metadata: AttentionMetadata


class Attention(Protocol):
    """Attention over past tokens, as the model sees it: ``attend(layer, q [T, H, D],
    k, v [T, Hkv, D]) -> [T, H, D]``. ``paged_kv(layer)`` returns the layer's paged caches
    when a fused decoder-layer kernel may run the store and attention itself, or None when
    it must call the object (any other cache layout)."""

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor: ...

    def paged_kv(self, layer: int) -> PagedKV | None: ...


class PagedAttention:
    """``Attention`` over paged KV caches for one step: stores the step's new keys and
    values at their slots, then attends (``store_kv_and_attend``)."""

    def __init__(self, k_caches: list[Tensor], v_caches: list[Tensor],
                 metadata: AttentionMetadata):
        self.k_caches, self.v_caches, self.metadata = k_caches, v_caches, metadata

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return store_kv_and_attend(q, k, v, self.k_caches[layer], self.v_caches[layer],
                                   self.metadata)

    def paged_kv(self, layer: int) -> PagedKV:
        return PagedKV(self.k_caches[layer], self.v_caches[layer], self.metadata)


def linear(x: Tensor, weight: Tensor | PackedWeight | BF16Weight,
           compute_dtype: torch.dtype | None = None) -> Tensor:
    """y = x @ W^T: x [..., K], W [N, K] dense, packed (GGUF block format, NF4) or rounded
    to bfloat16 for inference (``BF16Weight``: ``bf16_matmul``, not differentiable).

    ``compute_dtype``: the GEMM's precision when it is not x's (mixed precision, as
    torch.autocast and bitsandbytes' ``compute_dtype``): x and W (a packed W dequantized a
    chunk at a time) are rounded to it, the products summed in float32 by the BLAS, and y
    returned in x's dtype; differentiable in x (W frozen: training over a bfloat16 base).
    torch.bfloat16 runs on AMX / AVX512-BF16 at 4-7x the float32 GEMM
    (``bf16_matmul_is_fast``)."""
    if isinstance(weight, BF16Weight):
        return bf16_matmul(x, weight)
    # the CPU's packed kernels multiply float32 x only: with another x, a packed W is
    # dequantized to the GEMM's dtype a chunk at a time
    packed_off_float32 = (isinstance(weight, PackedWeight) and x.dtype != torch.float32
                          and not _use_triton(x))
    if compute_dtype is not None and compute_dtype != x.dtype or packed_off_float32:
        compute_dtype = compute_dtype or x.dtype
        if needs_grad(x):
            return MixedPrecisionLinear.apply(x, weight, compute_dtype)
        return _mixed_precision_matmul(x, weight, compute_dtype)
    if isinstance(weight, PackedWeight):
        if needs_grad(x):
            return PackedLinear.apply(x, weight)
        return _packed_matmul(x, weight)
    return torch.nn.functional.linear(x, weight)


def _packed_matmul(x: Tensor, weight: PackedWeight) -> Tensor:
    if _use_triton(x):
        return _triton().quant_matmul(x, weight)
    if _use_cpu(x):
        if weight.qtype == NF4 and x.numel() // x.shape[-1] >= NF4_DENSE_MIN_ROWS:
            return _dequantized_matmul(x, weight)
        return _cpu.quant_matmul(x, weight)
    return x @ dequantize(weight).to(x.dtype).t()


def weight_only_linear(x: Tensor, weight: PackedWeight) -> Tensor:
    """y = x @ dequantize(W)^T with x float32 [M, K] kept in float32 on every path (weight-only
    quantization: never the int8-activation kernels, whatever the options say), so y is off
    from x @ W_true^T by W's rounding and float32 accumulation alone. A caller that bounds
    that error (the memory banks' pre-scan, ``memory/vector_index.py``) relies on it."""
    if _use_cpu(x):
        return _cpu.quant_matmul(x, weight, int8_activations=False)
    return x @ dequantize(weight).to(x.dtype).t()


class BF16Weight(NamedTuple):
    """A linear layer's weight [N, K] and bias [N] rounded to bfloat16 once. ``onednn``: the
    weight is in oneDNN's blocked layout for AMX / AVX512-BF16 (``pack_bf16``), so a call
    skips the per-call reorder that dominates small matmuls; otherwise it is plain [N, K]."""

    weight: Tensor
    bias: Tensor | None
    onednn: bool


# The row count oneDNN lays the weight out for; any row count runs, this one best
# (a memory-bank query is a few dozen word pieces).
BF16_PACK_ROWS = 64


def bf16_matmul_is_fast() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AMX or AVX512-BF16) through oneDNN;
    elsewhere bfloat16 is emulated and slower than float32."""
    return (torch.backends.mkldnn.is_available()
            and (torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()))


def pack_bf16(weight: Tensor, bias: Tensor | None = None) -> BF16Weight:
    """Round weight [N, K] and bias [N] (float32, CPU) to bfloat16 and lay the weight out
    for oneDNN when the native kernels are in use and the CPU multiplies bfloat16 natively."""
    weight, bias = weight.detach().to(torch.bfloat16), None if bias is None else bias.detach().to(torch.bfloat16)
    if options().backend == "auto" and bf16_matmul_is_fast():
        return BF16Weight(torch.ops.mkldnn._reorder_linear_weight(weight, BF16_PACK_ROWS), bias, True)
    return BF16Weight(weight.contiguous(), bias, False)


def bf16_linear(x: Tensor, weight: BF16Weight, gelu: bool = False) -> Tensor:
    """y = x @ W^T + b, then GELU (erf form) if ``gelu``: x bfloat16 [M, K] -> bfloat16
    [M, N], products summed in float32 and rounded to bfloat16 once (oneDNN fuses the bias
    and GELU into the matmul). Not differentiable."""
    if weight.onednn:
        return torch.ops.mkldnn._linear_pointwise(x, weight.weight, weight.bias, "gelu" if gelu else "none",
                                                  [], "none" if gelu else "")
    return reference.bf16_linear(x, weight.weight, weight.bias, gelu)


def bf16_matmul(x: Tensor, weight: BF16Weight) -> Tensor:
    """y = x @ W^T (+ b) in mixed precision, as ``torch.autocast`` runs a CPU linear: x [..., K]
    of any float dtype is rounded to bfloat16, the products summed in float32
    (``bf16_linear``: oneDNN's AMX / AVX512-BF16 GEMM where the CPU has them), and y [..., N]
    rounded to bfloat16 once and returned in x's dtype. Against float32 that is ~2^-9
    relative error per rounding; on a CPU with native bfloat16 a prefill-sized matmul runs
    ~5x faster than float32's (benchmarks/results/synthetic-data-cpu-2026-11-30T*.md).
    Not differentiable."""
    y = bf16_linear(x.reshape(-1, x.shape[-1]).to(torch.bfloat16), weight)
    return y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)


NF4 = "NF4"
# From this many rows of x on, an NF4 matmul dequantizes W a chunk at a time and multiplies
# with torch's dense float32 GEMM (oneDNN/MKL): the decode is O(N K), the product
# O(M N K), and at a training batch's M (thousands of tokens) the blocked GEMM beats
# decoding into the packed kernel's tiles (benchmarks/results/training-cpu-2026-11-30.md).
NF4_DENSE_MIN_ROWS = 256
# float32 bytes of a packed W dequantized at a time by the chunked matmuls: 16 MiB, so W is
# never dense as a whole (a whole 576 x 3072 SmolLM2 projection is 7 MiB; a 49152-row
# head would go in 7 parts).
DEQUANTIZED_CHUNK_BYTES = 16 * 2**20


def _row_chunks(w: PackedWeight) -> list[tuple[int, int, PackedWeight]]:
    """(start, end, rows start:end of w) covering w's rows, DEQUANTIZED_CHUNK_BYTES each."""
    step = max(1, DEQUANTIZED_CHUNK_BYTES // (4 * w.cols))
    return [(start, min(start + step, w.rows),
             PackedWeight(w.data[start:start + step], w.qtype, min(step, w.rows - start), w.cols))
            for start in range(0, w.rows, step)]


def _dequantized_matmul(x: Tensor, weight: PackedWeight) -> Tensor:
    """x [..., K] @ W^T with W dequantized chunk by chunk (exactly ``dequantize``'s values)."""
    parts = [torch.nn.functional.linear(x, dequantize(rows)) for _, _, rows in _row_chunks(weight)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


class PackedLinear(torch.autograd.Function):
    """y = x @ W^T for a frozen packed W, differentiable in x (QLoRA trains adapters over
    such a base). The forward is ``linear``'s packed matmul; the backward dx = dy @ W walks
    W by chunks of DEQUANTIZED_CHUNK_BYTES, each dequantized by the kernel, multiplied and
    dropped, so W is never dense as a whole."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: PackedWeight) -> Tensor:
        ctx.weight = weight
        return _packed_matmul(x, weight)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None]:
        grad_in = None
        for start, end, rows in _row_chunks(ctx.weight):
            part = grad_out[..., start:end] @ dequantize(rows, grad_out.dtype)
            grad_in = part if grad_in is None else grad_in.add_(part)
        return grad_in, None


def _mixed_precision_matmul(x: Tensor, weight: Tensor | PackedWeight, dtype: torch.dtype) -> Tensor:
    """x [..., K] @ W^T in ``dtype`` (see ``linear``), returned in x's dtype."""
    xc = x.to(dtype)
    if not isinstance(weight, PackedWeight):
        return torch.nn.functional.linear(xc, weight.to(dtype)).to(x.dtype)
    y = x.new_empty(*x.shape[:-1], weight.rows)
    for start, end, rows in _row_chunks(weight):
        y[..., start:end] = torch.nn.functional.linear(xc, dequantize(rows, dtype))
    return y


class MixedPrecisionLinear(torch.autograd.Function):
    """y = x @ W^T with the GEMMs in ``dtype`` (``linear``'s ``compute_dtype``) for a frozen
    W, dense or packed; dx = dy @ W in ``dtype`` too (a packed W a chunk at a time), returned
    in x's dtype."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | PackedWeight, dtype: torch.dtype) -> Tensor:
        ctx.weight, ctx.dtype = weight, dtype
        return _mixed_precision_matmul(x, weight, dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None, None]:
        weight, dtype = ctx.weight, ctx.dtype
        grad = grad_out.to(dtype)
        if not isinstance(weight, PackedWeight):
            return (grad @ weight.to(dtype)).to(grad_out.dtype), None, None
        grad_in = None
        for start, end, rows in _row_chunks(weight):
            part = grad[..., start:end] @ dequantize(rows, dtype)
            grad_in = part.to(grad_out.dtype) if grad_in is None else grad_in.add_(part)
        return grad_in, None, None


class DecoderLayerWeights(NamedTuple):
    """One decoder layer's parameters, as ``fused_decoder_layer`` takes them: RMSNorm
    weights [C], fused QKV [(H + 2 Hkv) D, C], output [C, H D], fused gate/up [2F, C] and
    down [C, F] projections."""
    attn_norm: Tensor
    wqkv: Tensor | PackedWeight
    wo: Tensor | PackedWeight
    ffn_norm: Tensor
    w_gate_up: Tensor | PackedWeight
    w_down: Tensor | PackedWeight
    eps: float
    num_heads: int
    num_kv_heads: int


class LayerLoRA(NamedTuple):
    """One decoder layer's adapters for one step, as ``FusedDecoderLayer`` takes them (C++
    views, checked when built): the step's ``lora_segments`` and the ``lora_projection`` of
    the fused QKV, output, fused gate/up and down projections (None where none applies)."""
    segments: object
    projections: tuple[object | None, object | None, object | None, object | None]


def lora_segments(mapping: LoRAMapping, stacks: list[LoRAStack]) -> object | None:
    """The step's segments for ``LayerLoRA``, built once a step; None when the fused CPU
    kernel cannot run these adapters (off the CPU, another backend, a weight dtype the C++
    kernels lack): then the model runs its layers op by op."""
    if (_cpu is None or options().backend != "auto" or mapping.seg_slots.device.type != "cpu"
            or any(s.a_stack.dtype not in LORA_CPU_WEIGHT_DTYPES for s in stacks)):
        return None
    return _cpu.lora_segments(mapping.seg_indptr, mapping.seg_slots)


def lora_projection(stack: LoRAStack) -> object:
    """A stack as ``LayerLoRA.projections`` holds it (a C++ view of its tensors, checked
    once: build it once per stack, not once a step). Raises ValueError for mismatched
    shapes."""
    return _cpu.lora_projection(stack.a_stack, stack.b_stack, stack.slice_offsets,
                                stack.scales, stack.magnitude_ratio)


class FusedDecoderLayer:
    """One decoder layer (norm, QKV, RoPE, store + attend, output projection, norm, SwiGLU
    MLP) as one C++ call: at decode each of those ops costs about what a Python call does.
    The step's adapters (``LayerLoRA``) run inside the same call. Made by
    ``fused_decoder_layer``, once per layer's weights (checked then)."""

    def __init__(self, weights: DecoderLayerWeights):
        self.weights = weights
        self._params = _cpu.decoder_layer_params(*weights)

    def runs(self, x: Tensor) -> bool:
        """Whether this kernel computes the layer for x: float32 on the CPU, under the
        auto backend, with no gradient needed (the kernel computes none)."""
        w = self.weights
        return _use_cpu(x) and not needs_grad(x, w.attn_norm, w.ffn_norm)

    @staticmethod
    def takes_lora(layer: int, attend: Attention) -> bool:
        """Whether a ``LayerLoRA`` can run inside the call: over paged float32 caches (the
        one-call path) only."""
        return _native_kv(attend, layer) is not None

    def __call__(self, layer: int, x: Tensor, residual: Tensor | None, positions: Tensor,
                 cos_sin: Tensor, attend: Attention, lora: LayerLoRA | None = None
                 ) -> tuple[Tensor, Tensor]:
        """x, residual [T, C] (residual None in the first layer), positions int64 [T];
        returns (layer output, new residual). With paged float32 caches the store and the
        attention run inside the call; any other ``attend`` runs between its two halves
        (not with adapters: ``takes_lora`` says so)."""
        kv = _native_kv(attend, layer)
        if kv is not None:
            return _cpu.decoder_layer(self._params, x, residual, positions, cos_sin,
                                      kv.k_cache, kv.v_cache, kv.metadata.native, lora)
        if lora is not None:
            raise ValueError("lora: the fused layer runs adapters over paged float32 caches only")
        w = self.weights
        q, k, v, residual = _cpu.qkv_projection(x, residual, w.attn_norm, w.eps, w.wqkv,
                                                positions, cos_sin, w.num_heads,
                                                w.num_kv_heads)
        return _cpu.o_proj_and_mlp(attend(layer, q, k, v), residual, w.wo, w.ffn_norm, w.eps,
                                   w.w_gate_up, w.w_down)


def _native_kv(attend: Attention, layer: int) -> PagedKV | None:
    """The layer's paged caches when the fused kernel can store and attend itself."""
    kv = attend.paged_kv(layer)
    if kv is not None and kv.metadata.native is not None and kv.k_cache.dtype == torch.float32:
        return kv
    return None


def fused_decoder_layer(weights: DecoderLayerWeights) -> FusedDecoderLayer | None:
    """The fused kernel for one layer's weights, or None where there is none (dense
    weights, weights off the CPU, the torch backend, no extension): then the caller composes
    the layer from the ops above. Raises ValueError when the weights do not fit together."""
    projections = (weights.wqkv, weights.wo, weights.w_gate_up, weights.w_down)
    if (options().backend != "auto" or _cpu is None
            or not all(isinstance(w, PackedWeight) and w.data.is_cpu for w in projections)):
        return None
    return FusedDecoderLayer(weights)


def dequantize(weight: PackedWeight, dtype: torch.dtype = torch.float32) -> Tensor:
    """[rows, cols] of a packed weight: float32, or its float32 values rounded to ``dtype``
    (bfloat16 straight from the CPU kernel, without a float32 copy)."""
    if weight.data.device.type == "cpu" and options().backend == "auto" and _cpu is not None:
        if dtype in FLOAT32_BFLOAT16:
            return _cpu.dequantize(weight, dtype)
        return _cpu.dequantize(weight).to(dtype)
    from llama_engine.quant import dequantize as torch_dequantize
    return torch_dequantize(weight).to(dtype)


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
    if k == 0:  # the chosen logprobs alone are minus the cross-entropy: one pass that writes
        # no [B, V] (a 256-sequence decode step's log-softmax is 50 MB)
        logits = logits.float()
        loss, _ = cross_entropy(logits, chosen, logits.new_ones(logits.shape[0]), False)
        return -loss, chosen[:, None][:, :0], logits[:, :0]
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


def lora_shrink(x: Tensor, a_stack: Tensor, mapping: LoRAMapping) -> Tensor:
    """h [T, P*R] float32 = x [T, K] @ A_slot^T per token, zero for tokens with no adapter
    (Punica's SGMV shrink)."""
    if needs_grad(x, a_stack):
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
    if needs_grad(y, h, stack.b_stack):
        return reference.lora_expand(y, h, *args, stack.magnitude_ratio)
    if _use_triton(y):
        return _triton().lora_expand(y, h, *args, mapping.max_seg_len, stack.magnitude_ratio)
    if _use_cpu(y) and stack.b_stack.dtype in LORA_CPU_WEIGHT_DTYPES and y.is_contiguous():
        return _cpu.lora_expand(y, h, *args, stack.magnitude_ratio)
    return reference.lora_expand(y, h, *args, stack.magnitude_ratio)


def add_lora(y: Tensor, x: Tensor, stack: LoRAStack, mapping: LoRAMapping) -> Tensor:
    """y (= x @ W^T, [T, N]) updated in place to the adapted projection of x [T, K]:
    lora_expand(y, lora_shrink(x)), one extension call on the CPU. Returns y."""
    if (_use_cpu(x) and not needs_grad(x, y, stack.a_stack, stack.b_stack)
            and stack.a_stack.dtype in LORA_CPU_WEIGHT_DTYPES
            and stack.b_stack.dtype == stack.a_stack.dtype and y.is_contiguous()):
        return _cpu.add_lora(y, x, stack.a_stack, stack.b_stack, stack.slice_offsets,
                             stack.scales, mapping.seg_indptr, mapping.seg_slots,
                             stack.magnitude_ratio)
    return lora_expand(y, lora_shrink(x, stack.a_stack, mapping), stack, mapping)
