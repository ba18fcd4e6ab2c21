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
