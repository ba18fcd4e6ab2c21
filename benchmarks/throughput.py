"""Offline throughput: N requests on llama-engine, then the same workload on HF
transformers ``generate`` with static batches, in the same run; prints both and the ratio."""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import time

from llama_engine.openmp import configure_openmp

# Environment variables that set how the OpenMP team waits between parallel regions. On a
# shared machine they change the figures severalfold: a team thread spinning at a barrier
# for a descheduled peer burns the peer's time slice.
OPENMP_SETTINGS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
# The engine's spin policy, as the llama-engine command sets it: libgomp reads it once, when
# torch loads it, so before the torch import below (LLM() sets it too, but too late in a
# program that imported torch first, as every benchmark that imports this module does).
# Both engines of a comparison share the runtime, hence the policy.
OPENMP_POLICY_APPLIED = configure_openmp()
OPENMP_AT_START = {name: os.environ.get(name) for name in OPENMP_SETTINGS}

import numpy as np  # noqa: E402
import torch  # noqa: E402

SHAREGPT_LIKE = {"prompt_mu": 5.0, "prompt_sigma": 0.9, "output_mu": 5.2, "output_sigma": 0.7}
MAX_LEN_CAP = 1024


def cpu_model() -> str:
    """The processor's marketing name (what lscpu prints), for the results file."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def openmp_settings() -> dict[str, str | bool | None]:
    """The OpenMP environment the runtime started with (None: unset, the runtime's default)
    and whether the engine's spin policy was set in time, for results files."""
    return {**OPENMP_AT_START, "engine_policy_applied": OPENMP_POLICY_APPLIED}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None)
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--dataset", choices=["fixed", "sharegpt-like"], default="fixed",
                   help="fixed lengths, or log-normal lengths shaped like ShareGPT (seeded)")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--hf-batch-size", type=int, default=32)
    p.add_argument("--skip-hf", action="store_true", help="do not run the transformers peer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-json", default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.5,
                   help="on a GPU: the engine's share of device memory (the peer runs after it)")


def _on_gpu() -> bool:
    """The engine's own choice: a GPU when one is visible."""
    return torch.cuda.is_available()


def _device() -> str:
    return "cuda" if _on_gpu() else "cpu"


def make_workload(args: argparse.Namespace, vocab: int, special: set[int]):
    """Random token prompts (no special tokens) and output lengths, reproducible by seed."""
    rng = np.random.default_rng(args.seed)
    n = args.num_requests
    if args.dataset == "fixed":
        prompt_lens, output_lens = [args.prompt_len] * n, [args.output_len] * n
    else:
        s = SHAREGPT_LIKE
        prompt_lens = np.clip(rng.lognormal(s["prompt_mu"], s["prompt_sigma"], n), 4, MAX_LEN_CAP)
        output_lens = np.clip(rng.lognormal(s["output_mu"], s["output_sigma"], n), 4, MAX_LEN_CAP)
    allowed = np.array([t for t in range(vocab) if t not in special])
    prompts = [rng.choice(allowed, int(length)).tolist() for length in prompt_lens]
    return prompts, [int(x) for x in output_lens]


def run_engine(args, prompts, output_lens) -> dict:
    from llama_engine import LLM, SamplingParams
    kwargs = {"gpu_memory_utilization": args.gpu_memory_utilization} if _on_gpu() else {}
    llm = LLM(args.model, max_num_seqs=args.max_num_seqs, **kwargs)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in output_lens]
    llm.generate(prompts[:2], params[:2])  # warm-up
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"elapsed_s": elapsed, "output_tokens": generated}


def run_hf(args, prompts, output_lens) -> dict:
    import transformers
    from llama_engine.loader import default_model_path
    path = args.model or default_model_path()
    folder, name = (os.path.split(path) if path.endswith(".gguf") else (path, None))
    # The engine's own default dtype on each device: float32 on the CPU, bfloat16 on a GPU.
    dtype = torch.bfloat16 if _on_gpu() else torch.float32
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                              dtype=dtype).eval()
    model.to(_device())
    _hf_batch(model, prompts[:2], 2)  # warm-up, as the engine gets
    size = args.hf_batch_size
    start, generated = time.perf_counter(), 0
    for i in range(0, len(prompts), size):
        generated += _hf_batch(model, prompts[i:i + size], max(output_lens[i:i + size]))
    return {"elapsed_s": time.perf_counter() - start, "output_tokens": generated}


def _hf_batch(model, prompts: list[list[int]], new_tokens: int) -> int:
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):  # left padding, as decoder-only generation needs
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    ids, mask = ids.to(model.device), mask.to(model.device)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return (out.shape[1] - width) * len(prompts)


def run(args: argparse.Namespace) -> dict:
    from llama_engine.loader import load_model
    torch.manual_seed(args.seed)
    tok = load_model(args.model).tokenizer
    special = {t for t in range(tok.vocab_size) if tok.is_special(t)}
    prompts, output_lens = make_workload(args, tok.vocab_size, special)
    results = {"engine": run_engine(args, prompts, output_lens)}
    if _on_gpu():  # hand the engine's KV pool back before the peer loads
        gc.collect()
        torch.cuda.empty_cache()
    if not args.skip_hf:
        results["transformers"] = run_hf(args, prompts, output_lens)
    report = {
        "date": datetime.date.today().isoformat(), "machine": cpu_model(),
        "cpus": os.cpu_count(), "load_average_1m": os.getloadavg()[0],
        "openmp": openmp_settings(), "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if _on_gpu() else "cpu",
        "workload": {k: getattr(args, k) for k in ("num_requests", "prompt_len", "output_len",
                                                    "dataset", "max_num_seqs", "hf_batch_size")},
    }
    for name, r in results.items():
        r["requests_per_s"] = args.num_requests / r["elapsed_s"]
        r["output_tokens_per_s"] = r["output_tokens"] / r["elapsed_s"]
        print(f"{name:>13}: {r['requests_per_s']:.3f} req/s, {r['output_tokens_per_s']:.1f} "
              f"output tok/s ({r['output_tokens']} tokens in {r['elapsed_s']:.1f} s)")
    if "transformers" in results:
        ratio = results["engine"]["output_tokens_per_s"] / results["transformers"]["output_tokens_per_s"]
        report["ratio_vs_transformers"] = ratio
        print(f"llama-engine / transformers output tokens/s: {ratio:.2f}x")
    report["results"] = results
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    run(parser.parse_args())
