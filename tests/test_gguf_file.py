"""llama_engine.loader.gguf_file against the gguf package: its GGUFReader reads the same files,
and its GGUFWriter writes the test files (every value type, custom alignment, big-endian)."""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from llama_engine.loader.gguf_file import GGUFFile, GGUFFormatError

# Keys GGUFReader adds from the header itself; they are not key/value pairs in the file.
READER_HEADER_FIELDS = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}

SCALARS = [  # (writer method, key, value): one of each GGUF scalar type
    ("add_uint8", "t.u8", 200), ("add_int8", "t.i8", -100), ("add_uint16", "t.u16", 60000),
    ("add_int16", "t.i16", -30000), ("add_uint32", "t.u32", 4_000_000_000),
    ("add_int32", "t.i32", -2_000_000_000), ("add_uint64", "t.u64", 2**63 + 5),
    ("add_int64", "t.i64", -(2**62)), ("add_float32", "t.f32", 0.5), ("add_float64", "t.f64", 1e-300),
    ("add_bool", "t.bool", True), ("add_string", "t.str", "héllo 🎉 wörld"),
]
ARRAYS = {
    "t.ints": [3, -1, 7],
    "t.floats": [0.25, -2.5],
    "t.bools": [True, False, True],
    "t.strings": ["", "a", "日本語", " spaced ", "<|im_end|>"],
    "t.nested": [[1, 2], [3]],
}


def test_default_model_reads_as_gguf_reader_does(default_gguf):
    ours = GGUFFile(default_gguf)
    reference = gguf.GGUFReader(default_gguf)
    expected = {name: f.contents() for name, f in reference.fields.items() if name not in READER_HEADER_FIELDS}
    assert ours.metadata == expected
    assert len(ours.metadata["tokenizer.ggml.tokens"]) == 49152
    assert [t.name for t in ours.tensors] == [t.name for t in reference.tensors]
    for mine, theirs in zip(ours.tensors, reference.tensors):
        assert mine.type_name == theirs.tensor_type.name
        assert list(mine.shape) == [int(d) for d in theirs.shape]
        assert mine.data.tobytes() == theirs.data.tobytes(), mine.name


def _write_every_type(path, alignment: int | None = None, endianess=gguf.GGUFEndian.LITTLE) -> dict:
    writer = gguf.GGUFWriter(str(path), "llama", endianess=endianess)
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    for method, key, value in SCALARS:
        getattr(writer, method)(key, value)
    for key, value in ARRAYS.items():
        writer.add_array(key, value)
    rng = np.random.default_rng(0)
    tensors = {
        "dense.f32": rng.standard_normal((3, 5)).astype(np.float32),
        "dense.f16": rng.standard_normal((4, 7)).astype(np.float16),
        "packed.q8_0": rng.integers(0, 256, (2, 2 * 34), dtype=np.uint8),  # 2 rows of 64 weights
    }
    for name, array in tensors.items():
        raw_dtype = gguf.GGMLQuantizationType.Q8_0 if name == "packed.q8_0" else None
        writer.add_tensor(name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


@pytest.mark.parametrize("alignment", [None, 64])
def test_every_value_type_and_tensor_type(tmp_path, alignment):
    path = tmp_path / "types.gguf"
    tensors = _write_every_type(path, alignment)
    ours = GGUFFile(path)
    reference = gguf.GGUFReader(path)
    for _, key, value in SCALARS:
        assert ours.metadata[key] == reference.fields[key].contents()
        assert ours.metadata[key] == (pytest.approx(value) if isinstance(value, float) else value)
    for key, value in ARRAYS.items():
        assert ours.metadata[key] == value  # GGUFReader flattens nested arrays: the written value is the reference
    by_name = {t.name: t for t in ours.tensors}
    assert by_name["dense.f32"].type_name == "F32" and by_name["dense.f32"].shape == (5, 3)
    assert by_name["packed.q8_0"].type_name == "Q8_0" and by_name["packed.q8_0"].shape == (64, 2)
    for name, array in tensors.items():
        assert by_name[name].data.tobytes() == array.tobytes()
        assert by_name[name].data.tobytes() == reference.tensors[list(tensors).index(name)].data.tobytes()
        if alignment:
            assert by_name[name].data.ctypes.data % alignment == 0


def test_tensor_data_is_a_private_view(tmp_path):
    """Writes to a tensor's view stay in the process: the file keeps its bytes."""
    path = tmp_path / "types.gguf"
    _write_every_type(path)
    before = path.read_bytes()
    tensor = GGUFFile(path).tensors[0]
    tensor.data[:] = 0
    assert path.read_bytes() == before and not tensor.data.any()


def test_damaged_files_raise_format_errors(tmp_path):
    path = tmp_path / "types.gguf"
    _write_every_type(path)
    whole = path.read_bytes()
    cases = {
        "empty": b"",
        "not GGUF": b"GGML" + whole[4:],
        "cut in the metadata": whole[:200],
        "cut in the tensor data": whole[:-64],  # more than the last tensor's padding
    }
    for name, content in cases.items():
        damaged = tmp_path / f"{name}.gguf"
        damaged.write_bytes(content)
        with pytest.raises(GGUFFormatError):
            GGUFFile(damaged)


def test_big_endian_file_is_refused_by_name(tmp_path):
    path = tmp_path / "big.gguf"
    _write_every_type(path, endianess=gguf.GGUFEndian.BIG)
    with pytest.raises(GGUFFormatError, match="big-endian"):
        GGUFFile(path)
