"""A training run as data (what the worker process and ``llama-engine train`` both execute):
the objective, the base model, the data files, the options, and where checkpoints go."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from llama_engine.datasets import parse_rows
from llama_engine.errors import RecipeError
from llama_engine.datasets.source import Content
from llama_engine.training.distributed import (SINGLE_PROCESS, FSDPOptions, close_data_parallel,
                                               init_data_parallel, launched_by_torchrun)
from llama_engine.training.loop import (DPO, REWARD, REWARD_UNDER_FSDP, SFT, CheckpointFn,
                                        DPOParams, Item, LogFn, Trainer, TrainingOptions,
                                        TrainingResult)
from llama_engine.training.model import TrainableModel
from llama_engine.training.losses import IGNORE_INDEX
from llama_engine.training.tokenization import (DEFAULT_MAX_SEQ_LEN, PreferencePair, preference_pair,
                                               sft_example)

FULL = "full"
ADAPTER_ALGORITHMS = ("lora", "qlora", "dora")
# The frozen base's precision under adapters (Llama Stack's TrainingConfig.dtype): "bf16"
# holds it in bfloat16 and runs its matmuls and the adapters' A x there; the adapter weights,
# updates and gradients, norms, attention, loss and optimizer stay float32
# (``lora.AdapterFineTune``); "fp32" keeps all in float32.
BASE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}



@dataclass(frozen=True)
class DataSource:
    """A local data file (its suffix names the format) and its declared columns."""
    path: str
    columns: dict[str, str]

    def rows(self) -> list[dict]:
        path = Path(self.path)
        return parse_rows(Content(path.read_bytes(), path.name, ""), self.columns)


@dataclass(frozen=True)
class Recipe:
    objective: str                      # loop.SFT, DPO or REWARD
    model_path: str                     # GGUF file or HF folder
    train: DataSource
    output_dir: str
    options: TrainingOptions = TrainingOptions()
    validation: Optional[DataSource] = None
    algorithm: str = FULL
    algorithm_config: Optional[dict[str, Any]] = None
    adapter_path: Optional[str] = None  # a PEFT folder the adapter starts from (its config wins)
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN
    activation_checkpointing: Optional[bool] = None  # None: the algorithm's default (QLoRA: on)
    dtype: Optional[str] = None         # the frozen base's precision, BASE_DTYPES; None: default
    fsdp: bool = False                  # the spec's memory_efficient_fsdp_wrap
    fsdp_cpu_offload: bool = False      # the spec's fsdp_cpu_offload (needs fsdp)
    nproc_per_node: int = 1             # ranks torch's launcher starts for a job

    def __post_init__(self) -> None:
        """Every check that needs neither the model nor the data, so that a front end
        refuses a run before it starts any process. Raises RecipeError."""
        if self.dtype is not None and self.dtype not in BASE_DTYPES:
            raise RecipeError("dtype", f"{self.dtype!r} is not one of {', '.join(BASE_DTYPES)}")
        if self.dtype == "bf16" and self.algorithm == FULL:
            raise RecipeError("dtype", "bf16 holds a frozen base in bfloat16 under adapters "
                              "(lora, qlora, dora); full fine-tuning trains every weight in fp32")
        if self.dtype == "bf16" and self.fsdp:
            raise RecipeError("dtype", "bf16 is not offered under FSDP (`fsdp`); use fp32")
        if self.nproc_per_node < 1:
            raise RecipeError("nproc_per_node", f"must be at least 1, got {self.nproc_per_node}")
        if self.nproc_per_node > 1 and not self.fsdp:
            raise RecipeError("nproc_per_node", "several processes train only under FSDP (`fsdp`)")
        if self.fsdp_cpu_offload and not self.fsdp:
            # as the spec's TrainingConfig has it: an option of FSDP, not a way to ask for it
            raise RecipeError("fsdp_cpu_offload", "keeps FSDP's shards in host memory: it "
                              "needs FSDP (`fsdp`)")
        if self.objective == REWARD and self.fsdp:
            raise RecipeError("fsdp", REWARD_UNDER_FSDP)
        if self.algorithm not in (FULL,) + ADAPTER_ALGORITHMS:
            raise RecipeError("algorithm", f"unknown {self.algorithm!r}; known: "
                              f"{', '.join((FULL,) + ADAPTER_ALGORITHMS)}")
        if self.algorithm in ADAPTER_ALGORITHMS:
            lora_spec(self)  # the adapter config's own checks (rank, alpha, modules)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Recipe":
        options = dict(data["options"])
        options["dpo"] = DPOParams(**options["dpo"])
        validation = data.get("validation")
        return cls(**{**data, "train": DataSource(**data["train"]),
                      "validation": DataSource(**validation) if validation else None,
                      "options": TrainingOptions(**options)})


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class AdapterStart:
    """Where training from an existing PEFT adapter starts: its base and its algorithm."""
    model_path: str
    algorithm: str


def adapter_start(folder: str | Path) -> AdapterStart:
    """The base model (``base_model_name_or_path``, a local GGUF file or HF folder) and the
    algorithm (dora or lora) of a PEFT adapter folder. Raises ValueError naming the problem."""
    from llama_engine.training.lora import LoRASpec, read_adapter_config
    config = read_adapter_config(Path(folder))
    base = config.get("base_model_name_or_path")
    if not base or not os.path.exists(base):
        raise ValueError(f"{folder}: its base model {base!r} (base_model_name_or_path) is not a "
                         "path on this server")
    spec = LoRASpec.from_peft_config(config)
    return AdapterStart(str(base), "dora" if spec.use_dora else "lora")


def lora_spec(recipe: Recipe):
    """The recipe's adapter configuration (``lora.LoRASpec``): the starting adapter's, or
    the algorithm config's (rsLoRA scaling when it says ``use_rslora``). Raises RecipeError
    for a bad config, ValueError for an unreadable adapter folder."""
    from llama_engine.training.lora import LoRASpec, read_adapter_config
    if recipe.adapter_path:
        return LoRASpec.from_peft_config(read_adapter_config(Path(recipe.adapter_path)))
    config = recipe.algorithm_config or {}
    return LoRASpec.from_config(recipe.algorithm, config, bool(config.get("use_rslora")))


@dataclass(frozen=True)
class BasePrecision:
    """The precision a run holds its base model's weights in, and why: logged once at the
    start of each run (a job's logs, the CLI's output)."""
    dtype: torch.dtype
    reason: str

    @property
    def name(self) -> str:
        """bf16 or fp32 (BASE_DTYPES' names, the request's and the CLI's)."""
        return next(name for name, dtype in BASE_DTYPES.items() if dtype == self.dtype)

    def record(self) -> dict[str, str]:
        """The job-log record: {"event": "precision", "base_dtype": "bf16", "reason": ...}."""
        return {"event": "precision", "base_dtype": self.name, "reason": self.reason}

    def describe(self) -> str:
        return f"precision: base model in {self.name} ({self.reason})"


def base_precision(recipe: Recipe, device: str) -> BasePrecision:
    """The base's precision: the recipe's dtype, else bfloat16 for adapters (single process)
    where the device multiplies it natively (a GPU, or a CPU with AMX / AVX512-BF16), as
    torchtune's and Llama Stack's default, else float32 (full fine-tuning, FSDP, a CPU
    that would emulate bfloat16)."""
    if recipe.dtype is not None:
        return BasePrecision(BASE_DTYPES[recipe.dtype], "as requested")
    if recipe.algorithm == FULL:
        return BasePrecision(torch.float32, "full fine-tuning trains every weight in fp32")
    if recipe.fsdp:
        return BasePrecision(torch.float32, "FSDP shards an fp32 base (bf16 is not offered "
                             "under FSDP)")
    if device == "cuda":
        native, unit = torch.cuda.is_bf16_supported(), "this GPU"
    else:
        from llama_engine.kernels import bf16_matmul_is_fast
        native, unit = bf16_matmul_is_fast(), "this CPU (AMX / AVX512-BF16)"
    if native:
        return BasePrecision(torch.bfloat16, f"the default for adapters in one process: {unit} "
                             "multiplies bfloat16 natively; adapter weights, norms, attention, "
                             "loss and optimizer stay fp32")
    return BasePrecision(torch.float32, f"the default for adapters where {unit} does not "
                         "multiply bfloat16 natively (emulated bfloat16 is slower than fp32)")


def build_model(recipe: Recipe, base_dtype: torch.dtype) -> TrainableModel:
    """The TrainableModel for the recipe's algorithm (checked by ``Recipe``): full
    fine-tuning (float32), or adapters over a ``base_dtype`` base (LoRA, DoRA; QLoRA over
    an NF4 base that dequantizes to it)."""
    device = default_device()
    if recipe.algorithm == FULL:
        from llama_engine.training.full import FullFineTune
        return FullFineTune(recipe.model_path, keep_reference=recipe.objective == DPO,
                            activation_checkpointing=bool(recipe.activation_checkpointing),
                            device=device)
    from llama_engine.training.lora import QLORA, AdapterFineTune
    model = AdapterFineTune(recipe.model_path, lora_spec(recipe),
                            quantize_base=recipe.algorithm == QLORA,
                            activation_checkpointing=recipe.activation_checkpointing,
                            seed=recipe.options.seed, device=device, base_dtype=base_dtype)
    if recipe.adapter_path:
        model.load_checkpoint(Path(recipe.adapter_path))
    return model


def load_items(tokenizer: Any, source: DataSource, objective: str, max_seq_len: int) -> list[Item]:
    """Tokenized examples (SFT) or preference pairs (DPO, reward) of ``source``'s rows,
    without those that ``max_seq_len`` cut before any token with a loss (their loss would be
    0 / 0). Raises RecipeError naming ``max_seq_len`` when that leaves none."""
    if objective == SFT:
        items = [sft_example(tokenizer, row, max_seq_len) for row in source.rows()]
    else:
        items = [preference_pair(tokenizer, row, max_seq_len) for row in source.rows()]
    kept = [item for item in items if _has_loss_terms(item)]
    if items and not kept:
        raise RecipeError("max_seq_len", f"{max_seq_len} tokens leave no example a token to "
                          f"learn (all {len(items)} are cut inside the prompt); raise it")
    return kept


def _has_loss_terms(item: Item) -> bool:
    examples = (item.chosen, item.rejected) if isinstance(item, PreferencePair) else (item,)
    return all(any(label != IGNORE_INDEX for label in e.labels) for e in examples)


def run(recipe: Recipe, on_log: LogFn = lambda record: None,
        on_checkpoint: CheckpointFn = lambda step, path: None,
        on_start: Callable[[Trainer, int, BasePrecision], None] = lambda *started: None
        ) -> TrainingResult:
    """Build the model, tokenize the data, train (resuming from the latest checkpoint under
    ``output_dir`` if any). ``on_start`` gets the trainer, the number of steps and the
    base's precision (to log) on every rank.

    Under FSDP (the recipe asks for it, or this process is one rank of a
    ``torch.distributed.run`` launch) this process joins the process group first and
    trains its share; rank 0 alone gets ``on_log`` and ``on_checkpoint``."""
    distributed = recipe.fsdp or launched_by_torchrun()
    group = init_data_parallel(default_device()) if distributed else SINGLE_PROCESS
    try:
        precision = base_precision(recipe, default_device())
        model = build_model(recipe, precision.dtype)
        tokenizer = model.tokenizer
        items = load_items(tokenizer, recipe.train, recipe.objective, recipe.max_seq_len)
        validation = (load_items(tokenizer, recipe.validation, recipe.objective, recipe.max_seq_len)
                      if recipe.validation else [])
        trainer = Trainer(model, recipe.options, Path(recipe.output_dir), on_log, on_checkpoint,
                          group, FSDPOptions(recipe.fsdp_cpu_offload) if distributed else None)
        on_start(trainer, recipe.options.total_steps(len(items)), precision)
        return trainer.train(items, validation)
    finally:
        if distributed:
            close_data_parallel()
