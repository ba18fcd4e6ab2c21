"""The whole engine on a CUDA GPU against transformers on the same GPU.

    python benchmarks/gpu_engine.py check --gguf .gpu/smollm2-4layers.Q4_1.gguf
    python benchmarks/gpu_engine.py random-model --tokenizer .gpu/tokenizer --out /tmp/m

``check``: greedy tokens and their logprobs from ``LLM`` (device auto, so the GPU, packed
Q4_1 weights through the Triton kernels) against transformers' own load of the same GGUF
(dequantized, float32, on the GPU), for float32 and bfloat16 engines. It reports, per
dtype, how many of the greedy tokens agree before the first divergence and the largest
logprob difference over the agreeing prefix; with float32 the logprobs should agree to
about 1e-3, with bfloat16 to a few 1e-2.

``random-model``: a full-size SmolLM2-135M-shaped HF checkpoint with random weights and the
real tokenizer, for throughput runs where the real weights cannot travel.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ",
           "Once upon a time, in a small village by the sea,", "List three primary colors:",
           "1, 2, 3, 5, 8, 13,", "Q: What is 12 times 12?\nA:", "<html>\n  <body>\n",
           "Explain why the sky is blue in one sentence."]
GREEDY_TOKENS = 32
# SmolLM2-135M's architecture (HF config names).
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                    tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)


def hf_greedy_logprobs(model, ids: list[int], num_tokens: int) -> tuple[list[int], list[float]]:
    """Argmax decoding with transformers' KV cache (EOS is just another token) and the
    log-probability of each chosen token."""
    tokens, logprobs, past, step = [], [], None, ids
    with torch.no_grad():
        for _ in range(num_tokens):
            out = model(torch.tensor([step], device=model.device), past_key_values=past,
                        use_cache=True)
            past = out.past_key_values
            lp = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
            tokens.append(int(lp.argmax()))
            logprobs.append(float(lp[tokens[-1]]))
            step = tokens[-1:]
    return tokens, logprobs


def check(gguf: str, dtypes: list[str]) -> dict:
    import transformers

    from llama_engine import LLM, SamplingParams
    folder, name = os.path.split(gguf)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                           dtype=torch.float32).cuda().eval()
    report = {}
    for dtype in dtypes:
        llm = LLM(gguf, dtype=dtype, gpu_memory_utilization=0.3)
        assert llm.engine.device.type == "cuda", llm.engine.device
        params = SamplingParams(temperature=0, max_tokens=GREEDY_TOKENS, ignore_eos=True,
                                logprobs=1)
        outs = llm.generate(PROMPTS, params)
        tok = llm.get_tokenizer()
        agreed, worst = [], 0.0
        for prompt, out in zip(PROMPTS, outs):
            ref_tokens, ref_lps = hf_greedy_logprobs(hf, tok.encode(prompt), GREEDY_TOKENS)
            ours = out.outputs[0]
            same = 0
            for token, ref in zip(ours.token_ids, ref_tokens):
                if token != ref:
                    break
                same += 1
            for step in range(same):
                worst = max(worst, abs(ours.logprobs[step][ours.token_ids[step]] - ref_lps[step]))
            agreed.append(same)
        report[dtype] = {"tokens_agreeing_before_divergence": agreed,
                         "all_identical": all(a == GREEDY_TOKENS for a in agreed),
                         "max_abs_logprob_diff": worst,
                         "sample_text": outs[0].outputs[0].text}
        print(f"{dtype}: greedy tokens agreeing per prompt {agreed} of {GREEDY_TOKENS}; "
              f"max |logprob diff| {worst:.2e}", flush=True)
        del llm, outs
        gc.collect()  # the engine's KV pool is only freed once its cycles are collected
        torch.cuda.empty_cache()
    return report


def random_model(tokenizer: str, out: str) -> None:
    import transformers
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**SMOLLM2_135M)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    for name in os.listdir(tokenizer):
        shutil.copy(os.path.join(tokenizer, name), out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check")
    p.add_argument("--gguf", required=True)
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--output-json", default=None)
    p = sub.add_parser("random-model")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.command == "check":
        report = check(args.gguf, args.dtype)
        report["device"] = torch.cuda.get_device_name()
        if args.output_json:
            Path(args.output_json).write_text(json.dumps(report, indent=1))
    else:
        random_model(args.tokenizer, args.out)


if __name__ == "__main__":
    main()
