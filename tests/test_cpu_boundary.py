"""The typed boundary of the C++ kernels (csrc/views.h): a tensor, packed weight, KV cache,
attention metadata, layer weight or stacked adapter weight that does not fit is a
ValueError naming it, raised before any memory is touched, and memory stays as it was.
Every binding takes its tensors so; each is tried here with a wrong dtype, a wrong shape
and a non-contiguous tensor."""
from __future__ import annotations

from typing import Callable

import pytest
import torch

try:
    from llama_engine import _C
    from llama_engine.kernels import cpu
except ImportError as exc:  # extension not built in this checkout
    pytest.skip(f"llama_engine._C cannot be imported ({exc})", allow_module_level=True)

from llama_engine.quant import quantize

C, HEADS, KV_HEADS, D, F = 64, 4, 2, 16, 96
NUM_BLOCKS, BLOCK_SIZE = 4, 8


def _layer_weights(heads: int = HEADS, kv_heads: int = KV_HEADS):
    return dict(attn_norm=torch.ones(C), wqkv=quantize(torch.randn((HEADS + 2 * KV_HEADS) * D, C), "Q8_0"),
                wo=quantize(torch.randn(C, HEADS * D), "Q8_0"), ffn_norm=torch.ones(C),
                w_gate_up=quantize(torch.randn(2 * F, C), "Q8_0"),
                w_down=quantize(torch.randn(C, F), "Q8_0"), eps=1e-5, num_heads=heads,
                num_kv_heads=kv_heads)


def _metadata(**changes):
    args = dict(slot_mapping=torch.tensor([0, 1, 2]), block_tables=torch.tensor([[0, 1]]),
                context_lens=torch.tensor([3]), cu_seqlens_q=torch.tensor([0, 3]), scale=0.25)
    args.update(changes)
    return cpu.attention_metadata(**args)


def _caches(dtype=torch.float32):
    shape = (NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, D)
    return torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)


def test_swapped_head_counts_are_caught_when_the_layer_is_built() -> None:
    with pytest.raises(ValueError, match="num_heads"):
        cpu.decoder_layer_params(**_layer_weights(heads=KV_HEADS, kv_heads=HEADS))
    with pytest.raises(ValueError, match="wqkv"):  # a plausible count that is not this layer's
        cpu.decoder_layer_params(**_layer_weights(heads=2 * HEADS, kv_heads=KV_HEADS))


def test_inconsistent_metadata_names_the_tensor() -> None:
    with pytest.raises(ValueError, match="cu_seqlens_q"):  # two sequences' offsets, one length
        _metadata(cu_seqlens_q=torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError, match="slot_mapping"):  # one slot short
        _metadata(slot_mapping=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="block_tables"):
        _metadata(block_tables=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="context_lens"):
        _C.AttentionMetadata(torch.tensor([0, 1, 2]), torch.tensor([[0, 1]], dtype=torch.int32),
                             torch.tensor([3.0]), torch.tensor([0, 3], dtype=torch.int32), 0.25)


def test_wrong_cache_dtype_or_shape_leaves_memory_untouched() -> None:
    params = cpu.decoder_layer_params(**_layer_weights())
    x, positions, cos_sin = torch.randn(3, C), torch.arange(3), torch.randn(16, D)
    metadata = _metadata()
    k_cache, v_cache = _caches(torch.float64)
    with pytest.raises(ValueError, match="k_cache: expected float32, got float64"):
        cpu.decoder_layer(params, x, None, positions, cos_sin, k_cache, v_cache, metadata)
    k_cache, _ = _caches()
    with pytest.raises(ValueError, match="v_cache: expected shape"):
        cpu.decoder_layer(params, x, None, positions, cos_sin, k_cache, k_cache[:2].clone(),
                          metadata)
    assert not k_cache.any()


