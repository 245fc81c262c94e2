"""The feed-forward activations of the GLM family: GeLU (GLM-2021, ChatGLM-6B) → GeGLU (GLM-130B) →
SwiGLU (ChatGLM2 onwards), as plain-torch references, the dispatching ``swiglu`` and a small ``MLP``.

Lineage.
* GLM-2021 and ChatGLM-6B: ``down(gelu(up(x)))`` with an inner size of 4·d, GeLU in its tanh
  approximation (ChatGLM-6B defines a GEGLU class but never uses it).
* GLM-130B: a gated linear unit (Shazeer 2020). One projection makes two halves of size I and one of
  them, through GeLU, gates the other. In GLM-130B's code (SwissArmyTransformer ``GEGLU``) the output is
  ``x1 · gelu(x2)``: the activation is on the **second** half.
* ChatGLM2/3 and GLM-4/4.5: SwiGLU, the same gate with SiLU (x · sigmoid(x)) instead of GeLU, and the
  gate is the **first** half: ChatGLM2's ``silu(x[0]) · x[1]`` and HF's ``Phi3MLP`` (used by ``glm`` and
  ``glm4``): ``gate, up = gate_up.chunk(2, -1); down(up · silu(gate))``.

Layout. The two projections are fused into one ``gate_up`` weight [2I, d], so the activation reads one
tensor ``[..., 2I]`` whose first I columns are the gate and last I the up projection, and writes
``[..., I]``. A fused kernel (``glmkit.kernels.swiglu``) reads the 2I values and writes the I results in
one pass; unfused, torch makes three passes (silu, multiply, and chunk's views are free only because
they are views).

Entry points:
* ``swiglu_reference(gate_up)``, ``geglu_reference(h, gate_first=False)``, ``gelu_reference(x)``.
* ``swiglu(gate_up)`` — dispatches through ``glmkit.backend.resolve``: the Triton kernel (forward and
  backward via ``torch.autograd.Function``) when it says "triton", the reference otherwise.
* ``MLP(hidden_size, intermediate_size, activation)`` — "gelu", "geglu" or "swiglu" (bias-free, as in
  ChatGLM2/GLM-4; GLM-2021 had biases: ``bias=True``).

The references compute in fp32 and round once to the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glmkit import backend

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_gated(h: torch.Tensor, name: str = "gate_up") -> int:
    if not isinstance(h, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(h).__name__}")
    if h.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {h.dtype}")
    if h.dim() < 1 or h.shape[-1] == 0 or h.shape[-1] % 2:
        raise ValueError(f"{name} must be [..., 2I] with an even, non-zero last dim (gate ‖ up), got {tuple(h.shape)}")
    return h.shape[-1] // 2


def gelu_reference(x: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """GeLU (GLM-2021/ChatGLM-6B use the tanh approximation), fp32 inside, x's dtype out."""
    return F.gelu(x.float(), approximate=approximate).to(x.dtype)


def swiglu_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU on the fused layout, gate first: gate_up [..., 2I] → silu(gate) · up [..., I]."""
    I = _check_gated(gate_up)
    gate, up = gate_up.float().split(I, dim=-1)
    return (F.silu(gate) * up).to(gate_up.dtype)


def geglu_reference(h: torch.Tensor, gate_first: bool = False, approximate: str = "tanh") -> torch.Tensor:
    """GeGLU on a fused [..., 2I] tensor → [..., I]. Default (gate_first=False) is GLM-130B's
    ``x1 · gelu(x2)``; gate_first=True gives ``gelu(x1) · x2`` (the SwiGLU ordering)."""
    I = _check_gated(h, "h")
    a, b = h.float().split(I, dim=-1)
    if gate_first:
        a, b = b, a
    return (a * F.gelu(b, approximate=approximate)).to(h.dtype)


def swiglu_path(gate_up: torch.Tensor) -> str:
    """Which implementation ``swiglu(gate_up)`` runs: "triton" or "torch"."""
    return "triton" if backend.resolve(gate_up) == "triton" else "torch"


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU as the model calls it: same result as ``swiglu_reference`` (gate_up [..., 2I] → [..., I]),
    differentiable on both paths; the fused Triton kernel when the backend resolves to "triton"."""
    _check_gated(gate_up)
    path = swiglu_path(gate_up)
    backend.record("swiglu", path)
    if path == "triton":
        from glmkit.kernels.swiglu import swiglu_triton

        return swiglu_triton(gate_up)
    return swiglu_reference(gate_up)


class MLP(nn.Module):
    """The GLM feed-forward block: ``down(act(up(x)))``.

    activation "swiglu" (ChatGLM2, GLM-4): ``gate_up_proj: d → 2I`` (gate first), ``swiglu``, ``down_proj``;
    "geglu" (GLM-130B): the same with ``geglu_reference`` (activation on the second half); "gelu"
    (GLM-2021, ChatGLM-6B): ``up_proj: d → I``, tanh-GeLU, ``down_proj``. Weights follow ``nn.Linear``.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str = "swiglu",
                 bias: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        if activation not in ("swiglu", "geglu", "gelu"):
            raise ValueError(f"activation must be 'swiglu', 'geglu' or 'gelu', got {activation!r}")
        for name, v in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size)):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.activation = activation
        kw = dict(bias=bias, device=device, dtype=dtype)
        if activation == "gelu":
            self.up_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        else:
            self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, **kw)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == "gelu":
            return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))
        h = self.gate_up_proj(x)
        return self.down_proj(swiglu(h) if self.activation == "swiglu" else geglu_reference(h))
