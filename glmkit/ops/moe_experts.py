"""The routed experts of a Mixture-of-Experts layer: the reference loop, the sorted torch path, and the
dispatch to the grouped-GEMM kernels (``kernels/moe_experts.py``) with their autograd wiring.

For each token t with its k chosen experts e = topk_idx[t, j] and weights w[t, j] (from the router,
``glmkit.moe``), ``y[t] = Σ_j w[t, j] · down_e(silu(gate_e(x[t])) · up_e(x[t]))``. Weights as HF's
``Glm4MoeExperts`` stacks them: ``w_gate_up [E, 2I, H]`` (gate rows first) and ``w_down [E, H, I]``, each used as
``x @ W[e]ᵀ``. Three implementations that agree to rounding:

* ``moe_experts_reference`` — the readable loop: for each expert, find its tokens, run its FFN, add the weighted
  result back (HF's eager path).
* ``moe_experts_sorted`` — the fast torch path (HF's ``grouped_mm_experts_forward``): sort the S = N·k slots by
  expert so each expert's rows are contiguous, one grouped GEMM for gate‖up, SwiGLU, one for down, weight,
  un-sort, sum the k slots per token. ``torch._grouped_mm`` runs all experts in one call where device, dtype
  and strides allow; otherwise a matmul per contiguous segment.
* the kernels — gather rows by token inside the GEMM (x is never copied k times), SwiGLU epilogue, combine.

``moe_experts(..., impl="auto")`` picks the kernels where ``glmkit.backend`` resolves to "triton", else the
sorted path; "loop", "sorted" and "triton" force one. Under CUDA autocast the kernels get the autocast dtype.
Weighting and the sum over k are fp32 everywhere, rounded once at the end. ``swiglu_limit`` L (GLM-5.3-Flash) makes
every expert's activation the clamped SwiGLU, silu(min(gate, L)) · clamp(up, -L, L), on all three paths (the kernels
clamp in their SwiGLU epilogues, forward and backward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from glmkit import backend
from glmkit.ops.swiglu import check_limit

IMPLS = ("auto", "loop", "sorted", "triton")
_GMM_ALIGN_BYTES = 16  # torch._grouped_mm: row strides and data pointers must be multiples of 16 bytes


def _swiglu(gate_up: torch.Tensor, limit: float | None = None) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    if limit is not None:
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    return F.silu(gate) * up


def moe_experts_reference(x, topk_idx, topk_weight, w_gate_up, w_down, swiglu_limit=None) -> torch.Tensor:
    """x [N, H], topk_idx [N, k], topk_weight [N, k], w_gate_up [E, 2I, H], w_down [E, H, I] → y [N, H], one
    expert at a time (an expert nobody picked costs nothing)."""
    out = torch.zeros(x.shape, device=x.device, dtype=torch.float32)
    for e in range(w_gate_up.shape[0]):
        token, slot = torch.where(topk_idx == e)
        if token.numel():
            y = F.linear(_swiglu(F.linear(x[token], w_gate_up[e]), swiglu_limit), w_down[e])
            out.index_add_(0, token, y.float() * topk_weight[token, slot, None].float())
    return out.to(x.dtype)


def _grouped_mm_ok(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` runs here: CPU (torch ≥ 2.9) in fp32/fp16/bf16, CUDA SM80+ in bf16 only;
    16-byte row strides and pointers."""
    if not hasattr(torch, "_grouped_mm") or x.dtype != w_gate_up.dtype or x.device != w_gate_up.device:
        return False
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
        return False  # inside torch.compile grouped_mm takes bf16 only
    if x.device.type == "cuda":
        if x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device) < (8, 0):
            return False
    elif x.device.type != "cpu" or tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 9):
        return False
    es = x.element_size()
    strides_ok = all(n * es % _GMM_ALIGN_BYTES == 0 for n in (x.shape[1], *w_gate_up.shape[1:2], w_down.shape[2]))
    # pointers cannot be read while torch.compile traces (fresh and parameter tensors are aligned anyway)
    return strides_ok and (
        torch.compiler.is_compiling() or all(t.data_ptr() % _GMM_ALIGN_BYTES == 0 for t in (x, w_gate_up, w_down))
    )