def test_wrong_activations_are_named() -> None:
    params = cpu.decoder_layer_params(**_layer_weights())
    k_cache, v_cache = _caches()
    metadata, cos_sin = _metadata(), torch.randn(16, D)
    with pytest.raises(ValueError, match="x: expected shape"):
        cpu.decoder_layer(params, torch.randn(3, C + 1), None, torch.arange(3), cos_sin,
                          k_cache, v_cache, metadata)
    with pytest.raises(ValueError, match="positions: expected int64"):
        cpu.decoder_layer(params, torch.randn(3, C), None, torch.arange(3, dtype=torch.int32),
                          cos_sin, k_cache, v_cache, metadata)
    with pytest.raises(ValueError, match="metadata"):  # 2 tokens, the metadata says 3
        cpu.decoder_layer(params, torch.randn(2, C), None, torch.arange(2), cos_sin, k_cache,
                          v_cache, metadata)
    with pytest.raises(ValueError, match="slot_mapping: slot beyond the cache"):
        cpu.decoder_layer(params, torch.randn(3, C), None, torch.arange(3), cos_sin, k_cache,
                          v_cache, _metadata(slot_mapping=torch.tensor([0, 1, 99])))
    assert not k_cache.any() and not v_cache.any()
    out = torch.empty(3, C)
    with pytest.raises(TypeError):  # not a tensor at all
        _C.decoder_layer(params, [[0.0] * C] * 3, None, torch.arange(3), cos_sin, k_cache,
                         v_cache, metadata, out, out, False)


def test_packed_view_checks_the_row_size() -> None:
    packed = quantize(torch.randn(8, 64), "Q4_0")  # 2 blocks of 18 bytes a row
    with pytest.raises(ValueError, match="packed"):
        _C.PackedWeightView(packed.data, "Q4_1", 8, 64)  # Q4_1 rows are 40 bytes
    with pytest.raises(ValueError, match="packed weight: expected uint8"):
        _C.PackedWeightView(packed.data.float(), "Q4_0", 8, 64)
    view = _C.PackedWeightView(packed.data, "Q4_0", 8, 64)
    with pytest.raises(ValueError, match="features"):
        cpu.quant_matmul(torch.randn(2, 32), view)


# ------------------------------------------- every binding: wrong dtype, shape and layout

TOKENS = 3


def _strided(t: torch.Tensor) -> torch.Tensor:
    """t's values in a tensor of t's shape and dtype that is not contiguous (last stride 2)."""
    wide = t.new_zeros(*t.shape[:-1], 2 * t.shape[-1])
    wide[..., ::2] = t
    return wide[..., ::2]


def _head_major(tokens: int, heads: int, head_dim: int) -> torch.Tensor:
    """A [T, H, D] tensor whose heads are the outer dim in memory (per-token dims not dense)."""
    return torch.randn(heads, tokens, head_dim).transpose(0, 1)


def _filled(*shape: int) -> torch.Tensor:
    """An output buffer holding a value no kernel writes, so that any write shows."""
    return torch.full(shape, 7.0)


LORA_SLOTS, RANK, N = 2, 4, 48
LORA_OFFSETS = (0, 32, 40, 48)  # three output slices, as a fused QKV's


def _lora_weights() -> dict[str, torch.Tensor]:
    """Stacked adapters for a [N, C] projection cut into three slices (LoRAProjection's
    arguments); one adapter per slot."""
    slices = len(LORA_OFFSETS) - 1
    return dict(a_stack=torch.randn(LORA_SLOTS, slices * RANK, C),
                b_stack=torch.randn(LORA_SLOTS, RANK, N),
                slice_offsets=torch.tensor(LORA_OFFSETS), scales=torch.rand(LORA_SLOTS, slices),
                magnitude_ratio=torch.rand(LORA_SLOTS, N))


def _lora_segments() -> dict[str, torch.Tensor]:
    """Token 0 on slot 1, tokens 1-2 on the base model (-1)."""
    return dict(seg_indptr=torch.tensor([0, 1, TOKENS], dtype=torch.int32),
                seg_slots=torch.tensor([1, -1], dtype=torch.int32))


