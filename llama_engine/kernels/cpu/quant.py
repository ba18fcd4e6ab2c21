"""Torch-facing wrappers of the C++ quantized matmul (``llama_engine._C``, csrc/quant.cpp).

The weights stay in their GGUF block layout. Two precisions:

* float32 (default): each block is decoded to the float32 values of
  ``llama_engine.quant.dequantize`` (Q4_1's d * q + m as one FMA) and multiplied with the
  untouched activations by float32 FMAs, so ``quant_matmul`` equals ``x @ dequantize(W).T``
  up to float32 rounding.
* int8 activations (``int8_activations=True``): each 32-block of x is rounded to int8
  (scale = absmax / 127) and the dot products are integer (AVX-512 VNNI / AVX2). Faster for
  many rows of x, but every output moves by up to sum over blocks of (d_x / 2) * sum |w|:
  ~0.5 % (relative 2-norm) for Gaussian x, 1-2 % on SmolLM2's real activations, which
  changes greedy output, hence not the default. ``KernelOptions.int8_activations`` (from
  ``LLAMA_ENGINE_INT8_ACTIVATIONS=1``, see ``kernels/options.py``) makes it the default for
  calls that do not choose (e.g. the dispatcher's ``kernels.linear``).

NF4 weights (``llama_engine.quant.quantize_nf4``) run on the float32 path only.
"""
from __future__ import annotations

import enum

import torch

from llama_engine import _C
from llama_engine.kernels.options import options
from llama_engine.quant import PackedWeight


class Isa(enum.IntEnum):
    """Instruction set of the tile kernels (AUTO: the best this CPU runs)."""

    AUTO = 0
    SCALAR = 1
    AVX2 = 2
    AVX512 = 3  # float32: AVX-512F; int8 activations: AVX-512 VNNI


def best_isa(int8_activations: bool = False) -> str:
    """Name of the kernel set ``quant_matmul`` uses on this CPU."""
    return _C.quant_isa(int8_activations)


def isa_supported(isa: Isa, int8_activations: bool = False) -> bool:
    return bool(_C.quant_isa_supported(int(isa), int8_activations))


def _packed_bytes(weight: PackedWeight) -> torch.Tensor:
    """The packed rows as a C-contiguous uint8 CPU tensor [rows, row bytes] (the extension
    checks the row size against the format)."""
    data = weight.data
    if data.dtype is torch.uint8 and data.is_cpu and data.dim() == 2 and data.is_contiguous():
        return data
    if not data.is_cpu:
        raise ValueError("the CPU quant kernels need the packed weight on the CPU")
    if data.dtype is not torch.uint8 or data.dim() != 2:
        raise ValueError("packed weight must be uint8 [N, packed row bytes]")
    return data.contiguous()


def packed_view(weight: PackedWeight) -> _C.PackedWeightView:
    """The weight as the extension takes it: its uint8 rows (kept alive by the view), format
    and [rows, cols], checked once (ValueError when the row size does not fit the format)."""
    return _C.PackedWeightView(_packed_bytes(weight), weight.qtype, weight.rows, weight.cols)


def dequantize(weight: PackedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """float32 [rows, cols], bit-identical to ``llama_engine.quant.dequantize``; with dtype
    torch.bfloat16, those values rounded to it (as ``.to(torch.bfloat16)``) without the
    float32 copy."""
    out = torch.empty(weight.rows, weight.cols, dtype=dtype)
    _C.dequantize(packed_view(weight), out)
    return out


def quant_matmul(x: torch.Tensor, weight: PackedWeight | _C.PackedWeightView,
                 isa: Isa = Isa.AUTO, int8_activations: bool | None = None) -> torch.Tensor:
    """x float32 [..., K] @ dequantize(weight).T -> float32 [..., N] (int8_activations None:
    the kernel options' default; NF4 has float32 kernels only). A caller that multiplies by
    the same weight often may pass its ``packed_view`` to skip rebuilding it. Raises
    ValueError for a dtype, device or shape that does not fit."""
    view = weight if isinstance(weight, _C.PackedWeightView) else packed_view(weight)
    if x.dtype is not torch.float32 or not x.is_cpu:
        raise ValueError(f"quant_matmul needs float32 CPU activations, got {x.dtype} on {x.device}")
    rows = x if x.is_contiguous() else x.contiguous()  # held until the kernel returns
    if x.dim() == 2:  # the usual case, and the cheapest torch.empty call
        out = torch.empty(x.shape[0], view.rows, dtype=torch.float32)
    else:
        out = torch.empty(*x.shape[:-1], view.rows, dtype=torch.float32)
    if int8_activations is None:
        int8_activations = options().int8_activations and view.qtype != "NF4"
    _C.quant_matmul(rows, view, out, isa, int8_activations)
    return out
