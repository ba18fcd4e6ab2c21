"""Decode throughput with many LoRA adapters in one batch, against the base alone and
against transformers + peft mixed-batch inference (``adapter_names=``), in the same run.

    python benchmarks/lora.py                       # 32 streams; 0, 1, 4, 16 adapters
    llama-engine bench lora --lora-dtype float32 --max-tokens 32

Adapters: random rank-16 LoRA on all seven projections of every decoder layer (B non-zero),
one set shared by both engines. Streams take adapters round-robin (0 adapters: every stream
on the base model, through the same LoRA-enabled engine). Only decode is timed: every
prompt is prefilled first, then the steps to the end (greedy, EOS ignored, so each run
decodes streams * max_tokens tokens). peft runs the same 32 prompts left-padded in one batch
with its KV cache, one adapter name per row. Results go to
benchmarks/results/lora-<device>-<date>.{md,json}.
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.throughput import cpu_model  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RANK = 16
ALPHA = 32
B_STD = 0.02  # adapters that move the logits without wrecking the text
PEFT_MODULES = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj",
                "w_gate": "gate_proj", "w_up": "up_proj", "w_down": "down_proj"}
TOPICS = ["the sea", "a city at night", "autumn", "trains", "mountains", "a library",
          "the desert", "rain", "a market", "winter", "bridges", "gardens"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--adapters", type=int, nargs="*", default=[0, 1, 4, 16])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--lora-dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--peft-tokens", type=int, default=8,
                        help="decode steps timed for peft (it is much slower)")
    parser.add_argument("--no-peft", action="store_true")
    parser.add_argument("--no-save", action="store_true")


def random_adapters(config, count: int, seed: int = 0) -> list:
    """`count` LoRAAdapters (rank 16, all projections) in our loader's form."""
    import torch

    from llama_engine.loader.adapters import LoRAAdapter, LoRAWeights, projection_shapes
    gen = torch.Generator().manual_seed(seed)
    shapes = projection_shapes(config)
    adapters = []
    for i in range(count):
        weights = {}
        for layer in range(config.num_layers):
            for proj, (out, k) in shapes.items():
                weights[(layer, proj)] = LoRAWeights(
                    torch.randn(RANK, k, generator=gen) / k ** 0.5,
                    torch.randn(out, RANK, generator=gen) * B_STD, ALPHA / RANK)
        adapters.append(LoRAAdapter(f"bench-{i}", "", weights))
    return adapters


def decode_run(llm, prompts: list[list[int]], params, loras: list, tag: str) -> dict:
    """Add every prompt, step until each has its first token, then time decode to the end."""
    engine = llm.engine
    for i, (prompt, lora) in enumerate(zip(prompts, loras)):
        engine.add_request(f"{tag}-{i}", prompt, params, lora)
    requests = list(engine.requests.values())
    while any(not r.seqs or r.seqs[0].num_output_tokens == 0 for r in requests):
        engine.step()
    tokens_before, steps = engine.generation_tokens_total, 0
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    seconds = time.perf_counter() - start
    tokens = engine.generation_tokens_total - tokens_before
    return {"tokens": tokens, "steps": steps, "seconds": seconds, "tok_s": tokens / seconds}


def peft_decode(model, tokenizer, prompts: list[str], names: list[str], steps: int) -> dict:
    """peft's mixed-batch decode: the batch prefilled once (left padding), then `steps`
    greedy steps with the KV cache, each row through its own adapter."""
    import torch
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    mask = batch["attention_mask"]
    with torch.no_grad():
        out = model(**batch, adapter_names=names, use_cache=True)
        past, next_ids = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        start = time.perf_counter()
        for _ in range(steps):
            mask = torch.cat([mask, torch.ones_like(next_ids)], dim=1)
            out = model(input_ids=next_ids, attention_mask=mask, past_key_values=past,
                        adapter_names=names, use_cache=True)
            past, next_ids = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        seconds = time.perf_counter() - start
    tokens = steps * len(prompts)
    return {"tokens": tokens, "steps": steps, "seconds": seconds, "tok_s": tokens / seconds}


def peft_model(model_path: str, adapters: list):
    """transformers' load of the GGUF (dequantized, float32) with our adapters' weights in
    peft adapters of the same names."""
    import peft
    import torch
    import transformers
    folder, name = os.path.split(model_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                           dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(PEFT_MODULES.values()))
    model = None
    for adapter in adapters:
        if model is None:
            model = peft.get_peft_model(hf, config, adapter_name=adapter.name)
        else:
            model.add_adapter(adapter.name, config)
        layers = model.base_model.model.model.layers
        with torch.no_grad():
            for (layer, proj), w in adapter.weights.items():
                parent = "self_attn" if proj in ("wq", "wk", "wv", "wo") else "mlp"
                module = layers[layer].get_submodule(f"{parent}.{PEFT_MODULES[proj]}")
                module.lora_A[adapter.name].weight.copy_(w.a)
                module.lora_B[adapter.name].weight.copy_(w.b)
    return model.eval(), tokenizer


