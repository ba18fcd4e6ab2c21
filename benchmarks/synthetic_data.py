"""Synthetic data generation end to end: P prompts x k samples on the default model, each
sample scored by a reward model (the default model with a seeded random reward head), on
llama-engine with and without prefix sharing, and on HF transformers (``generate`` with
``num_return_sequences=k``, then ``LlamaForSequenceClassification`` on the same weights and
head, loaded dense from an HF folder of the dequantized GGUF) at each of --peer-dtypes.
Reports generations/s and scored generations/s (generation, then scoring: end to end).

Rounds: this VM's speed drifts by 1.5-2x within minutes, so each side is a live process of
its own (``benchmarks/sides.py``; models loaded once, untimed), and the sides take turns in
--rounds rounds, each side running the whole workload once per round after an untimed
warm-up (one prompt generated and scored; the prefix caches are then emptied, so a round
starts as a fresh engine would and finds nothing of the last one cached). A round's ratio is
ours (prefix sharing) over the faster transformers configuration in that round, in scored
generations/s; the headline ``ratio_vs_transformers`` is the median of the rounds' ratios
(``round_ratios``; ``mean_ratio_vs_transformers`` compares the sides' means instead). Every
side's figures of every round are in the JSON (``sides``).

The reward model runs at --reward-dtype, by default what ``llama-engine serve --reward-model``
picks (bfloat16 matmuls on a CPU that multiplies bfloat16 natively, else float32). The policy
runs at --policy-dtype, by default bfloat16 on such a CPU too (``llama-engine serve --dtype
bfloat16``; the server's ``auto`` keeps float32 on the CPU, where decoding a few sequences is
fastest on the packed GGUF weights, while 256 sequences at once are bound by the matmuls).
transformers runs loaded in bfloat16 (on such a CPU) and in float32 by default. After the
rounds, our scores of our last round's sequences are compared with transformers' float32
scores of the same sequences (max abs difference; the fraction of prompts whose k samples
rank alike; Kendall concordance).

With prefix sharing: the k samples of a prompt are one request with n = k (forked from one
prefill) and the reward model's prefix cache shares each prompt's tokens among its k
replies. Without: k separate requests per prompt and no prefix cache on either engine.
Every sample is exactly --max-tokens long (EOS ignored; transformers ``min_new_tokens``),
so both sides do the same work.

--scoring-only times the scoring alone: the same P x k fixed replies (~the benchmark's
lengths) scored by each side (the engine at float32 and --reward-dtype, transformers at
--peer-dtypes), in rounds likewise.

    python -m benchmarks.synthetic_data --num-prompts 32 -k 8 --rounds 3 --output-json out.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

# first: it sets the engine's OpenMP spin policy, which must precede the torch import
from benchmarks.throughput import cpu_model, openmp_settings

import torch  # noqa: E402

from benchmarks.sides import Side, in_child  # noqa: E402

TOPICS = ["the moon", "bread", "rain", "volcanoes", "chess", "bees", "trains", "glass",
          "coffee", "whales", "maps", "tea", "bridges", "salt", "owls", "clocks"]
QUESTIONS = ["Explain in two sentences how {t} works.", "Give three facts about {t}."]
HEAD_SEED = 0
HEAD_STD = 0.02  # transformers' initializer_range, as our reward training starts from
WARMUP_TOKENS = 4
PEER_DTYPES = ("bfloat16", "float32")
OURS = "engine, prefix sharing"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("-k", type=int, default=8, help="samples per prompt")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per sample")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds; in each, every side runs the whole workload once, in turn")
    p.add_argument("--hf-prompts-per-batch", type=int, default=4,
                   help="transformers: prompts per generate call (x k sequences)")
    p.add_argument("--hf-score-batch", type=int, default=32)
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--peer-dtypes", default=None,
                   help="comma-separated precisions transformers runs at, of bfloat16, float32 "
                        "(default: both where the CPU multiplies bfloat16 natively, else "
                        "float32); the ratio is against the fastest in each round")
    p.add_argument("--reward-dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="the reward model's dtype (auto: the server's --reward-dtype auto)")
    p.add_argument("--policy-dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="the policy's dtype (auto: bfloat16 where the CPU multiplies it natively)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-json", default=None)
    p.add_argument("--scoring-only", action="store_true",
                   help="time only the scoring of fixed replies (the same sequences on every "
                        "side: the engine at float32 and --reward-dtype, transformers at "
                        "--peer-dtypes), in --rounds rounds")


def prompts(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": QUESTIONS[i % 2].format(t=TOPICS[(i // 2) % len(TOPICS)])}]
            for i in range(n)]


def fixed_replies(n: int, k: int) -> list[list[str]]:
    """--scoring-only's replies: k per prompt, ~100 tokens with the prompt, as generated ones."""
    return [[f"Sample {j}: " + "a plain sentence about it, " * 9 for j in range(k)]
            for _ in range(n)]


