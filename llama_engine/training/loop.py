"""The training loop, written against ``TrainableModel``: SFT, DPO and reward modelling over
packed batches; epochs, shuffling, an n_iters cap, a linear warm-up then cosine lr,
checkpoints every N steps that a restarted job resumes from, and one log record per step."""
from __future__ import annotations

import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from llama_engine.training.batching import PackedBatch, batches_per_epoch, epoch_batches, pack
from llama_engine.training.checkpoint import TRAINING_STATE_FILE
from llama_engine.training.losses import (IGNORE_INDEX, bradley_terry_loss, dpo_loss,
                                          linear_cross_entropy, sequence_logprobs, sft_loss)
from llama_engine.training.model import TrainableModel
from llama_engine.training.optim import build_optimizer, build_scheduler, default_warmup_steps
from llama_engine.training.tokenization import Example, PreferencePair

SFT, DPO, REWARD = "sft", "dpo", "reward"
OBJECTIVES = (SFT, DPO, REWARD)
CHECKPOINT_DIR = re.compile(r"^step-(\d+)$")
SCORE_HEAD_INIT_STD = 0.02  # transformers' initializer_range for Llama
Item = Union[Example, PreferencePair]
LogFn = Callable[[dict], None]
CheckpointFn = Callable[[int, Path], None]


@dataclass(frozen=True)
class DPOParams:
    """See ``losses.dpo_loss``."""
    beta: float = 0.1
    reward_clip: float = 0.0
    label_smoothing: float = 0.0
    gamma: float = 0.0


@dataclass(frozen=True)
class TrainingOptions:
    objective: str = SFT
    n_epochs: int = 1
    batch_size: int = 8
    shuffle: bool = True
    n_iters: Optional[int] = None       # cap on optimizer steps; None: all epochs
    optimizer_type: str = "adamw"
    lr: float = 2e-5
    lr_min: float = 0.0
    weight_decay: float = 0.0
    warmup_steps: Optional[int] = None  # None: DEFAULT_WARMUP_FRACTION of the steps
    max_grad_norm: Optional[float] = None
    seed: int = 0
    checkpoint_every_n_steps: Optional[int] = None  # None: at each epoch's end (and the last step)
    dpo: DPOParams = DPOParams()

    def total_steps(self, num_items: int) -> int:
        steps = self.n_epochs * batches_per_epoch(num_items, self.batch_size)
        return min(steps, self.n_iters) if self.n_iters else steps


@dataclass(frozen=True)
class TrainingResult:
    checkpoints: list[tuple[int, Path]]
    records: list[dict]


def latest_checkpoint(output_dir: Path) -> tuple[int, Path] | None:
    """The complete checkpoint with the most steps in ``output_dir`` (a folder holding the
    training state; ``.partial`` folders are incomplete writes)."""
    found = []
    if output_dir.is_dir():
        for entry in output_dir.iterdir():
            match = CHECKPOINT_DIR.match(entry.name)
            if match and (entry / TRAINING_STATE_FILE).exists():
                found.append((int(match.group(1)), entry))
    return max(found) if found else None


def _label_rows(batch: PackedBatch) -> torch.Tensor:
    return (batch.labels != IGNORE_INDEX).nonzero().squeeze(-1)


def sft_batch_loss(model: TrainableModel, batch: PackedBatch) -> torch.Tensor:
    """Mean next-token cross-entropy over the batch's label tokens: the hidden states of
    those tokens only, then the head and the loss fused in chunks where the head is a plain
    matrix (``losses.linear_cross_entropy``: no [T, vocab] logits held), else the logits."""
    rows = _label_rows(batch)
    hidden, labels = model.hidden_states(batch)[rows], batch.labels[rows]
    weight = model.output_weight()
    if weight is not None:
        return linear_cross_entropy(hidden, weight, labels)
    return sft_loss(model.compute_logits(hidden), labels)


def _reply_logprobs(model: TrainableModel, batch: PackedBatch) -> torch.Tensor:
    rows = _label_rows(batch)
    logits = model.compute_logits(model.hidden_states(batch)[rows])
    return sequence_logprobs(logits, batch.labels[rows], batch.seq_index[rows], batch.num_seqs)


