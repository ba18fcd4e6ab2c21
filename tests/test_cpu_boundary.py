"""The typed boundary of the C++ kernels (csrc/views.h): a tensor, packed weight, KV cache,
attention metadata or layer weight that does not fit is a ValueError naming it, raised
before any memory is touched, and memory stays as it was."""
from __future__ import annotations

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
