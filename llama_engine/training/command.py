"""``llama-engine train sft|dpo|reward --dataset PATH ...``: one training run in this process,
with a progress bar, checkpoints under --output and a loss-curve PNG beside them.
``--nproc-per-node N`` (N > 1) trains under FSDP on N ranks that torch's launcher starts, each
running this same command (so does ``torchrun ... -m llama_engine.cli train ...``)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from llama_engine.datasets import check_columns
from llama_engine.datasets.columns import PREFERENCE, SFT as SFT_TASK, check_trainer_columns
from llama_engine.errors import RecipeError
from llama_engine.training.distributed import (launched_by_torchrun, nproc_per_node_arg,
                                               run_launcher)
from llama_engine.training.loop import OBJECTIVES, SFT, DPOParams, TrainingOptions
from llama_engine.training.optim import OPTIMIZERS
from llama_engine.training.recipe import (ADAPTER_ALGORITHMS, FULL, BasePrecision, DataSource,
                                          Recipe, run)
from llama_engine.training.tokenization import DEFAULT_MAX_SEQ_LEN

LOSS_CURVE_FILE = "loss_curve.png"
METRICS_FILE = "metrics.jsonl"
# The recipe's options whose flag is not "--" + the option's name with dashes (cli_flag).
FLAGS = {"model_path": "--model", "train": "--dataset", "validation": "--validation-dataset",
         "output_dir": "--output", "n_epochs": "--epochs", "shuffle": "--no-shuffle",
         "optimizer_type": "--optimizer", "checkpoint_every_n_steps": "--checkpoint-every",
         "lora_attn_modules": "--lora-modules", "apply_lora_to_mlp": "--lora-mlp",
         "apply_lora_to_output": "--lora-output", "use_rslora": "--rslora",
         "fsdp": "--fsdp / --nproc-per-node"}


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("objective", choices=OBJECTIVES)
    parser.add_argument("--dataset", required=True,
                        help="JSONL, JSON, CSV or Parquet file; sft reads a 'dialog' or 'text' "
                             "column, dpo and reward 'prompt' (dialog or text), 'chosen', 'rejected'")
    parser.add_argument("--validation-dataset", default=None)
    parser.add_argument("--model", default=None, help="GGUF file or HF folder (default: SmolLM2)")
    parser.add_argument("--output", required=True, help="checkpoint folder (resumed if it has some)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--n-iters", type=int, default=None, help="cap on optimizer steps")
    parser.add_argument("--no-shuffle", action="store_true")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--lr-min", type=float, default=0.0)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--warmup-steps", type=int, default=None)
    parser.add_argument("--max-grad-norm", type=float, default=None)
    parser.add_argument("--max-seq-len", type=int, default=DEFAULT_MAX_SEQ_LEN)
    parser.add_argument("--checkpoint-every", type=int, default=None,
                        help="steps between checkpoints (default: each epoch)")
    parser.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction,
                        default=None, help="recompute each decoder layer in the backward pass "
                        "(default: on for qlora, off otherwise)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                        help="the frozen base's precision under lora/qlora/dora (default: bf16 "
                             "where the device multiplies bfloat16 natively, else fp32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--algorithm", choices=(FULL,) + ADAPTER_ALGORITHMS, default=FULL,
                        help="full fine-tuning, or an adapter: lora, qlora (NF4 base), dora")
    parser.add_argument("--rank", type=int, default=8, help="adapter rank r")
    parser.add_argument("--alpha", type=float, default=16.0, help="adapter alpha")
    parser.add_argument("--lora-modules", default="q_proj,v_proj",
                        help="comma-separated attention projections to adapt (q_proj, k_proj, "
                             "v_proj, o_proj)")
    parser.add_argument("--lora-mlp", action="store_true", help="adapt gate/up/down_proj too")
    parser.add_argument("--lora-output", action="store_true", help="adapt the output head")
    parser.add_argument("--rslora", action="store_true", help="scale alpha / sqrt(r) (rsLoRA)")
    parser.add_argument("--beta", type=float, default=0.1, help="DPO reward_scale")
    parser.add_argument("--reward-clip", type=float, default=0.0, help="DPO; 0: no clip")
    parser.add_argument("--label-smoothing", type=float, default=0.0, help="DPO epsilon (cDPO)")
    parser.add_argument("--gamma", type=float, default=0.0, help="DPO target reward margin")
    parser.add_argument("--nproc-per-node", type=nproc_per_node_arg, default=1, metavar="N",
                        help="train under FSDP on N processes started by torch's launcher "
                             "(torch.distributed.run; gloo on the CPU, NCCL on GPUs)")
    parser.add_argument("--fsdp", action="store_true",
                        help="shard with FSDP even in one process (implied by --nproc-per-node > 1)")
    parser.add_argument("--fsdp-cpu-offload", action="store_true",
                        help="FSDP keeps parameter, gradient and optimizer shards in host memory "
                             "(with --fsdp or --nproc-per-node N > 1; alone it is refused)")


def cli_flag(option: str) -> str:
    """The flag that sets a recipe option (a RecipeError's field): max_seq_len is
    --max-seq-len, n_epochs --epochs."""
    return FLAGS.get(option, "--" + option.replace("_", "-"))


def _source(path: str, objective: str) -> DataSource:
    """The file's columns as the trainer reads them, checked against every row."""
    source = DataSource(str(Path(path).resolve()), {})
    rows = source.rows()
    first = rows[0] if rows else {}
    if objective == SFT:
        columns = {"dialog": "dialog"} if "dialog" in first else {"text": "text"}
    else:
        columns = {"prompt": "dialog" if isinstance(first.get("prompt"), list) else "text",
                   "chosen": "text", "rejected": "text"}
    check_trainer_columns(columns, SFT_TASK if objective == SFT else PREFERENCE)
    check_columns(rows, columns)
    return DataSource(source.path, columns)


def _algorithm_config(args: argparse.Namespace) -> dict | None:
    """The spec's LoraFinetuningConfig fields (and use_rslora) from the adapter flags."""
    if args.algorithm == FULL:
        return None
    return {"lora_attn_modules": [m for m in args.lora_modules.split(",") if m],
            "apply_lora_to_mlp": args.lora_mlp, "apply_lora_to_output": args.lora_output,
            "rank": args.rank, "alpha": args.alpha, "use_rslora": args.rslora}


def save_loss_curve(records: list[dict], path: Path) -> None:
    """Training loss per step (and validation loss where measured), as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r for r in records if "loss" in r]
    ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], label="train")
    validation = [r for r in records if "validation_loss" in r]
    if validation:
        ax.plot([r["step"] for r in validation], [r["validation_loss"] for r in validation],
                "o-", label="validation")
    finish_loss_plot(fig, [ax], path)


def finish_loss_plot(fig, axes: list, path: Path | str) -> None:
    """Label the loss-per-step axes, save the matplotlib figure as a PNG at ``path``, close it."""
    import matplotlib.pyplot as plt
    for ax in axes:
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _recipe(args: argparse.Namespace) -> Recipe:
    """The run the flags describe, every check that needs no model done (the data's
    columns against every row, the options together, the adapter config). Raises
    ValueError naming what is wrong."""
    from llama_engine.loader import default_model_path
    options = TrainingOptions(
        objective=args.objective, n_epochs=args.epochs, batch_size=args.batch_size,
        shuffle=not args.no_shuffle, n_iters=args.n_iters, optimizer_type=args.optimizer,
        lr=args.lr, lr_min=args.lr_min, weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps, max_grad_norm=args.max_grad_norm, seed=args.seed,
        checkpoint_every_n_steps=args.checkpoint_every,
        dpo=DPOParams(args.beta, args.reward_clip, args.label_smoothing, args.gamma))
    return Recipe(
        objective=args.objective, model_path=args.model or default_model_path(),
        train=_source(args.dataset, args.objective), output_dir=args.output, options=options,
        validation=_source(args.validation_dataset, args.objective) if args.validation_dataset else None,
        algorithm=args.algorithm, algorithm_config=_algorithm_config(args),
        max_seq_len=args.max_seq_len,
        activation_checkpointing=args.activation_checkpointing, dtype=args.dtype,
        fsdp=args.fsdp or args.nproc_per_node > 1,
        fsdp_cpu_offload=args.fsdp_cpu_offload, nproc_per_node=args.nproc_per_node)


def run_train(args: argparse.Namespace) -> None:
    """Train as the flags say (``add_train_arguments``). Raises ValueError naming the flag
    at fault for a refused run."""
    try:
        _train(args)
    except RecipeError as e:  # the recipe's names for options are the HTTP API's; here, flags
        raise ValueError(e.render(cli_flag)) from None


def _train(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    recipe = _recipe(args)  # a refused run is refused here, before any rank starts
    if args.nproc_per_node > 1 and not launched_by_torchrun():
        # each rank runs this same command line; the launcher's reason is the run's error
        reason = run_launcher(args.nproc_per_node, "llama_engine.cli", args.argv)
        if reason is not None:
            print(f"llama-engine: error: {reason}", file=sys.stderr)
            sys.exit(1)
        return
    writer = int(os.environ.get("RANK", "0")) == 0

    output = Path(args.output)
    created = not output.exists()
    output.mkdir(parents=True, exist_ok=True)
    bar = tqdm(unit="step", dynamic_ncols=True, disable=True)  # shown once training starts
    records: list[dict] = []

    def on_start(trainer, total: int, precision: BasePrecision) -> None:
        nonlocal bar  # not before: a refused model or dataset prints its error alone
        if writer:
            print(precision.describe(), flush=True)
        bar = tqdm(total=total, unit="step", dynamic_ncols=True, disable=not writer)

    def on_log(record: dict) -> None:
        records.append(record)
        with open(output / METRICS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
        if "loss" in record:
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                            tok_s=f"{record['tokens_per_s']:.0f}")

    def on_checkpoint(step: int, folder: Path) -> None:
        bar.write(f"checkpoint {folder}")

    try:
        result = run(recipe, on_log, on_checkpoint, on_start)
    except BaseException:
        if created and writer and not any(output.iterdir()):  # refused before it wrote
            output.rmdir()
        raise
    finally:
        bar.close()
    if not writer:  # rank 0 reports
        return
    if records:
        save_loss_curve(records, output / LOSS_CURVE_FILE)
    last = result.checkpoints[-1][1] if result.checkpoints else None
    print(f"done: {len([r for r in records if 'loss' in r])} steps; final checkpoint {last}; "
          f"loss curve {output / LOSS_CURVE_FILE}")
