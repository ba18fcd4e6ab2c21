"""Optimizers (the spec's adam / adamw / sgd) and the learning-rate schedule: a linear warm-up,
then a cosine decay to ``lr_min``."""
from __future__ import annotations

import math
from typing import Iterable

import torch

from llama_engine.errors import RecipeError

OPTIMIZERS = ("adam", "adamw", "sgd")
DEFAULT_WARMUP_FRACTION = 0.05  # of all steps, when the request does not say


def build_optimizer(params: Iterable[torch.nn.Parameter], optimizer_type: str, lr: float,
                    weight_decay: float) -> torch.optim.Optimizer:
    """torch's Adam (weight decay as an L2 term in the gradient), AdamW (decoupled weight
    decay, Loshchilov & Hutter 2019) or plain SGD. Raises RecipeError for another name."""
    params = list(params)
    if optimizer_type == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if optimizer_type == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if optimizer_type == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    raise RecipeError("optimizer_type", f"unknown optimizer {optimizer_type!r}; known: "
                      f"{', '.join(OPTIMIZERS)}")


def default_warmup_steps(total_steps: int) -> int:
    return int(total_steps * DEFAULT_WARMUP_FRACTION)


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """The multiplier of the peak lr at ``step`` (0-based): step / warmup_steps during the
    warm-up, then a half cosine from 1 down to ``min_ratio`` (= lr_min / lr) at
    ``total_steps``: the SGDR cosine (Loshchilov & Hutter 2017) with a floor, the formula
    of transformers' ``get_cosine_with_min_lr_schedule_with_warmup``."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return min_ratio + (1.0 - min_ratio) * cosine


def build_scheduler(optimizer: torch.optim.Optimizer, lr: float, lr_min: float,
                    warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepping ``lr_factor`` once per optimizer step."""
    ratio = lr_min / lr
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps, total_steps, ratio))
