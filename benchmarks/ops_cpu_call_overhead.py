"""Per-call time of the CPU kernel wrappers (kernels/cpu) at single-stream decode shapes.

SmolLM2-135M decode calls these ~300 times per token on one-row inputs, where the Python
wrapper (argument checks, tensor -> extension hand-over, output allocation) can cost more
than the kernel. Shapes: x [1, 576]; q [1, 9, 64] and k/v [1, 3, 64] as strided slices of
a [1, 960] fused QKV output; caches [64 blocks, 16, 3, 64]; one sequence of context 100;
quant_matmul of [1, 576] by a Q4_1 [576, 576] weight; sample of one row of SmolLM2's 49152
logits, greedy and with temperature / top-p. The fused decoder-layer ops (csrc/decoder_layer.cpp)
run at the same shapes with random Q4_1 weights of one SmolLM2 layer: qkv_projection,
o_proj_and_mlp, and decoder_layer (both, with the paged store and attention between them),
which together replace the nine single-op calls of a layer. add_lora: one token's rank-16
update of the fused QKV projection from a stack of 4 bfloat16 adapter slots (the unfused
path's one extension call per projection).

    .venv/bin/python benchmarks/ops_cpu_call_overhead.py [--calls N] [--rounds R] [--save]

--save writes the table to benchmarks/results/ops-cpu-call-overhead-<date>.md.
"""
from __future__ import annotations

import argparse
import datetime
import os
import time
from pathlib import Path
from typing import Callable

import torch

from llama_engine import kernels
from llama_engine.kernels import cpu
from llama_engine.kernels.cpu import ops
from llama_engine.kernels.cpu import quant as cpu_quant
from llama_engine.quant import quantize

RESULTS_DIR = Path(__file__).parent / "results"

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN = 576, 9, 3, 64, 1536
NUM_BLOCKS, BLOCK_SIZE, CONTEXT = 64, 16, 100
VOCAB = 49152
LORA_RANK = 16


