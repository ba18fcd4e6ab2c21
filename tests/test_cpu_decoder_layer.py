"""The fused decoder-layer ops on the CPU (csrc/decoder_layer.cpp) against the torch
reference.

``cpu.qkv_projection`` and ``cpu.o_proj_and_mlp`` run one extension call each for packed
weights on the CPU, ``kernels.FusedDecoderLayer`` the whole layer. Here each is compared with the same chain built from
kernels/reference.py on the dequantized weights in float64, over random shapes (token
counts, head layouts, widths that are not multiples of the tile sizes) and every packed
format, with fresh random inputs per case.
"""
from __future__ import annotations

import pytest
import torch

try:
    from llama_engine.kernels import cpu
except ImportError as exc:  # extension not built in this checkout
    pytest.skip(f"llama_engine._C cannot be imported ({exc})", allow_module_level=True)

from llama_engine import kernels
from llama_engine.kernels import reference
from llama_engine.quant import dequantize, quantize

FORMATS = ["Q4_0", "Q4_1", "Q8_0", "NF4"]
SEEDS = range(3)
# float32 kernels against a float64 reference: a few float32 ulps per accumulated sum
TOL = dict(rtol=2e-4, atol=2e-4)


def _case(seed: int, qtype: str):
    g = torch.Generator().manual_seed(seed)
    pick = lambda options: options[int(torch.randint(len(options), (1,), generator=g))]
    block = 64 if qtype == "NF4" else 32
    shape = dict(tokens=int(torch.randint(1, 40, (1,), generator=g)),
                 hidden=block * pick([2, 3, 5]), kv_heads=pick([1, 2, 3]),
                 group=pick([1, 3, 4]),
                 # the output projection's K is heads * head_dim: a whole NF4 block
                 head_dim=64 if qtype == "NF4" else pick([16, 32, 64]),
                 ffn=block * pick([3, 4, 7]))
    return g, shape


def _weight(g: torch.Generator, rows: int, cols: int, qtype: str):
    packed = quantize(torch.randn(rows, cols, generator=g) / cols ** 0.5, qtype)
    return packed, dequantize(packed).double()


