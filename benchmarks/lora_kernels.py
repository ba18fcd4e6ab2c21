"""Batched LoRA kernels at SmolLM2-135M shapes: ours (kernels.add_lora, the C++ shrink and
expand on the manager's stacked layout) against, in the same run, the einsum reference and
a per-adapter loop (what peft's mixed-batch ``adapter_names`` forward does: for each
adapter, gather its rows, B(A(x)) * scale, scatter back; per unfused projection).

    python benchmarks/lora_kernels.py                 # decode: 32 tokens over 16 adapters, rank 16
    python benchmarks/lora_kernels.py --threads 1     # one core

Cases: decode (one token per sequence, adapters interleaved), decode with one adapter, and
a prefill-like step (4 adapters x 64-token segments). The adapters adapt the output head
too (PEFT's lm_head: B is 49152 x r), run once a step over the sampled rows (one per
sequence). For scale, each row also times the base matmul on the same x: the decoder
projections packed Q4_1, the head Q8_0 (as in the default GGUF). Results go to
benchmarks/results/lora-kernels-cpu-<date>.{md,json}.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# First: applies --threads before torch loads OpenMP.
from benchmarks.kernels import (RESULTS_DIR, add_run_arguments, machine_info,  # noqa: E402
                               median_ms)

import torch  # noqa: E402

from llama_engine import LoRARequest, kernels  # noqa: E402
from llama_engine.config import ModelConfig  # noqa: E402
from llama_engine.engine.lora_manager import FUSED_PROJECTIONS, LoRAManager  # noqa: E402
from llama_engine.kernels import reference  # noqa: E402
from llama_engine.loader.adapters import (HEAD_KEY, LoRAAdapter, LoRAWeights,  # noqa: E402
                                          adapted_shape, projection_shapes)
from llama_engine.quant import quantize  # noqa: E402

# SmolLM2-135M's decoder layer (one is enough: every layer has the same shapes).
SMOLLM2 = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=1,
                      num_heads=9, num_kv_heads=3, head_dim=64, max_position_embeddings=2048)
WEIGHT_SCALE = 0.05
# the base matmul timed beside each adapted weight: the default GGUF's formats
BASE_QTYPE, HEAD_QTYPE = "Q4_1", "Q8_0"


@dataclass
class Row:
    case: str
    weights: str
    projection: str
    n: int
    k: int
    tokens: int
    adapters: int
    rank: int
    ours_ms: float
    einsum_ms: float
    loop_ms: float
    base_matmul_ms: float

    @property
    def cells(self) -> list[str]:
        return [self.case, self.weights, self.projection, f"{self.n}x{self.k}", str(self.tokens),
                str(self.adapters), str(self.rank), f"{self.ours_ms:.3f}", f"{self.einsum_ms:.3f}",
                f"{self.loop_ms:.3f}", f"{self.einsum_ms / self.ours_ms:.1f}x",
                f"{self.loop_ms / self.ours_ms:.1f}x", f"{self.base_matmul_ms:.3f}",
                f"{100 * self.ours_ms / self.base_matmul_ms:.0f}%"]


HEADER = ["case", "adapter weights", "projection", "NxK", "tokens", "adapters", "rank", "ours ms",
          "einsum ms",
          "per-adapter loop ms", "einsum/ours", "loop/ours",
          f"base matmul ms ({BASE_QTYPE}; lm_head {HEAD_QTYPE})",
          "ours/base"]


def _adapter(seed: int, rank: int) -> LoRAAdapter:
    """Layer 0's seven projections and the output head."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {(0, proj): shape for proj, shape in projection_shapes(SMOLLM2).items()}
    shapes[HEAD_KEY] = adapted_shape(SMOLLM2, HEAD_KEY)
    weights = {key: LoRAWeights(WEIGHT_SCALE * torch.randn(rank, k, generator=gen),
                                WEIGHT_SCALE * torch.randn(out, rank, generator=gen), 2.0)
               for key, (out, k) in shapes.items()}
    return LoRAAdapter(f"bench{seed}", "", weights)


def _per_adapter_loop(manager: LoRAManager, keys: list[tuple[int, str]], x: torch.Tensor,
                      outputs: list[torch.Tensor], token_ids: list[int]) -> list[torch.Tensor]:
    """peft's mixed-batch forward, module by module: outputs are the unfused modules' (keys
    of the adapters' weights) own base outputs (as peft's separate q/k/v modules have),
    updated in place."""
    ids = torch.tensor(token_ids)
    for lora_int_id in sorted(set(token_ids)):
        rows = torch.nonzero(ids == lora_int_id).squeeze(1)
        sub_batch = x[rows]
        for key, out in zip(keys, outputs):
            w = manager.adapters[lora_int_id].weights[key]
            out[rows] += (sub_batch @ w.a.t()) @ w.b.t() * w.scale
    return outputs


def run_case(name: str, manager: LoRAManager, seg_lens: list[int], lora_ids: list[int],
             args: argparse.Namespace) -> list[Row]:
    """Layer 0's four fused projections over the step's tokens, then the output head over
    its sampled rows (one per sequence)."""
    step = manager.prepare_step(seg_lens, lora_ids)
    token_ids = [i for n, i in zip(seg_lens, lora_ids) for _ in range(n)]
    gen = torch.Generator().manual_seed(0)
    rows = [_measure(name, manager, fused, step.stack(0, fused), step.mapping,
                     [(0, proj) for proj in parts], token_ids, BASE_QTYPE, gen, args)
            for fused, parts in FUSED_PROJECTIONS.items()]
    head = step.head([1] * len(seg_lens))
    rows.append(_measure(name, manager, "lm_head", head.stack, head.mapping, [HEAD_KEY],
                         lora_ids, HEAD_QTYPE, gen, args))
    return rows


