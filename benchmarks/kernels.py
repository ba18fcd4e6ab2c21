"""Quantized matmul benchmark on the SmolLM2-135M shapes, per backend.

    python benchmarks/kernels.py                      # CPU backend, M = 1 8 32 128
    python benchmarks/kernels.py --m 1 --isa AVX2     # one instruction set only
    python benchmarks/kernels.py --threads 1          # one core: stable on a shared machine

Each row times quant_matmul(x[M, K], W[N, K] packed) and, in the same run, torch's fp32
matmul on the dequantized weight, reporting GFLOP/s (2*M*N*K per call), GB/s of weight
traffic (packed bytes for quant_matmul, fp32 bytes for torch) and torch time / ours.
The summary adds the matmul time of one whole forward step (30 layers + output head).
Results go to benchmarks/results/kernels-<backend>-<date>.{md,json}.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable


def _apply_thread_count() -> None:
    """--threads must reach OMP_NUM_THREADS before torch and llama_engine._C load OpenMP,
    and the engine's OpenMP spin policy likewise (as the llama-engine command sets it)."""
    from llama_engine.openmp import configure_openmp
    configure_openmp()
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--threads", type=int)
    threads = early.parse_known_args()[0].threads
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
_apply_thread_count()

import torch  # noqa: E402

from llama_engine.quant import PackedWeight, dequantize, quantize  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
LAYERS = 30
# (name, N, K, qtype, uses per layer); the output head runs once per step.
SHAPES = [
    ("q_proj/o_proj", 576, 576, "Q4_1", 2),
    ("k_proj/v_proj", 192, 576, "Q4_1", 2),
    ("gate/up_proj", 1536, 576, "Q4_1", 2),
    ("down_proj", 576, 1536, "Q4_1", 1),
    ("lm_head", 49152, 576, "Q8_0", 0),
]
DEFAULT_M = [1, 8, 32, 128]
WEIGHT_SCALE = 0.05  # typical magnitude of trained weights; only affects the quant scales


@dataclass
class Row:
    backend: str
    shape: str
    n: int
    k: int
    qtype: str
    m: int
    ours_ms: float
    torch_ms: float
    ours_gflops: float
    torch_gflops: float
    ours_weight_gbs: float
    torch_weight_gbs: float
    speedup_vs_torch: float


def median_ms(fn: Callable[[], object], min_repeats: int, min_seconds: float) -> float:
    """Median wall time of fn() in ms, after one warm-up call."""
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_repeats or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def make_row(backend: str, shape: str, weight: PackedWeight, m: int, ours_ms: float,
             torch_ms: float) -> Row:
    flops = 2.0 * m * weight.rows * weight.cols
    fp32_bytes = 4.0 * weight.rows * weight.cols
    return Row(backend, shape, weight.rows, weight.cols, weight.qtype, m, ours_ms, torch_ms,
               flops / ours_ms / 1e6, flops / torch_ms / 1e6,
               weight.nbytes() / ours_ms / 1e6, fp32_bytes / torch_ms / 1e6,
               torch_ms / ours_ms)


def cpu_backend(args: argparse.Namespace) -> list[Row]:
    from llama_engine.kernels.cpu import quant as cpu_quant
    isa = cpu_quant.Isa[args.isa]
    rows = []
    for precision in args.precision:
        int8 = precision == "int8"
        label = f"cpu-{cpu_quant.best_isa(int8) if isa == cpu_quant.Isa.AUTO else isa.name.lower()}-{precision}"
        for name, n, k, gguf_qtype, _ in SHAPES:
            qtype = "NF4" if precision == "nf4" else gguf_qtype
            weight = quantize(torch.randn(n, k) * WEIGHT_SCALE, qtype)
            dense = dequantize(weight)
            view = cpu_quant.packed_view(weight)  # checked once, as a model layer's are
            for m in args.m:
                x = torch.randn(m, k)
                ours = median_ms(lambda: cpu_quant.quant_matmul(x, view, isa, int8),
                                 args.repeats, args.min_seconds)
                ref = median_ms(lambda: torch.nn.functional.linear(x, dense), args.repeats,
                                args.min_seconds)
                rows.append(make_row(label, name, weight, m, ours, ref))
                print(format_row(rows[-1]), flush=True)
    return rows


# Other backends (e.g. "triton") register a function returning rows here.
BACKENDS: dict[str, Callable[[argparse.Namespace], list[Row]]] = {"cpu": cpu_backend}