def _binding_calls() -> dict[str, tuple[Callable, dict]]:
    """Each binding with valid keyword arguments (fresh tensors)."""
    torch.manual_seed(0)
    lora, segments = _lora_weights(), _lora_segments()
    expand_weights = {name: lora[name] for name in lora if name != "a_stack"}
    layer = _layer_weights()
    packed = {name: cpu.packed_view(layer[name]) for name in ("wqkv", "wo", "w_gate_up", "w_down")}
    f64, i32 = torch.float64, torch.int32
    rows = dict(x=torch.randn(TOKENS, C), residual=torch.randn(TOKENS, C),
                out=_filled(TOKENS, C), new_residual=_filled(TOKENS, C))
    rope_inputs = dict(positions=torch.arange(TOKENS), cos_sin=torch.randn(16, D))
    caches = dict(k_cache=torch.randn(NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, D),
                  v_cache=torch.randn(NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, D))
    qkv = dict(q=torch.randn(TOKENS, HEADS, D), k=torch.randn(TOKENS, KV_HEADS, D),
               v=torch.randn(TOKENS, KV_HEADS, D))
    return {
        "rms_norm": (_C.rms_norm, dict(rows, weight=torch.randn(C), eps=1e-5)),
        "rope": (_C.rope, dict(q=qkv["q"], k=qkv["k"], **rope_inputs)),
        "silu_and_mul": (_C.silu_and_mul, dict(gate_up=torch.randn(TOKENS, 2 * F),
                                               out=_filled(TOKENS, F))),
        "silu_and_mul_backward": (_C.silu_and_mul_backward, dict(
            gate_up=torch.randn(TOKENS, 2 * F), grad_out=torch.randn(TOKENS, F),
            grad_gate_up=_filled(TOKENS, 2 * F))),
        "cross_entropy": (_C.cross_entropy, dict(
            logits=torch.randn(TOKENS, F), labels=torch.tensor([0, -100, F - 1]),
            scale=torch.ones(TOKENS), loss=_filled(TOKENS), grad=_filled(TOKENS, F))),
        "sample": (_C.sample, dict(logits=torch.randn(2, 10), temperature=torch.ones(2, dtype=f64),
                                   top_k=torch.zeros(2, dtype=torch.int64),
                                   top_p=torch.ones(2, dtype=f64), min_p=torch.zeros(2, dtype=f64),
                                   uniform=torch.full((2,), 0.5, dtype=f64),
                                   out=torch.full((2,), -1))),
        "dequantize": (_C.dequantize, dict(w=packed["w_down"], out=_filled(C, F))),
        "quant_matmul": (_C.quant_matmul, dict(x=torch.randn(2, C), w=packed["w_gate_up"],
                                               out=_filled(2, 2 * F), isa=0,
                                               int8_activations=False)),
        "store_kv": (_C.store_kv, dict(k=qkv["k"], v=qkv["v"], slot_mapping=torch.arange(TOKENS),
                                       **caches)),
        "paged_attention": (_C.paged_attention, dict(q=qkv["q"], metadata=_metadata(),
                                                     out=_filled(TOKENS, HEADS, D), **caches)),
        "store_kv_and_attend": (_C.store_kv_and_attend, dict(
            qkv, metadata=_metadata(), out=_filled(TOKENS, HEADS, D), **caches)),
        "qkv_projection": (_C.qkv_projection, dict(
            x=rows["x"], residual=rows["residual"], norm_weight=torch.randn(C), eps=1e-5,
            wqkv=packed["wqkv"], q=_filled(TOKENS, HEADS, D), k=_filled(TOKENS, KV_HEADS, D),
            v=_filled(TOKENS, KV_HEADS, D), new_residual=rows["new_residual"],
            int8_activations=False, **rope_inputs)),
        "o_proj_and_mlp": (_C.o_proj_and_mlp, dict(
            attn=torch.randn(TOKENS, HEADS * D), residual=rows["residual"], wo=packed["wo"],
            norm_weight=torch.randn(C), eps=1e-5, w_gate_up=packed["w_gate_up"],
            w_down=packed["w_down"], out=rows["out"], new_residual=rows["new_residual"],
            int8_activations=False)),
        "decoder_layer": (_C.decoder_layer, dict(
            rows, weights=cpu.decoder_layer_params(**layer), metadata=_metadata(),
            int8_activations=False, **rope_inputs, **caches)),
        "AttentionMetadata": (_C.AttentionMetadata, dict(
            slot_mapping=torch.arange(TOKENS), block_tables=torch.tensor([[0, 1]], dtype=i32),
            context_lens=torch.tensor([TOKENS], dtype=i32),
            cu_seqlens_q=torch.tensor([0, TOKENS], dtype=i32), scale=0.25)),
        "PackedWeightView": (_C.PackedWeightView, dict(data=layer["wo"].data, qtype="Q8_0",
                                                       rows=C, cols=HEADS * D)),
        "DecoderLayerParams": (_C.DecoderLayerParams, dict(
            attn_norm=torch.ones(C), ffn_norm=torch.ones(C), eps=1e-5, num_heads=HEADS,
            num_kv_heads=KV_HEADS, **packed)),
        "lora_shrink": (_C.lora_shrink, dict(x=torch.randn(TOKENS, C), a_stack=lora["a_stack"],
                                             h=_filled(TOKENS, 3 * RANK), **segments)),
        "lora_expand": (_C.lora_expand, dict(y=torch.randn(TOKENS, N),
                                             h=torch.randn(TOKENS, 3 * RANK), **expand_weights,
                                             **segments)),
        "lora_add": (_C.lora_add, dict(y=torch.randn(TOKENS, N), x=torch.randn(TOKENS, C),
                                       **lora, **segments)),
        "LoRASegments": (_C.LoRASegments, segments),
        "LoRAProjection": (_C.LoRAProjection, lora),
    }