class Trainer:
    """Runs ``options`` over ``items`` (Examples for SFT, PreferencePairs for DPO and reward
    modelling), writing checkpoints under ``output_dir``/step-N."""

    def __init__(self, model: TrainableModel, options: TrainingOptions, output_dir: Path,
                 on_log: LogFn = lambda record: None,
                 on_checkpoint: CheckpointFn = lambda step, path: None):
        if options.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {options.objective!r}")
        self.model, self.options, self.output_dir = model, options, Path(output_dir)
        self.on_log, self.on_checkpoint = on_log, on_checkpoint
        self.score_head: torch.nn.Parameter | None = None
        if options.objective == REWARD:
            generator = torch.Generator().manual_seed(options.seed)
            weight = torch.randn(1, model.config.hidden_size, generator=generator)
            self.score_head = torch.nn.Parameter((weight * SCORE_HEAD_INIT_STD).to(model.device))
        params = model.trainable_parameters() + ([self.score_head] if self.score_head is not None else [])
        self.params = params
        self.optimizer = build_optimizer(params, options.optimizer_type, options.lr,
                                         options.weight_decay)

    # ---- one step per objective ---------------------------------------------------------
    def _sft_step(self, examples: Sequence[Example]) -> tuple[torch.Tensor, dict, int]:
        batch = pack(examples).to(self.model.device)
        return sft_batch_loss(self.model, batch), {}, batch.num_tokens

    def _pair_batch(self, pairs: Sequence[PreferencePair]) -> PackedBatch:
        return pack([p.chosen for p in pairs] + [p.rejected for p in pairs]).to(self.model.device)

    def _dpo_step(self, pairs: Sequence[PreferencePair]) -> tuple[torch.Tensor, dict, int]:
        batch, n = self._pair_batch(pairs), len(pairs)
        with torch.no_grad(), self.model.reference():
            reference = _reply_logprobs(self.model, batch)
        policy = _reply_logprobs(self.model, batch)
        d = self.options.dpo
        out = dpo_loss(policy[:n], policy[n:], reference[:n], reference[n:], d.beta,
                       d.reward_clip, d.label_smoothing, d.gamma)
        metrics = {"rewards/chosen": out.chosen_rewards.mean().item(),
                   "rewards/rejected": out.rejected_rewards.mean().item(),
                   "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).float().mean().item(),
                   "rewards/margins": (out.chosen_rewards - out.rejected_rewards).mean().item()}
        return out.loss, metrics, batch.num_tokens

    def reward_scores(self, batch: PackedBatch) -> torch.Tensor:
        """[B] scalar rewards: the score head on each sequence's last hidden state."""
        hidden = self.model.hidden_states(batch)[batch.last_token_index]
        return (hidden @ self.score_head.t()).squeeze(-1)

    def _reward_step(self, pairs: Sequence[PreferencePair]) -> tuple[torch.Tensor, dict, int]:
        batch, n = self._pair_batch(pairs), len(pairs)
        scores = self.reward_scores(batch)
        metrics = {"accuracy": (scores[:n] > scores[n:]).float().mean().item()}
        return bradley_terry_loss(scores[:n], scores[n:]), metrics, batch.num_tokens

    def loss(self, items: Sequence[Item]) -> tuple[torch.Tensor, dict, int]:
        """(loss, extra metrics, tokens) of one batch under the objective."""
        step = {SFT: self._sft_step, DPO: self._dpo_step, REWARD: self._reward_step}
        return step[self.options.objective](items)

    # ---- checkpoints ----------------------------------------------------------------------
    def _save(self, step: int, epoch: int, scheduler) -> Path:
        final = self.output_dir / f"step-{step}"
        partial = self.output_dir / f"step-{step}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        self.model.save_checkpoint(partial, self.score_head.detach() if self.score_head is not None else None)
        torch.save({"step": step, "epoch": epoch, "optimizer": self.optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "score_head": self.score_head.detach() if self.score_head is not None else None},
                   partial / TRAINING_STATE_FILE)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)  # a step-N folder is complete or absent
        # Only the newest training state is needed to resume (the optimizer's is twice the
        # model); every checkpoint keeps its weights, the job's artifacts.
        for entry in self.output_dir.iterdir():
            if entry != final and CHECKPOINT_DIR.match(entry.name):
                (entry / TRAINING_STATE_FILE).unlink(missing_ok=True)
        self.on_checkpoint(step, final)
        return final

    def _resume(self, scheduler) -> int:
        found = latest_checkpoint(self.output_dir)
        if found is None:
            return 0
        step, folder = found
        state = torch.load(folder / TRAINING_STATE_FILE, map_location=self.model.device,
                           weights_only=False)
        self.model.load_checkpoint(folder)
        self.optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if self.score_head is not None:
            with torch.no_grad():
                self.score_head.copy_(state["score_head"])
        return step

    def evaluate(self, items: Sequence[Item]) -> float:
        """Mean batch loss over ``items`` (no gradient)."""
        losses = []
        with torch.no_grad():
            for start in range(0, len(items), self.options.batch_size):
                losses.append(self.loss(items[start:start + self.options.batch_size])[0].item())
        return sum(losses) / len(losses)

    # ---- the loop -------------------------------------------------------------------------
    def train(self, items: Sequence[Item], validation: Sequence[Item] = ()) -> TrainingResult:
        """Train, resuming from the latest checkpoint under output_dir if there is one.
        Returns the checkpoints written by this call and the step records."""
        o = self.options
        if not items:
            raise ValueError("no training rows")
        total = o.total_steps(len(items))
        warmup = o.warmup_steps if o.warmup_steps is not None else default_warmup_steps(total)
        scheduler = build_scheduler(self.optimizer, o.lr, o.lr_min, warmup, total)
        step = self._resume(scheduler)
        per_epoch = batches_per_epoch(len(items), o.batch_size)
        checkpoints: list[tuple[int, Path]] = []
        records: list[dict] = []
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for epoch in range(step // per_epoch, o.n_epochs):
            for index, batch in enumerate(epoch_batches(items, epoch, o.batch_size, o.shuffle, o.seed)):
                if epoch * per_epoch + index < step:
                    continue  # done before the restart
                if step >= total:
                    break
                started = time.perf_counter()
                lr = self.optimizer.param_groups[0]["lr"]
                loss, metrics, num_tokens = self.loss(batch)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(self.params, o.max_grad_norm or math.inf)
                self.optimizer.step()
                scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                step += 1
                elapsed = time.perf_counter() - started
                record = {"step": step, "epoch": epoch, "loss": loss.item(), "lr": lr,
                          "grad_norm": grad_norm.item(), "num_tokens": num_tokens,
                          "tokens_per_s": num_tokens / elapsed, **metrics}
                records.append(record)
                self.on_log(record)
                every = o.checkpoint_every_n_steps
                due = step % every == 0 if every else index + 1 == per_epoch
                if due or step == total:
                    checkpoints.append((step, self._save(step, epoch, scheduler)))
            if validation and step <= total:
                record = {"step": step, "epoch": epoch, "validation_loss": self.evaluate(validation)}
                records.append(record)
                self.on_log(record)
            if step >= total:
                break
        return TrainingResult(checkpoints, records)
