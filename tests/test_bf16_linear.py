"""``kernels.bf16_linear`` (oneDNN's bfloat16 matmul on a weight laid out once, bias and
GELU fused) against the torch reference: the same bfloat16 inputs, products summed in
float32, one rounding to bfloat16 at the end. Fresh random shapes and inputs each case."""
from __future__ import annotations

import pytest
import torch

from llama_engine import kernels
from llama_engine.kernels import KernelOptions, configure, reference

SEEDS = range(6)
# Outputs are rounded to bfloat16 once (2^-8 relative spacing); float32 sums taken in another
# order may land one bfloat16 step apart, or a few float32 roundings apart near zero.
BF16_RTOL, BF16_ATOL = 2.0 ** -7, 1e-3


@pytest.mark.skipif(not kernels.bf16_matmul_is_fast(), reason="no AMX / AVX512-BF16 on this CPU")
@pytest.mark.parametrize("seed", SEEDS)
def test_onednn_bf16_linear_matches_reference(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    rows = int(torch.randint(1, 300, (1,), generator=g))
    out_features, in_features = (int(v) for v in torch.randint(1, 1600, (2,), generator=g))
    weight = torch.randn(out_features, in_features, generator=g) * in_features ** -0.5
    bias = torch.randn(out_features, generator=g) if seed % 2 else None
    x = torch.randn(rows, in_features, generator=g).to(torch.bfloat16)
    packed = kernels.pack_bf16(weight, bias)
    assert packed.onednn
    for gelu in (False, True):
        out = kernels.bf16_linear(x, packed, gelu)
        expected = reference.bf16_linear(x, weight.to(torch.bfloat16),
                                         None if bias is None else bias.to(torch.bfloat16), gelu)
        assert out.dtype == torch.bfloat16 and out.shape == (rows, out_features)
        torch.testing.assert_close(out.float(), expected.float(), rtol=BF16_RTOL, atol=BF16_ATOL)


def test_torch_backend_keeps_the_plain_layout() -> None:
    weight, bias = torch.randn(24, 40), torch.randn(24)
    previous = configure(KernelOptions(backend="torch"))
    try:
        packed = kernels.pack_bf16(weight, bias)
    finally:
        configure(previous)
    assert not packed.onednn and torch.equal(packed.weight, weight.to(torch.bfloat16))
    x = torch.randn(5, 40).to(torch.bfloat16)
    expected = (x.float() @ weight.to(torch.bfloat16).float().t() + bias.to(torch.bfloat16).float())
    torch.testing.assert_close(kernels.bf16_linear(x, packed).float(), expected.to(torch.bfloat16).float())


@pytest.mark.parametrize("seed", SEEDS)
def test_linear_over_a_bf16_weight_is_mixed_precision(seed: int) -> None:
    """``kernels.linear`` of float32 x [B, M, K] and a ``BF16Weight``: the torch reference of
    autocast's CPU linear (x and W rounded to bfloat16, float32 sums, y rounded to bfloat16
    once), returned in float32; and within bfloat16's error of the float32 product."""
    g = torch.Generator().manual_seed(100 + seed)
    batch, rows = (int(v) for v in torch.randint(1, 200, (2,), generator=g))
    out_features, in_features = (int(v) for v in torch.randint(1, 1600, (2,), generator=g))
    weight = torch.randn(out_features, in_features, generator=g) * in_features ** -0.5
    x = torch.randn(batch % 3 + 1, rows, in_features, generator=g)
    out = kernels.linear(x, kernels.pack_bf16(weight))
    expected = (x.to(torch.bfloat16).float() @ weight.to(torch.bfloat16).float().t()).to(torch.bfloat16)
    assert out.dtype == torch.float32 and out.shape == (*x.shape[:-1], out_features)
    torch.testing.assert_close(out, expected.float(), rtol=BF16_RTOL, atol=BF16_ATOL)
    # three roundings to bfloat16 (x, W, y) of 2^-9 relative each, summed over K terms
    exact = x.double() @ weight.double().t()
    scale = (x.double().abs() @ weight.double().abs().t())
    assert ((out.double() - exact).abs() <= 3 * 2.0 ** -8 * scale + 1e-6).all()
