"""SwiGLU on the fused gate‖up layout: the reference and the dispatch to the fused kernel (``kernels/swiglu.py``).

GLM-2021 and ChatGLM-6B used ``down(gelu(up(x)))``; GLM-130B a gated unit, GeGLU ``x1 · gelu(x2)``; ChatGLM2
onwards SwiGLU, the same gate with SiLU and the gate in the **first** half: ``silu(gate) · up`` (ChatGLM2's
``silu(x[0]) · x[1]``, HF's ``Phi3MLP``). One projection makes ``gate_up [..., 2I]``; the activation reads it
once and writes ``[..., I]``. Unfused, torch makes several passes; the kernel makes one.

Clamped SwiGLU (GLM-5.3-Flash, HF ``glm5_next``'s ``swiglu_limit`` = L, 10 in its config): before the activation
the gate is clamped from above only, ``min(gate, L)``, and the up half on both sides, ``clamp(up, -L, L)``; the
gradient is zero where a value was clamped (torch's ``clamp``). It bounds the product that a rare huge
pre-activation would otherwise blow up in low precision. ``limit=None`` is plain SwiGLU. The fused kernel clamps too
(``limit`` is a compile-time constant there: one compile per limit value).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from glmkit import backend


def _check(gate_up: torch.Tensor) -> None:
    if not isinstance(gate_up, torch.Tensor) or gate_up.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"gate_up must be a float32/float16/bfloat16 tensor, got {getattr(gate_up, 'dtype', gate_up)}")
    if gate_up.dim() < 1 or gate_up.shape[-1] == 0 or gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up must be [..., 2I] with an even, non-zero last dim, got {tuple(gate_up.shape)}")


def check_limit(limit) -> float | None:
    """``limit`` as a float, or None; a ValueError unless it is None or a finite number > 0."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not math.isfinite(limit) or limit <= 0:
        raise ValueError(f"the SwiGLU limit must be None (no clamp) or a finite number > 0, got {limit!r}")
    return float(limit)


def swiglu_reference(gate_up: torch.Tensor, limit: float | None = None) -> torch.Tensor:
    """gate_up [..., 2I], gate first → silu(gate) · up [..., I], in fp32, rounded to the input dtype. With ``limit``
    L: silu(min(gate, L)) · clamp(up, -L, L) (glm5_next's clamped SwiGLU)."""
    _check(gate_up)
    limit = check_limit(limit)
    gate, up = gate_up.float().chunk(2, dim=-1)
    if limit is not None:
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    return (F.silu(gate) * up).to(gate_up.dtype)


class SwiGLUFunction(torch.autograd.Function):
    """The kernels as one differentiable op: saves gate_up only; the backward recomputes the sigmoid."""

    @staticmethod
    def forward(ctx, gate_up, limit=None):
        from glmkit.kernels.swiglu import swiglu_fwd

        ctx.save_for_backward(gate_up)
        ctx.limit = limit
        return swiglu_fwd(gate_up, limit)

    @staticmethod
    def backward(ctx, dy):
        from glmkit.kernels.swiglu import swiglu_bwd

        return swiglu_bwd(dy, ctx.saved_tensors[0], ctx.limit), None


def swiglu(gate_up: torch.Tensor, limit: float | None = None) -> torch.Tensor:
    """SwiGLU as the models call it: ``swiglu_reference``'s result (clamped when ``limit`` is set), differentiable,
    on the fused kernel where ``glmkit.backend`` resolves to "triton"."""
    _check(gate_up)
    limit = check_limit(limit)
    path = "triton" if backend.resolve(gate_up) == "triton" else "torch"
    backend.record("swiglu", path)
    return SwiGLUFunction.apply(gate_up, limit) if path == "triton" else swiglu_reference(gate_up, limit)
