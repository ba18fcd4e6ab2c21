"""Compile every Triton kernel for a CUDA architecture on a machine without a GPU.

    python -m llama_engine.kernels.triton._compile_check [--arch 90] [--dtypes bf16]
                                                         [--all-configs]

The CPU tests run the kernels in Triton's numpy interpreter, which accepts code that the
GPU compiler rejects (a tl.dot smaller than 16x16, a loop-carried value changing type, a
dtype a hardware op lacks). This script drives the public wrappers with small CPU tensors
while every kernel launch is replaced by a compilation for the target (PTX and cubin via
the ptxas bundled with triton); an autotuned kernel compiles its first config, or every
config with --all-configs. It must run without TRITON_INTERPRET, in its own process:
kernels are jitted at import.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                 torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8", torch.int8: "i8"}
INT32_LIMIT = 2**31
DEFAULT_ARCH = 90
CUDA_WARP_SIZE = 32


def _arg_type(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _TRITON_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -INT32_LIMIT <= value < INT32_LIMIT else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for kernel argument {value!r}")


def _install_compiling_launchers(arch: int, all_configs: bool, compiled: list[str]) -> None:
    """Make kernel[grid](...) compile for `arch` instead of launching."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    target = GPUTarget("cuda", arch, CUDA_WARP_SIZE)
    option_names = ("num_warps", "num_stages")

    def compile_instead(self: JITFunction, *args: object, grid: object, warmup: bool,
                        **kwargs: object) -> None:
        values = dict(zip([p.name for p in self.params], args)) | kwargs
        signature, constexprs = {}, {}
        for param in self.params:
            if param.is_constexpr:
                signature[param.name] = "constexpr"
                constexprs[param.name] = values[param.name]
            else:
                signature[param.name] = _arg_type(values[param.name])
        options = {name: kwargs[name] for name in option_names if name in kwargs}
        triton.compile(ASTSource(self, signature, constexprs), target=target, options=options)
        compiled.append(f"{self.__name__} {constexprs} {options}")

    def compile_every_config(self: Autotuner, *args: object, **kwargs: object) -> None:
        for config in self.configs if all_configs else self.configs[:1]:
            self.fn.run(*args, **kwargs, **config.all_kwargs())

    JITFunction.run = compile_instead
    Autotuner.run = compile_every_config


def _exercise_wrappers(dtype: torch.dtype) -> None:
    """Call each public wrapper on shapes that reach every code path of its kernels."""
    import importlib

    from llama_engine.kernels import triton as tk
    from llama_engine.quant import quantize
    attention = importlib.import_module("llama_engine.kernels.triton.attention")
    tokens, heads, kv_heads, head_dim, hidden = 20, 8, 2, 64, 96
    x = torch.randn(tokens, hidden).to(dtype)
    tk.rms_norm(x, x[0], 1e-5, x)
    tk.silu_and_mul(torch.randn(tokens, 2 * hidden).to(dtype))
    q = torch.randn(tokens, heads, head_dim).to(dtype)
    k = torch.randn(tokens, kv_heads, head_dim).to(dtype)
    tk.rope(q, k, torch.arange(tokens), torch.randn(tokens, head_dim))
    k_cache = torch.randn(4, 16, kv_heads, head_dim).to(dtype)
    tk.store_kv(k, k, k_cache, k_cache.clone(), torch.arange(tokens))
    tables = torch.arange(4, dtype=torch.int32)[None, :]
    lens = torch.tensor([tokens], dtype=torch.int32)
    for q_len, splits in [(tokens, 1), (1, 1), (1, 4)]:  # prefill, decode, split decode
        cu_seqlens = torch.tensor([0, q_len], dtype=torch.int32)
        attention.paged_attention_split_kv(q[:q_len], k_cache, k_cache, tables, lens,
                                           cu_seqlens, 0.125, splits)
    for qtype in ("Q8_0", "Q4_0", "Q4_1"):
        weight = quantize(torch.randn(48, 128), qtype)
        tk.quant_matmul(x[:1, :64].repeat(1, 2), weight)  # decode path
        tk.quant_matmul(torch.randn(tokens, 128).to(dtype), weight)  # prefill path
    # batched LoRA: 3 slots, rank 16 over 3 output slices, one base and one adapter segment
    segments = (torch.tensor([0, 1, tokens], dtype=torch.int32),
                torch.tensor([2, -1], dtype=torch.int32))
    h = tk.lora_shrink(x, torch.randn(3, 48, hidden).to(dtype), *segments, tokens - 1)
    tk.lora_expand(torch.randn(tokens, 80).to(dtype), h, torch.randn(3, 16, 80).to(dtype),
                   (0, 40, 60, 80), torch.rand(3, 3), *segments, tokens - 1,
                   torch.rand(3, 80).to(dtype))


def _exercise_sampling() -> None:
    """Sampling reads float32 logits whatever the model dtype: one variant."""
    from llama_engine.kernels import triton as tk
    uniform = torch.rand(2)
    tk.sample(torch.randn(2, 100), uniform, torch.zeros(2, dtype=torch.int32), uniform,
              uniform, uniform)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=DEFAULT_ARCH,
                        help="CUDA compute capability, e.g. 90 for H100")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=sorted(DTYPES))
    parser.add_argument("--all-configs", action="store_true",
                        help="compile every autotune config, not just the first")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter never compiles anything")
    compiled: list[str] = []
    _install_compiling_launchers(args.arch, args.all_configs, compiled)
    for name in args.dtypes:
        _exercise_wrappers(DTYPES[name])
    _exercise_sampling()
    print(f"compiled {len(compiled)} kernel variants for sm_{args.arch}")


if __name__ == "__main__":
    main()