def run(args: argparse.Namespace) -> None:
    from llama_engine import LLM, LoRARequest, SamplingParams
    from llama_engine.loader import default_model_path

    most = max(args.adapters)
    llm = LLM(args.model, enable_lora=True, max_loras=max(most, 1), max_lora_rank=RANK,
              lora_dtype=args.lora_dtype, max_num_seqs=max(args.streams, 64))
    adapters = random_adapters(llm.engine.model_config, most)
    requests = [LoRARequest(a.name, i + 1) for i, a in enumerate(adapters)]
    for request, adapter in zip(requests, adapters):
        llm.engine.add_lora(request, adapter)
    tokenizer = llm.get_tokenizer()
    texts = [f"Write a short poem about {TOPICS[i % len(TOPICS)]} (number {i})."
             for i in range(args.streams)]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": t}]) for t in texts]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)

    def loras_for(count: int) -> list:
        return [requests[i % count] if count else None for i in range(args.streams)]

    decode_run(llm, prompts[:4], params, loras_for(min(most, 4)), "warmup")
    rounds = []
    for r in range(args.rounds):  # interleaved, so machine load drifts hit every case alike
        rounds.append({str(n): decode_run(llm, prompts, params, loras_for(n), f"r{r}-{n}")
                       for n in args.adapters})
        print(f"round {r}: " + ", ".join(f"{n} adapters {x['tok_s']:.1f} tok/s"
                                         for n, x in rounds[-1].items()), flush=True)
    ours = {n: statistics.median(x[n]["tok_s"] for x in rounds) for n in rounds[0]}
    summary = {"tok_s": ours}
    if "0" in ours:
        summary["below_base"] = {n: 1 - v / ours["0"] for n, v in ours.items()}
    if not args.no_peft and most:
        model, hf_tokenizer = peft_model(args.model or default_model_path(), adapters)
        chat = [hf_tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                                 add_generation_prompt=True) for t in texts]
        peft_run = peft_decode(model, hf_tokenizer, chat,
                               [adapters[i % most].name for i in range(args.streams)],
                               args.peft_tokens)
        summary["peft"] = peft_run
        summary["vs_peft"] = ours[str(most)] / peft_run["tok_s"]
        print(f"peft, {most} adapters: {peft_run['tok_s']:.1f} tok/s", flush=True)
    result = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{cpu_model()}, {os.cpu_count()} cores",
              "load_average": round(os.getloadavg()[0], 2),
              "platform": platform.platform(), "command": " ".join(["python", *sys.argv]),
              "model": llm.engine.model_id, "streams": args.streams, "rank": RANK,
              "lora_dtype": args.lora_dtype, "max_tokens": args.max_tokens, "rounds": rounds,
              "median": summary}
    lines = ["| adapters | ours tok/s | below base |", "|---|---|---|"]
    for n, v in ours.items():
        below = summary.get("below_base", {}).get(n)
        lines.append(f"| {n} | {v:.1f} | {'' if below is None else f'{100 * below:.1f}%'} |")
    if "peft" in summary:
        lines += ["", f"transformers + peft, {most} adapters mixed (`adapter_names`): "
                      f"{summary['peft']['tok_s']:.1f} tok/s; ours {summary['vs_peft']:.1f}x"]
    print("\n".join(lines))
    if not args.no_save:
        RESULTS_DIR.mkdir(exist_ok=True)
        device = llm.engine.device.type
        stem = RESULTS_DIR / f"lora-{device}-{dt.date.today().isoformat()}"
        stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        header = [f"# LoRA serving: decode at {args.streams} streams, rank {RANK}, all linear",
                  "", f"- date: {result['date']}", f"- machine: {result['machine']} (load "
                  f"average {result['load_average']} at the end)", f"- command: `{result['command']}`",
                  f"- model: {result['model']}, adapter weights {args.lora_dtype}, greedy, "
                  f"{args.max_tokens} decode tokens per stream, median of {args.rounds} rounds", ""]
        stem.with_suffix(".md").write_text("\n".join(header + lines) + "\n")
        print(f"wrote {stem}.json and .md")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    run(parser.parse_args())


if __name__ == "__main__":
    main()