def format_row(r: Row) -> str:
    return (f"| {r.backend} | {r.shape} | {r.n}x{r.k} | {r.qtype} | {r.m} | {r.ours_ms:.3f} | "
            f"{r.ours_gflops:.1f} | {r.ours_weight_gbs:.1f} | {r.torch_ms:.3f} | "
            f"{r.torch_gflops:.1f} | {r.speedup_vs_torch:.2f}x |")


TABLE_HEADER = ("| kernel | shape | NxK | type | M | ours ms | ours GFLOP/s | ours weight GB/s | "
                "torch fp32 ms | torch GFLOP/s | torch/ours |\n"
                "|---|---|---|---|---|---|---|---|---|---|---|")


def forward_step_ms(rows: list[Row]) -> dict[str, dict[str, float]]:
    """Matmul time of one forward step (all 30 layers + head) per kernel and M."""
    uses = {name: per_layer for name, _, _, _, per_layer in SHAPES}
    steps: dict[str, dict[str, float]] = {}
    for r in rows:
        count = uses[r.shape] * LAYERS if uses[r.shape] else 1
        step = steps.setdefault(f"{r.backend} M={r.m}", {"m": r.m, "ours_ms": 0.0, "torch_ms": 0.0})
        step["ours_ms"] += count * r.ours_ms
        step["torch_ms"] += count * r.torch_ms
    return steps


def machine_info() -> dict[str, object]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info: dict[str, object] = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
                               "torch_threads": torch.get_num_threads(),
                               "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
                               "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
                               "gomp_spincount": os.environ.get("GOMP_SPINCOUNT", "unset")}
    try:
        from llama_engine.kernels.cpu import quant as cpu_quant
        info["quant_isa"] = cpu_quant.best_isa()
    except ImportError:
        pass
    return info


def write_results(backend: str, rows: list[Row], notes: str, threads: int | None) -> Path:
    now = dt.datetime.now(dt.timezone.utc)
    suffix = f"-{threads}thread" if threads else ""
    stem = RESULTS_DIR / f"kernels-{backend}-{now:%Y-%m-%d}{suffix}"
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    steps = forward_step_ms(rows)
    payload = {"date": now.isoformat(timespec="seconds"), "machine": info, "notes": notes,
               "rows": [asdict(r) for r in rows], "forward_step_ms": steps}
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = [f"# Quantized matmul benchmark ({backend}), {now:%Y-%m-%d %H:%M} UTC", "",
             "Machine: " + ", ".join(f"{k}={v}" for k, v in info.items()), ""]
    if notes:
        lines += [notes, ""]
    lines += [TABLE_HEADER] + [format_row(r) for r in rows] + ["", "Matmul time of one forward "
              "step (30 layers + lm_head):", "", "| kernel, M | ours ms | torch fp32 ms | ours ms/row |",
              "|---|---|---|---|"]
    lines += [f"| {key} | {s['ours_ms']:.2f} | {s['torch_ms']:.2f} | {s['ours_ms'] / s['m']:.3f} |"
              for key, s in steps.items()]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return stem.with_suffix(".md")


def add_run_arguments(parser: argparse.ArgumentParser, repeats: int, min_seconds: float) -> None:
    """The options every kernel benchmark shares: timing, threads, notes, saving."""
    parser.add_argument("--repeats", type=int, default=repeats,
                        help="minimum timed calls per case")
    parser.add_argument("--min-seconds", type=float, default=min_seconds,
                        help="minimum time per case")
    parser.add_argument("--threads", type=int, help="OpenMP/torch threads (default: all cores)")
    parser.add_argument("--notes", default="", help="free text saved with the results")
    parser.add_argument("--no-save", action="store_true")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=sorted(BACKENDS), default="cpu")
    parser.add_argument("--m", type=int, nargs="+", default=DEFAULT_M, help="activation rows")
    parser.add_argument("--isa", default="AUTO", help="CPU: AUTO, SCALAR, AVX2 or AVX512")
    parser.add_argument("--precision", nargs="+", choices=["f32", "int8", "nf4"],
                        default=["f32", "int8", "nf4"],
                        help="CPU: float32 activations, int8-quantized activations, and/or "
                             "NF4 weights (float32 activations) instead of the GGUF formats")
    add_run_arguments(parser, repeats=5, min_seconds=0.2)
    args = parser.parse_args()
    print(TABLE_HEADER)
    rows = BACKENDS[args.backend](args)
    for key, s in forward_step_ms(rows).items():
        print(f"forward step {key}: ours {s['ours_ms']:.2f} ms, torch fp32 {s['torch_ms']:.2f} ms")
    if not args.no_save:
        print("saved", write_results(args.backend, rows, args.notes, args.threads))


if __name__ == "__main__":
    main()