# (binding, argument, bad value from the good one, the error expected): per binding, one
# wrong dtype, one wrong shape and one non-contiguous tensor.
BAD_ARGUMENTS = [
    ("rms_norm", "x", lambda t: t.double(), "x: expected float32, got float64"),
    ("rms_norm", "weight", lambda t: torch.randn(C + 1), r"weight: expected shape \[64\], got \[65\]"),
    ("rms_norm", "residual", _strided, "residual: must be C-contiguous"),
    ("rope", "positions", lambda t: t.int(), "positions: expected int64, got int32"),
    ("rope", "cos_sin", lambda t: torch.randn(16, D + 2),
     r"cos_sin: expected shape \[\*, 16\], got \[16, 18\]"),
    ("rope", "q", lambda t: _head_major(TOKENS, HEADS, D), r"q: each token's \[H, D\] must be dense"),
    ("silu_and_mul", "gate_up", lambda t: t.double(), "gate_up: expected float32, got float64"),
    ("silu_and_mul", "out", lambda t: _filled(TOKENS, F + 1),
     r"out: expected shape \[3, 96\], got \[3, 97\]"),
    ("silu_and_mul", "gate_up", _strided, "gate_up: must be C-contiguous"),
    ("silu_and_mul", "out", lambda t: _filled(TOKENS, F).bfloat16(), "out: expected float32, got bfloat16"),
    ("silu_and_mul_backward", "grad_out", lambda t: t.double(), "grad_out: expected float32, got float64"),
    ("silu_and_mul_backward", "grad_gate_up", lambda t: _filled(TOKENS, 2 * F + 2),
     r"grad_gate_up: expected shape \[3, 192\], got \[3, 194\]"),
    ("silu_and_mul_backward", "gate_up", _strided, "gate_up: must be C-contiguous"),
    ("silu_and_mul_backward", "gate_up", lambda t: t.bfloat16(), "grad_out: expected bfloat16, got float32"),
    ("cross_entropy", "labels", lambda t: torch.tensor([0, F, 1]),
     f"labels: {F} is outside the vocabulary"),
    ("cross_entropy", "grad", lambda t: _filled(TOKENS, F).bfloat16(), "grad: expected the logits' dtype"),
    ("cross_entropy", "logits", _strided, "logits: must be C-contiguous"),
    ("sample", "temperature", lambda t: t.float(), "temperature: expected float64, got float32"),
    ("sample", "top_k", lambda t: torch.zeros(3, dtype=torch.int64),
     r"top_k: expected shape \[2\], got \[3\]"),
    ("sample", "logits", _strided, "logits: must be C-contiguous"),
    ("dequantize", "out", lambda t: t.double(), "out: expected float32 or bfloat16, got float64"),
    ("dequantize", "out", lambda t: _filled(C, F - 1), r"out: expected shape \[64, 96\]"),
    ("dequantize", "out", _strided, "out: must be C-contiguous"),
    ("quant_matmul", "x", lambda t: t.double(), "x: expected float32, got float64"),
    ("quant_matmul", "x", lambda t: torch.randn(2, C + 32), "x: expected 64 features"),
    ("quant_matmul", "out", _strided, "out: must be C-contiguous"),
    ("store_kv", "slot_mapping", lambda t: t.int(), "slot_mapping: expected int64, got int32"),
    ("store_kv", "v_cache", lambda t: t[1:].clone(), "v_cache: expected shape"),
    ("store_kv", "k", lambda t: _head_major(TOKENS, KV_HEADS, D),
     r"k: each token's \[H, D\] must be dense"),
    ("paged_attention", "q", lambda t: t.double(), "q: expected float32, got float64"),
    ("paged_attention", "out", lambda t: _filled(TOKENS, HEADS, D + 1), "out: expected shape"),
    ("paged_attention", "k_cache", _strided, "k_cache: must be C-contiguous"),
    ("store_kv_and_attend", "v", lambda t: t.double(), "v: expected float32, got float64"),
    ("store_kv_and_attend", "k", lambda t: torch.randn(TOKENS, KV_HEADS, D + 1), "k: expected shape"),
    ("store_kv_and_attend", "out", _strided, "out: must be C-contiguous"),
    ("qkv_projection", "norm_weight", lambda t: t.double(), "norm_weight: expected float32"),
    ("qkv_projection", "residual", lambda t: torch.randn(TOKENS, C + 1), "residual: expected shape"),
    ("qkv_projection", "v", _strided, "v: must be C-contiguous"),
    ("o_proj_and_mlp", "residual", lambda t: t.double(), "residual: expected float32"),
    ("o_proj_and_mlp", "attn", lambda t: torch.randn(TOKENS, HEADS * D + 1), "attn: expected shape"),
    ("o_proj_and_mlp", "new_residual", _strided, "new_residual: must be C-contiguous"),
    ("decoder_layer", "cos_sin", lambda t: t.double(), "cos_sin: expected float32"),
    ("decoder_layer", "new_residual", lambda t: _filled(TOKENS, C + 1), "new_residual: expected shape"),
    ("decoder_layer", "x", _strided, "x: must be C-contiguous"),
    ("AttentionMetadata", "context_lens", lambda t: t.float(), "context_lens: expected int32, got float32"),
    ("AttentionMetadata", "cu_seqlens_q", lambda t: torch.tensor([0, 1, TOKENS], dtype=torch.int32),
     "cu_seqlens_q: expected shape"),
    ("AttentionMetadata", "block_tables", _strided, "block_tables: must be C-contiguous"),
    ("PackedWeightView", "data", lambda t: t.float(), "packed weight: expected uint8"),
    ("PackedWeightView", "data", lambda t: t[1:].clone(), "packed weight must be uint8 \\[N"),
    ("PackedWeightView", "data", _strided, "packed weight: must be C-contiguous"),
    ("DecoderLayerParams", "attn_norm", lambda t: t.double(), "attn_norm: expected float32"),
    ("DecoderLayerParams", "ffn_norm", lambda t: torch.ones(C + 1), "ffn_norm: expected shape"),
    ("DecoderLayerParams", "ffn_norm", _strided, "ffn_norm: must be C-contiguous"),
    ("lora_shrink", "x", lambda t: t.double(), "x: expected float32, got float64"),
    ("lora_shrink", "h", lambda t: _filled(TOKENS, 3 * RANK + 1), r"h: expected shape \[3, 12\]"),
    ("lora_shrink", "seg_slots", _strided, "seg_slots: must be C-contiguous"),
    ("lora_expand", "magnitude_ratio", lambda t: t.double(),
     "magnitude_ratio: expected float32, got float64"),
    ("lora_expand", "scales", lambda t: torch.rand(LORA_SLOTS, 2),
     r"scales: expected shape \[2, 3\]"),
    ("lora_expand", "b_stack", _strided, "b_stack: must be C-contiguous"),
    ("lora_add", "a_stack", lambda t: t.double(),
     "a_stack: expected float32 or bfloat16, got float64"),
    ("lora_add", "x", lambda t: torch.randn(TOKENS, C + 1), r"x: expected shape \[3, 64\]"),
    ("lora_add", "y", _strided, "y: must be C-contiguous"),
    ("LoRASegments", "seg_indptr", lambda t: t.float(), "seg_indptr: expected int32, got float32"),
    ("LoRASegments", "seg_indptr", lambda t: t[:2].clone(), r"seg_indptr: expected shape \[3\]"),
    ("LoRASegments", "seg_slots", _strided, "seg_slots: must be C-contiguous"),
    ("LoRAProjection", "scales", lambda t: t.double(), "scales: expected float32, got float64"),
    ("LoRAProjection", "magnitude_ratio", lambda t: torch.rand(LORA_SLOTS, N - 1),
     r"magnitude_ratio: expected shape \[2, 48\]"),
    ("LoRAProjection", "a_stack", _strided, "a_stack: must be C-contiguous"),
]


