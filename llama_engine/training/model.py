"""The interface between the training loop and a model being trained.

Full fine-tuning implements it in ``full.py``. LoRA, QLoRA and DoRA implement it over the
model's adapter seam: ``trainable_parameters`` are the adapters, ``reference()`` disables
them, and ``save_checkpoint`` writes a PEFT adapter folder."""
from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from llama_engine.config import ModelConfig
from llama_engine.training.batching import PackedBatch
from llama_engine.training.distributed import DataParallel, FSDPOptions


@runtime_checkable
class TrainableModel(Protocol):
    config: ModelConfig
    device: torch.device  # where batches go
    tokenizer: Any        # llama_engine.tokenizer.Tokenizer of the base model

    def hidden_states(self, batch: PackedBatch) -> torch.Tensor:
        """Final-norm hidden states [T, hidden_size] of the packed batch, each sequence
        attending causally within itself; differentiable w.r.t. the trainable parameters."""
        ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[T, vocab_size] float32 logits from ``hidden_states``' output."""
        ...

    def output_weight(self) -> torch.Tensor | None:
        """The output head's weight [vocab_size, hidden_size] when ``compute_logits`` is
        exactly ``hidden @ weight^T`` (a dense head with no adapter), else None. The SFT
        loss then runs through ``losses.linear_cross_entropy``, never holding all logits."""
        ...

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters the optimizer updates (requires_grad set), in a fixed order."""
        ...

    def shard(self, group: DataParallel, options: FSDPOptions) -> None:
        """Apply FSDP over the ranks of ``group`` (``distributed.shard_llama``); after it,
        ``trainable_parameters`` are DTensor shards and ``fsdp_root`` the root module."""
        ...

    @property
    def fsdp_root(self) -> torch.nn.Module | None:
        """The FSDP root module once sharded (what the optimizer state is keyed by), else None."""
        ...

    def full_weights(self) -> AbstractContextManager[None]:
        """Inside, the parameters are whole on every rank (a collective when sharded), for
        ``save_checkpoint``."""
        ...

    def reference(self) -> AbstractContextManager[None]:
        """Inside this context the model computes the frozen reference policy of DPO (the
        starting weights: adapters disabled, or a frozen copy for full fine-tuning)."""
        ...

    def save_checkpoint(self, folder: Path, score_head: torch.Tensor | None = None) -> None:
        """Write the trained weights as a servable artifact in ``folder`` (created): an HF
        folder for full fine-tuning, a PEFT adapter folder for adapters. ``score_head``
        [1, hidden_size] (reward models) is saved as ``score.weight``, in the layout of
        HF's ``LlamaForSequenceClassification``."""
        ...

    def load_checkpoint(self, folder: Path) -> None:
        """Load the trainable weights back from a folder ``save_checkpoint`` wrote (to resume
        an interrupted job)."""
        ...