def save_head(hidden_size: int, folder: str) -> tuple[str, torch.Tensor]:
    from safetensors.torch import save_file
    head = torch.randn(1, hidden_size, generator=torch.Generator().manual_seed(HEAD_SEED)) * HEAD_STD
    path = os.path.join(folder, "score.safetensors")
    save_file({"score.weight": head}, path)
    return path, head


Replies = tuple[list[list[str]], int]  # k reply texts per prompt, tokens generated


def timed_workload(tok, dialogs: list[list[dict]], warm_up: Callable[[], None],
                   generate: Callable[[], Replies],
                   score: Callable[[list[list[int]]], tuple[list[float], dict]]) -> dict:
    """One round of the workload on one side: ``warm_up()`` untimed, then ``generate()``, the
    replies tokenized as the reward model reads them, and ``score`` of those token ids
    (scores and the side's own figures). Seconds of each part, tokens, and the scored
    sequences with their scores."""
    from llama_engine.synthetic_data import reply_token_ids
    warm_up()
    start = time.perf_counter()
    replies, tokens = generate()
    generated = time.perf_counter()
    sequences = [reply_token_ids(tok, d, r) for d, rs in zip(dialogs, replies) for r in rs]
    scores, figures = score(sequences)
    done = time.perf_counter()
    return {"generation_s": generated - start, "scoring_s": done - generated,
            "tokens_generated": tokens, "scored_tokens": sum(len(s) for s in sequences),
            **figures, "sequences": sequences, "scores": scores}


def build_engine(args: argparse.Namespace, head_path: str, share_prefix: bool,
                 reward_dtype: str) -> Callable[[int], dict]:
    """Our side, in its process: the policy (none with --scoring-only) and the reward model,
    loaded; returns the workload, a function of the round."""
    from llama_engine import LLM, SamplingParams
    reward = LLM(score_head=head_path, enable_prefix_caching=share_prefix, dtype=reward_dtype)
    policy = None if args.scoring_only else LLM(enable_prefix_caching=share_prefix,
                                                dtype=args.policy_dtype)
    tok = reward.get_tokenizer()
    dialogs = prompts(args.num_prompts)
    prompt_ids = [tok.apply_chat_template(d, add_generation_prompt=True) for d in dialogs]
    params = dict(temperature=0.7, top_p=0.95, max_tokens=args.max_tokens, ignore_eos=True)

    def warm_up() -> None:  # then empty the caches: the round starts as a fresh engine
        if policy is not None:
            policy.generate(prompt_ids[:1], SamplingParams(max_tokens=WARMUP_TOKENS))
        reward.reward(prompt_ids[:1])
        for llm in filter(None, (policy, reward)):
            if not llm.reset_prefix_cache():
                raise RuntimeError("the prefix cache could not be reset: a request is running")

    def generate() -> Replies:
        if policy is None:
            return fixed_replies(len(dialogs), args.k), 0
        if share_prefix:
            outs = policy.generate(prompt_ids, SamplingParams(n=args.k, seed=args.seed, **params))
            replies = [[o.text for o in out.outputs] for out in outs]
        else:
            flat = [p for p in prompt_ids for _ in range(args.k)]
            seeds = [SamplingParams(seed=args.seed * 1000 + i, **params) for i in range(len(flat))]
            outs = policy.generate(flat, seeds)
            replies = [[outs[i * args.k + j].outputs[0].text for j in range(args.k)]
                       for i in range(len(dialogs))]
        return replies, sum(len(o.token_ids) for out in outs for o in out.outputs)

    def score(sequences: list[list[int]]) -> tuple[list[float], dict]:
        scored = reward.reward(sequences)
        cached = sum(o.num_cached_tokens for o in scored)
        return [o.score for o in scored], {
            "prefix_cache_hit_rate": cached / sum(len(s) for s in sequences)}

    return lambda _round: timed_workload(tok, dialogs, warm_up, generate, score)


