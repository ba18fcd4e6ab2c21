"""Training throughput: steps (forward + backward + AdamW step) on llama-engine's model, then
the same batches on HF transformers (+ peft for adapters, + bitsandbytes for QLoRA) with the
same hyperparameters and the same initial adapter weights, in the same run, each side in its
own process (so peak RSS is its own), interleaved in rounds so that a load from elsewhere
falls on every side alike: each round, each side in turn runs a warm-up step, then --steps
timed steps back to back, as a training loop does (a process's first step after sitting
idle through the others' ran 1-28% slower than its next on our VM; those untimed warm-up
steps are in the results as ``warmup_s``). On the shared VMs we measure on a step's time drifts by up to 1.5x
within minutes, so each round's ratio is in the results too (``round_ratios``), and the
tokens/s ratio is their median.
Methods: full fine-tuning, LoRA r=16 on all linear layers, QLoRA (the same over an NF4 base
with double-quantized scales), DoRA. Prints tokens/s, peak RSS, the ratios, how far apart the loss curves are, and plots them.

Precision (``--dtype``): our adapter methods hold the frozen base in bfloat16 where the CPU
multiplies it natively (our training default; adapters, norms, attention, loss and optimizer
stay float32). The peer then runs twice: at the same precision (the model loaded
in bfloat16, peft's adapters float32; bitsandbytes' ``bnb_4bit_compute_dtype``) and in
float32, and the ratio is taken against its faster run.

Each side runs its own default recipe, and QLoRA's is the same on both: activation
checkpointing per decoder layer (ours by default; peft's ``prepare_model_for_kbit_training``,
the standard QLoRA recipe, turns on transformers' gradient checkpointing). Our SFT loss is
fused with the head in chunks (``losses.linear_cross_entropy``) for every method; transformers
computes the whole logits (its own default: no chunked loss exists for it on the CPU).

    python benchmarks/training.py --methods lora,qlora --seq-len 128 --batch-size 4 --rounds 2
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform

import torch

from benchmarks.sides import Side, in_child

LR = 1e-5
ADAPTER_LR = 1e-3  # adapters start at zero: a full fine-tune's lr would barely move them
WARMUP_STEPS = 1  # per round, not timed: first-touch allocation, caches after idling
METHODS = ("full", "lora", "qlora", "dora")
LORA_RANK, LORA_ALPHA = 16, 32
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_OUR_LOSS = "loss fused with the head over 256-token chunks"
_THEIR_LOSS = "whole logits"
RECIPES = {  # what each side runs, written into the results
    "full": {"llama_engine": _OUR_LOSS, "transformers": _THEIR_LOSS},
    "lora": {"llama_engine": _OUR_LOSS, "transformers": _THEIR_LOSS},
    "dora": {"llama_engine": _OUR_LOSS, "transformers": _THEIR_LOSS},
    "qlora": {"llama_engine": "activation checkpointing per decoder layer (our QLoRA default), "
                              "NF4 decoder projections, float32 embedding and head, " + _OUR_LOSS,
              "transformers": "peft.prepare_model_for_kbit_training (gradient checkpointing), "
                              "bitsandbytes NF4 double-quant, compute in the run's dtype, "
                              "float32 embedding and head, " + _THEIR_LOSS},
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="GGUF file or HF folder (default: SmolLM2)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=2,
                   help="timed steps per side per round (after a warm-up step)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated, of {', '.join(METHODS)}")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                   help="the frozen base's precision for the adapter methods (default: our "
                        "training default, bfloat16 where the CPU multiplies it natively); "
                        "the peer runs at it and at float32")
    p.add_argument("--output-json", default=None)
    p.add_argument("--plot", default=None, help="PNG of both sides' loss curves per method")


def _batches(vocab: int, args: argparse.Namespace) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(args.seed)
    return [torch.randint(1, vocab, (args.batch_size, args.seq_len), generator=generator)
            for _ in range(args.rounds * (WARMUP_STEPS + args.steps))]


class _TrainingSide(Side):
    """One side's training process; request i runs batch i's step, answering its loss."""

    def __init__(self, build, *build_args):
        super().__init__(build, *build_args)
        self.losses: list[float] = []
        self.times: list[float] = []
        self.warmup_times: list[float] = []

    def run_round(self, args: argparse.Namespace) -> None:
        """The next WARMUP_STEPS untimed and args.steps timed steps, back to back."""
        for j in range(WARMUP_STEPS + args.steps):
            loss, seconds = self(len(self.losses))
            self.losses.append(loss)
            (self.times if j >= WARMUP_STEPS else self.warmup_times).append(seconds)

    def finish(self, tokens: int) -> dict:
        peak = self.close()
        return {"losses": self.losses, "step_s": self.times, "warmup_s": self.warmup_times,
                "tokens_per_s": tokens * len(self.times) / sum(self.times), "peak_rss_bytes": peak}


def _lr(method: str) -> float:
    return LR if method == "full" else ADAPTER_LR


def build_ours(model_path: str, method: str, args: argparse.Namespace, adapter_file: str):
    """Our side's training step on batch i, as a function of i returning the loss; for
    adapters, the initial adapter weights go to ``adapter_file`` (PEFT names) so that peft
    starts from the same ones."""
    from safetensors.torch import save_file

    from llama_engine.training.batching import pack
    from llama_engine.training.losses import IGNORE_INDEX
    from llama_engine.training.loop import sft_batch_loss
    from llama_engine.training.tokenization import Example

    if method == "full":
        from llama_engine.training.full import FullFineTune
        model = FullFineTune(model_path)
    else:
        from llama_engine.training.lora import AdapterFineTune, LoRASpec
        spec = LoRASpec(ALL_LINEAR, LORA_RANK, LORA_ALPHA, use_dora=method == "dora")
        model = AdapterFineTune(model_path, spec, quantize_base=method == "qlora", seed=args.seed,
                                base_dtype=getattr(torch, args.dtype))
        save_file({k: v.detach().contiguous() for k, v in model.adapters.peft_state_dict().items()},
                  adapter_file)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=_lr(method))

    def step(batch: torch.Tensor) -> float:
        packed = pack([Example(row.tolist(), row[1:].tolist() + [IGNORE_INDEX]) for row in batch])
        loss = sft_batch_loss(model, packed)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    batches = _batches(model.config.vocab_size, args)
    return lambda i: step(batches[i])


def build_transformers(model_path: str, method: str, args: argparse.Namespace,
                       adapter_file: str, dtype: str = "float32"):
    """transformers' (+ peft, + bitsandbytes NF4 with double quantization for QLoRA) training
    step on batch i, as a function of i returning the loss. ``dtype`` bfloat16: the model
    loaded in bfloat16 (peft keeps its adapters float32) or bitsandbytes'
    ``bnb_4bit_compute_dtype=torch.bfloat16``."""
    import transformers
    torch_dtype = getattr(torch, dtype)
    kwargs = {"dtype": torch.float32 if method == "full" else torch_dtype}
    if method == "qlora":
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch_dtype)
    if os.path.isdir(model_path):
        model = transformers.AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    else:
        folder, name = os.path.split(model_path)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, **kwargs)
    if method != "full":
        import peft
        from safetensors.torch import load_file
        config = peft.LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                 target_modules=list(ALL_LINEAR), use_dora=method == "dora")
        if method == "qlora":  # the QLoRA recipe: gradient checkpointing on
            model = peft.prepare_model_for_kbit_training(model)
        model = peft.get_peft_model(model, config)
        peft.set_peft_model_state_dict(model, load_file(adapter_file))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=_lr(method))

    def step(batch: torch.Tensor) -> float:
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    batches = _batches(model.config.vocab_size, args)
    return lambda i: step(batches[i])


def write_hf_folder(gguf_path: str, folder: str) -> None:
    """The GGUF model dequantized by transformers and saved as an HF folder (safetensors)."""
    import transformers
    directory, name = os.path.split(gguf_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name,
                                                              dtype=torch.float32)
    # save_pretrained refuses a model loaded from GGUF; its dequantized weights are plain
    os.makedirs(folder, exist_ok=True)
    from safetensors.torch import save_model
    save_model(model, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):  # the GGUF's; the saved weights are dense
        del config.quantization_config
    config.save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name).save_pretrained(folder)


def peer_dtypes(method: str, args: argparse.Namespace) -> list[str]:
    """The precisions the peer runs a method at: ours, and float32 besides when ours is
    bfloat16 (the ratio is taken against the peer's faster one)."""
    if method == "full":
        return ["float32"]
    return list(dict.fromkeys([args.dtype, "float32"]))


def compare(model_path: str, method: str, args: argparse.Namespace) -> dict:
    """Our side and the peer's (at each of ``peer_dtypes``) of one method, each in a fresh
    process, interleaved in rounds."""
    import tempfile
    tokens = args.batch_size * args.seq_len
    with tempfile.TemporaryDirectory() as folder:
        adapter_file = os.path.join(folder, "initial_adapter.safetensors")
        peer_path = model_path
        if not os.path.isdir(model_path):
            # the peer starts from an HF folder of the dequantized model, as its users do:
            # transformers refuses a quantization_config with a GGUF file (bitsandbytes
            # quantizes from the folder), and in bfloat16 it would keep the GGUF's blocks
            # packed and cast around every matmul. Written in its own process so that the
            # peer's peak RSS is its own.
            peer_path = os.path.join(folder, "hf")
            in_child(write_hf_folder, model_path, peer_path)
        ours_side = _TrainingSide(build_ours, model_path, method, args, adapter_file)
        if ours_side.error:
            raise RuntimeError(f"[{method}] llama-engine failed: {ours_side.error}")
        peers = {dtype: _TrainingSide(build_transformers, peer_path, method, args, adapter_file, dtype)
                 for dtype in peer_dtypes(method, args)}
        for _ in range(args.rounds):
            ours_side.run_round(args)
            for side in peers.values():
                if not side.error:
                    side.run_round(args)
        ours = ours_side.finish(tokens)
        result = {"llama_engine": ours, "dtype": args.dtype if method != "full" else "float32",
                  "peers": {}}
        for dtype, side in peers.items():
            if side.error:
                side.close()
                result["peers"][dtype] = {"error": side.error}
                continue
            theirs = side.finish(tokens)
            theirs["max_loss_gap"] = max(abs(a - b) for a, b in zip(ours["losses"], theirs["losses"]))
            result["peers"][dtype] = theirs
    ran = {dtype: r for dtype, r in result["peers"].items() if "error" not in r}
    if ran:  # against the peer's faster precision
        best = max(ran, key=lambda dtype: ran[dtype]["tokens_per_s"])
        theirs = ran[best]
        ratios = (_round_times(theirs, args) / _round_times(ours, args)).sort().values
        result.update(transformers=theirs, peer_dtype=best, round_ratios=ratios.tolist(),
                      tokens_per_s_ratio=ratios.quantile(0.5).item(),
                      mean_tokens_per_s_ratio=ours["tokens_per_s"] / theirs["tokens_per_s"],
                      peak_rss_ratio=ours["peak_rss_bytes"] / theirs["peak_rss_bytes"],
                      max_loss_gap=theirs["max_loss_gap"])
    else:
        result["transformers"] = None
    return result


def _round_times(side: dict, args: argparse.Namespace) -> torch.Tensor:
    """A side's seconds per timed step, averaged per round: [rounds] float64."""
    return torch.tensor(side["step_s"], dtype=torch.float64).view(args.rounds, args.steps).mean(1)


def plot(results: dict, path: str) -> None:
    from llama_engine.training.command import finish_loss_plot
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 3.5), squeeze=False)
    for ax, (method, r) in zip(axes[0], results.items()):
        curves = [(f"llama_engine ({r['dtype']})", r["llama_engine"], "o-")]
        curves += [(f"transformers ({dtype})", peer, style) for (dtype, peer), style
                   in zip(r["peers"].items(), ("x--", "+:")) if "error" not in peer]
        for label, side, style in curves:
            ax.plot(range(len(side["losses"])), side["losses"], style, label=label)
        ax.set_title(method)
    finish_loss_plot(fig, list(axes[0]), path)


