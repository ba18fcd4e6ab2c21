"""Make what a GPU check carries to a device machine that cannot reach a model hub and takes
at most 64 MiB of files: the default GGUF cut to its first few decoder layers (the real
tokenizer, the real packed Q4_1 weights of those layers), and the tokenizer files for the
random full-size checkpoint that ``gpu_engine.py`` builds there.

    python benchmarks/gpu_prepare.py --out .gpu --layers 4
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LAYER_TENSOR = re.compile(r"^blk\.(\d+)\.")


def truncate_gguf(source: str, target: str, num_layers: int) -> None:
    """Copy a GGUF keeping its metadata and tokenizer but only blocks 0..num_layers-1."""
    import gguf
    reader = gguf.GGUFReader(source)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(target, arch)
    block_count_key = gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # the writer writes these itself
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        value = num_layers if field.name == block_count_key else field.contents()
        writer.add_key_value(field.name, value, value_type, sub_type=sub_type)
    kept = [t for t in reader.tensors
            if not (m := LAYER_TENSOR.match(t.name)) or int(m.group(1)) < num_layers]
    for tensor in kept:
        writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype,
                               tensor.data.nbytes, tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in kept:
        writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
    writer.close()


def save_tokenizer(source: str, folder: str) -> None:
    """The GGUF's tokenizer as HF files (tokenizer.json, its config, the chat template)."""
    import transformers
    gguf_folder, gguf_name = os.path.split(source)
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_folder, gguf_file=gguf_name)
    tokenizer.save_pretrained(folder)


def main() -> None:
    from llama_engine.loader import default_model_path
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=".gpu")
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    source = default_model_path()
    target = os.path.join(args.out, f"smollm2-{args.layers}layers.Q4_1.gguf")
    truncate_gguf(source, target, args.layers)
    save_tokenizer(source, os.path.join(args.out, "tokenizer"))
    print(target, os.path.getsize(target) // 1024, "KiB")


if __name__ == "__main__":
    main()
