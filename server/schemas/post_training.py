"""Request and response models of the spec's Datasets and PostTraining APIs
(llama_stack_draft_spec.py, post_training_types). Every field is required, as in the spec;
the bounds below turn nonsense values into 400s that name the field."""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Any, Literal, Optional, Union

from pydantic import Field, model_validator

from server.schemas.common import StrictModel
from server.schemas.llama_stack import URL

ColumnType = Literal["dialog", "text", "media", "number", "json"]
# torchtune's names for the attention projections, and HF's o_proj for the output one.
LoraAttnModule = Literal["q_proj", "k_proj", "v_proj", "output_proj", "o_proj"]

DATASET_COLUMNS_DESCRIPTION = (
    "Column name -> type. The trainers read: SFT, `dialog` (a list of messages {role, content}; "
    "only assistant turns carry loss) or `text` (plain language modelling); DPO and reward "
    "modelling, `prompt` (dialog or text), `chosen` and `rejected` (text: the assistant's "
    "preferred and dispreferred replies). Checked against every row on create."
)
CONTENT_URL_DESCRIPTION = (
    "file:// (a path on the server), data: (base64 or percent-encoded) or http(s):// (fetched "
    "once, with a size limit and a timeout). JSONL, a JSON array of objects, CSV (dialog and "
    "json cells as JSON text) or Parquet; the format comes from the suffix, the MIME type or "
    "the bytes."
)


class Dataset(StrictModel):
    """Dataset to be used for training or evaluating language models. In a training request,
    `metadata.dataset_id` names a dataset registered with /datasets/create instead of
    fetching `content_url` again."""

    columns: dict[str, ColumnType] = Field(description=DATASET_COLUMNS_DESCRIPTION)
    content_url: URL = Field(description=CONTENT_URL_DESCRIPTION)
    metadata: dict[str, Any]


class CreateDatasetRequest(StrictModel):
    """Request to create a dataset."""

    uuid: str = Field(min_length=1)
    dataset: Dataset


class DatasetQuery(StrictModel):
    dataset_id: str = Field(min_length=1)


class JobQuery(StrictModel):
    job_uuid: str = Field(min_length=1)


class FinetuningAlgorithm(str, Enum):
    full = "full"
    lora = "lora"
    qlora = "qlora"
    dora = "dora"


class LoraFinetuningConfig(StrictModel):
    lora_attn_modules: list[LoraAttnModule]
    apply_lora_to_mlp: bool
    apply_lora_to_output: bool
    rank: int = Field(gt=0)
    alpha: int = Field(gt=0)

    @model_validator(mode="after")
    def _adapts_something(self) -> "LoraFinetuningConfig":
        if not (self.lora_attn_modules or self.apply_lora_to_mlp or self.apply_lora_to_output):
            raise ValueError("lora_attn_modules: empty, with apply_lora_to_mlp and "
                             "apply_lora_to_output false: no module to adapt")
        return self


class QLoraFinetuningConfig(LoraFinetuningConfig):
    pass


class DoraFinetuningConfig(LoraFinetuningConfig):
    pass


class OptimizerConfig(StrictModel):
    """`lr` rises linearly over the warm-up steps, then follows a cosine down to `lr_min`."""

    optimizer_type: Literal["adam", "adamw", "sgd"]
    lr: float = Field(gt=0)
    lr_min: float = Field(ge=0)
    weight_decay: float = Field(ge=0)

    @model_validator(mode="after")
    def _lr_min_below_lr(self) -> "OptimizerConfig":
        if self.lr_min > self.lr:
            raise ValueError(f"lr_min ({self.lr_min}) must not exceed lr ({self.lr})")
        return self


class TrainingConfig(StrictModel):
    n_epochs: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    shuffle: bool
    n_iters: int = Field(gt=0, description="A cap on optimizer steps over all epochs.")
    enable_activation_checkpointing: bool
    memory_efficient_fsdp_wrap: bool
    fsdp_cpu_offload: bool
    dtype: Optional[Literal["bf16", "fp32"]] = Field(
        default=None, description="The frozen base's precision under lora, qlora and dora: "
        "bf16 holds it in bfloat16 and runs its matmuls and the adapters' A x there (adapter "
        "weights, updates and gradients, norms, attention, loss and optimizer stay fp32); fp32 keeps everything in float32. Default: bf16 "
        "where the device multiplies bfloat16 natively (GPU, CPU with AMX or AVX512-BF16) "
        "and training runs in one process, else fp32. Full fine-tuning is fp32.")


