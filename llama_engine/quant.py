"""Packed weight formats (GGUF block layouts) and their plain torch dequantization.

A ``PackedWeight`` keeps a [N, K] matrix exactly as the GGUF file stores it: each row is
K / 32 blocks of bytes. Kernels consume the bytes directly; ``dequantize`` is the
reference they are tested against.

Block layouts (32 weights a block, little-endian fp16 scales):
  Q8_0: d:f16, q:int8[32]                 w = d * q
  Q4_0: d:f16, qs:u8[16]                  w = d * (nibble - 8)
  Q4_1: d:f16, m:f16, qs:u8[16]           w = d * nibble + m
  nibble j (0..15) is the low half of qs[j]; nibble j+16 is the high half of qs[j].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK = 32
BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}


@dataclass
class PackedWeight:
    """A quantized [rows, cols] matrix in a GGUF block format."""

    data: torch.Tensor  # uint8 [rows, cols // 32 * BLOCK_BYTES[qtype]]
    qtype: str
    rows: int
    cols: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.cols)

    def select_rows(self, index: torch.Tensor) -> "PackedWeight":
        return PackedWeight(self.data[index].contiguous(), self.qtype, len(index), self.cols)

    def nbytes(self) -> int:
        return self.data.numel()


def _f16(raw: torch.Tensor) -> torch.Tensor:
    """Reinterpret the last dim (2 bytes) as float16 and widen to float32."""
    return raw.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[..., 16] bytes -> [..., 32] values: low halves first, then high halves."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1).float()


def dequantize(w: PackedWeight) -> torch.Tensor:
    """Reference dequantization to float32 [rows, cols]."""
    if w.qtype not in BLOCK_BYTES:
        raise ValueError(f"unsupported packed format {w.qtype!r}")
    blocks = w.data.view(w.rows, w.cols // BLOCK, BLOCK_BYTES[w.qtype])
    d = _f16(blocks[..., 0:2])
    if w.qtype == "Q8_0":
        values = d * blocks[..., 2:].contiguous().view(torch.int8).float()
    elif w.qtype == "Q4_0":
        values = d * (_nibbles(blocks[..., 2:]) - 8.0)
    else:
        m = _f16(blocks[..., 2:4])
        values = d * _nibbles(blocks[..., 4:]) + m
    return values.reshape(w.rows, w.cols)


def quantize(w: torch.Tensor, qtype: str) -> PackedWeight:
    """Round a float [rows, cols] matrix into a block format (as llama.cpp's reference
    quantizers do). Tests and tiny checkpoints use it to make packed weights."""
    rows, cols = w.shape
    if cols % BLOCK:
        raise ValueError(f"{qtype} needs a multiple of {BLOCK} columns, got {cols}")
    x = w.float().reshape(rows, cols // BLOCK, BLOCK)
    if qtype == "Q8_0":
        d = x.abs().amax(-1, keepdim=True) / 127.0
        q = torch.where(d > 0, x / d, torch.zeros_like(x)).round().clamp(-127, 127).to(torch.int8)
        body = q.view(torch.uint8)
        head = [d.half()]
    elif qtype == "Q4_0":
        idx = x.abs().argmax(-1, keepdim=True)
        signed_max = x.gather(-1, idx)
        d = signed_max / -8.0
        q = torch.where(d != 0, x / d, torch.zeros_like(x)).add(8.5).floor().clamp(0, 15).to(torch.uint8)
        body = q[..., :16] | (q[..., 16:] << 4)
        head = [d.half()]
    elif qtype == "Q4_1":
        lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        d = (hi - lo) / 15.0
        q = torch.where(d > 0, (x - lo) / d, torch.zeros_like(x)).add(0.5).floor().clamp(0, 15).to(torch.uint8)
        body = q[..., :16] | (q[..., 16:] << 4)
        head = [d.half(), lo.half()]
    else:
        raise ValueError(f"unsupported packed format {qtype!r}")
    parts = [h.contiguous().view(torch.uint8) for h in head] + [body]
    data = torch.cat(parts, dim=-1).reshape(rows, -1).contiguous()
    return PackedWeight(data, qtype, rows, cols)
