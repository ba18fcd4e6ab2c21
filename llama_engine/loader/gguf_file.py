"""The GGUF container: metadata key/values and tensor descriptions, read over one memory map.

Layout (llama.cpp's ggml/docs/gguf.md, versions 2 and 3, little-endian): magic "GGUF", u32
version, u64 tensor count, u64 key/value count; each key/value is a string key, a u32 value
type and the value (an array is a u32 item type, a u64 length and the items; a string is a u64
byte length and UTF-8 bytes); each tensor description is a string name, u32 dimension count,
u64 dimensions (contiguous one first), u32 ggml type and u64 offset into the data section,
which starts at the next multiple of general.alignment.

Why not gguf.GGUFReader: it builds numpy views for every item of every array as it opens a
file (tokens, merges and token types: about 150k views for a 49k vocabulary), which took half
of the engine's start-up. Here a string array is one loop over the map, a numeric array one
numpy view. Tensor data are views of a private (copy-on-write) mapping of the file, as
llama.cpp maps its weights: a weight used as stored is never copied, costs no memory beyond the
page cache, and a write to it stays in this process. (So the file must not be truncated while a
model uses it.) The gguf package still names the value and tensor types and gives each tensor
type's block size.
"""
from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGMLQuantizationType, GGUFValueType

SUPPORTED_VERSIONS = (2, 3)
KEY_ALIGNMENT = "general.alignment"

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
# Fixed-size value types: struct format for one value, numpy dtype for an array of them.
_SCALARS: dict[GGUFValueType, tuple[struct.Struct, np.dtype]] = {
    value_type: (struct.Struct("<" + code), np.dtype("<" + code))
    for value_type, code in (
        (GGUFValueType.UINT8, "B"), (GGUFValueType.INT8, "b"),
        (GGUFValueType.UINT16, "H"), (GGUFValueType.INT16, "h"),
        (GGUFValueType.UINT32, "I"), (GGUFValueType.INT32, "i"),
        (GGUFValueType.UINT64, "Q"), (GGUFValueType.INT64, "q"),
        (GGUFValueType.FLOAT32, "f"), (GGUFValueType.FLOAT64, "d"),
        (GGUFValueType.BOOL, "?"),
    )
}