def _cos_sin(g: torch.Generator, positions: int, head_dim: int) -> torch.Tensor:
    angles = torch.arange(positions)[:, None] * torch.rand(head_dim // 2, generator=g)
    return torch.cat([angles.cos(), angles.sin()], dim=-1).float()


@pytest.mark.parametrize("qtype", FORMATS)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("with_residual", [False, True])
def test_qkv_projection_matches_reference(seed: int, qtype: str, with_residual: bool) -> None:
    g, s = _case(seed, qtype)
    T, C, D = s["tokens"], s["hidden"], s["head_dim"]
    heads, kv_heads = s["kv_heads"] * s["group"], s["kv_heads"]
    wqkv, dense = _weight(g, (heads + 2 * kv_heads) * D, C, qtype)
    x = torch.randn(T, C, generator=g) * 2
    residual = torch.randn(T, C, generator=g) if with_residual else None
    norm_weight = torch.rand(C, generator=g) + 0.5
    positions = torch.randint(0, 500, (T,), generator=g)
    cos_sin = _cos_sin(g, 500, D)

    q, k, v, new_residual = cpu.qkv_projection(x, residual, norm_weight, 1e-5, wqkv,
                                                   positions, cos_sin, heads, kv_heads)

    h, ref_residual = reference.rms_norm(x.double(), norm_weight.double(), 1e-5,
                                         None if residual is None else residual.double())
    ref_q, ref_k, ref_v = (h @ dense.T).split([heads * D, kv_heads * D, kv_heads * D], -1)
    ref_q, ref_k = reference.rope(ref_q.reshape(T, heads, D), ref_k.reshape(T, kv_heads, D),
                                  positions, cos_sin.double())
    torch.testing.assert_close(q.double(), ref_q, **TOL)
    torch.testing.assert_close(k.double(), ref_k, **TOL)
    torch.testing.assert_close(v.double(), ref_v.reshape(T, kv_heads, D), **TOL)
    torch.testing.assert_close(new_residual.double(), ref_residual, **TOL)


@pytest.mark.parametrize("qtype", FORMATS)
@pytest.mark.parametrize("seed", SEEDS)
def test_o_proj_and_mlp_matches_reference(seed: int, qtype: str) -> None:
    g, s = _case(seed, qtype)
    T, C, F = s["tokens"], s["hidden"], s["ffn"]
    heads, D = s["kv_heads"] * s["group"], s["head_dim"]
    wo, wo_dense = _weight(g, C, heads * D, qtype)
    w_gate_up, gate_up_dense = _weight(g, 2 * F, C, qtype)
    w_down, down_dense = _weight(g, C, F, qtype)
    attn = torch.randn(T, heads, D, generator=g)
    residual = torch.randn(T, C, generator=g)
    norm_weight = torch.rand(C, generator=g) + 0.5

    out, new_residual = cpu.o_proj_and_mlp(attn, residual, wo, norm_weight, 1e-5,
                                             w_gate_up, w_down)

    h = attn.reshape(T, -1).double() @ wo_dense.T
    normed, ref_residual = reference.rms_norm(h, norm_weight.double(), 1e-5, residual.double())
    ref_out = reference.silu_and_mul(normed @ gate_up_dense.T) @ down_dense.T
    torch.testing.assert_close(out.double(), ref_out, **TOL)
    torch.testing.assert_close(new_residual.double(), ref_residual, **TOL)


def test_fused_and_composed_paths_agree_exactly() -> None:
    """The fused call runs the very kernels the composed path calls one by one."""
    g = torch.Generator().manual_seed(7)
    T, C, F, D, kv = 5, 96, 160, 32, 2
    wqkv, _ = _weight(g, (4 + 2 * kv) * D, C, "Q4_1")
    wo, _ = _weight(g, C, 4 * D, "Q4_1")
    w_gate_up, _ = _weight(g, 2 * F, C, "Q4_1")
    w_down, _ = _weight(g, C, F, "Q4_1")
    x, residual = torch.randn(T, C, generator=g), torch.randn(T, C, generator=g)
    norm_weight, positions = torch.rand(C, generator=g) + 0.5, torch.arange(3, 3 + T)
    cos_sin = _cos_sin(g, 64, D)
    fused = cpu.qkv_projection(x, residual, norm_weight, 1e-5, wqkv, positions, cos_sin,
                                   4, kv)
    h, new_residual = kernels.rms_norm(x, norm_weight, 1e-5, residual)
    q, k, v = kernels.linear(h, wqkv).split([4 * D, kv * D, kv * D], -1)
    q, k = kernels.rope(q.reshape(T, 4, D).contiguous(), k.reshape(T, kv, D).contiguous(),
                        positions, cos_sin)
    for got, want in zip(fused, (q, k, v.reshape(T, kv, D), new_residual)):
        assert torch.equal(got, want)
    out, res2 = cpu.o_proj_and_mlp(q, residual, wo, norm_weight, 1e-5, w_gate_up, w_down)
    h2, want_res = kernels.rms_norm(kernels.linear(q.reshape(T, -1), wo), norm_weight, 1e-5,
                                    residual)
    want = kernels.linear(kernels.silu_and_mul(kernels.linear(h2, w_gate_up)), w_down)
    assert torch.equal(out, want) and torch.equal(res2, want_res)


def test_bad_shapes_are_refused_with_the_argument_named() -> None:
    g = torch.Generator().manual_seed(0)
    wqkv, _ = _weight(g, 3 * 32, 64, "Q4_1")
    cos_sin = _cos_sin(g, 16, 32)
    with pytest.raises(ValueError, match="wqkv"):  # 1 + 2 * 1 heads of 32 = 96 rows
        cpu.qkv_projection(torch.randn(2, 64), None, torch.ones(64), 1e-5, wqkv,
                               torch.arange(2), cos_sin, 2, 1)
    with pytest.raises(ValueError, match="positions"):
        cpu.qkv_projection(torch.randn(2, 64), None, torch.ones(64), 1e-5, wqkv,
                               torch.tensor([0, 99]), cos_sin, 1, 1)
    with pytest.raises(ValueError, match="residual"):
        cpu.qkv_projection(torch.randn(2, 64), torch.randn(3, 64), torch.ones(64), 1e-5,
                               wqkv, torch.arange(2), cos_sin, 1, 1)


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("seed", SEEDS)
def test_decoder_layer_in_one_call_equals_the_composed_layer(seed: int,
                                                             with_residual: bool) -> None:
    """With kernels.PagedAttention the fused layer runs qkv_projection, the paged store and
    attention, and o_proj_and_mlp in one extension call; with an attention that offers no
    paged caches it calls those three one by one, which must give the same outputs and
    caches.
    The batch mixes a prefill chunk over a cached prefix with decode rows."""
    g, s = _case(seed, "Q4_1")
    C, F, D, kv = s["hidden"], s["ffn"], s["head_dim"], s["kv_heads"]
    heads = kv * s["group"]
    weights = kernels.DecoderLayerWeights(
        torch.rand(C, generator=g) + 0.5, _weight(g, (heads + 2 * kv) * D, C, "Q4_1")[0],
        _weight(g, C, heads * D, "Q4_1")[0], torch.rand(C, generator=g) + 0.5,
        _weight(g, 2 * F, C, "Q4_1")[0], _weight(g, C, F, "Q4_1")[0], 1e-5, heads, kv)
    block_size, num_blocks, layers = 4, 12, 2
    q_lens, prefixes = [5, 1, 1], [3, 9, 0]
    tables = torch.randperm(num_blocks, generator=g)[:9].reshape(3, 3).to(torch.int32)
    slots, positions = [], []
    for i, (q_len, prefix) in enumerate(zip(q_lens, prefixes)):
        for p in range(prefix, prefix + q_len):
            slots.append(int(tables[i, p // block_size]) * block_size + p % block_size)
            positions.append(p)
    tokens = sum(q_lens)
    caches = [torch.randn(num_blocks, block_size, kv, D, generator=g) for _ in range(2 * layers)]

    def attention(k_caches, v_caches):
        return kernels.PagedAttention(k_caches, v_caches, kernels.AttentionMetadata(
            torch.tensor(slots), tables,
            torch.tensor([p + q for p, q in zip(prefixes, q_lens)], dtype=torch.int32),
            torch.tensor([0, 5, 6, 7], dtype=torch.int32), D ** -0.5))

    class Unpaged:  # the same attention, without paged_kv: the layer runs in two halves
        def __init__(self, paged):
            self.paged = paged

        def __call__(self, *args):
            return self.paged(*args)

        def paged_kv(self, layer):
            return None

    x = torch.randn(tokens, C, generator=g)
    residual = torch.randn(tokens, C, generator=g) if with_residual else None
    cos_sin = _cos_sin(g, 32, D)
    fused_caches = [c.clone() for c in caches]
    layer = kernels.fused_decoder_layer(weights)
    assert layer is not None and layer.runs(x)
    fused = layer(1, x, residual, torch.tensor(positions), cos_sin,
                  attention(fused_caches[:layers], fused_caches[layers:]))
    composed = layer(1, x, residual, torch.tensor(positions), cos_sin,
                     Unpaged(attention(caches[:layers], caches[layers:])))
    assert torch.equal(fused[0], composed[0]) and torch.equal(fused[1], composed[1])
    assert all(torch.equal(a, b) for a, b in zip(fused_caches, caches))