class DPOAlignmentConfig(StrictModel):
    """DPO (Rafailov et al. 2023) with the variants TRL names: `reward_scale` is beta;
    `reward_clip` clips each implicit reward to [-reward_clip, reward_clip] (0: no clip);
    `epsilon` is the label-smoothing of conservative DPO (cDPO, Mitchell 2023); `gamma` a
    target reward margin subtracted inside the sigmoid (as SimPO's gamma)."""

    reward_scale: float = Field(gt=0)
    reward_clip: float = Field(ge=0)
    epsilon: float = Field(ge=0, lt=0.5)
    gamma: float = Field(ge=0)


HYPERPARAM_DESCRIPTION = (
    "Optional: seed (int, default 0), warmup_steps (int, default 5% of the steps), "
    "max_seq_len (tokens per row, default 2048), max_grad_norm (clip, default none).")
LOGGER_DESCRIPTION = "Optional: checkpoint_every_n_steps (default: once per epoch)."


class TrainingRequest(StrictModel):
    """The fields both training requests share."""

    job_uuid: str = Field(min_length=1)
    dataset: Dataset
    validation_dataset: Dataset
    optimizer_config: OptimizerConfig
    training_config: TrainingConfig
    hyperparam_search_config: dict[str, Any] = Field(description=HYPERPARAM_DESCRIPTION)
    logger_config: dict[str, Any] = Field(description=LOGGER_DESCRIPTION)


class PostTrainingSFTRequest(TrainingRequest):
    """Request to finetune a model."""

    model: str = Field(description="A served model id or an alias of it (e.g. llama3_8b).")
    algorithm: FinetuningAlgorithm = Field(strict=False)  # an enum: its JSON form is a string
    algorithm_config: Union[LoraFinetuningConfig, QLoraFinetuningConfig, DoraFinetuningConfig]


class PostTrainingRLHFRequest(TrainingRequest):
    """Request to finetune a model with preferences (DPO)."""

    finetuned_model: URL = Field(description="file:// URL of an HF model folder to start from.")
    algorithm: Literal["dpo"]
    algorithm_config: DPOAlignmentConfig


class PostTrainingJob(StrictModel):
    """A queued job (Llama Stack's answer to a training request; the draft spec returns
    nothing): its status, logs and artifacts are read by this uuid."""

    job_uuid: str


class PostTrainingJobStatus(str, Enum):
    running = "running"
    completed = "completed"
    failed = "failed"
    scheduled = "scheduled"


class Checkpoint(StrictModel):
    iters: int
    path: URL


class PostTrainingJobStatusResponse(StrictModel):
    """Status of a finetuning job."""

    job_uuid: str
    status: PostTrainingJobStatus = Field(strict=False)  # an enum: its JSON form is a string
    scheduled_at: Optional[datetime] = None
    started_at: Optional[datetime] = None
    completed_at: Optional[datetime] = None
    resources_allocated: Optional[dict[str, Any]] = None
    checkpoints: list[Checkpoint] = Field(default_factory=list)


class PostTrainingJobArtifactsResponse(StrictModel):
    """Artifacts of a finetuning job."""

    job_uuid: str
    checkpoints: list[Checkpoint] = Field(default_factory=list)


class PostTrainingJobLogStream(StrictModel):
    """Stream of logs from a finetuning job: each event carries new log lines, JSON records:
    lifecycle events ({"event": "scheduled"}, "running"), the precision the run chose at its
    start ({"event": "precision", "base_dtype": "bf16" or "fp32", "reason"}), one record per
    optimizer step (step, epoch, loss, lr, grad_norm, tokens_per_s; for DPO also
    rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins), then the job's
    end."""

    job_uuid: str
    log_lines: list[str]