def hf_models(folder: str, head: torch.Tensor, dtype: torch.dtype):
    """transformers' causal LM from the dense HF ``folder`` at ``dtype``, the same decoder
    under ``LlamaForSequenceClassification`` with the reward head, and the pad id."""
    import transformers
    causal = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
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


def build_transformers(args: argparse.Namespace, folder: str, head: torch.Tensor,
                       dtype: str) -> Callable[[int], dict]:
    """transformers' side at ``dtype``, in its process: the models loaded from the dense HF
    ``folder``; returns the workload, a function of the round."""
    causal, scorer, pad = hf_models(folder, head, getattr(torch, dtype))
    tok = _tokenizer()
    dialogs = prompts(args.num_prompts)
    prompt_ids = [tok.apply_chat_template(d, add_generation_prompt=True) for d in dialogs]

    def warm_up() -> None:  # as the engine gets
        torch.manual_seed(args.seed)
        if not args.scoring_only:
            _generate(causal, prompt_ids[:1], 1, WARMUP_TOKENS, pad)
        _score(scorer, prompt_ids[:1], pad)

    def generate() -> Replies:
        if args.scoring_only:
            return fixed_replies(len(dialogs), args.k), 0
        replies, tokens = [], 0
        size = args.hf_prompts_per_batch
        for i in range(0, len(prompt_ids), size):
            batch = _generate(causal, prompt_ids[i:i + size], args.k, args.max_tokens, pad)
            tokens += sum(len(r) for r in batch)
            replies += [[tok.decode(r, skip_special_tokens=True)
                         for r in batch[j * args.k:(j + 1) * args.k]]
                        for j in range(len(batch) // args.k)]
        return replies, tokens

    def score(sequences: list[list[int]]) -> tuple[list[float], dict]:
        return score_batched(scorer, sequences, pad, args.hf_score_batch), {}

    return lambda _round: timed_workload(tok, dialogs, warm_up, generate, score)


def score_batched(scorer, sequences: list[list[int]], pad: int, batch: int) -> list[float]:
    return [v for i in range(0, len(sequences), batch)
            for v in _score(scorer, sequences[i:i + batch], pad)]


def float32_scores(folder: str, head: torch.Tensor, sequences: list[list[int]],
                   batch: int) -> list[float]:
    """transformers' float32 scores of ``sequences`` (the reference of our scores)."""
    _, scorer, pad = hf_models(folder, head, torch.float32)
    return score_batched(scorer, sequences, pad, batch)


def score_agreement(k: int, scores: list[float], expected: list[float]) -> dict:
    """Our scores against transformers' float32 scores of the same sequences (k per prompt):
    max abs difference, the fraction of prompts whose k samples rank alike (what the top_k /
    top_p filters read), and Kendall's concordance over all pairs."""
    groups = [slice(i, i + k) for i in range(0, len(scores), k)]

    def order(values: list[float]) -> list[int]:
        return sorted(range(len(values)), key=values.__getitem__)
    pairs = [(i, j) for i in range(len(scores)) for j in range(i + 1, len(scores))]
    return {"max_abs_diff": max(abs(a - b) for a, b in zip(scores, expected)),
            "score_std": float(torch.tensor(expected).std()),
            "prompts_ranked_alike": sum(order(scores[g]) == order(expected[g]) for g in groups) / len(groups),
            "best_sample_alike": sum(max(range(k), key=scores[g].__getitem__)
                                     == max(range(k), key=expected[g].__getitem__)
                                     for g in groups) / len(groups),
            "kendall_concordance": sum((scores[i] - scores[j]) * (expected[i] - expected[j]) > 0
                                       for i, j in pairs) / max(len(pairs), 1)}


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


def _rates(r: dict, samples: int) -> None:
    """A round's generations/s (none when nothing was generated), scoring generations/s and
    scored generations/s end to end, added to its figures."""
    if r["tokens_generated"]:
        r["generations_per_s"] = samples / r["generation_s"]
        r["generation_tokens_per_s"] = r["tokens_generated"] / r["generation_s"]
    r["scoring_generations_per_s"] = samples / r["scoring_s"]
    r["scored_generations_per_s"] = samples / (r["generation_s"] + r["scoring_s"])


def _summary(rounds: list[dict], samples: int) -> dict:
    """A side's figures over all rounds (rates from the summed seconds) and each round's."""
    total = {key: sum(r[key] for r in rounds)
             for key in ("generation_s", "scoring_s", "tokens_generated")}
    _rates(total, samples * len(rounds))
    return {key: value for key, value in total.items() if key.endswith("_per_s")} | {"rounds": rounds}


def side_builds(args: argparse.Namespace, head_path: str, head: torch.Tensor,
                hf_folder: str | None) -> dict[str, tuple]:
    """Each side's name -> (build, its arguments); ours (OURS, or with --scoring-only the
    engine at --reward-dtype) first, the peers' names start with "transformers"."""
    if args.scoring_only:
        ours = {f"engine {dtype}": (build_engine, args, head_path, True, dtype)
                for dtype in dict.fromkeys([args.reward_dtype, "float32"])}
    else:
        ours = {OURS: (build_engine, args, head_path, True, args.reward_dtype),
                "engine, no prefix sharing": (build_engine, args, head_path, False, args.reward_dtype)}
    peers = {f"transformers {dtype}": (build_transformers, args, hf_folder, head, dtype)
             for dtype in ([] if hf_folder is None else args.peer_dtypes)}
    return ours | peers


def add_ratios(sides: dict[str, dict], peers: list[str]) -> None:
    """To each of our sides: its scored generations/s over the fastest peer's in each round
    (``round_ratios``; ``round_peers`` names that peer), their median
    (``ratio_vs_transformers``), and the ratio of its mean over the fastest peer mean
    (``mean_ratio_vs_transformers``)."""
    def rate(name: str, i: int) -> float:
        return sides[name]["rounds"][i]["scored_generations_per_s"]
    rounds = range(len(sides[peers[0]]["rounds"]))
    fastest = [max(peers, key=lambda name: rate(name, i)) for i in rounds]
    fastest_mean = max(sides[name]["scored_generations_per_s"] for name in peers)
    for name, side in sides.items():
        if name not in peers:
            side["round_ratios"] = [rate(name, i) / rate(peer, i) for i, peer in zip(rounds, fastest)]
            side["round_peers"] = fastest
            side["ratio_vs_transformers"] = statistics.median(side["round_ratios"])
            side["mean_ratio_vs_transformers"] = side["scored_generations_per_s"] / fastest_mean


def _peer_dtypes(text: str | None) -> list[str]:
    from llama_engine.kernels import bf16_matmul_is_fast
    if text is None:
        return list(PEER_DTYPES) if bf16_matmul_is_fast() else ["float32"]
    dtypes = [d for d in text.split(",") if d]
    for dtype in dtypes:
        if dtype not in PEER_DTYPES:
            raise SystemExit(f"--peer-dtypes: unknown {dtype!r}; known: {', '.join(PEER_DTYPES)}")
    return list(dict.fromkeys(dtypes))


def _print_round(i: int, name: str, r: dict) -> None:
    generated = "generations_per_s" in r
    generation = (f"{r['generations_per_s']:.2f} generations/s ({r['generation_tokens_per_s']:.0f} "
                  "tok/s), " if generated else "")
    print(f"round {i + 1} {name:>26}: {generation}scoring {r['scoring_s']:.1f} s, "
          f"{r['scored_generations_per_s']:.2f} scored generations/s"
          f"{' end to end' if generated else ''} (load {r['load_average_1m']:.2f})", flush=True)


def run(args: argparse.Namespace) -> dict:
    from benchmarks.training import write_hf_folder
    from llama_engine.kernels import bf16_matmul_is_fast
    from llama_engine.loader import default_model_path, load_model
    native = "bfloat16" if bf16_matmul_is_fast() else "float32"
    if args.reward_dtype == "auto":  # as `llama-engine serve --reward-dtype auto` picks it
        args.reward_dtype = native
    if args.policy_dtype == "auto":
        args.policy_dtype = native
    args.peer_dtypes = [] if args.skip_hf else _peer_dtypes(args.peer_dtypes)
    hidden = load_model(None).config.hidden_size
    samples = args.num_prompts * args.k
    load_at_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as folder:
        head_path, head = save_head(hidden, folder)
        hf_folder = None
        if args.peer_dtypes:  # transformers loads dense weights, as its users' checkpoints are
            hf_folder = os.path.join(folder, "hf")
            in_child(write_hf_folder, default_model_path(), hf_folder)
        processes, errors = {}, {}
        for name, (build, *build_args) in side_builds(args, head_path, head, hf_folder).items():
            side = Side(build, *build_args)
            if side.error is None:
                processes[name] = side
                continue
            side.close()
            if not name.startswith("transformers"):
                raise RuntimeError(f"{name} failed: {side.error}")
            errors[name] = side.error
            print(f"{name} could not run: {side.error}", flush=True)
        rounds: dict[str, list[dict]] = {name: [] for name in processes}
        for i in range(args.rounds):
            for name, side in processes.items():
                r, _ = side(i)
                r["load_average_1m"] = os.getloadavg()[0]
                _rates(r, samples)
                rounds[name].append(r)
                _print_round(i, name, r)
        peaks = {name: side.close() for name, side in processes.items()}
        ours_name = next(iter(processes))
        last = rounds[ours_name][-1]
        agreement = None
        if hf_folder is not None:
            expected = in_child(float32_scores, hf_folder, head, last["sequences"],
                                args.hf_score_batch)
            agreement = score_agreement(args.k, last["scores"], expected)
            print("our scores vs transformers float32 on the same sequences:", agreement)
    for side_rounds in rounds.values():  # kept for the agreement only
        for r in side_rounds:
            del r["sequences"], r["scores"]
    sides = {name: _summary(rs, samples) | {"peak_rss_bytes": peaks[name]}
             for name, rs in rounds.items()}
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": cpu_model(), "cpus": os.cpu_count(), "openmp": openmp_settings(),
              "load_average_1m": {"start": load_at_start, "end": os.getloadavg()[0]},
              "torch": torch.__version__, "device": "cpu",
              "workload": {"num_prompts": args.num_prompts, "k": args.k,
                           "max_tokens": args.max_tokens, "seed": args.seed,
                           "rounds": args.rounds, "scoring_only": args.scoring_only,
                           "reward_dtype": args.reward_dtype, "policy_dtype": args.policy_dtype,
                           "peer_dtypes": args.peer_dtypes},
              "sides": sides, "peer_errors": errors, "ours": ours_name,
              "scores_vs_transformers_float32": agreement}
    peers = [name for name in sides if name.startswith("transformers")]
    if peers:
        add_ratios(sides, peers)
        ours = sides[ours_name]
        report.update({key: ours[key] for key in ("ratio_vs_transformers", "round_ratios",
                                                  "round_peers", "mean_ratio_vs_transformers")})
        for name, side in sides.items():
            if name not in peers:
                rounds_text = ", ".join(f"{x:.2f}" for x in side["round_ratios"])
                print(f"{name} / the faster transformers, scored generations/s: "
                      f"{side['ratio_vs_transformers']:.2f}x (median of rounds: {rounds_text}; "
                      f"of the means {side['mean_ratio_vs_transformers']:.2f}x)")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    run(parser.parse_args())
