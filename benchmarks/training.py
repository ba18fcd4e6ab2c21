"""Training throughput: full fine-tuning steps (forward + backward + AdamW step) on
llama-engine's model, then the same batches on HF transformers + torch.optim, in the same
run, each side in its own process (so peak RSS is its own). Prints tokens/s, peak RSS, the
ratio, and how far apart the two loss curves are.

    python benchmarks/training.py --seq-len 128 --batch-size 4 --steps 5
"""
from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import resource
import time

import torch

LR = 1e-5
WARMUP_STEPS = 1  # not timed: first-touch allocation and thread-pool start


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="GGUF file or HF folder (default: SmolLM2)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up step)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-json", default=None)


def _batches(vocab: int, args: argparse.Namespace) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(args.seed)
    return [torch.randint(1, vocab, (args.batch_size, args.seq_len), generator=generator)
            for _ in range(WARMUP_STEPS + args.steps)]


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _timed(step, batches: list[torch.Tensor]) -> dict:
    losses, times = [], []
    for i, batch in enumerate(batches):
        started = time.perf_counter()
        losses.append(step(batch))
        if i >= WARMUP_STEPS:
            times.append(time.perf_counter() - started)
    tokens = batches[0].numel()
    return {"losses": losses, "step_s": times, "tokens_per_s": tokens * len(times) / sum(times),
            "peak_rss_bytes": _peak_rss_bytes()}


def run_ours(model_path: str, args: argparse.Namespace) -> dict:
    from llama_engine.training.batching import pack
    from llama_engine.training.full import FullFineTune
    from llama_engine.training.losses import IGNORE_INDEX, sft_loss
    from llama_engine.training.tokenization import Example

    model = FullFineTune(model_path)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=LR)

    def step(batch: torch.Tensor) -> float:
        packed = pack([Example(row.tolist(), row[1:].tolist() + [IGNORE_INDEX]) for row in batch])
        loss = sft_loss(model.compute_logits(model.hidden_states(packed)), packed.labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return _timed(step, _batches(model.config.vocab_size, args))


def run_transformers(model_path: str, args: argparse.Namespace) -> dict:
    import transformers
    if os.path.isdir(model_path):
        model = transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    else:
        folder, name = os.path.split(model_path)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                                  dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)

    def step(batch: torch.Tensor) -> float:
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return _timed(step, _batches(model.config.vocab_size, args))


def _in_child(fn, model_path: str, args: argparse.Namespace) -> dict:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, (model_path, args))


def run(args: argparse.Namespace) -> None:
    from benchmarks.throughput import cpu_model
    from llama_engine.loader import default_model_path

    model_path = args.model or default_model_path()
    ours = _in_child(run_ours, model_path, args)
    theirs = _in_child(run_transformers, model_path, args)
    gap = max(abs(a - b) for a, b in zip(ours["losses"], theirs["losses"]))
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"{platform.python_implementation()} {platform.python_version()}",
        "command": "python benchmarks/training.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
            if v is not None and k not in ("func", "output_json")),
        "mode": "full fine-tuning, AdamW", "model": os.path.basename(model_path),
        "llama_engine": ours, "transformers": theirs,
        "tokens_per_s_ratio": ours["tokens_per_s"] / theirs["tokens_per_s"],
        "peak_rss_ratio": ours["peak_rss_bytes"] / theirs["peak_rss_bytes"],
        "max_loss_gap": gap,
    }
    print(f"llama-engine  {ours['tokens_per_s']:8.1f} tok/s  peak RSS {ours['peak_rss_bytes'] / 2**30:.2f} GiB")
    print(f"transformers  {theirs['tokens_per_s']:8.1f} tok/s  peak RSS {theirs['peak_rss_bytes'] / 2**30:.2f} GiB")
    print(f"ratio {result['tokens_per_s_ratio']:.2f}x tokens/s, {result['peak_rss_ratio']:.2f}x peak RSS; "
          f"loss curves differ by at most {gap:.2e}")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    run(parser.parse_args())
