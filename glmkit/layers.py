"""The two small layers every GLM decoder since ChatGLM2 is made of besides its mixers: ``RMSNorm`` and the
SwiGLU ``MLP`` (the dense FFN, and the shared expert of an MoE layer). Both call the kernel-backed ops. GLM-5.3-Flash
clamps the SwiGLU's inputs (``swiglu_limit``, ``glmkit.ops.swiglu``).
"""

from __future__ import annotations

import torch
from torch import nn

from glmkit.ops.rmsnorm import rmsnorm
from glmkit.ops.swiglu import check_limit, swiglu


class RMSNorm(nn.Module):
    """RMSNorm over the last dim with a learned ``weight`` (ones at init); output in the input's dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rmsnorm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class MLP(nn.Module):
    """``down(silu(gate(x)) · up(x))`` with one fused ``gate_up_proj [2I, d]`` (gate rows first, as HF ``glm``
    stores it; ``glm4_moe``'s separate gate_proj/up_proj are concatenated on load) and ``down_proj [d, I]``.
    ``swiglu_limit`` L (GLM-5.3-Flash): the clamped SwiGLU, silu(min(gate, L)) · clamp(up, -L, L)."""

    def __init__(self, hidden_size: int, intermediate_size: int, swiglu_limit: float | None = None):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.swiglu_limit = check_limit(swiglu_limit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_up_proj(x), self.swiglu_limit))
