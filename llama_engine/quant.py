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
w = NF4_LEVELS[code] * absmax, with the block absmax values double-quantized to 8 bits as
bitsandbytes does.
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
# QLoRA's NF4 with double quantization, value for value as bitsandbytes computes it
# (``quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)``):
#   * the matrix, read row-major, is cut into blocks of 64; each block's absmax is kept and
#     its weights scaled by 1 / absmax are rounded to the nearest of the 16 NF4 levels;
#   * double quantization: offset = the mean of all absmax values; absmax - offset is cut
#     into groups of 256 blocks (row-major over the whole matrix), each group scaled by
#     1 / its largest |absmax - offset| and rounded to the nearest value of the signed 8-bit
#     dynamic map (Dettmers 2015, bitsandbytes' create_dynamic_map).
# Dequantized: absmax = DYNAMIC_MAP[q] * group_scale + offset; w = NF4_LEVELS[code] * absmax.
# Row layout (each row self-contained, so select_rows and row-parallel kernels work):
#   codes   u8[cols / 2]: block b's byte j holds code j (low nibble) and j + 32 (high)
#   absmax  u8[cols / 64]: index into NF4_ABSMAX_MAP, per block
#   f32[2 + G]: offset, phase, then the scales of the G groups the row's blocks touch;
#     block b of the row belongs to slot (phase + b) // 256, phase = the row's first block
#     index within its group (a group may span rows, as in bitsandbytes).

NF4_BLOCK = 64
NF4_GROUP = 256  # blocks per double-quantization group
# the 16 NormalFloat4 levels (QLoRA, Dettmers et al. 2023)
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])
NF4_HEADER_FLOATS = 2  # offset, phase
SMALLEST_SCALE = 1e-38  # bitsandbytes' floor under an absmax before taking 1 / absmax