def per_call_us(fn: Callable[[], object], calls: int, rounds: int) -> float:
    """Best over `rounds` of the mean time of `calls` back-to-back calls, in microseconds
    (the best round is the one least disturbed by other processes on a shared machine)."""
    for _ in range(calls // 10 + 1):
        fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def sampling_params(temperature: float, top_p: float) -> tuple[torch.Tensor, ...]:
    """One row's (temperature, top_k, top_p, min_p, uniform) as ``ops.sample`` takes them."""
    def row(value: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        return torch.full((1,), value, dtype=dtype)
    return row(temperature), row(0, torch.int64), row(top_p), row(0.0), row(0.5)


def decode_cases() -> dict[str, Callable[[], object]]:
    torch.manual_seed(0)
    x, residual, weight = torch.randn(1, HIDDEN), torch.randn(1, HIDDEN), torch.randn(HIDDEN)
    qkv = torch.randn(1, (HEADS + 2 * KV_HEADS) * HEAD_DIM)
    q_size, kv_size = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    q = qkv[:, :q_size].view(1, HEADS, HEAD_DIM)
    k = qkv[:, q_size:q_size + kv_size].view(1, KV_HEADS, HEAD_DIM)
    v = qkv[:, q_size + kv_size:].view(1, KV_HEADS, HEAD_DIM)
    positions = torch.tensor([CONTEXT - 1])
    cos_sin = torch.randn(2048, HEAD_DIM)
    gate_up = torch.randn(1, 2 * FFN)
    cache_shape = (NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    k_cache, v_cache = torch.randn(cache_shape), torch.randn(cache_shape)
    slots = torch.tensor([CONTEXT - 1])
    blocks = -(-CONTEXT // BLOCK_SIZE)
    block_tables = torch.arange(blocks, dtype=torch.int32)[None, :]
    context_lens = torch.tensor([CONTEXT], dtype=torch.int32)
    cu_seqlens_q = torch.tensor([0, 1], dtype=torch.int32)
    packed = quantize(torch.randn(HIDDEN, HIDDEN), "Q4_1")
    logits = torch.randn(1, VOCAB)
    greedy, top_p = sampling_params(0.0, 1.0), sampling_params(0.7, 0.9)
    layer = kernels.DecoderLayerWeights(
        torch.rand(HIDDEN) + 0.5, quantize(torch.randn(q_size + 2 * kv_size, HIDDEN), "Q4_1"),
        packed, torch.rand(HIDDEN) + 0.5, quantize(torch.randn(2 * FFN, HIDDEN), "Q4_1"),
        quantize(torch.randn(HIDDEN, FFN), "Q4_1"), 1e-5, HEADS, KV_HEADS)
    attention = kernels.PagedAttention([k_cache], [v_cache], kernels.AttentionMetadata(
        slots, block_tables, context_lens, cu_seqlens_q, 0.125))
    metadata = attention.metadata.native
    fused_layer = kernels.fused_decoder_layer(layer)
    w = layer
    lora_stack = kernels.LoRAStack(
        torch.randn(4, 3 * LORA_RANK, HIDDEN).bfloat16(),
        torch.randn(4, LORA_RANK, q_size + 2 * kv_size).bfloat16(), torch.rand(4, 3),
        (0, q_size, q_size + kv_size, q_size + 2 * kv_size), None)
    lora_mapping = kernels.lora_mapping([1], [2])
    return {
        "rms_norm": lambda: ops.rms_norm(x, weight, 1e-5),
        "rms_norm +residual": lambda: ops.rms_norm(x, weight, 1e-5, residual),
        "rope (strided q/k)": lambda: ops.rope(q, k, positions, cos_sin),
        "silu_and_mul": lambda: ops.silu_and_mul(gate_up),
        "store_kv (strided k/v)": lambda: ops.store_kv(k, v, k_cache, v_cache, slots),
        "paged_attention": lambda: ops.paged_attention(q, k_cache, v_cache, block_tables,
                                                       context_lens, cu_seqlens_q, 0.125),
        "quant_matmul Q4_1 576x576": lambda: cpu_quant.quant_matmul(x, packed),
        "sample greedy (1 x 49152)": lambda: ops.sample(logits, *greedy),
        "sample top-p 0.9 (1 x 49152)": lambda: ops.sample(logits, *top_p),
        "qkv_projection (fused)": lambda: cpu.qkv_projection(
            x, residual, w.attn_norm, w.eps, w.wqkv, positions, cos_sin, HEADS, KV_HEADS),
        "o_proj_and_mlp (fused)": lambda: cpu.o_proj_and_mlp(
            q, residual, w.wo, w.ffn_norm, w.eps, w.w_gate_up, w.w_down),
        "store_kv_and_attend (step metadata)": lambda: ops.store_kv_and_attend(
            q, k, v, k_cache, v_cache, metadata),
        "decoder_layer (one layer)": lambda: fused_layer(
            0, x, residual, positions, cos_sin, attention),
        "add_lora (fused QKV, bf16)": lambda: kernels.add_lora(qkv, x, lora_stack, lora_mapping),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    rows = ["| op | us/call |", "|---|---:|"]
    print(f"{'op':28s} {'us/call':>8s}")
    for name, fn in decode_cases().items():
        cheap = not any(word in name
                        for word in ("attention", "matmul", "fused", "layer", "sample"))
        calls = args.calls if cheap else args.calls // 5
        us = per_call_us(fn, calls, args.rounds)
        print(f"{name:28s} {us:8.2f}", flush=True)
        rows.append(f"| {name} | {us:.2f} |")
    if args.save:
        now = datetime.datetime.now(datetime.timezone.utc)
        path = RESULTS_DIR / f"ops-cpu-call-overhead-{now:%Y-%m-%d}.md"
        path.write_text("\n".join([
            f"# CPU kernel wrappers per call at decode shapes ({now:%Y-%m-%d %H:%M} UTC)", "",
            f"{os.cpu_count()} CPUs, torch {torch.__version__}, OMP_NUM_THREADS="
            f"{os.environ.get('OMP_NUM_THREADS', 'unset')}; best of {args.rounds} rounds "
            "(see the script's docstring for the shapes). The steady state repeats one call, "
            "so caches are warm: these are call costs, not DRAM-bound figures.", ""] + rows)
            + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
