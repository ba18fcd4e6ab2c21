"""Packed weight formats (GGUF block layouts) and their plain torch dequantization.

A ``PackedWeight`` keeps a [N, K] matrix exactly as the GGUF file stores it: each row is
K / 32 blocks of bytes. Kernels consume the bytes directly; ``dequantize`` is the
reference they are tested against.

Block layouts (32 weights a block, little-endian fp16 scales):
  Q8_0: d:f16, q:int8[32]                 w = d * q
  Q4_0: d:f16, qs:u8[16]                  w = d * (nibble - 8)
  Q4_1: d:f16, m:f16, qs:u8[16]           w = d * nibble + m
  nibble j (0..15) is the low half of qs[j]; nibble j+16 is the high half of qs[j].

NF4 (QLoRA 4-bit NormalFloat, not a GGUF format; see quantize_nf4): blocks of 64 weights,
w = NF4_LEVELS[code] * absmax, with the block absmax values double-quantized to int8.
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

    def to(self, device: torch.device | str) -> "PackedWeight":
        return PackedWeight(self.data.to(device), self.qtype, self.rows, self.cols)


def _f16(raw: torch.Tensor) -> torch.Tensor:
    """Reinterpret the last dim (2 bytes) as float16 and widen to float32."""
    return raw.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[..., 16] bytes -> [..., 32] values: low halves first, then high halves."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1).float()


def dequantize(w: PackedWeight) -> torch.Tensor:
    """Reference dequantization to float32 [rows, cols]."""
    if w.qtype == "NF4":
        return dequantize_nf4(w)
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
    if qtype == "NF4":
        return quantize_nf4(w)
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


# ---- NF4 -------------------------------------------------------------------------------
# Row layout (every row self-contained, so select_rows and row-parallel kernels work):
#   codes   u8[cols / 2]: block b's byte j holds code j (low nibble) and j + 32 (high)
#   absmax  i8[cols / 64]: (absmax - offset) / scale rounded, per block
#   groups  f32[2 * ceil(blocks / 256)]: (scale, offset) per group of 256 blocks
# QLoRA double-quantizes the absmax values in groups of 256 with the mean as offset; here a
# group never spans rows (rows of <= 16384 columns have one group).

NF4_BLOCK = 64
NF4_GROUP = 256  # blocks per double-quantization group
# the 16 NormalFloat4 levels (QLoRA, Dettmers et al. 2023)
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])


NF4_ABSMAX_MAX = 127.0  # int8 range of the double-quantized absmax
NF4_GROUP_BYTES = 8  # float32 scale + float32 offset


def _nf4_groups(blocks: int) -> int:
    return -(-blocks // NF4_GROUP)


def nf4_row_bytes(cols: int) -> int:
    blocks = cols // NF4_BLOCK
    return cols // 2 + blocks + NF4_GROUP_BYTES * _nf4_groups(blocks)


def quantize_nf4(w: torch.Tensor) -> PackedWeight:
    """Round a float [rows, cols] matrix to NF4 with double-quantized absmax (see above)."""
    rows, cols = w.shape
    if cols % NF4_BLOCK:
        raise ValueError(f"NF4 needs a multiple of {NF4_BLOCK} columns, got {cols}")
    blocks = cols // NF4_BLOCK
    x = w.float().reshape(rows, blocks, NF4_BLOCK)
    absmax = x.abs().amax(-1)
    normed = x / torch.where(absmax > 0, absmax, torch.ones_like(absmax))[..., None]
    codes = (normed[..., None] - NF4_LEVELS).abs().argmin(-1).to(torch.uint8)
    half = NF4_BLOCK // 2
    packed_codes = (codes[..., :half] | (codes[..., half:] << 4)).reshape(rows, -1)
    groups = _nf4_groups(blocks)
    padded = torch.nn.functional.pad(absmax, (0, groups * NF4_GROUP - blocks))
    valid = torch.arange(groups * NF4_GROUP) < blocks
    grouped, grouped_valid = padded.reshape(rows, groups, NF4_GROUP), valid.reshape(groups, NF4_GROUP)
    offset = (grouped * grouped_valid).sum(-1) / grouped_valid.sum(-1)
    spread = ((grouped - offset[..., None]).abs() * grouped_valid).amax(-1)
    scale = torch.where(spread > 0, spread / NF4_ABSMAX_MAX, torch.ones_like(spread))
    q = ((grouped - offset[..., None]) / scale[..., None]).round().clamp(-NF4_ABSMAX_MAX, NF4_ABSMAX_MAX)
    q = q.reshape(rows, -1)[:, :blocks].to(torch.int8).view(torch.uint8)
    group_floats = torch.stack([scale, offset], -1).reshape(rows, -1).contiguous().view(torch.uint8)
    data = torch.cat([packed_codes, q, group_floats], -1).contiguous()
    return PackedWeight(data, "NF4", rows, cols)


def dequantize_nf4(w: PackedWeight) -> torch.Tensor:
    """Reference NF4 dequantization: absmax = q * scale + offset, w = level * absmax."""
    blocks = w.cols // NF4_BLOCK
    groups = _nf4_groups(blocks)
    codes_end, absmax_end = w.cols // 2, w.cols // 2 + blocks
    packed = w.data[:, :codes_end].reshape(w.rows, blocks, NF4_BLOCK // 2)
    codes = torch.cat([packed & 0x0F, packed >> 4], -1).long()
    q = w.data[:, codes_end:absmax_end].contiguous().view(torch.int8).float()
    group_floats = w.data[:, absmax_end:].contiguous().view(torch.float32).reshape(w.rows, groups, 2)
    group_of_block = torch.arange(blocks) // NF4_GROUP
    scale, offset = group_floats[:, group_of_block, 0], group_floats[:, group_of_block, 1]
    absmax = q * scale + offset
    return (NF4_LEVELS[codes] * absmax[..., None]).reshape(w.rows, w.cols)