class GGUFFormatError(ValueError):
    """The bytes do not follow the GGUF layout (truncated, damaged, or an unsupported variant)."""


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor's description and its bytes, still in the file's memory map."""

    name: str
    type_name: str  # ggml type name, as gguf.GGMLQuantizationType spells it: "F32", "Q4_1", ...
    shape: tuple[int, ...]  # GGUF order: shape[0] is the contiguous (column) dimension
    data: np.ndarray  # uint8 view of the tensor's bytes in the private mapping


class _Cursor:
    """Reads GGUF values forward from an offset in a buffer."""

    def __init__(self, buffer: mmap.mmap, offset: int) -> None:
        self.buffer = buffer
        self.offset = offset

    def unpack(self, fmt: struct.Struct) -> Any:
        (value,) = fmt.unpack_from(self.buffer, self.offset)
        self.offset += fmt.size
        return value

    def string(self) -> str:
        length = self.unpack(_U64)
        end = self.offset + length
        if end > len(self.buffer):
            raise GGUFFormatError(f"a string of {length} bytes at offset {self.offset} runs past the end of the file")
        text = self.buffer[self.offset:end].decode("utf-8")
        self.offset = end
        return text

    def strings(self, count: int) -> list[str]:
        # The hot loop of opening a file (every token and merge). int.from_bytes rather than
        # struct: a tuple per item would wake the garbage collector, whose full passes over
        # torch's objects cost more than the loop itself.
        buffer, offset, size = self.buffer, self.offset, len(self.buffer)
        out: list[str] = []
        append = out.append
        for _ in range(count):
            length = int.from_bytes(buffer[offset:offset + 8], "little")
            offset += 8
            if offset + length > size:
                raise GGUFFormatError(f"a string of {length} bytes at offset {offset} runs past the end of the file")
            append(buffer[offset:offset + length].decode("utf-8"))
            offset += length
        self.offset = offset
        return out

    def value(self, value_type: GGUFValueType) -> Any:
        if value_type == GGUFValueType.STRING:
            return self.string()
        if value_type in _SCALARS:
            return self.unpack(_SCALARS[value_type][0])
        if value_type == GGUFValueType.ARRAY:
            item_type = GGUFValueType(self.unpack(_U32))
            count = self.unpack(_U64)
            if item_type == GGUFValueType.STRING:
                return self.strings(count)
            if item_type in _SCALARS:
                dtype = _SCALARS[item_type][1]
                items = np.frombuffer(self.buffer, dtype=dtype, count=count, offset=self.offset)
                self.offset += count * dtype.itemsize
                return items.tolist()
            return [self.value(item_type) for _ in range(count)]
        raise GGUFFormatError(f"unknown GGUF value type {value_type}")


class GGUFFile:
    """An open GGUF file: ``metadata`` (key -> Python value: int, float, bool, str or list) and
    ``tensors`` (in file order). Raises GGUFFormatError (a ValueError) for anything that is not
    a well-formed little-endian GGUF v2/v3 file; OSError when the file cannot be opened."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        with open(path, "rb") as file:
            # A zero-length file cannot be mapped; report it as the damaged GGUF it is.
            if os.fstat(file.fileno()).st_size == 0:
                raise GGUFFormatError("the file is empty")
            self._map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
        try:
            self.metadata, self.tensors = self._parse()
        except (struct.error, UnicodeDecodeError, ValueError) as error:
            if isinstance(error, GGUFFormatError):
                raise
            raise GGUFFormatError(f"{type(error).__name__}: {error}") from error

    def _parse(self) -> tuple[dict[str, Any], list[GGUFTensor]]:
        cursor = _Cursor(self._map, 0)
        if cursor.unpack(_U32) != GGUF_MAGIC:
            raise GGUFFormatError("no GGUF magic at the start of the file")
        version = cursor.unpack(_U32)
        if version not in SUPPORTED_VERSIONS:
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            kind = "a big-endian" if swapped in SUPPORTED_VERSIONS else "an unsupported"
            raise GGUFFormatError(f"{kind} GGUF (version field {version}); readable: little-endian "
                                  f"versions {', '.join(map(str, SUPPORTED_VERSIONS))}")
        tensor_count, kv_count = cursor.unpack(_U64), cursor.unpack(_U64)
        metadata: dict[str, Any] = {}
        for _ in range(kv_count):
            key = cursor.string()
            if key in metadata:
                raise GGUFFormatError(f"metadata key {key!r} appears twice")
            metadata[key] = cursor.value(GGUFValueType(cursor.unpack(_U32)))
        descriptions = []
        for _ in range(tensor_count):
            name = cursor.string()
            shape = tuple(cursor.unpack(_U64) for _ in range(cursor.unpack(_U32)))
            descriptions.append((name, GGMLQuantizationType(cursor.unpack(_U32)), shape, cursor.unpack(_U64)))
        alignment = metadata.get(KEY_ALIGNMENT, GGUF_DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise GGUFFormatError(f"{KEY_ALIGNMENT} must be a power of two, got {alignment!r}")
        data_start = -(-cursor.offset // alignment) * alignment
        return metadata, [self._tensor(data_start, *description) for description in descriptions]

    def _tensor(self, data_start: int, name: str, kind: GGMLQuantizationType, shape: tuple[int, ...],
                offset: int) -> GGUFTensor:
        elements = math.prod(shape)
        block_elements, block_bytes = GGML_QUANT_SIZES[kind]
        if elements % block_elements:
            raise GGUFFormatError(f"tensor {name!r}: {elements} elements is not a whole number of "
                                  f"{kind.name} blocks of {block_elements}")
        size = elements // block_elements * block_bytes
        start = data_start + offset
        if start + size > len(self._map):
            raise GGUFFormatError(f"tensor {name!r} ({size} bytes at offset {start}) runs past the end "
                                  f"of the file ({len(self._map)} bytes)")
        data = np.frombuffer(self._map, dtype=np.uint8, count=size, offset=start)
        return GGUFTensor(name, kind.name, shape, data)
