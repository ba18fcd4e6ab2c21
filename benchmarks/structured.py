"""Decode throughput with every stream under a JSON schema, against the same run free.

    python benchmarks/structured.py                     # 32 streams, 64 decode tokens, 3 rounds
    python benchmarks/structured.py --streams 32 --max-tokens 128 --rounds 5

One engine, in one process: each round runs the same 32 chat prompts unconstrained and then
under a JSON schema (nested objects, an enum, an integer, bounded strings, an array whose
minItems keeps the grammar open past max_tokens), greedy, EOS ignored, so both runs decode
exactly streams * max_tokens tokens. Only decode is timed (from the step after every prompt
has its first token to the end). The constrained run also reports where its extra time goes:
filling the batch's bitmask (llguidance), applying it to the logits, and advancing the
matchers. Results go to benchmarks/results/structured-<device>-<date>.{md,json}.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.throughput import cpu_model  # noqa: E402
from llama_engine import LLM, SamplingParams  # noqa: E402
from llama_engine.engine import sampler  # noqa: E402
from llama_engine.sampling_params import StructuredOutputsParams  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ITEM = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 24},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2030},
        "genre": {"enum": ["drama", "comedy", "thriller", "documentary"]},
        "director": {"type": "object",
                     "properties": {"name": {"type": "string", "maxLength": 24},
                                    "country": {"type": "string", "maxLength": 16}},
                     "required": ["name", "country"], "additionalProperties": False},
    },
    "required": ["title", "year", "genre", "director"],
    "additionalProperties": False,
}
# minItems far beyond what max_tokens can write: no stream finishes early.
SCHEMA = {"type": "object",
          "properties": {"films": {"type": "array", "items": ITEM, "minItems": 100}},
          "required": ["films"], "additionalProperties": False}
TOPICS = ["French cinema", "the 1970s", "science fiction", "Japan", "war films", "musicals",
          "silent films", "Italy", "animation", "westerns", "film noir", "Korea"]


class Timer:
    """Accumulates the wall time of calls to a wrapped function."""

    def __init__(self, fn):
        self.fn, self.seconds, self.calls = fn, 0.0, 0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start
            self.calls += 1


def decode_run(llm: LLM, prompts: list[list[int]], params: SamplingParams, tag: str) -> dict:
    """Add every prompt, step until each has its first token, then time decode to the end."""
    engine = llm.engine
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", prompt, params)
    requests = list(engine.requests.values())
    while any(seq.num_output_tokens == 0 for r in requests for seq in r.seqs) or \
            any(not r.seqs for r in requests):
        engine.step()
    fill = engine.structured.fill_bitmask = Timer(engine.structured.fill_bitmask)
    advance = engine.structured.advance = Timer(engine.structured.advance)
    apply = sampler.apply_token_bitmask = Timer(sampler.apply_token_bitmask)
    tokens_before, step_seconds = engine.generation_tokens_total, []
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
        step_seconds.append(time.perf_counter() - start - sum(step_seconds))
    seconds, steps = time.perf_counter() - start, len(step_seconds)
    sampler.apply_token_bitmask = apply.fn
    del engine.structured.fill_bitmask, engine.structured.advance
    tokens = engine.generation_tokens_total - tokens_before
    return {"tokens": tokens, "steps": steps, "seconds": seconds, "tok_s": tokens / seconds,
            "step_ms": 1000 * seconds / steps,
            # The fastest step: what the machine does when nothing else holds its cores.
            "min_step_ms": 1000 * min(step_seconds),
            "fill_ms_per_step": 1000 * fill.seconds / steps,
            "apply_ms_per_step": 1000 * apply.seconds / steps,
            "advance_ms_per_step": 1000 * advance.seconds / steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()

    llm = LLM(args.model)
    tokenizer = llm.get_tokenizer()
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content":
               f"List films about {TOPICS[i % len(TOPICS)]} (set {i}) as JSON."}])
               for i in range(args.streams)]
    common = dict(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    free = SamplingParams(**common)
    constrained = SamplingParams(**common, structured_outputs=StructuredOutputsParams(json=SCHEMA))
    decode_run(llm, prompts[:2], constrained, "warmup-c")  # builds llguidance's vocabulary
    decode_run(llm, prompts[:2], free, "warmup-f")
    rounds = []
    for r in range(args.rounds):  # interleaved, so machine load drifts hit both alike
        rounds.append({"free": decode_run(llm, prompts, free, f"free-{r}"),
                       "json_schema": decode_run(llm, prompts, constrained, f"json-{r}")})
        print(f"round {r}: free {rounds[-1]['free']['tok_s']:.1f} tok/s, "
              f"json_schema {rounds[-1]['json_schema']['tok_s']:.1f} tok/s", flush=True)

    def median(kind: str, key: str) -> float:
        return statistics.median(x[kind][key] for x in rounds)

    summary = {kind: {key: median(kind, key) for key in rounds[0][kind]}
               for kind in ("free", "json_schema")}
    summary["slowdown"] = 1 - summary["json_schema"]["tok_s"] / summary["free"]["tok_s"]
    summary["min_step_slowdown"] = 1 - (summary["free"]["min_step_ms"]
                                        / summary["json_schema"]["min_step_ms"])
    device = llm.engine.device.type
    result = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": cpu_model() if device == "cpu" else device,
              "platform": platform.platform(), "command": " ".join(["python", *sys.argv]),
              "model": llm.engine.model_id, "streams": args.streams,
              "max_tokens": args.max_tokens, "rounds": rounds, "median": summary}
    lines = [f"free:        {summary['free']['tok_s']:.1f} tok/s, "
             f"{summary['free']['step_ms']:.1f} ms/step (fastest {summary['free']['min_step_ms']:.1f})",
             f"json_schema: {summary['json_schema']['tok_s']:.1f} tok/s, "
             f"{summary['json_schema']['step_ms']:.1f} ms/step (fastest "
             f"{summary['json_schema']['min_step_ms']:.1f}; mask fill "
             f"{summary['json_schema']['fill_ms_per_step']:.2f} ms, apply "
             f"{summary['json_schema']['apply_ms_per_step']:.2f} ms, advance "
             f"{summary['json_schema']['advance_ms_per_step']:.2f} ms per step)",
             f"slowdown:    {100 * summary['slowdown']:.1f}% in tok/s, "
             f"{100 * summary['min_step_slowdown']:.1f}% in the fastest step"]
    print("\n".join(lines))
    if not args.no_save:
        stem = RESULTS_DIR / f"structured-{device}-{dt.date.today().isoformat()}"
        stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        header = [f"# Structured outputs: decode at {args.streams} streams, JSON schema vs free",
                  "", f"- date: {result['date']}", f"- machine: {result['machine']}",
                  f"- command: `{result['command']}`", f"- model: {result['model']}, greedy, "
                  f"{args.max_tokens} decode tokens per stream, median of {args.rounds} rounds", ""]
        stem.with_suffix(".md").write_text("\n".join(header + lines) + "\n")
        print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()
