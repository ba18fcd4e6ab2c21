"""Triton kernels against their torch counterparts on a CUDA GPU.

    python benchmarks/kernels_triton.py                    # SmolLM2-135M and Llama-3-8B
    python benchmarks/kernels_triton.py --model llama3-8b --kernels quant_matmul attention

Every case first checks our output against the torch counterpart (a "CHECK FAILED" line
marks a kernel whose timing means nothing), then times both with triton.testing.do_bench
(median ms). GB/s counts the bytes each side must move at least (packed weight bytes for
quant_matmul, the dequantized bf16 weight for torch); TFLOP/s counts the useful math
(2*M*N*K for matmuls, 4*D per query-key pair for attention). The last column is torch
time / ours. Results also go to benchmarks/results/kernels-triton-<date>.json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEVICE = "cuda"
DTYPE = torch.bfloat16
BYTES = torch.finfo(DTYPE).bits // 8
KV_BLOCK_SIZE = 16
WEIGHT_SCALE = 0.02  # typical magnitude of trained weights; only sets the quant scales
DECODE_BATCHES = [1, 32]
PREFILL_TOKENS = 2048
MATMUL_ROWS = [1, 16, 512]
DECODE_CONTEXTS = [512, 4096]
SAMPLE_BATCHES = [1, 64]
ROPE_POSITIONS = 8192
# Loose agreement bounds for the pre-timing sanity check (bf16 outputs).
CHECK_ATOL, CHECK_RTOL = 5e-2, 5e-2


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    qtypes: tuple[str, ...]


MODELS = {
    "smollm2-135m": ModelShape("SmolLM2-135M", 576, 1536, 9, 3, 64, 49152, ("Q4_1", "Q8_0")),
    "llama3-8b": ModelShape("Llama-3-8B", 4096, 14336, 32, 8, 128, 128256, ("Q4_0", "Q8_0")),
}


@dataclass
class Case:
    kernel: str
    shape: str
    ours: Callable[[], object]
    theirs: Callable[[], object]
    ours_bytes: float
    theirs_bytes: float
    flops: float


@dataclass
class Row:
    model: str
    kernel: str
    shape: str
    ours_ms: float
    torch_ms: float
    ours_gbs: float
    torch_gbs: float
    ours_tflops: float
    torch_tflops: float
    speedup: float
    check: str


def _randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, device=DEVICE) * scale).to(DTYPE)


# ---------------------------------------------------------------- elementwise kernels

def norm_cases(model: ModelShape) -> list[Case]:
    from llama_engine.kernels import reference
    from llama_engine.kernels import triton as tk
    cases = []
    for tokens in [DECODE_BATCHES[-1], PREFILL_TOKENS]:
        x, residual = _randn(tokens, model.hidden), _randn(tokens, model.hidden)
        weight = _randn(model.hidden)
        io = 4 * tokens * model.hidden * BYTES  # x, residual in; normed, new residual out
        cases.append(Case("rms_norm+residual", f"T={tokens} H={model.hidden}",
                          lambda x=x, r=residual, w=weight: tk.rms_norm(x, w, 1e-5, r),
                          lambda x=x, r=residual, w=weight: reference.rms_norm(x, w, 1e-5, r),
                          io, io, 4 * tokens * model.hidden))
        gate_up = _randn(tokens, 2 * model.intermediate)
        io = 3 * tokens * model.intermediate * BYTES
        cases.append(Case("silu_and_mul", f"T={tokens} F={model.intermediate}",
                          lambda g=gate_up: tk.silu_and_mul(g),
                          lambda g=gate_up: reference.silu_and_mul(g),
                          io, io, 5 * tokens * model.intermediate))
        cases.append(_rope_case(model, tokens))
    return cases


def _rope_case(model: ModelShape, tokens: int) -> Case:
    from llama_engine.kernels import reference
    from llama_engine.kernels import triton as tk
    q = _randn(tokens, model.heads, model.head_dim)
    k = _randn(tokens, model.kv_heads, model.head_dim)
    angles = torch.rand(ROPE_POSITIONS, model.head_dim // 2, device=DEVICE) * 6.28
    cos_sin = torch.cat([angles.cos(), angles.sin()], dim=-1)
    positions = torch.randint(0, ROPE_POSITIONS, (tokens,), device=DEVICE, dtype=torch.int32)
    io = 2 * (model.heads + model.kv_heads) * tokens * model.head_dim * BYTES
    return Case("rope", f"T={tokens} H={model.heads}/{model.kv_heads} D={model.head_dim}",
                lambda: tk.rope(q, k, positions, cos_sin),
                lambda: reference.rope(q, k, positions, cos_sin),
                io, io, 3 * (model.heads + model.kv_heads) * tokens * model.head_dim)


# ------------------------------------------------------------------------- attention

def _paged_kv(model: ModelShape, context_lens: list[int]
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Caches holding each sequence in shuffled blocks, and the block tables."""
    per_seq = [-(-ctx // KV_BLOCK_SIZE) for ctx in context_lens]
    n_blocks = sum(per_seq)
    k_cache = _randn(n_blocks, KV_BLOCK_SIZE, model.kv_heads, model.head_dim)
    v_cache = _randn(n_blocks, KV_BLOCK_SIZE, model.kv_heads, model.head_dim)
    shuffled = torch.randperm(n_blocks, device=DEVICE).to(torch.int32)
    tables = torch.zeros(len(context_lens), max(per_seq), dtype=torch.int32, device=DEVICE)
    start = 0
    for i, count in enumerate(per_seq):
        tables[i, :count] = shuffled[start:start + count]
        start += count
    return k_cache, v_cache, tables


def _contiguous_kv(cache: torch.Tensor, tables: torch.Tensor, context: int) -> torch.Tensor:
    """[B, Hkv, ctx, D] copy of the paged cache, the layout SDPA wants (made untimed)."""
    gathered = cache[tables.long()].flatten(1, 2)[:, :context]
    return gathered.transpose(1, 2).contiguous()


def attention_case(model: ModelShape, batch: int, context: int, q_len: int) -> Case:
    from llama_engine.kernels import triton as tk
    k_cache, v_cache, tables = _paged_kv(model, [context] * batch)
    q = _randn(batch * q_len, model.heads, model.head_dim)
    lens = torch.full((batch,), context, dtype=torch.int32, device=DEVICE)
    cu_seqlens = torch.arange(0, batch + 1, dtype=torch.int32, device=DEVICE) * q_len
    scale = model.head_dim ** -0.5
    k_dense = _contiguous_kv(k_cache, tables, context)
    v_dense = _contiguous_kv(v_cache, tables, context)
    q_dense = q.view(batch, q_len, model.heads, model.head_dim).transpose(1, 2)
    # A prefill chunk here covers the whole context, so causal masking is exactly SDPA's.
    causal = q_len > 1

    def theirs() -> torch.Tensor:
        out = F.scaled_dot_product_attention(q_dense, k_dense, v_dense, is_causal=causal,
                                             scale=scale, enable_gqa=True)
        return out.transpose(1, 2)  # [B, q_len, H, D]: a view, our row order

    kv_bytes = 2 * batch * context * model.kv_heads * model.head_dim * BYTES
    q_bytes = 2 * q.numel() * BYTES
    pairs = batch * q_len * context / (2 if causal else 1)
    kind = "prefill" if causal else "decode"
    return Case(f"paged_attention {kind}", f"B={batch} q={q_len} ctx={context}",
                lambda: tk.paged_attention(q, k_cache, v_cache, tables, lens, cu_seqlens, scale),
                theirs, kv_bytes + q_bytes, kv_bytes + q_bytes,
                4 * pairs * model.heads * model.head_dim)


def attention_cases(model: ModelShape) -> list[Case]:
    cases = [attention_case(model, batch, context, 1)
             for batch in DECODE_BATCHES for context in DECODE_CONTEXTS]
    cases.append(attention_case(model, 1, PREFILL_TOKENS, PREFILL_TOKENS))
    cases.append(_store_kv_case(model))
    return cases


def _store_kv_case(model: ModelShape) -> Case:
    from llama_engine.kernels import reference
    from llama_engine.kernels import triton as tk
    tokens = PREFILL_TOKENS
    k_cache, v_cache, _ = _paged_kv(model, [2 * tokens])
    k = _randn(tokens, model.kv_heads, model.head_dim)
    v = _randn(tokens, model.kv_heads, model.head_dim)
    slots = torch.randperm(2 * tokens, device=DEVICE)[:tokens]
    io = 4 * k.numel() * BYTES
    return Case("store_kv", f"T={tokens} Hkv={model.kv_heads} D={model.head_dim}",
                lambda: tk.store_kv(k, v, k_cache, v_cache, slots),
                lambda: reference.store_kv(k, v, k_cache, v_cache, slots), io, io, 0.0)


# ---------------------------------------------------------------------- quant_matmul

def matmul_cases(model: ModelShape) -> list[Case]:
    from llama_engine.kernels import triton as tk
    from llama_engine.quant import dequantize, quantize
    projections = [("qkv_proj", (model.heads + 2 * model.kv_heads) * model.head_dim, model.hidden),
                   ("o_proj", model.hidden, model.heads * model.head_dim),
                   ("gate_up_proj", 2 * model.intermediate, model.hidden),
                   ("down_proj", model.hidden, model.intermediate),
                   ("lm_head", model.vocab, model.hidden)]
    cases = []
    for qtype in model.qtypes:
        for name, n, k in projections:
            packed = quantize(torch.randn(n, k, device=DEVICE) * WEIGHT_SCALE, qtype)
            dense = dequantize(packed).to(DTYPE)
            for m in MATMUL_ROWS:
                x = _randn(m, k)
                io = (m * k + m * n) * BYTES
                cases.append(Case(f"quant_matmul {qtype}", f"{name} M={m} N={n} K={k}",
                                  lambda x=x, w=packed: tk.quant_matmul(x, w),
                                  lambda x=x, w=dense: x @ w.t(),
                                  packed.nbytes() + io, dense.numel() * BYTES + io,
                                  2.0 * m * n * k))
    return cases


# -------------------------------------------------------------------------- sampling

def torch_sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                 top_p: torch.Tensor, min_p: torch.Tensor, uniform: torch.Tensor
                 ) -> torch.Tensor:
    """Batched torch version of reference.sample (float32): the fair torch baseline."""
    safe_temperature = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    probs = torch.softmax(logits / safe_temperature[:, None], dim=-1)
    ranked, order = probs.sort(dim=-1, descending=True, stable=True)
    ranks = torch.arange(logits.shape[1], device=logits.device)[None, :]
    keep = (ranked.cumsum(-1) - ranked) < top_p[:, None]
    keep &= ranked >= min_p[:, None] * ranked[:, :1]
    keep &= (top_k[:, None] <= 0) | (ranks < top_k[:, None])
    running = torch.where(keep, ranked, torch.zeros_like(ranked)).cumsum(-1)
    pick = torch.searchsorted(running, uniform[:, None] * running[:, -1:], right=True)
    pick = torch.minimum(pick, keep.sum(-1, keepdim=True) - 1)
    sampled = order.gather(1, pick).squeeze(1)
    return torch.where(temperature == 0, logits.argmax(-1), sampled)


def sample_cases(model: ModelShape) -> list[Case]:
    from llama_engine.kernels import triton as tk
    cases = []
    for batch in SAMPLE_BATCHES:
        logits = torch.randn(batch, model.vocab, device=DEVICE) * 3
        params = (torch.full((batch,), 0.8, device=DEVICE),
                  torch.full((batch,), 50, dtype=torch.int32, device=DEVICE),
                  torch.full((batch,), 0.95, device=DEVICE),
                  torch.full((batch,), 0.05, device=DEVICE),
                  torch.rand(batch, device=DEVICE))
        io = logits.numel() * 4
        cases.append(Case("sample", f"B={batch} V={model.vocab}",
                          lambda lg=logits, p=params: tk.sample(lg, *p),
                          lambda lg=logits, p=params: torch_sample(lg, *p), io, io, 0.0))
    return cases


# ------------------------------------------------------------------------------ LoRA

LORA_RANK = 16
LORA_ADAPTERS = 16
LORA_PREFILL_SEGMENT = 256


def _lora_case(model: ModelShape, name: str, n: int, k: int, slices: int,
               seg_lens: list[int]) -> Case:
    """add_lora (shrink + expand) over segments cycling through LORA_ADAPTERS adapters,
    against what peft's mixed-batch forward does: per adapter, gather its rows, apply
    B(A(x)) * scale, scatter back."""
    from llama_engine import kernels
    tokens, rank = sum(seg_lens), LORA_RANK
    slots = [i % LORA_ADAPTERS for i in range(len(seg_lens))]
    a = _randn(LORA_ADAPTERS, slices * rank, k, scale=k ** -0.5)
    b = _randn(LORA_ADAPTERS, rank, n, scale=rank ** -0.5)
    offsets = tuple(n * p // slices for p in range(slices + 1))
    scales = torch.rand(LORA_ADAPTERS, slices, device=DEVICE) + 0.5
    stack = kernels.LoRAStack(a, b, scales, offsets, None)
    mapping = kernels.lora_mapping(seg_lens, slots, DEVICE)
    x, y = _randn(tokens, k), _randn(tokens, n)
    token_slot = torch.tensor([s for n_, s in zip(seg_lens, slots) for _ in range(n_)],
                              device=DEVICE)
    rows = [torch.nonzero(token_slot == s).squeeze(1) for s in range(LORA_ADAPTERS)]

    def theirs() -> torch.Tensor:
        out = y.clone()
        for slot, index in enumerate(rows):
            xs = x[index]
            for p in range(slices):
                lo, hi = offsets[p], offsets[p + 1]
                h = xs @ a[slot, p * rank:(p + 1) * rank].t()
                out[index, lo:hi] += scales[slot, p].to(DTYPE) * (h @ b[slot, :, lo:hi])
        return out

    # Weights of every adapter used, x read, y read and written, h written and read (fp32).
    used = min(len(seg_lens), LORA_ADAPTERS)
    io = used * (a[0].numel() + b[0].numel()) * BYTES + (tokens * k + 2 * tokens * n) * BYTES \
        + 2 * tokens * slices * rank * 4
    return Case("add_lora", f"{name} T={tokens} segs={len(seg_lens)} r={rank}",
                lambda: kernels.add_lora(y.clone(), x, stack, mapping), theirs, io, io,
                2.0 * tokens * slices * rank * (k + n // slices))


def lora_cases(model: ModelShape) -> list[Case]:
    qkv = (model.heads + 2 * model.kv_heads) * model.head_dim
    shapes = [("qkv_proj", qkv, model.hidden, 3), ("down_proj", model.hidden, model.intermediate, 1)]
    cases = []
    for name, n, k, slices in shapes:
        cases.append(_lora_case(model, name, n, k, slices, [1] * DECODE_BATCHES[-1]))
        cases.append(_lora_case(model, name, n, k, slices, [LORA_PREFILL_SEGMENT] * 4))
    return cases


KERNELS = {"norm": norm_cases, "attention": attention_cases, "quant_matmul": matmul_cases,
           "sample": sample_cases, "lora": lora_cases}


# --------------------------------------------------------------------------- running

def _as_tensors(result: object) -> list[torch.Tensor]:
    if result is None:
        return []
    return list(result) if isinstance(result, tuple) else [result]


def check(case: Case) -> str:
    """Compare our output with the counterpart's before timing anything."""
    ours, theirs = _as_tensors(case.ours()), _as_tensors(case.theirs())
    if not ours:
        return "n/a"  # in-place op (store_kv): both write the same cache
    for a, b in zip(ours, theirs):
        if not a.is_floating_point():
            return f"ids equal {int((a == b).sum())}/{a.numel()}"
        b = b.reshape(a.shape)  # SDPA's [B, q_len, H, D] is our [T, H, D]
        if not torch.allclose(a.float(), b.float(), atol=CHECK_ATOL, rtol=CHECK_RTOL):
            return f"CHECK FAILED (max diff {float((a.float() - b.float()).abs().max()):.3g})"
    return "ok"


def measure(model: ModelShape, case: Case) -> Row:
    from triton.testing import do_bench
    verdict = check(case)
    ours_ms = do_bench(case.ours, return_mode="median")
    torch_ms = do_bench(case.theirs, return_mode="median")

    def rate(amount: float, ms: float, unit: float) -> float:
        return amount / (ms * 1e-3) / unit

    return Row(model.name, case.kernel, case.shape, ours_ms, torch_ms,
               rate(case.ours_bytes, ours_ms, 1e9), rate(case.theirs_bytes, torch_ms, 1e9),
               rate(case.flops, ours_ms, 1e12), rate(case.flops, torch_ms, 1e12),
               torch_ms / ours_ms, verdict)


HEADER = (f"{'model':<13} {'kernel':<24} {'shape':<34} {'ours ms':>9} {'torch ms':>9} "
          f"{'ours GB/s':>10} {'torch GB/s':>10} {'ours TF/s':>9} {'torch TF/s':>10} "
          f"{'speedup':>8}  check")


def format_row(row: Row) -> str:
    return (f"{row.model:<13} {row.kernel:<24} {row.shape:<34} {row.ours_ms:>9.4f} "
            f"{row.torch_ms:>9.4f} {row.ours_gbs:>10.1f} {row.torch_gbs:>10.1f} "
            f"{row.ours_tflops:>9.2f} {row.torch_tflops:>10.2f} {row.speedup:>7.2f}x  "
            f"{row.check}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), nargs="+", default=sorted(MODELS))
    parser.add_argument("--kernels", choices=sorted(KERNELS), nargs="+", default=list(KERNELS))
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON results file (default: benchmarks/results/...)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit("kernels_triton.py times Triton kernels on a CUDA GPU and none is visible "
                 "here (torch.cuda.is_available() is False); run it on a GPU machine. "
                 "The CPU interpreter checks live in tests/test_triton_kernels.py.")
    torch.manual_seed(0)
    device_name = torch.cuda.get_device_name()
    print(f"device: {device_name}, dtype: {DTYPE}, triton kernels vs torch {torch.__version__}")
    print(HEADER)
    rows = []
    for model_key in args.model:
        model = MODELS[model_key]
        for kernel in args.kernels:
            for case in KERNELS[kernel](model):
                rows.append(measure(model, case))
                print(format_row(rows[-1]), flush=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    out = args.out or RESULTS_DIR / f"kernels-triton-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": device_name, "dtype": str(DTYPE),
                               "rows": [asdict(row) for row in rows]}, indent=1))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