def run(args: argparse.Namespace) -> None:
    from benchmarks.throughput import cpu_model
    from llama_engine.loader import default_model_path

    model_path = args.model or default_model_path()
    if args.dtype is None:
        from llama_engine.kernels import bf16_matmul_is_fast
        args.dtype = "bfloat16" if bf16_matmul_is_fast() else "float32"
    methods = [m for m in args.methods.split(",") if m]
    for method in methods:
        if method not in METHODS:
            raise SystemExit(f"--methods: unknown {method!r}; known: {', '.join(METHODS)}")
    results = {}
    for method in methods:
        r = results[method] = compare(model_path, method, args)
        ours = r["llama_engine"]
        print(f"[{method}] llama-engine ({r['dtype']}) {ours['tokens_per_s']:8.1f} tok/s  "
              f"peak RSS {ours['peak_rss_bytes'] / 2**30:.2f} GiB")
        for dtype, theirs in r["peers"].items():
            if "error" in theirs:
                print(f"[{method}] transformers ({dtype}) could not run: {theirs['error']}")
                continue
            print(f"[{method}] transformers ({dtype}) {theirs['tokens_per_s']:8.1f} tok/s  "
                  f"peak RSS {theirs['peak_rss_bytes'] / 2**30:.2f} GiB; loss curves differ "
                  f"by at most {theirs['max_loss_gap']:.2e}")
        if r["transformers"] is not None:
            rounds = ", ".join(f"{x:.2f}" for x in r["round_ratios"])
            print(f"[{method}] ratio {r['tokens_per_s_ratio']:.2f}x tokens/s (median of rounds: "
                  f"{rounds}; of the means {r['mean_tokens_per_s_ratio']:.2f}x) against the peer's "
                  f"faster ({r['peer_dtype']}), {r['peak_rss_ratio']:.2f}x its peak RSS")
    if "lora" in results and "qlora" in results:
        print("QLoRA / LoRA peak RSS (ours): {:.2f}".format(
            results["qlora"]["llama_engine"]["peak_rss_bytes"]
            / results["lora"]["llama_engine"]["peak_rss_bytes"]))
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"{platform.python_implementation()} {platform.python_version()}",
        "command": "python benchmarks/training.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
            if v is not None and k not in ("func", "output_json", "plot")),
        "model": os.path.basename(model_path),
        "hyperparameters": {"optimizer": "AdamW", "lr_full": LR, "lr_adapters": ADAPTER_LR,
                            "lora_rank": LORA_RANK, "lora_alpha": LORA_ALPHA,
                            "lora_targets": list(ALL_LINEAR)},
        "recipes": {m: RECIPES[m] for m in methods},
        "methods": results,
    }
    if args.plot:
        plot(results, args.plot)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    run(parser.parse_args())
