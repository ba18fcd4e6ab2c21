"""The training loop, written against ``TrainableModel``: SFT, DPO and reward modelling over
packed batches; epochs, shuffling, an n_iters cap, a linear warm-up then cosine lr,
checkpoints every N steps that a restarted job resumes from, and one log record per step.
Under FSDP (``distributed.py``) every rank runs this loop on its share of each batch."""
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

from llama_engine.errors import RecipeError
from llama_engine.training.batching import PackedBatch, batches_per_epoch, epoch_batches, pack
from llama_engine.training.checkpoint import TRAINING_STATE_FILE
from llama_engine.training.distributed import (SINGLE_PROCESS, DataParallel, FSDPOptions,
                                               full_optimizer_state, load_full_optimizer_state,
                                               whole)
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
StepTerms = tuple[torch.Tensor, dict, int, int]  # loss sum, metric sums, tokens, loss terms
LogFn = Callable[[dict], None]
REWARD_UNDER_FSDP = ("reward-model training does not run under FSDP (its score head sits "
                     "outside the model); train it in one process")
CheckpointFn = Callable[[int, Path], None]


@dataclass(frozen=True)
class DPOParams:
    """See ``losses.dpo_loss``."""
    beta: float = 0.1
    reward_clip: float = 0.0
    label_smoothing: float = 0.0
    gamma: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.label_smoothing < 0.5:  # 0.5 would make chosen and rejected alike
            raise RecipeError("label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing}")


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

    def __post_init__(self) -> None:
        """The bounds a run needs (the HTTP schemas hold the same; the CLI's flags meet
        them here). Raises RecipeError naming the option."""
        at_least = {"n_epochs": (self.n_epochs, 1), "batch_size": (self.batch_size, 1),
                    "n_iters": (self.n_iters, 1), "warmup_steps": (self.warmup_steps, 0),
                    "checkpoint_every_n_steps": (self.checkpoint_every_n_steps, 1)}
        for name, (value, low) in at_least.items():
            if value is not None and value < low:
                raise RecipeError(name, f"must be at least {low}, got {value}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise RecipeError("lr", f"must be positive, got {self.lr}")
        if not 0 <= self.lr_min <= self.lr:
            raise RecipeError("lr_min", f"must lie in [0, lr = {self.lr}], got {self.lr_min}")
        if not self.weight_decay >= 0:
            raise RecipeError("weight_decay", f"must be non-negative, got {self.weight_decay}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise RecipeError("max_grad_norm", f"must be positive, got {self.max_grad_norm}")

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


def sft_batch_loss(model: TrainableModel, batch: PackedBatch, reduction: str = "mean"
                   ) -> torch.Tensor:
    """Mean (``reduction`` "sum": sum) next-token cross-entropy over the batch's label
    tokens: the hidden states of those tokens only, then the head and the loss fused in
    chunks where the head is a plain matrix (``losses.linear_cross_entropy``: no [T, vocab]
    logits held), else the logits."""
    rows = _label_rows(batch)
    hidden, labels = model.hidden_states(batch)[rows], batch.labels[rows]
    weight = model.output_weight()
    if weight is None:
        return sft_loss(model.compute_logits(hidden), labels, reduction)
    loss = linear_cross_entropy(hidden, weight, labels)
    return loss * rows.numel() if reduction == "sum" else loss


def _reply_logprobs(model: TrainableModel, batch: PackedBatch) -> torch.Tensor:
    rows = _label_rows(batch)
    logits = model.compute_logits(model.hidden_states(batch)[rows])
    return sequence_logprobs(logits, batch.labels[rows], batch.seq_index[rows], batch.num_seqs)


class Trainer:
    """Runs ``options`` over ``items`` (Examples for SFT, PreferencePairs for DPO and reward
    modelling), writing checkpoints under ``output_dir``/step-N.

    With ``fsdp``, the model is sharded over ``group``'s ranks (every rank builds a Trainer
    with the same arguments and calls ``train`` with the same items); rank 0 writes the
    checkpoints and gets ``on_log`` / ``on_checkpoint``."""

    def __init__(self, model: TrainableModel, options: TrainingOptions, output_dir: Path,
                 on_log: LogFn = lambda record: None,
                 on_checkpoint: CheckpointFn = lambda step, path: None,
                 group: DataParallel = SINGLE_PROCESS, fsdp: FSDPOptions | None = None):
        if options.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {options.objective!r}")
        if group.world_size > 1 and fsdp is None:
            raise ValueError("several ranks train only under FSDP (fsdp options)")
        if fsdp is not None and options.objective == REWARD:
            raise ValueError(REWARD_UNDER_FSDP)
        self.model, self.options, self.output_dir = model, options, Path(output_dir)
        self.group = group
        if not group.is_writer:
            on_log, on_checkpoint = (lambda record: None), (lambda step, path: None)
        self.on_log, self.on_checkpoint = on_log, on_checkpoint
        if fsdp is not None:
            found = latest_checkpoint(self.output_dir)
            if found is not None:  # resume: whole weights in, before they are sharded
                model.load_checkpoint(found[1])
            model.shard(group, fsdp)
        self.score_head: torch.nn.Parameter | None = None
        if options.objective == REWARD:
            generator = torch.Generator().manual_seed(options.seed)
            weight = torch.randn(1, model.config.hidden_size, generator=generator)
            self.score_head = torch.nn.Parameter((weight * SCORE_HEAD_INIT_STD).to(model.device))
        params = model.trainable_parameters() + ([self.score_head] if self.score_head is not None else [])
        self.params = params
        self.optimizer = build_optimizer(params, options.optimizer_type, options.lr,
                                         options.weight_decay)

    # ---- one step per objective: (loss sum, metric sums, tokens, loss terms) -------------
    def _sft_step(self, examples: Sequence[Example]) -> StepTerms:
        batch = pack(examples).to(self.model.device)
        loss = sft_batch_loss(self.model, batch, "sum")
        return loss, {}, batch.num_tokens, int((batch.labels != IGNORE_INDEX).sum())

    def _pair_batch(self, pairs: Sequence[PreferencePair]) -> PackedBatch:
        return pack([p.chosen for p in pairs] + [p.rejected for p in pairs]).to(self.model.device)

    def _dpo_step(self, pairs: Sequence[PreferencePair]) -> StepTerms:
        batch, n = self._pair_batch(pairs), len(pairs)
        with torch.no_grad(), self.model.reference():
            reference = _reply_logprobs(self.model, batch)
        policy = _reply_logprobs(self.model, batch)
        d = self.options.dpo
        out = dpo_loss(policy[:n], policy[n:], reference[:n], reference[n:], d.beta,
                       d.reward_clip, d.label_smoothing, d.gamma)
        metrics = {"rewards/chosen": out.chosen_rewards.sum().item(),
                   "rewards/rejected": out.rejected_rewards.sum().item(),
                   "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).float().sum().item(),
                   "rewards/margins": (out.chosen_rewards - out.rejected_rewards).sum().item()}
        return out.loss * n, metrics, batch.num_tokens, n

    def reward_scores(self, batch: PackedBatch) -> torch.Tensor:
        """[B] scalar rewards: the score head on each sequence's last hidden state."""
        hidden = self.model.hidden_states(batch)[batch.last_token_index]
        return (hidden @ self.score_head.t()).squeeze(-1)

    def _reward_step(self, pairs: Sequence[PreferencePair]) -> StepTerms:
        batch, n = self._pair_batch(pairs), len(pairs)
        scores = self.reward_scores(batch)
        metrics = {"accuracy": (scores[:n] > scores[n:]).float().sum().item()}
        return bradley_terry_loss(scores[:n], scores[n:]) * n, metrics, batch.num_tokens, n

    def loss_terms(self, items: Sequence[Item]) -> StepTerms:
        """(loss summed over its terms, metrics summed likewise, tokens, number of terms) of
        ``items`` under the objective. The terms are label tokens for SFT, pairs otherwise;
        the batch loss is their mean."""
        step = {SFT: self._sft_step, DPO: self._dpo_step, REWARD: self._reward_step}
        return step[self.options.objective](items)

    def _rank_loss(self, batch: Sequence[Item]) -> tuple[torch.Tensor, dict, int, int]:
        """This rank's part of the global batch's mean loss (its loss sum over the batch's
        number of terms; the parts add up to the mean, and so do their gradients, which FSDP
        sums), its metric sums, and the batch's tokens and terms over all ranks."""
        share = self.group.share(batch)
        # A rank without items still runs a forward and backward (on one item, counted as
        # nothing): FSDP's gathers and reductions need every rank.
        loss_sum, metric_sums, num_tokens, terms = self.loss_terms(share or batch[:1])
        if not share:
            loss_sum, num_tokens, terms = loss_sum * 0, 0, 0
            metric_sums = dict.fromkeys(metric_sums, 0.0)
        totals = self.group.all_reduce_sum(torch.tensor([terms, num_tokens], dtype=torch.float64))
        all_terms, all_tokens = int(totals[0]), int(totals[1])
        return loss_sum / max(all_terms, 1), metric_sums, all_tokens, all_terms

    def _clip_gradients(self) -> torch.Tensor:
        """Clip to max_grad_norm (if set); the total gradient norm before clipping, over all
        ranks' shards."""
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = whole(torch.nn.utils.get_total_norm(grads))
        torch.nn.utils.clip_grads_with_norm_(self.params, self.options.max_grad_norm or math.inf,
                                             norm)
        return norm

    # ---- checkpoints ----------------------------------------------------------------------
    def _save(self, step: int, epoch: int, scheduler) -> Path:
        final = self.output_dir / f"step-{step}"
        partial = self.output_dir / f"step-{step}.partial"
        root = self.model.fsdp_root
        with self.model.full_weights():  # every rank gathers; rank 0 writes
            if self.group.is_writer:
                shutil.rmtree(partial, ignore_errors=True)
                self.model.save_checkpoint(partial, self.score_head.detach() if self.score_head is not None else None)
        optimizer = (self.optimizer.state_dict() if root is None
                     else full_optimizer_state(root, self.optimizer))
        if not self.group.is_writer:
            self.group.barrier()  # the checkpoint is complete once the rank-0 barrier passes
            return final
        torch.save({"step": step, "epoch": epoch, "optimizer": optimizer,
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
        self.group.barrier()
        self.on_checkpoint(step, final)
        return final

    def _resume(self, scheduler) -> int:
        found = latest_checkpoint(self.output_dir)
        if found is None:
            return 0
        step, folder = found
        state = torch.load(folder / TRAINING_STATE_FILE, map_location=self.model.device,
                           weights_only=False)
        root = self.model.fsdp_root
        if root is None:
            self.model.load_checkpoint(folder)  # (a sharded model loaded it before sharding)
            self.optimizer.load_state_dict(state["optimizer"])
        else:
            load_full_optimizer_state(root, self.optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if self.score_head is not None:
            with torch.no_grad():
                self.score_head.copy_(state["score_head"])
        return step

    def evaluate(self, items: Sequence[Item]) -> float:
        """Mean batch loss over ``items`` (no gradient; every rank computes all of it)."""
        losses = []
        with torch.no_grad():
            for start in range(0, len(items), self.options.batch_size):
                loss_sum, _, _, terms = self.loss_terms(items[start:start + self.options.batch_size])
                losses.append(loss_sum.item() / max(terms, 1))
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
                loss, metric_sums, num_tokens, terms = self._rank_loss(batch)
                loss.backward()
                grad_norm = self._clip_gradients()
                self.optimizer.step()
                scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                step += 1
                names = sorted(metric_sums)
                sums = self.group.all_reduce_sum(torch.tensor(
                    [loss.item()] + [metric_sums[n] for n in names], dtype=torch.float64)).tolist()
                metrics = {n: value / max(terms, 1) for n, value in zip(names, sums[1:])}
                elapsed = time.perf_counter() - started
                record = {"step": step, "epoch": epoch, "loss": sums[0], "lr": lr,
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