def dynamic_map(exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The signed dynamic quantization map (Dettmers 2015, "8-Bit Approximations for
    Parallelism in Deep Learning"; bitsandbytes' create_dynamic_map(signed=True)): 2^bits
    sorted float32 values in [-1, 1], dense near 0. For each exponent i the fraction
    midpoints of linspace(0.1, 1) are scaled by 10^(i - exponent_bits + 1), both signs."""
    values: list[float] = []
    fraction_bits = total_bits - 1 - exponent_bits
    for i in range(exponent_bits):
        bounds = torch.linspace(0.1, 1, 2 ** (i + fraction_bits) + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        power = 10 ** (-(exponent_bits - 1) + i)  # scaled in float32, as bitsandbytes does
        values += (power * means).tolist() + (-power * means).tolist()
    if 2 ** fraction_bits - 1 > 0:  # the all-zero-exponent values (none for 7 of 8 bits)
        bounds = torch.linspace(0.1, 1, 2 ** fraction_bits, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        power = 10 ** (-(exponent_bits - 1) + exponent_bits - 1)
        values += (power * means).tolist() + (-power * means).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (2 ** total_bits - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


NF4_ABSMAX_MAP = dynamic_map()


def _nf4_slots(blocks: int) -> int:
    """Group scales a row of ``blocks`` blocks stores: enough for any phase."""
    return (blocks + NF4_GROUP - 2) // NF4_GROUP + 1


def nf4_row_bytes(cols: int) -> int:
    blocks = cols // NF4_BLOCK
    return cols // 2 + blocks + 4 * (NF4_HEADER_FLOATS + _nf4_slots(blocks))


def _round_to_map(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the sorted ``values`` (ties to the lower), as bitsandbytes'
    bucketize over the midpoints."""
    return torch.bucketize(x, (values[:-1] + values[1:]) / 2, out_int32=True).to(torch.uint8)


def _blockwise(x: torch.Tensor, size: int, values: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' blockwise quantization of flat x: per block of ``size``, the absmax
    and each value times 1 / absmax (clamped to [-1, 1]) rounded to ``values`` (a partial
    last block divides instead, as bitsandbytes does)."""
    full = x.numel() - x.numel() % size
    head = x[:full].reshape(-1, size)
    absmax = head.abs().amax(-1)
    scaled = [(head * (1.0 / absmax.clamp(min=SMALLEST_SCALE))[:, None]).clamp(-1, 1).reshape(-1)]
    if full < x.numel():
        tail_max = x[full:].abs().amax().clamp(min=SMALLEST_SCALE)
        absmax = torch.cat([absmax, tail_max[None]])
        scaled.append((x[full:] / tail_max).clamp(-1, 1))
    return _round_to_map(torch.cat(scaled), values), absmax


def quantize_nf4(w: torch.Tensor) -> PackedWeight:
    """Round a float [rows, cols] matrix to NF4 with double-quantized absmax, as
    bitsandbytes does (see above). Raises ValueError unless cols is a multiple of 64."""
    rows, cols = w.shape
    if cols % NF4_BLOCK:
        raise ValueError(f"NF4 needs a multiple of {NF4_BLOCK} columns, got {cols}")
    blocks = cols // NF4_BLOCK
    codes, absmax = _blockwise(w.float().reshape(-1), NF4_BLOCK, NF4_LEVELS)
    codes = codes.reshape(rows, blocks, NF4_BLOCK)
    half = NF4_BLOCK // 2
    packed_codes = (codes[..., :half] | (codes[..., half:] << 4)).reshape(rows, -1)
    offset = absmax.mean()
    q, group_scale = _blockwise(absmax - offset, NF4_GROUP, NF4_ABSMAX_MAP)
    slots = _nf4_slots(blocks)
    first_block = torch.arange(rows) * blocks
    group_scale = torch.cat([group_scale, torch.zeros(slots)])  # rows ending early pad with 0
    scales = group_scale[(first_block // NF4_GROUP)[:, None] + torch.arange(slots)]
    header = torch.stack([offset.expand(rows), (first_block % NF4_GROUP).float()], -1)
    floats = torch.cat([header, scales], -1).contiguous().view(torch.uint8)
    data = torch.cat([packed_codes, q.reshape(rows, blocks), floats], -1).contiguous()
    return PackedWeight(data, "NF4", rows, cols)


def dequantize_nf4(w: PackedWeight) -> torch.Tensor:
    """Reference NF4 dequantization: absmax = NF4_ABSMAX_MAP[q] * group scale + offset,
    w = NF4_LEVELS[code] * absmax (bitsandbytes' dequantize_4bit)."""
    blocks = w.cols // NF4_BLOCK
    codes_end, absmax_end = w.cols // 2, w.cols // 2 + blocks
    packed = w.data[:, :codes_end].reshape(w.rows, blocks, NF4_BLOCK // 2)
    codes = torch.cat([packed & 0x0F, packed >> 4], -1).long()
    q = w.data[:, codes_end:absmax_end].long()
    floats = w.data[:, absmax_end:].contiguous().view(torch.float32)
    offset, phase = floats[:, :1], floats[:, 1:2].long()
    slot = (phase + torch.arange(blocks)) // NF4_GROUP
    scale = floats[:, NF4_HEADER_FLOATS:].gather(1, slot)
    absmax = NF4_ABSMAX_MAP[q] * scale + offset
    return (NF4_LEVELS[codes] * absmax[..., None]).reshape(w.rows, w.cols)


# ---- rounding bounds -------------------------------------------------------------------
# How far storing a value in a format can move it, at worst. Float formats (GGUF's type
# names; torch dtypes map onto them): relative to the value, the unit roundoff 2^-p (p: the
# significand's bits), plus, below the smallest normal, half the subnormal spacing.
FLOAT_ROUNDOFF = {"F32": (2.0 ** -24, 2.0 ** -150), "F16": (2.0 ** -11, 2.0 ** -25),
                  "BF16": (2.0 ** -8, 2.0 ** -134)}
TORCH_FORMATS = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
# Block formats: relative to the largest |w| of the value's block, from the quantizers above:
# Q8_0 half a step d = amax / 127; Q4_0 a whole step d = amax / 8 (the block's largest
# value of the other sign than its extreme lands on code 16, clamped to 15); Q4_1 half a
# step (max - min) / 15 <= 2 amax / 15; NF4 half the widest gap between levels (0.304 / 2)
# plus the double-quantized absmax's own error. Each also carries its fp16 / 8-bit scale's
# rounding, which the FORMAT_SLACK factor below covers.
BLOCK_ROUNDOFF = {"Q8_0": (BLOCK, 0.5 / 127), "Q4_0": (BLOCK, 1 / 8), "Q4_1": (BLOCK, 1 / 15),
                  "NF4": (NF4_BLOCK, 0.2)}
FORMAT_SLACK = 1.5  # the scales' own rounding, and float32 arithmetic in the quantizers


def rounding_bound(values: torch.Tensor, formats: "tuple[str, ...] | set[str]") -> torch.Tensor:
    """The largest difference, elementwise, between float [rows, cols] ``values`` and the
    same values after being stored in each of ``formats`` in turn (GGUF type names: F32,
    F16, BF16, Q8_0, Q4_0, Q4_1; or NF4): the sum of each format's worst rounding error
    (FLOAT_ROUNDOFF, BLOCK_ROUNDOFF) times FORMAT_SLACK. float32, values' shape. A block
    format's bound uses the largest |value| of each block of a row (a row's tail shorter
    than a block: of the whole row). Raises ValueError for an unknown format."""
    magnitude = values.detach().float().abs()
    bound = torch.zeros_like(magnitude)
    for name in formats:
        if name in FLOAT_ROUNDOFF:
            relative, floor = FLOAT_ROUNDOFF[name]
            bound += magnitude * relative + floor
        elif name in BLOCK_ROUNDOFF:
            size, relative = BLOCK_ROUNDOFF[name]
            rows, cols = magnitude.shape
            if cols % size:
                block_max = magnitude.amax(-1, keepdim=True).expand(rows, cols)
            else:
                block_max = magnitude.reshape(rows, cols // size, size).amax(-1, keepdim=True) \
                    .expand(rows, cols // size, size).reshape(rows, cols)
            bound += block_max * relative
        else:
            raise ValueError(f"unknown weight format {name!r} (known: "
                             f"{', '.join([*FLOAT_ROUNDOFF, *BLOCK_ROUNDOFF])})")
    return bound * FORMAT_SLACK