def test_every_binding_is_tried() -> None:
    """A binding added to the extension gets its cases here."""
    bindings = {name for name in dir(_C) if callable(getattr(_C, name))
                and not name.startswith("_")
                and name not in ("quant_isa", "quant_isa_supported", "lora_isa")}  # no tensors
    assert bindings == set(_binding_calls())
    assert {case[0] for case in BAD_ARGUMENTS} == bindings


@pytest.mark.parametrize("binding", sorted(_binding_calls()))
def test_valid_arguments_pass(binding: str) -> None:
    """The good arguments that the cases below spoil one at a time are accepted."""
    fn, args = _binding_calls()[binding]
    fn(**args)


@pytest.mark.parametrize("binding, argument, spoil, error", BAD_ARGUMENTS,
                         ids=[f"{c[0]}-{c[1]}-{i % 3}" for i, c in enumerate(BAD_ARGUMENTS)])
def test_bad_tensor_is_named_and_nothing_is_written(binding: str, argument: str,
                                                    spoil: Callable, error: str) -> None:
    fn, args = _binding_calls()[binding]
    args[argument] = spoil(args[argument])
    before = {name: t.clone() for name, t in args.items() if isinstance(t, torch.Tensor)}
    with pytest.raises(ValueError, match=error):
        fn(**args)
    for name, t in before.items():
        assert torch.equal(args[name], t), f"{name} was written before the error"


