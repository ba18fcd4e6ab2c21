"""Synthetic data generation end to end: P prompts x k samples on the default model, each
sample scored by a reward model (the default model with a seeded random reward head), on
llama-engine with and without prefix sharing, and on HF transformers (``generate`` with
``num_return_sequences=k``, then ``LlamaForSequenceClassification`` on the same weights and
head, loaded dense from an HF folder of the dequantized GGUF) in the same run. Reports generations/s and scored generations/s (generation plus
scoring) and the ratio against transformers' faster configuration.

The reward model runs at --reward-dtype, by default what ``llama-engine serve --reward-model``
picks (bfloat16 matmuls on a CPU that multiplies bfloat16 natively, else float32). The policy
runs at --policy-dtype, by default bfloat16 on such a CPU too (``llama-engine serve --dtype
bfloat16``; the server's ``auto`` keeps float32 on the CPU, where decoding a few sequences is
fastest on the packed GGUF weights, while 256 sequences at once are bound by the matmuls).
When either is bfloat16 the peer runs twice, in float32 and loaded in bfloat16, and the
report gives how far our scores are from transformers' float32 scores of the same sequences
(max abs difference; the fraction of prompts whose k samples rank alike; Kendall
concordance).

With prefix sharing: the k samples of a prompt are one request with n = k (forked from one
prefill) and the reward model's prefix cache shares each prompt's tokens among its k
replies. Without: k separate requests per prompt and no prefix cache on either engine.
Every sample is exactly --max-tokens long (EOS ignored; transformers ``min_new_tokens``),
so both sides do the same work.
"""
from __future__ import annotations

import argparse
import atexit
import datetime
import functools
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

# first: it sets the engine's OpenMP spin policy, which must precede the torch import
from benchmarks.throughput import cpu_model, openmp_settings

import torch  # noqa: E402

TOPICS = ["the moon", "bread", "rain", "volcanoes", "chess", "bees", "trains", "glass",
          "coffee", "whales", "maps", "tea", "bridges", "salt", "owls", "clocks"]
