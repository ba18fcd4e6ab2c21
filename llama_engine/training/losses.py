"""Training losses: SFT cross-entropy, DPO (with cDPO smoothing, reward clipping and a target
margin) and the Bradley-Terry reward-model loss."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llama_engine import kernels

IGNORE_INDEX = -100  # a label that carries no loss (prompt tokens, sequence ends), as in HF


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Mean (``reduction`` "sum": sum) next-token cross-entropy over the tokens whose label
    is not IGNORE_INDEX.

    logits: [T, V] (any float dtype, computed in float32); labels: [T] int64, already
    shifted (labels[t] is the token that should follow position t). The mean over label
    tokens is what HF ``LlamaForCausalLM(labels=...)`` and torchtune compute."""
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction=reduction)


# Tokens whose logits exist at a time in linear_cross_entropy: 256 x a 49152 vocabulary is
# 48 MiB of float32, against 384 MiB for SmolLM2's whole 2048-token batch (and as much again
# for its softmax and for its gradient, which autograd would hold at once).
LOSS_CHUNK_TOKENS = 256


class _LinearCrossEntropy(torch.autograd.Function):
    """sft_loss(hidden @ weight^T, labels) chunk by chunk over the tokens, the gradients
    computed in the forward pass (as Liger-Kernel's fused linear cross-entropy does): of
    the logits only one chunk ever exists, and the backward scales the two gradients."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                chunk_tokens: int, grad_enabled: bool) -> torch.Tensor:
        counted = labels != IGNORE_INDEX
        # HF's mean over label tokens; no label token gives nan, as F.cross_entropy does
        count = counted.sum().to(torch.float32)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        # (needs_input_grad says requires_grad even under no_grad: ask the caller's mode)
        grad_hidden = torch.empty_like(hidden) if grad_enabled and ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if grad_enabled and ctx.needs_input_grad[1] else None
        for start in range(0, hidden.shape[0], chunk_tokens):
            h, y = hidden[start:start + chunk_tokens], labels[start:start + chunk_tokens]
            mask = counted[start:start + chunk_tokens]
            # the logits in the head's dtype; each row's loss and d(mean CE)/d logits =
            # (softmax - one_hot(label)) / count, zero off label tokens, in one pass
            logits = F.linear(h.to(weight.dtype), weight)
            with_grad = grad_hidden is not None or grad_weight is not None
            row_loss, grad_logits = kernels.cross_entropy(
                logits, y, mask / count, with_grad)  # IGNORE_INDEX < 0: no loss
            loss += row_loss.sum()
            if not with_grad:
                continue
            if grad_hidden is not None:
                grad_hidden[start:start + chunk_tokens] = grad_logits @ weight
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.t(), h)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss / count

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (grad_hidden * grad_loss if grad_hidden is not None else None,
                grad_weight * grad_loss if grad_weight is not None else None, None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         chunk_tokens: int = LOSS_CHUNK_TOKENS) -> torch.Tensor:
    """``sft_loss(hidden @ weight^T, labels)`` without the [T, V] logits: hidden [T, C]
    float32, the output head's weight [V, C] float32, or bfloat16 when frozen (then the
    head's matmuls run in bfloat16, hidden rounded to it), labels [T] as ``sft_loss`` takes
    them. The
    logits, their softmax and their gradient exist ``chunk_tokens`` rows at a time (the
    chunked loss of torchtune's CEWithChunkedOutputLoss, with Liger-Kernel's gradients in
    the forward pass, so nothing is recomputed). Differentiable in hidden and weight; equal
    to the unchunked loss up to float32 summation order."""
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens: must be positive, got {chunk_tokens}")
    return _LinearCrossEntropy.apply(hidden, weight, labels, chunk_tokens, torch.is_grad_enabled())


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor,
                      seq_index: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """Sum of log p(label) over each sequence's label tokens: [num_seqs] float32.

    logits [N, V], labels [N] (IGNORE_INDEX where no term), seq_index [N] int64 (which
    sequence each row belongs to); the rows may be any subset of a batch's tokens (those
    with labels, to skip the others' logits). DPO scores whole replies this way."""
    mask = labels != IGNORE_INDEX
    safe = labels.clamp(min=0)
    token_logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, safe[:, None]).squeeze(-1)
    token_logp = token_logp * mask
    return torch.zeros(num_seqs, dtype=torch.float32, device=logits.device).index_add(
        0, seq_index, token_logp)


@dataclass(frozen=True)
class DPOOutput:
    loss: torch.Tensor              # scalar
    chosen_rewards: torch.Tensor    # [B]: beta * (log pi(y_w|x) - log pi_ref(y_w|x)), clipped
    rejected_rewards: torch.Tensor  # [B]


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             reference_chosen: torch.Tensor, reference_rejected: torch.Tensor,
             beta: float, reward_clip: float = 0.0, label_smoothing: float = 0.0,
             gamma: float = 0.0) -> DPOOutput:
    """Direct Preference Optimization, sigmoid form (Rafailov et al. 2023, eq. 7).

    Inputs are per-pair summed log-probabilities of the chosen and rejected replies, [B].
    The implicit rewards are r = beta * (log pi - log pi_ref) (``reward_scale`` = beta);
    with ``reward_clip`` > 0 each is clamped to [-reward_clip, reward_clip] (0: no clip).
    With margin m = r_w - r_l - gamma (``gamma``: a target reward margin, as SimPO's gamma,
    Meng et al. 2024, and the margin of Llama 2's reward loss) the loss is

        -(1 - eps) * log sigmoid(m) - eps * log sigmoid(-m)

    where eps (``epsilon``) is the label smoothing of conservative DPO (Mitchell 2023, the
    ``label_smoothing`` of TRL's ``DPOTrainer``). With no clip and gamma = 0 this is TRL's
    "sigmoid" loss: beta = 0.1 and a log-ratio difference h = 0, 10, 20 give 0.6931, 0.3133,
    0.1269; policy equal to reference gives ln 2."""
    chosen = beta * (policy_chosen - reference_chosen)
    rejected = beta * (policy_rejected - reference_rejected)
    if reward_clip > 0:
        chosen = chosen.clamp(-reward_clip, reward_clip)
        rejected = rejected.clamp(-reward_clip, reward_clip)
    margin = chosen - rejected - gamma
    losses = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    return DPOOutput(losses.mean(), chosen.detach(), rejected.detach())


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """Reward-model loss on preference pairs, -log sigmoid(s_w - s_l) averaged over the batch
    (Bradley & Terry 1952; InstructGPT, Ouyang et al. 2022, eq. 1; TRL's ``RewardTrainer``).
    Scores are [B] scalars from the reward head at each reply's last token."""
    return -F.logsigmoid(chosen_scores.float() - rejected_scores.float()).mean()