@pytest.mark.parametrize("binding", ["rms_norm", "rope", "silu_and_mul", "sample", "dequantize"])
def test_a_list_for_a_tensor_is_a_type_error(binding: str) -> None:
    fn, args = _binding_calls()[binding]
    first = next(name for name, value in args.items() if isinstance(value, torch.Tensor))
    args[first] = args[first].tolist()
    with pytest.raises(TypeError):
        fn(**args)


def test_unfused_ops_check_their_own_rules() -> None:
    fn, args = _binding_calls()["rms_norm"]
    with pytest.raises(ValueError, match="new_residual: given exactly when residual is"):
        fn(**dict(args, new_residual=None))
    with pytest.raises(ValueError, match="x: expected"):
        fn(**dict(args, x=torch.tensor(1.0), out=torch.tensor(1.0), residual=None,
                  new_residual=None))
    with pytest.raises(ValueError, match="q: head dim must be even"):
        _C.rope(torch.randn(2, 1, 7), torch.randn(2, 1, 7), torch.arange(2), torch.randn(4, 7))
    with pytest.raises(ValueError, match="q/k: same number of tokens"):
        _C.rope(torch.randn(2, 1, 8), torch.randn(3, 1, 8), torch.arange(2), torch.randn(4, 8))
    with pytest.raises(ValueError, match="gate_up: last dim must be even"):
        _C.silu_and_mul(torch.randn(2, 7), torch.empty(2, 3))


def test_wrappers_convert_metadata_but_not_activations() -> None:
    """The torch wrappers take int32 positions and strided inputs (converted or copied),
    and pass a wrong activation dtype to the extension, which names it."""
    q, k = torch.randn(2, 1, 8), torch.randn(2, 1, 8)
    cpu.rope(q, k, torch.arange(2, dtype=torch.int32), torch.randn(4, 8))
    with pytest.raises(ValueError, match="x: expected float32, got float64"):
        cpu.rms_norm(torch.randn(2, 8, dtype=torch.float64), torch.ones(8), 1e-5)
    with pytest.raises(ValueError, match="gate_up: last dim must be even"):
        cpu.silu_and_mul(torch.randn(2, 7))
    with pytest.raises(ValueError, match=r"top_k: expected shape \[1\], got \[2\]"):
        cpu.sample(torch.randn(1, 10), torch.ones(1), torch.zeros(2, dtype=torch.int64),
                   torch.ones(1), torch.zeros(1), torch.rand(1))