def _grouped_mm(a, b, offs):
    out = torch._grouped_mm(a, b, offs=offs)
    if out.requires_grad:  # its backward rejects stride-0 incoming grads (e.g. from .sum())
        out.register_hook(lambda g: g.contiguous())
    return out


def moe_experts_sorted(x, topk_idx, topk_weight, w_gate_up, w_down, swiglu_limit=None) -> torch.Tensor:
    """The reference's result by sorting slots by expert (steps in the module docstring)."""
    N, k = topk_idx.shape
    if N == 0:
        return torch.zeros_like(x)
    E = w_gate_up.shape[0]
    sorted_e, perm = torch.sort(topk_idx.reshape(-1).long(), stable=True)  # [S]
    x_g = x[perm // k]  # [S, H], rows grouped by expert
    counts = torch.zeros(E, dtype=torch.int64, device=x.device).scatter_add_(0, sorted_e, torch.ones_like(sorted_e))
    w_gu, w_d = w_gate_up.transpose(-2, -1), w_down.transpose(-2, -1)  # [E, H, 2I], [E, I, H] views
    if not _grouped_mm_ok(x_g, w_gate_up, w_down) and torch.compiler.is_compiling():
        # no grouped GEMM and no host sync allowed: every expert on every token, weighted by a dense [N, E] map
        w = torch.zeros(N, E, device=x.device).scatter_(1, topk_idx.long(), topk_weight.float())
        y = torch.einsum("ne,enh->nh", w, (_swiglu(x @ w_gu, swiglu_limit) @ w_d).float())
        return y.to(x.dtype)
    if _grouped_mm_ok(x_g, w_gate_up, w_down):
        offs = counts.cumsum(0).to(torch.int32)
        y_g = _grouped_mm(_swiglu(_grouped_mm(x_g, w_gu, offs), swiglu_limit), w_d, offs)
    else:
        c = counts.tolist()  # one host sync
        seg = lambda a, b: torch.cat([a_e @ b[e] for e, a_e in enumerate(a.split(c)) if c[e]])  # noqa: E731
        y_g = seg(_swiglu(seg(x_g, w_gu), swiglu_limit), w_d)
    y_g = y_g.float() * topk_weight.reshape(-1)[perm].float().unsqueeze(-1)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return rearrange(y_g[inv], "(n k) h -> n k h", k=k).sum(dim=1).to(x.dtype)  # reshape-sum: deterministic


class MoEExpertsFunction(torch.autograd.Function):
    """The kernels as one differentiable op. Saves x, the routing and h = the pre-activation [S, 2I]; neither
    the activation a [S, I] (recomputed from h in the backward's epilogue) nor the down outputs z [S, H]."""

    @staticmethod
    def forward(ctx, x, topk_idx, topk_weight, w_gate_up, w_down, block_m, limit=None):
        from glmkit.kernels.moe_experts import experts_fwd

        y, saved = experts_fwd(x, topk_idx, topk_weight, w_gate_up, w_down, block_m, keep=True, limit=limit)
        ctx.save_for_backward(*saved)
        ctx.meta = (topk_idx.shape[1], block_m, topk_weight.dtype, topk_weight.shape, limit)
        return y

    @staticmethod
    def backward(ctx, dy):
        from glmkit.kernels.moe_experts import experts_bwd

        k, block_m, w_dtype, w_shape, limit = ctx.meta
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3], ctx.needs_input_grad[4])
        dx, dtopw, dwgu, dwd = experts_bwd(dy, ctx.saved_tensors, k, block_m, need, limit=limit)
        dtopw = dtopw.to(w_dtype).reshape(w_shape) if dtopw is not None else None
        return dx, None, dtopw, dwgu, dwd, None, None


