"""CPU timings of the non-matmul hot ops: C++ kernels (kernels/cpu/ops.py) against the torch
reference (kernels/reference.py) in the same run, at SmolLM2-135M shapes.

Cases: a decode step (batch 32, 256 tokens of context each) and a prefill of 512 tokens.
Prints a table and writes it to benchmarks/results/ops-cpu-<date>.md.

    .venv/bin/python benchmarks/ops_cpu.py [--repeats N]
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from llama_engine.kernels import reference
from llama_engine.kernels.cpu import ops

# SmolLM2-135M
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB = 576, 9, 3, 64, 1536, 49152
BLOCK_SIZE = 16
DECODE_BATCH, DECODE_CONTEXT = 32, 256
PREFILL_TOKENS = 512
RESULTS_DIR = Path(__file__).parent / "results"


@dataclass
class Case:
    op: str
    shape: str
    ours: Callable[[], object]
    torch_ref: Callable[[], object]


def time_ms(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(best, median) wall time of fn in ms. On a shared machine the best run is the one
    least disturbed by other processes; the median shows what a caller typically sees."""
    fn()  # warm-up: first-touch of buffers, thread team start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return min(times), statistics.median(times)


def elementwise_cases(tokens: int, label: str) -> list[Case]:
    x, residual, weight = (torch.randn(tokens, HIDDEN), torch.randn(tokens, HIDDEN),
                           torch.randn(HIDDEN))
    q, k = torch.randn(tokens, HEADS, HEAD_DIM), torch.randn(tokens, KV_HEADS, HEAD_DIM)
    positions = torch.randint(0, 2048, (tokens,))
    inv_freq = 10000.0 ** (-torch.arange(0, HEAD_DIM, 2).double() / HEAD_DIM)
    angles = torch.arange(2048).double()[:, None] * inv_freq
    cos_sin = torch.cat([angles.cos(), angles.sin()], -1).float()
    gate_up = torch.randn(tokens, 2 * FFN)
    return [
        Case("rms_norm+residual", f"{label} [{tokens}, {HIDDEN}]",
             lambda: ops.rms_norm(x, weight, 1e-5, residual),
             lambda: reference.rms_norm(x, weight, 1e-5, residual)),
        Case("rope (in place)", f"{label} q[{tokens},{HEADS},{HEAD_DIM}]",
             lambda: ops.rope(q, k, positions, cos_sin),
             lambda: reference.rope(q, k, positions, cos_sin)),
        Case("silu_and_mul", f"{label} [{tokens}, {2 * FFN}]",
             lambda: ops.silu_and_mul(gate_up), lambda: reference.silu_and_mul(gate_up)),
    ]


def kv_cases(q_lens: list[int], context_lens: list[int], label: str) -> list[Case]:
    """store_kv and paged_attention for sequences with shuffled block tables."""
    blocks_per_seq = [math.ceil(c / BLOCK_SIZE) for c in context_lens]
    num_blocks = sum(blocks_per_seq)
    order = torch.randperm(num_blocks).to(torch.int32)
    tables = torch.zeros(len(q_lens), max(blocks_per_seq), dtype=torch.int32)
    start = 0
    for i, n in enumerate(blocks_per_seq):
        tables[i, :n] = order[start:start + n]
        start += n
    cache_shape = (num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    k_cache, v_cache = torch.randn(cache_shape), torch.randn(cache_shape)
    tokens = sum(q_lens)
    q = torch.randn(tokens, HEADS, HEAD_DIM)
    k_new, v_new = torch.randn(tokens, KV_HEADS, HEAD_DIM), torch.randn(tokens, KV_HEADS, HEAD_DIM)
    slots = torch.randperm(num_blocks * BLOCK_SIZE)[:tokens]
    ctx = torch.tensor(context_lens, dtype=torch.int32)
    cu = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    scale = HEAD_DIM ** -0.5
    return [
        Case("store_kv", f"{label} {tokens} tokens",
             lambda: ops.store_kv(k_new, v_new, k_cache, v_cache, slots),
             lambda: reference.store_kv(k_new, v_new, k_cache, v_cache, slots)),
        Case("paged_attention", f"{label} {len(q_lens)} seqs, ctx {max(context_lens)}",
             lambda: ops.paged_attention(q, k_cache, v_cache, tables, ctx, cu, scale),
             lambda: reference.paged_attention(q, k_cache, v_cache, tables, ctx, cu, scale)),
    ]


def sampling_cases(batch: int) -> list[Case]:
    logits = torch.randn(batch, VOCAB) * 4.0
    uniform = torch.rand(batch)
    settings = {
        "greedy": (0.0, 0, 1.0, 0.0),
        "T=0.8 top-k 50": (0.8, 50, 1.0, 0.0),
        "T=0.8 top-p 0.9": (0.8, 0, 0.9, 0.0),
        "T=1 min-p 0.05": (1.0, 0, 1.0, 0.05),
    }
    cases = []
    for name, (temp, top_k, top_p, min_p) in settings.items():
        args = (logits, torch.full((batch,), temp), torch.full((batch,), top_k),
                torch.full((batch,), top_p), torch.full((batch,), min_p), uniform)
        cases.append(Case(f"sample {name}", f"[{batch}, {VOCAB}]",
                          lambda a=args: ops.sample(*a), lambda a=args: reference.sample(*a)))
    return cases


def machine_line() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} logical cores, torch {torch.__version__}"


def results_table(cases: list[Case], repeats: int) -> list[str]:
    lines = ["| op | case | C++ best ms | C++ median ms | torch best ms | speedup (best) |",
             "|---|---|---:|---:|---:|---:|"]
    for case in cases:
        ours_best, ours_median = time_ms(case.ours, repeats)
        ref_best, _ = time_ms(case.torch_ref, max(3, repeats // 4))
        lines.append(f"| {case.op} | {case.shape} | {ours_best:.3f} | {ours_median:.3f} | "
                     f"{ref_best:.3f} | {ref_best / ours_best:.1f}x |")
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()],
                        help="thread counts to run (torch and the C++ kernels share one "
                             "OpenMP runtime, so torch.set_num_threads sets both)")
    args = parser.parse_args()
    torch.manual_seed(0)
    decode_lens = [1] * DECODE_BATCH
    cases = (elementwise_cases(DECODE_BATCH, "decode")
             + elementwise_cases(PREFILL_TOKENS, "prefill")
             + kv_cases(decode_lens, [DECODE_CONTEXT] * DECODE_BATCH, "decode")
             + kv_cases([PREFILL_TOKENS], [PREFILL_TOKENS], "prefill")
             + sampling_cases(DECODE_BATCH))
    now = datetime.datetime.now(datetime.timezone.utc)
    lines = [f"# CPU ops: C++ kernels vs torch reference ({now:%Y-%m-%d %H:%M} UTC)", "",
             f"Machine: {machine_line()}", "",
             "SmolLM2-135M shapes (hidden 576, 9 heads / 3 KV heads, head dim 64, FFN 1536, "
             f"vocab 49152), KV block size {BLOCK_SIZE}; wall time per call (one layer for the "
             f"per-layer ops), {args.repeats} runs after a warm-up."]
    for threads in args.threads:
        torch.set_num_threads(threads)
        print(f"{threads} thread(s)", flush=True)
        lines += ["", f"## {threads} thread(s)", ""] + results_table(cases, args.repeats)
    lines += ["", f"1-minute load average at the end of the run: {os.getloadavg()[0]:.1f} "
              f"on {os.cpu_count()} cores shared with other jobs: compare best times."]
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"ops-cpu-{now:%Y-%m-%d}.md"
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