def _measure(name: str, manager: LoRAManager, label: str, stack: kernels.LoRAStack,
             m: kernels.LoRAMapping, keys: list[tuple[int, str]], token_ids: list[int],
             qtype: str, gen: torch.Generator, args: argparse.Namespace) -> Row:
    """One stacked weight (keys: the adapters' weights it holds, in slice order) over rows
    of adapters token_ids: ours, checked against the einsum reference and the loop, then
    all three and the base matmul timed."""
    n, k = stack.b_stack.shape[2], stack.a_stack.shape[2]
    x = torch.randn(len(token_ids), k, generator=gen)
    base = quantize(WEIGHT_SCALE * torch.randn(n, k, generator=gen), qtype)
    y0 = kernels.linear(x, base)

    def einsum() -> torch.Tensor:
        h = reference.lora_shrink(x, stack.a_stack, m.seg_indptr, m.seg_slots)
        return reference.lora_expand(y0.clone(), h, stack.b_stack, stack.slice_offsets,
                                     stack.scales, m.seg_indptr, m.seg_slots)

    ours = kernels.add_lora(y0.clone(), x, stack, m)
    offsets = stack.slice_offsets

    def unfused_outputs() -> list[torch.Tensor]:
        return [y0[:, lo:hi].clone() for lo, hi in zip(offsets, offsets[1:])]

    loop = torch.cat(_per_adapter_loop(manager, keys, x, unfused_outputs(), token_ids), 1)
    torch.testing.assert_close(ours, einsum(), atol=1e-4, rtol=1e-4)
    # the loop reads the float32 adapters: bfloat16 stacks differ by their rounding
    loop_tolerance = 1e-4 if manager.dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ours, loop, atol=loop_tolerance, rtol=loop_tolerance)
    timing = (args.repeats, args.min_seconds)
    # outputs accumulate over the timed calls: their values do not matter
    y, outputs = y0.clone(), unfused_outputs()
    row = Row(name, str(manager.dtype).removeprefix("torch."), label, n, k, len(token_ids),
              len(set(token_ids)), manager.rank,
              median_ms(lambda: kernels.add_lora(y, x, stack, m), *timing),
              median_ms(einsum, *timing),
              median_ms(lambda: _per_adapter_loop(manager, keys, x, outputs, token_ids), *timing),
              median_ms(lambda: kernels.linear(x, base), *timing))
    print(" | ".join(row.cells), flush=True)
    return row


def write_results(rows: list[Row], args: argparse.Namespace) -> Path:
    now = dt.datetime.now(dt.timezone.utc)
    suffix = f"-{args.threads}thread" if args.threads else ""
    stem = RESULTS_DIR / f"lora-kernels-cpu-{now:%Y-%m-%d}{suffix}"
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    command = "python " + " ".join(sys.argv)
    per_layer = {}
    for r in rows:
        if r.projection == "lm_head":  # once a step, not per decoder layer
            continue
        totals = per_layer.setdefault(f"{r.case}, {r.weights}", {
            "ours_ms": 0.0, "einsum_ms": 0.0, "loop_ms": 0.0,
                                               "base_matmul_ms": 0.0})
        for key in totals:
            totals[key] += getattr(r, key)
    payload = {"date": now.isoformat(timespec="seconds"), "command": command, "machine": info,
               "notes": args.notes, "rows": [asdict(r) for r in rows],
               "per_decoder_layer": per_layer}
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = [f"# Batched LoRA kernels (cpu), {now:%Y-%m-%d %H:%M} UTC", "",
             f"Command: `{command}`", "",
             "Machine: " + ", ".join(f"{k}={v}" for k, v in info.items()), ""]
    if args.notes:
        lines += [args.notes, ""]
    lines += ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r.cells) + " |" for r in rows]
    lines += ["", "Per decoder layer (the four fused projections):", "",
              "| case | ours ms | einsum ms | per-adapter loop ms | base Q4_1 matmuls ms "
              "| ours/base |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {case} | {t['ours_ms']:.3f} | {t['einsum_ms']:.3f} | {t['loop_ms']:.3f} | "
              f"{t['base_matmul_ms']:.3f} | {100 * t['ours_ms'] / t['base_matmul_ms']:.0f}% |"
              for case, t in per_layer.items()]
    lines += ["", f"The output head's rows (lm_head) run once a step; its base matmul is "
              f"{HEAD_QTYPE}."]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return stem.with_suffix(".md")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=32, help="decode batch (one per sequence)")
    parser.add_argument("--adapters", type=int, default=16, help="distinct adapters at decode")
    parser.add_argument("--rank", type=int, default=16)
    add_run_arguments(parser, repeats=20, min_seconds=0.3)
    args = parser.parse_args()
    print(" | ".join(HEADER))
    decode_ids = [t % args.adapters + 1 for t in range(args.tokens)]
    prefill_adapters = min(4, args.adapters)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        manager = LoRAManager(SMOLLM2, max_loras=args.adapters, max_lora_rank=args.rank,
                              dtype=dtype)
        for i in range(1, args.adapters + 1):
            manager.add_adapter(LoRARequest(f"bench{i}", i), _adapter(i, args.rank))
        rows += run_case(f"decode, {args.adapters} adapters", manager, [1] * args.tokens,
                         decode_ids, args)
        rows += run_case("decode, 1 adapter", manager, [1] * args.tokens, [1] * args.tokens,
                         args)
        rows += run_case(f"prefill, {prefill_adapters} x 64 tokens", manager,
                         [64] * prefill_adapters, list(range(1, prefill_adapters + 1)), args)
    if not args.no_save:
        print("saved", write_results(rows, args))


if __name__ == "__main__":
    main()
