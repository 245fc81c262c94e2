"""RMSNorm (ChatGLM2 onwards): the reference and the dispatch to the fused kernel (``kernels/rmsnorm.py``).

GLM-2021, ChatGLM-6B and GLM-130B normalised with LayerNorm: subtract the row mean, divide by the row standard
deviation, scale and shift. ChatGLM2/3, GLM-4, GLM-4.5 and GLM-5 use RMSNorm (Zhang & Sennrich 2019), which
drops the mean and the bias: ``y = x / sqrt(mean(x²) + eps) · weight``. One reduction instead of two, at no
measurable cost in quality; fused, a single pass over the row. GLM-4-0414 uses four per layer ("sandwich"),
GLM-4.5 one more per head on q and k (QK-norm), MLA two on its latents: the same op each time.

Precision: the reference computes in fp32 and rounds once. HF's ``GlmRMSNorm`` rounds the normalised row to the
input dtype before multiplying by ``weight``: equal in fp32, one rounding apart in bf16. The kernel rounds once.
"""

from __future__ import annotations

import torch

from glmkit import backend

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(x: torch.Tensor, weight: torch.Tensor | None) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOAT_DTYPES or x.dim() < 1 or x.shape[-1] == 0:
        raise TypeError(
            f"x must be a float32/float16/bfloat16 tensor [..., N] with N > 0, got "
            f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}"
        )
    if weight is not None and (
        not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (x.shape[-1],) or weight.device != x.device
    ):
        raise ValueError(
            f"weight must be a [{x.shape[-1]}] tensor on {x.device} (x's last dim), got "
            f"{tuple(getattr(weight, 'shape', ()))}"
        )


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-5) -> torch.Tensor:
    """x / sqrt(mean(x²) + eps) · weight over the last dim, in fp32, rounded to x's dtype; weight None = no scale."""
    _check(x, weight)
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y if weight is None else y * weight.float()).to(x.dtype)


class RMSNormFunction(torch.autograd.Function):
    """The kernels as one differentiable op: the forward keeps one fp32 1/rms per row for the backward."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        from glmkit.kernels.rmsnorm import rmsnorm_fwd

        y, rstd = rmsnorm_fwd(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        from glmkit.kernels.rmsnorm import rmsnorm_bwd

        x, weight, rstd = ctx.saved_tensors
        dx, dw = rmsnorm_bwd(dy.contiguous(), x, weight, rstd, compute_dw=ctx.needs_input_grad[1])
        return (dx if ctx.needs_input_grad[0] else None), dw, None


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """RMSNorm as the models call it: ``rmsnorm_reference``'s result, differentiable in x and weight, on the
    fused kernel where ``glmkit.backend`` resolves to "triton"."""
    _check(x, weight)
    path = "triton" if backend.resolve(x) == "triton" else "torch"
    backend.record("rmsnorm", path)
    if path == "triton":
        return RMSNormFunction.apply(x, weight, eps)
    return rmsnorm_reference(x, weight, eps)