QUESTIONS = ["Explain in two sentences how {t} works.", "Give three facts about {t}."]
HEAD_SEED = 0
HEAD_STD = 0.02  # transformers' initializer_range, as our reward training starts from


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("-k", type=int, default=8, help="samples per prompt")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per sample")
    p.add_argument("--hf-prompts-per-batch", type=int, default=4,
                   help="transformers: prompts per generate call (x k sequences)")
    p.add_argument("--hf-score-batch", type=int, default=32)
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--reward-dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="the reward model's dtype (auto: the server's --reward-dtype auto)")
    p.add_argument("--policy-dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="the policy's dtype (auto: bfloat16 where the CPU multiplies it natively)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-json", default=None)
    p.add_argument("--scoring-only", type=int, default=0, metavar="ROUNDS",
                   help="time only the scoring of fixed replies (the same sequences on every "
                        "side: the engine at float32 and --reward-dtype, transformers at float32 "
                        "and bfloat16), ROUNDS rounds interleaved, and exit")


def prompts(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": QUESTIONS[i % 2].format(t=TOPICS[(i // 2) % len(TOPICS)])}]
            for i in range(n)]


def save_head(hidden_size: int, folder: str) -> tuple[str, torch.Tensor]:
    from safetensors.torch import save_file
    head = torch.randn(1, hidden_size, generator=torch.Generator().manual_seed(HEAD_SEED)) * HEAD_STD
    path = os.path.join(folder, "score.safetensors")
    save_file({"score.weight": head}, path)
    return path, head


def run_engine(args, dialogs, head_path: str, share_prefix: bool) -> dict:
    """The timed run; also returns (not timed) the scored sequences and their scores."""
    from llama_engine import LLM, SamplingParams
    from llama_engine.synthetic_data import reply_token_ids
    policy = LLM(enable_prefix_caching=share_prefix, dtype=args.policy_dtype)
    reward = LLM(score_head=head_path, enable_prefix_caching=share_prefix, dtype=args.reward_dtype)
    tok = policy.get_tokenizer()
    prompt_ids = [tok.apply_chat_template(d, add_generation_prompt=True) for d in dialogs]
    policy.generate(prompt_ids[:1], SamplingParams(max_tokens=4))  # warm-up
    reward.reward(prompt_ids[:1])
    params = dict(temperature=0.7, top_p=0.95, max_tokens=args.max_tokens, ignore_eos=True)
    start = time.perf_counter()
    if share_prefix:
        outs = policy.generate(prompt_ids, SamplingParams(n=args.k, seed=args.seed, **params))
        replies = [[o.text for o in out.outputs] for out in outs]
    else:
        flat = [p for p in prompt_ids for _ in range(args.k)]
        seeds = [SamplingParams(seed=args.seed * 1000 + i, **params) for i in range(len(flat))]
        outs = policy.generate(flat, seeds)
        replies = [[outs[i * args.k + j].outputs[0].text for j in range(args.k)]
                   for i in range(len(dialogs))]
    generated = time.perf_counter()
    sequences = [reply_token_ids(tok, d, r) for d, rs in zip(dialogs, replies) for r in rs]
    scored = reward.reward(sequences)
    done = time.perf_counter()
    scored_tokens = sum(len(o.prompt_token_ids) for o in scored)
    return {"generation_s": generated - start, "scoring_s": done - generated,
            "tokens_generated": sum(len(o.token_ids) for out in outs for o in out.outputs),
            "scored_tokens": scored_tokens,
            "prefix_cache_hit_rate": sum(o.num_cached_tokens for o in scored) / scored_tokens,
            "reward_dtype": args.reward_dtype, "policy_dtype": args.policy_dtype,
            "sequences": sequences, "scores": [o.score for o in scored]}


@functools.cache
def _dense_hf_folder() -> str:
    """The default GGUF dequantized once into an HF folder (safetensors), removed at exit, for
    transformers to load dense as its users' checkpoints are: from the GGUF itself transformers
    5 keeps the blocks packed and, in bfloat16, casts around every matmul (its own warning)."""
    from benchmarks.training import write_hf_folder
    from llama_engine.loader import default_model_path
    folder = tempfile.mkdtemp(prefix="sdg-hf-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    write_hf_folder(default_model_path(), folder)
    return folder


def hf_models(head: torch.Tensor, dtype: torch.dtype):
    """transformers' causal LM on the default GGUF's weights (dequantized) at ``dtype``, the
    same decoder under ``LlamaForSequenceClassification`` with the reward head, and the pad id."""
    import transformers
    causal = transformers.AutoModelForCausalLM.from_pretrained(_dense_hf_folder(),
                                                               dtype=dtype).eval()
    config = causal.config
    config.num_labels = 1
    scorer = transformers.LlamaForSequenceClassification(config).to(dtype).eval()
    scorer.model = causal.model  # the same decoder, with the reward head on top
    with torch.no_grad():
        scorer.score.weight.copy_(head)
    pad = _tokenizer().eos_token_id
    scorer.config.pad_token_id = pad
    return causal, scorer, pad


def _tokenizer():
    from llama_engine.loader import default_model_path
    from llama_engine.tokenizer import Tokenizer
    return Tokenizer.from_gguf(default_model_path())


def run_hf(args, dialogs, head: torch.Tensor, dtype: torch.dtype) -> dict:
    from llama_engine.synthetic_data import reply_token_ids
    causal, scorer, pad = hf_models(head, dtype)
    tok = _tokenizer()
    prompt_ids = [tok.apply_chat_template(d, add_generation_prompt=True) for d in dialogs]
    torch.manual_seed(args.seed)
    _generate(causal, prompt_ids[:1], 1, 4, pad)  # warm-up, as the engine gets
    start = time.perf_counter()
    replies, tokens = [], 0
    size = args.hf_prompts_per_batch
    for i in range(0, len(prompt_ids), size):
        batch = _generate(causal, prompt_ids[i:i + size], args.k, args.max_tokens, pad)
        tokens += sum(len(r) for r in batch)
        replies += [[tok.decode(r, skip_special_tokens=True) for r in batch[j * args.k:(j + 1) * args.k]]
                    for j in range(len(batch) // args.k)]
    generated = time.perf_counter()
    sequences = [reply_token_ids(tok, d, r) for d, rs in zip(dialogs, replies) for r in rs]
    for i in range(0, len(sequences), args.hf_score_batch):
        _score(scorer, sequences[i:i + args.hf_score_batch], pad)
    done = time.perf_counter()
    return {"generation_s": generated - start, "scoring_s": done - generated,
            "tokens_generated": tokens, "scored_tokens": sum(len(s) for s in sequences),
            "dtype": str(dtype).removeprefix("torch.")}


def score_agreement(args, ours: dict, head: torch.Tensor) -> dict:
    """Our scores of our sequences against transformers' float32 scores of the same ones:
    max abs difference, the fraction of prompts whose k samples rank alike (what the top_k /
    top_p filters read), and Kendall's concordance over all pairs."""
    _, scorer, pad = hf_models(head, torch.float32)
    sequences, scores = ours["sequences"], ours["scores"]
    expected = [v for i in range(0, len(sequences), args.hf_score_batch)
                for v in _score(scorer, sequences[i:i + args.hf_score_batch], pad)]
    groups = [slice(i, i + args.k) for i in range(0, len(scores), args.k)]

    def order(values: list[float]) -> list[int]:
        return sorted(range(len(values)), key=values.__getitem__)
    pairs = [(i, j) for i in range(len(scores)) for j in range(i + 1, len(scores))]
    return {"max_abs_diff": max(abs(a - b) for a, b in zip(scores, expected)),
            "score_std": float(torch.tensor(expected).std()),
            "prompts_ranked_alike": sum(order(scores[g]) == order(expected[g]) for g in groups) / len(groups),
            "best_sample_alike": sum(max(range(args.k), key=scores[g].__getitem__)
                                     == max(range(args.k), key=expected[g].__getitem__)
                                     for g in groups) / len(groups),
            "kendall_concordance": sum((scores[i] - scores[j]) * (expected[i] - expected[j]) > 0
                                       for i, j in pairs) / len(pairs)}


def _generate(model, prompts: list[list[int]], k: int, new_tokens: int, pad: int) -> list[list[int]]:
    """k sampled continuations per prompt (left padding), each exactly new_tokens long."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=0.7,
                             top_p=0.95, top_k=0, num_return_sequences=k, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, pad_token_id=pad)
    return out[:, width:].tolist()


def _score(model, sequences: list[list[int]], pad: int) -> list[float]:
    """Right-padded batch; transformers reads each row at its last non-pad token."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, s in enumerate(sequences):
        ids[row, :len(s)] = torch.tensor(s)
        mask[row, :len(s)] = 1
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=mask).logits[:, 0].tolist()


def run_scoring_only(args, dialogs, head_path: str, head: torch.Tensor) -> dict[str, list[float]]:
    """Seconds to score the same P x k fixed replies (~the benchmark's lengths) on each side,
    one list per side, the sides taking turns each round so that load hits them alike."""
    from llama_engine import LLM
    from llama_engine.synthetic_data import reply_token_ids
    tok = _tokenizer()
    sequences = [reply_token_ids(tok, d, f"Sample {j}: " + "a plain sentence about it, " * 9)
                 for d in dialogs for j in range(args.k)]

    def engine(dtype: str):  # a fresh engine each round: no sequence of the last one cached
        return lambda: LLM(score_head=head_path, dtype=dtype).reward

    def peer(dtype: torch.dtype):
        _, scorer, pad = hf_models(head, dtype)
        return lambda: lambda seqs: [_score(scorer, seqs[i:i + args.hf_score_batch], pad)
                                     for i in range(0, len(seqs), args.hf_score_batch)]
    sides = {f"engine {dtype}": engine(dtype)
             for dtype in dict.fromkeys(["float32", args.reward_dtype])}
    sides |= {f"transformers {str(dtype).removeprefix('torch.')}": peer(dtype)
              for dtype in (torch.float32, torch.bfloat16)}
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.scoring_only):
        for name, make in sides.items():
            score = make()
            score(sequences[:1])  # warm-up
            start = time.perf_counter()
            score(sequences)
            times[name].append(time.perf_counter() - start)
            print(f"{name:>24}: scoring {times[name][-1]:.1f} s (load {os.getloadavg()[0]:.2f})", flush=True)
    return times


def run(args: argparse.Namespace) -> dict:
    from llama_engine.kernels import bf16_matmul_is_fast
    from llama_engine.loader import load_model
    native = "bfloat16" if bf16_matmul_is_fast() else "float32"
    if args.reward_dtype == "auto":  # as `llama-engine serve --reward-dtype auto` picks it
        args.reward_dtype = native
    if args.policy_dtype == "auto":
        args.policy_dtype = native
    hidden = load_model(None).config.hidden_size
    dialogs = prompts(args.num_prompts)
    samples = args.num_prompts * args.k
    load_at_start = os.getloadavg()[0]
    results: dict[str, dict] = {}

    def record(name: str, r: dict) -> None:  # printed as each run ends: a long run shows progress
        total = r["generation_s"] + r["scoring_s"]
        r["generations_per_s"] = samples / r["generation_s"]
        r["generation_tokens_per_s"] = r["tokens_generated"] / r["generation_s"]
        r["scoring_generations_per_s"] = samples / r["scoring_s"]
        r["scored_generations_per_s"] = samples / total  # end to end: generate, then score
        results[name] = r
        print(f"{name:>26}: {r['generations_per_s']:.2f} generations/s "
              f"({r['generation_tokens_per_s']:.0f} tok/s), scoring {r['scoring_s']:.1f} s, "
              f"{r['scored_generations_per_s']:.2f} scored generations/s end to end", flush=True)

    with tempfile.TemporaryDirectory() as folder:
        head_path, head = save_head(hidden, folder)
        if args.scoring_only:
            times = run_scoring_only(args, dialogs, head_path, head)
            report = {"date": datetime.date.today().isoformat(), "machine": cpu_model(),
                      "load_average_1m": {"start": load_at_start, "end": os.getloadavg()[0]},
                      "scoring_s": times}
            if args.output_json:
                Path(args.output_json).write_text(json.dumps(report, indent=2))
            return report
        record("engine, prefix sharing", run_engine(args, dialogs, head_path, True))
        record("engine, no prefix sharing", run_engine(args, dialogs, head_path, False))
    peers = [] if args.skip_hf else [torch.float32] + (
        [torch.bfloat16] if "bfloat16" in (args.reward_dtype, args.policy_dtype) else [])
    for dtype in peers:
        record(f"transformers {str(dtype).removeprefix('torch.')}", run_hf(args, dialogs, head, dtype))
    ours = results["engine, prefix sharing"]
    agreement = None
    if peers:
        agreement = score_agreement(args, ours, head)
        print("our scores vs transformers float32 on the same sequences:", agreement)
    for r in results.values():  # kept for the agreement, not for the report
        r.pop("sequences", None), r.pop("scores", None)
    report = {"date": datetime.date.today().isoformat(), "machine": cpu_model(),
              "cpus": os.cpu_count(), "openmp": openmp_settings(),
              "load_average_1m": {"start": load_at_start, "end": os.getloadavg()[0]},
              "torch": torch.__version__, "device": "cpu",
              "workload": {"num_prompts": args.num_prompts, "k": args.k,
                           "max_tokens": args.max_tokens, "seed": args.seed,
                           "reward_dtype": args.reward_dtype, "policy_dtype": args.policy_dtype},
              "results": results, "scores_vs_transformers_float32": agreement}
    peer_names = [name for name in results if name.startswith("transformers")]
    if peer_names:
        fastest = max(peer_names, key=lambda name: results[name]["scored_generations_per_s"])
        peer = results[fastest]["scored_generations_per_s"]
        report["peer"] = fastest
        report["ratio_vs_transformers"] = {
            name: r["scored_generations_per_s"] / peer for name, r in results.items()
            if name not in peer_names}
        for name, ratio in report["ratio_vs_transformers"].items():
            print(f"{name} / {fastest}, scored generations/s end to end: {ratio:.2f}x")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    run(parser.parse_args())