def _check(x, topk_idx, topk_weight, w_gate_up, w_down) -> None:
    if not (isinstance(x, torch.Tensor) and x.dim() == 2 and x.is_floating_point()):
        raise ValueError(f"x must be a float [N, H] tensor, got {getattr(x, 'shape', type(x).__name__)}")
    N, H = x.shape
    if w_gate_up.dim() != 3 or w_gate_up.shape[2] != H or w_gate_up.shape[1] % 2:
        raise ValueError(f"w_gate_up must be [E, 2I, H={H}], got {tuple(w_gate_up.shape)}")
    E, I = w_gate_up.shape[0], w_gate_up.shape[1] // 2
    if tuple(w_down.shape) != (E, H, I):
        raise ValueError(f"w_down must be [E, H, I] = {(E, H, I)}, got {tuple(w_down.shape)}")
    if topk_idx.dim() != 2 or topk_idx.shape[0] != N or topk_idx.is_floating_point():
        raise ValueError(f"topk_idx must be an integer [N={N}, k] tensor, got {topk_idx.dtype} {tuple(topk_idx.shape)}")
    if topk_weight.shape != topk_idx.shape or not topk_weight.is_floating_point():
        raise ValueError(f"topk_weight must be a float tensor shaped like topk_idx {tuple(topk_idx.shape)}")
    if len({t.device for t in (x, topk_idx, topk_weight, w_gate_up, w_down)}) != 1:
        raise ValueError("x, topk_idx, topk_weight, w_gate_up and w_down must be on one device")


def moe_experts(
    x, topk_idx, topk_weight, w_gate_up, w_down, impl: str = "auto", *, swiglu_limit: float | None = None
) -> torch.Tensor:
    """The routed experts (see the module docstring): x [N, H] → y [N, H] in x's dtype, differentiable in x,
    topk_weight and both weights. ``swiglu_limit``: the clamped SwiGLU (None: plain)."""
    _check(x, topk_idx, topk_weight, w_gate_up, w_down)
    swiglu_limit = check_limit(swiglu_limit)
    if not torch.is_autocast_enabled(x.device.type) and not x.dtype == w_gate_up.dtype == w_down.dtype:
        raise TypeError(
            f"x, w_gate_up and w_down must share a dtype outside autocast, got {x.dtype}, {w_gate_up.dtype}, "
            f"{w_down.dtype}"
        )
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    path = impl if impl != "auto" else ("triton" if backend.resolve(x) == "triton" else "sorted")
    backend.record("moe_experts", "triton" if path == "triton" else "torch")
    if path == "loop":
        return moe_experts_reference(x, topk_idx, topk_weight, w_gate_up, w_down, swiglu_limit)
    if path == "sorted":
        return moe_experts_sorted(x, topk_idx, topk_weight, w_gate_up, w_down, swiglu_limit)
    from glmkit.kernels.moe_experts import default_block_m, experts_fwd

    dtype = torch.get_autocast_dtype("cuda") if x.is_cuda and torch.is_autocast_enabled("cuda") else w_gate_up.dtype
    x, w_gate_up, w_down = (t.to(dtype) for t in (x, w_gate_up, w_down))
    block_m = default_block_m(topk_idx.numel(), w_gate_up.shape[0], x.device)
    if x.shape[0] == 0:
        return x.new_zeros(x.shape)
    x = x if x.stride(-1) == 1 else x.contiguous()
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, topk_weight, w_gate_up, w_down)):
        return MoEExpertsFunction.apply(x, topk_idx, topk_weight, w_gate_up, w_down, block_m, swiglu_limit)
    return experts_fwd(x, topk_idx, topk_weight, w_gate_up, w_down, block_m, limit=swiglu_limit)[0]
