"""C++ quantized matmul / dequantize (csrc/quant.cpp) against llama_engine.quant.

Reference: x.double() @ dequantize(W).double().T. Tolerances:
* float32 path (default): the weights are decoded exactly (Q4_1 to half an ulp), so only
  float32 rounding remains, at most K * 2^-24 * (|x| @ |W|^T) per output (the standard
  worst-case bound for a length-K float32 dot product; observed errors are ~100x smaller,
  while a wrong nibble, scale or min would exceed it by orders of magnitude).
* int8-activation path: each 32-block of x is rounded to int8 with scale
  d_x = absmax / 127, so every activation moves by at most d_x / 2 and the integer dot
  products are exact. Output (m, n) differs from the reference by at most
      bound[m, n] = sum over blocks b of (d_x[m, b] / 2) * sum_{k in b} |W[n, k]|
  plus float32 rounding of the per-block scaling (FLOAT_SLACK relative to |x| @ |W|^T).
  For Gaussian activations the relative 2-norm error measures ~0.5 %; MAX_RELATIVE_ERROR
  caps it at 1 %.
"""
from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("llama_engine._C", reason="C++ extension llama_engine._C is not built "
                    "(python setup.py build_ext --inplace)")

from llama_engine.kernels.cpu import quant as cpu_quant  # noqa: E402
from llama_engine.quant import (  # noqa: E402
    BLOCK, BLOCK_BYTES, NF4_BLOCK, NF4_LEVELS, PackedWeight, dequantize, nf4_row_bytes, quantize)

FORMATS = ["Q4_0", "Q4_1", "Q8_0"]
INT8_MAX = 127.0
FLOAT32_UNIT_ROUNDOFF = 2.0 ** -24
FLOAT_SLACK = 2e-6           # int8 path: float32 scaling error, relative to |x| @ |W|^T
MAX_RELATIVE_ERROR = 0.01    # 2-norm relative error for Gaussian activations (measured ~0.005)
ACT_ROWS = [1, 2, 3, 4, 17, 64]  # <= 4 rows: packed-row kernel; more: decoded chunks
# (isa, int8_activations) pairs this CPU has kernels for
KERNELS = [(isa, int8) for int8 in (False, True) for isa in cpu_quant.Isa
           if cpu_quant.isa_supported(isa, int8)]


def kernel_id(kernel: tuple[cpu_quant.Isa, bool]) -> str:
    return f"{kernel[0].name}-{'int8' if kernel[1] else 'f32'}"


def random_shape(seed: int) -> tuple[int, int]:
    """Odd N (no tile size divides it) and K a multiple of 32 with an odd or even block count."""
    rng = random.Random(seed)
    return 2 * rng.randint(1, 60) + 1, BLOCK * rng.randint(1, 50)


def make_weight(n: int, k: int, qtype: str, generator: torch.Generator) -> PackedWeight:
    return quantize(torch.randn(n, k, generator=generator) * 0.05, qtype)


