"""Differentiable RMSNorm, rotary embedding and SwiGLU for training: the forward runs the
op's kernel (native on the CPU, the torch reference elsewhere) and the backward is the op's
closed-form gradient in a few whole-tensor passes (one native pass for SwiGLU). Autograd
through the references records every intermediate instead: for rope, four slices whose
backward each zero-fills and copies a whole [T, H, D] gradient; for RMSNorm about a dozen
passes over [T, C]; for SwiGLU strided products over both halves and a concatenation of
their gradients."""
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
        return _rotate(q, k, positions, cos_sin, native)

    @staticmethod
    def backward(ctx, grad_q: Tensor, grad_k: Tensor):
        positions, cos_sin = ctx.saved_tensors
        half = cos_sin.shape[-1] // 2
        inverse = torch.cat([cos_sin[:, :half], -cos_sin[:, half:]], dim=-1)
        grad_q, grad_k = _rotate(grad_q, grad_k, positions, inverse, ctx.native)
        return grad_q, grad_k, None, None, None


def _rotate(q: Tensor, k: Tensor, positions: Tensor, cos_sin: Tensor, native
            ) -> tuple[Tensor, Tensor]:
    """q, k rotated into new tensors: ``native`` rotates in place, so it gets copies (the
    caller's tensors are left as they are); the torch reference makes new ones itself."""
    if native is not None:
        return native(q.clone(memory_format=torch.contiguous_format),
                      k.clone(memory_format=torch.contiguous_format), positions, cos_sin)
    return reference.rope(q, k, positions, cos_sin)


def rope(q: Tensor, k: Tensor, positions: Tensor, cos_sin: Tensor, native=None
         ) -> tuple[Tensor, Tensor]:
    """``reference.rope`` (q [T, H, D], k [T, Hkv, D]), differentiable in q and k, returning
    new tensors. ``native``: the kernel's in-place ``rope(q, k, positions, cos_sin)`` for
    both passes, or None for torch ops."""
    return _Rope.apply(q, k, positions, cos_sin, native)


class _SiluAndMul(torch.autograd.Function):
    """SwiGLU (Shazeer 2020): silu(gate) * up over gate_up = [gate, up]. With s =
    sigmoid(gate): d_gate = dy * up * s * (1 + gate * (1 - s)), d_up = dy * gate * s."""

    @staticmethod
    def forward(ctx, gate_up: Tensor, native, native_backward) -> Tensor:
        ctx.save_for_backward(gate_up)
        ctx.native_backward = native_backward
        return native(gate_up) if native is not None else reference.silu_and_mul(gate_up)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (gate_up,) = ctx.saved_tensors
        if ctx.native_backward is not None:
            return ctx.native_backward(gate_up, grad_out), None, None
        gate, up = gate_up.chunk(2, dim=-1)
        s = torch.sigmoid(gate)
        grad_gate = grad_out * up * s * (1 + gate * (1 - s))
        return torch.cat([grad_gate, grad_out * gate * s], dim=-1), None, None


def silu_and_mul(gate_up: Tensor, native=None, native_backward=None) -> Tensor:
    """``reference.silu_and_mul`` (gate_up [..., 2F] -> [..., F]), differentiable in
    gate_up. ``native`` / ``native_backward``: the kernel's forward and its gradient
    (``cpu.silu_and_mul_backward``), or None for torch ops."""
    return _SiluAndMul.apply(gate_up, native, native_backward)
