"""Differentiable RMSNorm and rotary embedding for training: the forward runs the op's
kernel (native on the CPU, the torch reference elsewhere) and the backward is the op's
closed-form gradient in a few whole-tensor passes. Autograd through the references records
every intermediate instead: for rope, four slices whose backward each zero-fills and copies
a whole [T, H, D] gradient, and for RMSNorm about a dozen passes over [T, C]."""
from __future__ import annotations

import torch
from torch import Tensor

from llama_engine.kernels import reference


class _RMSNorm(torch.autograd.Function):
    """y = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps) over the last dim (Zhang &
    Sennrich 2019). With x_hat = x * rstd and g_hat = dy * w:
        dx = rstd * (g_hat - x_hat * mean(g_hat * x_hat)),   dw = sum over rows of dy * x_hat."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float, native) -> Tensor:
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        y = native(x, weight, eps)[0] if native is not None else x * rstd * weight
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, weight, rstd = ctx.saved_tensors
        x_hat = x * rstd
        grad_hat = grad_y * weight
        mean = (grad_hat * x_hat).mean(-1, keepdim=True)
        grad_x = grad_hat.addcmul_(x_hat, mean, value=-1).mul_(rstd)
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad_y * x_hat).reshape(-1, x.shape[-1]).sum(0)
        return grad_x, grad_w, None, None


def rms_norm(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None,
             native=None) -> tuple[Tensor, Tensor]:
    """``reference.rms_norm`` (x [..., C], weight [C], float32), differentiable in x,
    residual and weight with a closed-form backward. ``native``: the kernel's
    ``rms_norm(x, weight, eps)`` for the forward, or None for torch ops."""
    if residual is not None:
        x = x + residual
    return _RMSNorm.apply(x, weight, eps, native), x


class _Rope(torch.autograd.Function):
    """Rotary embedding (Su et al. 2021) of q and k: each (x1, x2) pair is rotated by its
    position's angle; a rotation's gradient is the rotation by minus the angle, so the
    backward runs the same kernel over a table with sin negated."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, positions: Tensor, cos_sin: Tensor, native
                ) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(positions, cos_sin)
        ctx.native = native
        return _rotate(q.clone(memory_format=torch.contiguous_format),
                       k.clone(memory_format=torch.contiguous_format), positions, cos_sin, native)

    @staticmethod
    def backward(ctx, grad_q: Tensor, grad_k: Tensor):
        positions, cos_sin = ctx.saved_tensors
        half = cos_sin.shape[-1] // 2
        inverse = torch.cat([cos_sin[:, :half], -cos_sin[:, half:]], dim=-1)
        grad_q, grad_k = _rotate(grad_q.clone(memory_format=torch.contiguous_format),
                                 grad_k.clone(memory_format=torch.contiguous_format),
                                 positions, inverse, ctx.native)
        return grad_q, grad_k, None, None, None


def _rotate(q: Tensor, k: Tensor, positions: Tensor, cos_sin: Tensor, native
            ) -> tuple[Tensor, Tensor]:
    """q, k rotated: in place by ``native`` (tensors this module owns), else new tensors."""
    if native is not None:
        return native(q, k, positions, cos_sin)
    return reference.rope(q, k, positions, cos_sin)


def rope(q: Tensor, k: Tensor, positions: Tensor, cos_sin: Tensor, native=None
         ) -> tuple[Tensor, Tensor]:
    """``reference.rope`` (q [T, H, D], k [T, Hkv, D]), differentiable in q and k, returning
    new tensors. ``native``: the kernel's in-place ``rope(q, k, positions, cos_sin)`` for
    both passes, or None for torch ops."""
    return _Rope.apply(q, k, positions, cos_sin, native)