def rounding_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Worst-case effect of int8 activation rounding, [M, N] (see the module docstring)."""
    m, k = x.shape
    half_step = x.double().abs().reshape(m, k // BLOCK, BLOCK).amax(-1) / INT8_MAX / 2
    w_abs_block_sums = w.double().abs().reshape(w.shape[0], k // BLOCK, BLOCK).sum(-1)
    return half_step @ w_abs_block_sums.T


def check_against_reference(x: torch.Tensor, weight: PackedWeight,
                            kernel: tuple[cpu_quant.Isa, bool]) -> None:
    isa, int8 = kernel
    w = dequantize(weight)
    out = cpu_quant.quant_matmul(x, weight, isa, int8_activations=int8)
    x2 = x.reshape(-1, weight.cols)
    ref = x2.double() @ w.double().T
    abs_products = x2.double().abs() @ w.double().abs().T
    if int8:
        tol = rounding_bound(x2, w) + FLOAT_SLACK * abs_products
    else:
        tol = weight.cols * FLOAT32_UNIT_ROUNDOFF * abs_products
    err = (out.reshape(-1, weight.rows).double() - ref).abs()
    assert out.shape == (*x.shape[:-1], weight.rows) and out.dtype == torch.float32
    assert bool((err <= tol).all()), f"max excess {(err - tol).max().item():.3e}"


@pytest.mark.parametrize("kernel", KERNELS, ids=kernel_id)
@pytest.mark.parametrize("qtype", FORMATS)
@pytest.mark.parametrize("m", ACT_ROWS)
@pytest.mark.parametrize("seed", [0, 1])
def test_quant_matmul_within_rounding_bound(kernel: tuple[cpu_quant.Isa, bool], qtype: str,
                                            m: int, seed: int) -> None:
    n, k = random_shape(seed * 100 + m)
    gen = torch.Generator().manual_seed(seed * 1000 + m)
    weight = make_weight(n, k, qtype, gen)
    check_against_reference(torch.randn(m, k, generator=gen), weight, kernel)


@pytest.mark.parametrize("qtype", FORMATS)
def test_quant_matmul_relative_error_gaussian(qtype: str) -> None:
    gen = torch.Generator().manual_seed(7)
    n, k, m = 301, 1536, 17
    weight = make_weight(n, k, qtype, gen)
    x = torch.randn(m, k, generator=gen)
    ref = x.double() @ dequantize(weight).double().T
    out = cpu_quant.quant_matmul(x, weight, int8_activations=True)
    assert (out.double() - ref).norm() / ref.norm() < MAX_RELATIVE_ERROR


@pytest.mark.parametrize("isa", [isa for isa, int8 in KERNELS if int8], ids=lambda i: i.name)
@pytest.mark.parametrize("qtype", FORMATS)
@pytest.mark.parametrize("m", [3, 5])
def test_quant_matmul_exact_for_int8_representable_activations(isa: cpu_quant.Isa, qtype: str,
                                                                m: int) -> None:
    """x = d * q with one |q| = 127 per block: int8 rounding is lossless, so only float32
    rounding remains (checks nibble order, offsets and scales of the integer path)."""
    gen = torch.Generator().manual_seed(11)
    n, k = 67, 224  # 7 blocks: the last one is a tail of the 2-block AVX-512 step
    weight = make_weight(n, k, qtype, gen)
    q = torch.randint(-127, 128, (m, k // BLOCK, BLOCK), generator=gen).float()
    q[..., 3] = 127.0 * torch.where(torch.rand(m, k // BLOCK, generator=gen) < 0.5, -1.0, 1.0)
    d = torch.rand(m, k // BLOCK, 1, generator=gen) + 0.5
    x = (q * d).reshape(m, k)
    w = dequantize(weight).double()
    ref = x.double() @ w.T
    err = (cpu_quant.quant_matmul(x, weight, isa, int8_activations=True).double() - ref).abs()
    assert bool((err <= 1e-5 * (x.double().abs() @ w.abs().T)).all())


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("qtype", FORMATS)
def test_quant_matmul_leading_dims_and_zero_block(qtype: str, int8: bool) -> None:
    gen = torch.Generator().manual_seed(3)
    weight = make_weight(45, 160, qtype, gen)
    x = torch.randn(2, 3, 160, generator=gen)
    x[1, 2, 32:64] = 0.0  # an all-zero block must give int8 scale 0, not a division by zero
    check_against_reference(x, weight, (cpu_quant.Isa.AUTO, int8))
    check_against_reference(x.transpose(0, 1), weight, (cpu_quant.Isa.AUTO, int8))  # strided


@pytest.mark.parametrize("qtype", FORMATS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dequantize_matches_reference_exactly(qtype: str, seed: int) -> None:
    n, k = random_shape(seed)
    weight = make_weight(n, k, qtype, torch.Generator().manual_seed(seed))
    assert torch.equal(cpu_quant.dequantize(weight), dequantize(weight))
    # bfloat16 out: the reference's float32 values rounded by torch
    assert torch.equal(cpu_quant.dequantize(weight, torch.bfloat16),
                       dequantize(weight).to(torch.bfloat16))


@pytest.mark.parametrize("qtype", FORMATS)
def test_dequantize_random_bytes_matches_reference(qtype: str) -> None:
    """Arbitrary bytes reach every fp16 scale: subnormals, infinities and NaNs included."""
    gen = torch.Generator().manual_seed(5)
    n, k = 129, 96
    data = torch.randint(0, 256, (n, k // BLOCK * BLOCK_BYTES[qtype]), generator=gen,
                         dtype=torch.uint8)
    weight = PackedWeight(data, qtype, n, k)
    torch.testing.assert_close(cpu_quant.dequantize(weight), dequantize(weight), rtol=0, atol=0,
                               equal_nan=True)


def test_rejects_bad_inputs() -> None:
    weight = make_weight(9, 64, "Q4_0", torch.Generator().manual_seed(0))
    with pytest.raises(ValueError):
        cpu_quant.quant_matmul(torch.randn(2, 32), weight)
    with pytest.raises(ValueError):
        cpu_quant.quant_matmul(torch.randn(2, 64, dtype=torch.float64), weight)


# ---- NF4 (float32 path only) ------------------------------------------------------------
NF4_MAX_ROUND_TRIP_ERROR = 0.12  # relative 2-norm for Gaussian weights (measured ~0.09)


def test_nf4_reference_reproduces_levels_exactly() -> None:
    """Blocks made of the 16 levels times one shared absmax: every code is exact and the
    double-quantized absmax is the group mean itself (q = 0), so nothing is rounded."""
    absmax = 2.5
    order = torch.randperm(3 * NF4_BLOCK, generator=torch.Generator().manual_seed(0))
    row = (NF4_LEVELS * absmax).repeat(NF4_BLOCK // 16 * 3)[order]
    rows = torch.stack([row, row.flip(0)])
    weight = quantize(rows, "NF4")
    assert weight.data.shape == (2, nf4_row_bytes(3 * NF4_BLOCK))
    assert torch.equal(dequantize(weight), rows)


def test_nf4_reference_round_trip_error() -> None:
    w = torch.randn(33, 640, generator=torch.Generator().manual_seed(1))
    assert (dequantize(quantize(w, "NF4")) - w).norm() / w.norm() < NF4_MAX_ROUND_TRIP_ERROR


@pytest.mark.parametrize("shape", [(7, 64), (45, 576), (3, 64 * 300)])
def test_nf4_dequantize_matches_reference_exactly(shape: tuple[int, int]) -> None:
    weight = quantize(torch.randn(*shape, generator=torch.Generator().manual_seed(2)), "NF4")
    assert torch.equal(cpu_quant.dequantize(weight), dequantize(weight))
    assert torch.equal(cpu_quant.dequantize(weight, torch.bfloat16),
                       dequantize(weight).to(torch.bfloat16))


@pytest.mark.parametrize("isa", [isa for isa, int8 in KERNELS if not int8], ids=lambda i: i.name)
@pytest.mark.parametrize("m", ACT_ROWS)
def test_nf4_quant_matmul_within_float32_bound(isa: cpu_quant.Isa, m: int) -> None:
    gen = torch.Generator().manual_seed(m)
    n, k = 2 * m + 31, NF4_BLOCK * (m % 5 + 1) * 3
    weight = quantize(torch.randn(n, k, generator=gen) * 0.05, "NF4")
    check_against_reference(torch.randn(m, k, generator=gen), weight, (isa, False))


def test_nf4_rejects_int8_activations() -> None:
    weight = quantize(torch.randn(5, 64), "NF4")
    with pytest.raises(ValueError):
        cpu_quant.quant_matmul(torch.randn(2, 64), weight, int8_activations=True)
