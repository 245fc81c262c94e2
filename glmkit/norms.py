"""Normalisation layers of the GLM family: LayerNorm (GLM-2021 → ChatGLM-6B → GLM-130B) and RMSNorm
(ChatGLM2 onwards), as plain-torch references plus the ``RMSNorm`` module the models use.

Lineage. GLM-2021 and ChatGLM-6B normalise with LayerNorm: subtract the row mean, divide by the row
standard deviation, then scale and shift with learned ``weight`` and ``bias``:

    LayerNorm(x) = (x - mean(x)) / sqrt(var(x) + eps) · weight + bias

ChatGLM2/3, GLM-4 and GLM-4.5 switch to RMSNorm (Zhang & Sennrich 2019), which drops the mean
subtraction and the bias: only the root-mean-square of the row is divided out,

    RMSNorm(x) = x / sqrt(mean(x²) + eps) · weight

One reduction instead of two and no bias, at no measurable cost in quality; in a fused kernel it is a
single pass over the row. GLM-4-0414 (HF ``glm4``) uses four of them per layer ("sandwich" norms) and
GLM-4.5 one more per head on q and k (QK-norm, ``[.., head_dim]`` rows) — the same operation each time.

Precision. Both references compute in fp32 and round once to the input's dtype. Hugging Face's
``GlmRMSNorm`` rounds the normalised row to the input dtype *before* multiplying by ``weight`` (and
returns the promoted dtype when weight and input differ); in fp32 the two agree exactly, in bf16 they
differ by at most one rounding. The Triton kernel (``glmkit.kernels.rmsnorm``) rounds once, like the
reference here.

Entry points:
* ``rms_norm_reference(x, weight, eps)``, ``layer_norm_reference(x, weight, bias, eps)`` — explicit math.
* ``rms_norm(x, weight, eps)`` — dispatches through ``glmkit.backend.resolve(x)``: the Triton kernel
  (forward and backward, through ``torch.autograd.Function``) when it says "triton", the reference
  otherwise.
* ``RMSNorm(hidden_size, eps)`` — ``nn.Module`` with a ``weight`` initialised to ones; calls ``rms_norm``.

Shapes: x ``[..., N]`` (any leading dims), weight/bias ``[N]``; the output has x's shape and dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from glmkit import backend

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(x: torch.Tensor, weight: torch.Tensor | None, eps: float, name: str = "weight") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dim (the normalised one), got shape {tuple(x.shape)}")
    if weight is not None:
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(weight).__name__}")
        if weight.shape != (x.shape[-1],):
            raise ValueError(f"{name} must have shape [N] = [{x.shape[-1]}] (x's last dim), got {tuple(weight.shape)}")
        if weight.device != x.device:
            raise ValueError(f"{name} is on {weight.device} but x is on {x.device}")
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-5) -> torch.Tensor:
    """RMSNorm of the last dim: x / sqrt(mean(x²) + eps) · weight, in fp32, rounded to x's dtype.
    x [..., N], weight [N] or None (no scale) → [..., N]."""
    _check(x, weight, eps)
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


def layer_norm_reference(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float = 1e-5
) -> torch.Tensor:
    """LayerNorm of the last dim (GLM-2021, ChatGLM-6B, GLM-130B): (x - mean) / sqrt(var + eps) · weight
    + bias, biased variance as in ``nn.LayerNorm``, in fp32, rounded to x's dtype. x [..., N] → [..., N]."""
    _check(x, weight, eps)
    _check(x, bias, eps, name="bias")
    xf = x.float()
    mu = xf.mean(-1, keepdim=True)
    var = (xf - mu).pow(2).mean(-1, keepdim=True)
    y = (xf - mu) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def rms_norm_path(x: torch.Tensor) -> str:
    """Which implementation ``rms_norm(x, ...)`` runs: "triton" or "torch"."""
    return "triton" if backend.resolve(x) == "triton" else "torch"


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """RMSNorm as the model calls it (same result as ``rms_norm_reference``), differentiable in x and
    weight on both paths. "triton": the fused kernel ``glmkit.kernels.rmsnorm`` (forward keeps one fp32
    1/rms per row for the backward); "torch": the reference."""
    _check(x, weight, eps)
    if weight is None:
        raise ValueError("weight is required for rms_norm (pass torch.ones(N) for an unscaled norm)")
    path = rms_norm_path(x)
    backend.record("rms_norm", path)
    if path == "triton":
        from glmkit.kernels.rmsnorm import rms_norm_triton

        return rms_norm_triton(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim with a learned ``weight`` [hidden_size] (initialised to ones).

    ``eps``: ChatGLM2/3 and GLM-4.5 use 1e-5; HF's GLM-4-9B config uses 1.5625e-07. The output has the
    input's dtype whatever the weight's dtype.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        if not isinstance(hidden_size, int) or hidden_size <= 0:
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        if not (isinstance(eps, (int, float)) and eps >= 0):
            raise ValueError(f"eps must be a non-negative number, got {eps!r}")
        self.hidden_size = hidden_size
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"
