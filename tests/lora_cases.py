"""Random batched-LoRA problems shared by the C++ and Triton kernel tests: segments of
mixed adapter slots (-1: no adapter), stacked weights, and the merged-weight answer."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from llama_engine import kernels


@dataclass
class LoRACase:
    x: torch.Tensor            # [T, K]
    y: torch.Tensor            # [T, N], the base output
    stack: kernels.LoRAStack
    mapping: kernels.LoRAMapping
    token_slots: list[int]


def make_case(seed: int, *, decode: bool, rank: int, num_slices: int, dora: bool,
              dtype: torch.dtype = torch.float32, max_tokens: int = 40, max_k: int = 200,
              max_slice: int = 150) -> LoRACase:
    """Fresh random inputs: decode (one token per segment) or prefill-like segments of
    varying lengths, including empty ones and ones with no adapter."""
    gen = torch.Generator().manual_seed(seed)

    def randint(low: int, high: int) -> int:
        return int(torch.randint(low, high, (1,), generator=gen))

    num_slots = randint(1, 6)
    k = randint(8, max_k)
    widths = [randint(1, max_slice) for _ in range(num_slices)]
    offsets = [0]
    for w in widths:
        offsets.append(offsets[-1] + w)
    n = offsets[-1]
    num_segments = randint(1, 12)
    lens = [1 if decode else randint(0, max_tokens // 4) for _ in range(num_segments)]
    slots = [randint(-1, num_slots) for _ in range(num_segments)]
    tokens = sum(lens)
    a = torch.randn(num_slots, num_slices * rank, k, generator=gen) / k ** 0.5
    b = torch.randn(num_slots, rank, n, generator=gen) / rank ** 0.5
    scales = torch.rand(num_slots, num_slices, generator=gen) + 0.5
    ratio = torch.rand(num_slots, n, generator=gen) + 0.5 if dora else None
    stack = kernels.LoRAStack(a.to(dtype), b.to(dtype), scales, tuple(offsets),
                              ratio.to(dtype) if dora else None)
    x = torch.randn(tokens, k, generator=gen).to(dtype)
    y = torch.randn(tokens, n, generator=gen).to(dtype)
    token_slots = [s for n_, s in zip(lens, slots) for _ in range(n_)]
    return LoRACase(x, y, stack, kernels.lora_mapping(lens, slots), token_slots)


def merged_answer(case: LoRACase) -> torch.Tensor:
    """y + x @ (s B A)^T token by token, scaled by the DoRA ratio: the adapted weight of
    each token's own adapter merged into a dense matrix (float64), independent of the
    stacked layout's slicing tricks."""
    s = case.stack
    rank = s.b_stack.shape[1]
    out = case.y.double().clone()
    for t, slot in enumerate(case.token_slots):
        if slot < 0:
            continue
        delta = torch.zeros(s.b_stack.shape[2], case.x.shape[1], dtype=torch.float64)
        for p in range(len(s.slice_offsets) - 1):
            lo, hi = s.slice_offsets[p], s.slice_offsets[p + 1]
            a_p = s.a_stack[slot, p * rank:(p + 1) * rank].double()      # [R, K]
            b_p = s.b_stack[slot, :, lo:hi].double().t()                 # [n_p, R]
            delta[lo:hi] = float(s.scales[slot, p]) * b_p @ a_p
        out[t] += delta @ case.x[t].double()
        if s.magnitude_ratio is not None:
            out[t] *= s.magnitude_ratio[slot].double()
    return out


# SmolLM2-135M-Instruct's decoder layers (the default model): what a PEFT adapter for it holds.
SMOLLM2 = dict(hidden=576, ffn=1536, layers=30, q=576, kv=192)
PEFT_MODULES = {"q_proj": ("self_attn", "q", "hidden"), "k_proj": ("self_attn", "kv", "hidden"),
                "v_proj": ("self_attn", "kv", "hidden"), "o_proj": ("self_attn", "hidden", "q"),
                "gate_proj": ("mlp", "ffn", "hidden"), "up_proj": ("mlp", "ffn", "hidden"),
                "down_proj": ("mlp", "hidden", "ffn")}


def write_peft_adapter(folder: str, rank: int = 8, targets: tuple[str, ...] = ("q_proj", "v_proj"),
                       seed: int = 0, in_features: int | None = None, **config: object) -> str:
    """A PEFT LoRA folder for the default model, as peft's save_pretrained lays it out
    (random A and non-zero B), without peft. in_features overrides A's input width (an
    adapter that does not fit); config entries go into adapter_config.json."""
    import json
    import os

    from safetensors.torch import save_file
    gen = torch.Generator().manual_seed(seed)
    os.makedirs(folder, exist_ok=True)
    tensors = {}
    for layer in range(SMOLLM2["layers"]):
        for module in targets:
            parent, out_dim, in_dim = PEFT_MODULES[module]
            key = f"base_model.model.model.layers.{layer}.{parent}.{module}"
            k = in_features or SMOLLM2[in_dim]
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, k, generator=gen) / k ** 0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(SMOLLM2[out_dim], rank,
                                                          generator=gen) * 0.05
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
                   "target_modules": list(targets), **config}, f)
    return folder
