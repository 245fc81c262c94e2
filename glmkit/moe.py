"""Mixture of Experts as in GLM-4.5 (HF ``glm4_moe``): routers, load balancing, experts and the MoE layer.

What MoE is. A dense transformer runs every token through one feed-forward network (FFN). An MoE layer
keeps E smaller FFNs (the *experts*) and a *router* that picks k of them per token, so the layer holds
E experts' worth of parameters (capacity) while each token pays for only k (compute). The output is a
weighted sum of the chosen experts' outputs: ``y = Σ_{j ∈ topk(x)} w_j(x) · E_j(x)``.

The classic router (Switch Transformer k = 1, Mixtral k = 2): ``p = softmax(W_r x)`` over all E experts,
pick the k largest p, weight by p (Mixtral renormalises the k weights to sum to 1; Switch does not). The
softmax couples the experts: raising one score lowers all others. Balance comes from an auxiliary loss
that punishes uneven load, which also pulls the language-model gradient away from the task.

GLM-4.5's router (the same code as DeepSeek-V3; ``Glm4MoeTopkRouter.forward`` in transformers 5.23.0,
``models/glm4_moe/modeling_glm4_moe.py``) differs in six ways:

1. **Sigmoid scores**, ``s = sigmoid(W_r x)`` in fp32: each expert's affinity is independent, in (0, 1).
2. **A selection-only bias** ``b = e_score_correction_bias`` (an fp32 *buffer*, not a trained
   parameter): experts are chosen by ``s + b`` but weighted by ``s``. The bias changes WHICH experts a
   token goes to, never how much each chosen expert's output counts.
3. **Normalised top-k weights** (``norm_topk_prob``): ``w_j = s_j / (Σ_{i∈topk} s_i + 1e-20)``.
4. **routed_scaling_factor** multiplies the normalised weights (2.5 in GLM-4.5, 1.0 in Air), so the
   routed part is not forced to the scale of a single expert.
5. **Group-limited routing** (``n_group``/``topk_group``): experts are split into n_group equal groups,
   a group's score is the sum of its top-2 biased scores, only the best topk_group groups stay
   eligible. DeepSeek-V3 uses 8 groups / top-4 (to bound cross-node traffic); both GLM-4.5 checkpoints
   use 1 / 1, where it does nothing.
6. **A shared expert** that every token passes through, added to the routed sum; and the first
   ``first_k_dense_replace`` layers (3 in GLM-4.5, 1 in Air) keep a plain dense SwiGLU FFN.

Balancing without an auxiliary loss (DeepSeek-V3 §2.1.2): after each training step,
``b_i ← b_i + γ · sign(mean_load − load_i)``; underloaded experts get a higher bias and are picked more
often. Because b never enters the weights, this steers load without touching the model's function the
way an auxiliary-loss gradient does. DeepSeek-V3 keeps a tiny sequence-wise balance loss on top
(``sequence_aux_loss``).

Experts. Each expert is a SwiGLU FFN ``E_j(x) = W_down_j (silu(W_gate_j x) ⊙ W_up_j x)``. Weights are
stacked as in HF's ``Glm4MoeExperts`` so a HF state dict loads directly:
``gate_up_proj [E, 2I, H]`` (rows [:I] = gate, [I:] = up; ``linear(x, gate_up_proj[e]).chunk(2)`` gives
gate, up) and ``down_proj [E, H, I]``. The zai-org checkpoint files store experts one by one
(``mlp.experts.{j}.{gate,up,down}_proj.weight``); transformers stacks them on load
(``conversion_mapping.py``, the ``qwen2_moe`` converter: ``MergeModulelist(dim=0)`` then
``Concatenate(dim=1)``, i.e. gate before up). ``pack_experts``/``unpack_experts`` do the same here.

Two implementations of the expert computation that agree to fp32 rounding:
* ``experts_loop`` — the readable reference: for each expert, find its tokens, run its FFN, add the
  weighted result back (what HF's eager ``Glm4MoeExperts.forward`` does).
* ``experts_sorted`` — the fast torch path (HF's ``grouped_mm_experts_forward``): sort the N·k
  (token, expert) slots by expert so each expert's rows are contiguous, one grouped GEMM for gate‖up,
  SwiGLU, one grouped GEMM for down, weight, un-sort, sum the k slots per token.
  ``torch._grouped_mm`` does all experts in one call where the device, dtype and strides allow it;
  otherwise a per-expert matmul over the contiguous segments.

Entry points: ``SoftmaxTopKRouter``, ``SigmoidGroupRouter`` (and the functional ``sigmoid_topk_route``),
``expert_load``, ``max_violation``, ``update_bias``, ``sequence_aux_loss``, ``Experts``,
``experts_loop``, ``experts_sorted``, ``SwiGLUMLP``, ``MoE``, ``update_all_biases``, ``total_aux_loss``, ``ffn_for_layer``.

Shapes: N tokens (batch and sequence flattened), H hidden size, E routed experts, k experts per token,
I expert intermediate size, S = N·k routed slots (slot s belongs to token s // k).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

# Added to the sum of the chosen sigmoid scores before dividing (HF Glm4MoeTopkRouter: `+ 1e-20`), so a
# token whose k scores all underflow to 0 gets weights 0 instead of NaN.
NORM_EPS = 1e-20
# Group score = sum of the top-2 (biased) scores in the group (HF Glm4MoeTopkRouter: `.topk(2)[0].sum()`).
GROUP_TOPK = 2
# Router and expert initialisation std (HF Glm4MoeConfig.initializer_range).
INIT_STD = 0.02
# torch._grouped_mm needs every row stride to be a multiple of 16 bytes (measured on CPU, torch 2.13:
# "strides should be multiple of 16 bytes"), and 16-byte aligned data pointers.
_GMM_ALIGN_BYTES = 16


# ----------------------------------------------------------------------------------------------------
# Routers
# ----------------------------------------------------------------------------------------------------


def _check_x(x: torch.Tensor, hidden: int, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != hidden:
        raise ValueError(f"{name} must be [..., {hidden}] (hidden size), got {tuple(x.shape)}")


class SoftmaxTopKRouter(nn.Module):
    """The classic router (Switch k = 1, Mixtral k = 2): softmax over all experts, keep the top k.

    ``forward(x [..., H]) -> (topk_idx [N, k] int64, topk_weight [N, k] fp32, scores [N, E] fp32)``
    with ``scores = softmax(W_r x)`` (fp32). ``norm_topk_prob=True`` renormalises the k weights to sum to 1
    (Mixtral); False keeps the raw probabilities (Switch, Qwen2-MoE's default).
    """

    def __init__(self, hidden_size: int, n_experts: int, top_k: int, norm_topk_prob: bool = True,
                 init_std: float = INIT_STD):
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k must be in [1, n_experts={n_experts}], got {top_k}")
        self.hidden_size, self.n_experts, self.top_k = hidden_size, n_experts, top_k
        self.norm_topk_prob = norm_topk_prob
        self.weight = nn.Parameter(torch.empty(n_experts, hidden_size))  # W_r [E, H]
        nn.init.normal_(self.weight, std=init_std)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        _check_x(x, self.hidden_size)
        with torch.autocast(x.device.type, enabled=False):   # fp32 even under autocast
            logits = F.linear(x.reshape(-1, self.hidden_size).float(), self.weight.float())  # [N, E]
        scores = logits.softmax(dim=-1)
        topk_weight, topk_idx = scores.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            topk_weight = topk_weight / topk_weight.sum(dim=-1, keepdim=True)
        return topk_idx, topk_weight, scores


def sigmoid_topk_route(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    top_k: int,
    n_group: int = 1,
    topk_group: int = 1,
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GLM-4.5 / DeepSeek-V3 routing from router logits, in HF ``Glm4MoeTopkRouter.forward``'s order.

    logits [N, E] (fp32), bias [E] or None (``e_score_correction_bias``). Returns
    ``topk_idx [N, k] int64``, ``topk_weight [N, k]`` (normalised, then scaled), ``scores [N, E]`` (sigmoid,
    unbiased). Index order within a row is unspecified (``topk(sorted=False)`` as in HF).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, E], got {tuple(logits.shape)}")
    E = logits.shape[1]
    if n_group < 1 or E % n_group:
        raise ValueError(f"n_group must divide n_experts={E}, got {n_group}")
    group_size = E // n_group
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"topk_group must be in [1, n_group={n_group}], got {topk_group}")
    if n_group > 1 and group_size < GROUP_TOPK:
        raise ValueError(f"group-limited routing needs ≥ {GROUP_TOPK} experts per group, got {group_size}")
    if not 1 <= top_k <= topk_group * group_size:
        raise ValueError(f"top_k must be in [1, topk_group·E/n_group = {topk_group * group_size}], got {top_k}")

    scores = logits.sigmoid()                                        # s: the weights come from these
    choice = scores if bias is None else scores + bias               # s + b: used ONLY for selection
    if n_group > 1 and topk_group < n_group:
        grouped = rearrange(choice, "n (g e) -> n g e", g=n_group)
        group_scores = grouped.topk(GROUP_TOPK, dim=-1).values.sum(dim=-1)           # [N, G]
        group_idx = group_scores.topk(topk_group, dim=-1, sorted=False).indices      # [N, topk_group]
        group_keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
        expert_keep = rearrange(group_keep, "n g -> n g 1").expand(-1, -1, group_size).reshape(-1, E)
        # -inf (not 0 as some DeepSeek code had): s + b may be negative, and a 0 would outrank it.
        choice = choice.masked_fill(~expert_keep, float("-inf"))
    topk_idx = choice.topk(top_k, dim=-1, sorted=False).indices
    topk_weight = scores.gather(1, topk_idx)                          # unbiased s of the chosen experts
    if norm_topk_prob:
        topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + NORM_EPS)
    topk_weight = topk_weight * routed_scaling_factor
    return topk_idx, topk_weight, scores


class SigmoidGroupRouter(nn.Module):
    """GLM-4.5's router: sigmoid scores, selection-only bias, group-limited top-k, normalised and scaled
    weights (see the module docstring and ``sigmoid_topk_route``).

    Parameters match HF ``Glm4MoeTopkRouter`` (``mlp.gate.weight [E, H]``,
    ``mlp.gate.e_score_correction_bias [E]`` fp32 buffer) so the state dict loads directly.

    ``forward(x [..., H]) -> (topk_idx [N, k], topk_weight [N, k] fp32, scores [N, E] fp32)``.
    """

    def __init__(self, hidden_size: int, n_experts: int, top_k: int, n_group: int = 1, topk_group: int = 1,
                 norm_topk_prob: bool = True, routed_scaling_factor: float = 1.0, init_std: float = INIT_STD):
        super().__init__()
        self.hidden_size, self.n_experts, self.top_k = hidden_size, n_experts, top_k
        self.n_group, self.topk_group = n_group, topk_group
        self.norm_topk_prob, self.routed_scaling_factor = norm_topk_prob, routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(n_experts, hidden_size))  # W_r [E, H]
        nn.init.normal_(self.weight, std=init_std)
        # Kept in fp32 even when the model is cast to bf16 (HF: _keep_in_fp32_modules_strict): the update
        # steps γ ≈ 1e-3 would vanish against bf16's 8-bit mantissa.
        self.register_buffer("e_score_correction_bias", torch.zeros(n_experts, dtype=torch.float32))
        sigmoid_topk_route(torch.zeros(1, n_experts), None, top_k, n_group, topk_group)  # validate the sizes

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) would cast the bias buffer; keep it fp32 (devices still move).
        super()._apply(fn, recurse)
        if self.e_score_correction_bias.dtype != torch.float32:
            self.e_score_correction_bias = self.e_score_correction_bias.float()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        _check_x(x, self.hidden_size)
        with torch.autocast(x.device.type, enabled=False):   # fp32 even under autocast (bf16 would flip ties)
            logits = F.linear(x.reshape(-1, self.hidden_size).float(), self.weight.float())  # [N, E], fp32 as HF
        return sigmoid_topk_route(logits, self.e_score_correction_bias, self.top_k, self.n_group,
                                  self.topk_group, self.norm_topk_prob, self.routed_scaling_factor)


# ----------------------------------------------------------------------------------------------------
# Load balancing
# ----------------------------------------------------------------------------------------------------


def expert_load(topk_idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Slots per expert: topk_idx [N, k] (or any shape) → load [E] fp32, ``load.sum() == topk_idx.numel()``."""
    if topk_idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"topk_idx must be int64 or int32, got {topk_idx.dtype}")
    return torch.bincount(topk_idx.reshape(-1).long(), minlength=n_experts)[:n_experts].float()


def max_violation(load: torch.Tensor) -> float:
    """MaxVio (Wang et al. 2024, arXiv:2408.15664): max_i load_i / mean(load) − 1. 0 = perfectly balanced;
    E − 1 = every slot on one expert."""
    mean = load.float().mean()
    return float(load.float().max() / mean - 1) if mean > 0 else 0.0


@torch.no_grad()
def update_bias(bias: torch.Tensor, load: torch.Tensor, gamma: float) -> torch.Tensor:
    """Aux-loss-free balancing step, in place: ``b_i += γ · sign(mean(load) − load_i)``; returns ``bias``.

    bias [E] (fp32 ``e_score_correction_bias``), load [E] (counts or fractions: only the sign matters).
    Underloaded experts gain γ, overloaded lose γ, an expert exactly at the mean is left alone.
    DeepSeek-V3 used γ = 0.001 for most of pre-training, then 0.
    """
    if bias.shape != load.shape or bias.dim() != 1:
        raise ValueError(f"bias and load must both be [E], got {tuple(bias.shape)} and {tuple(load.shape)}")
    load = load.to(device=bias.device, dtype=torch.float32)
    bias.add_(gamma * torch.sign(load.mean() - load).to(bias.dtype))
    return bias


def sequence_aux_loss(scores: torch.Tensor, topk_idx: torch.Tensor, alpha: float = 1e-4) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss (eq. 17-20), averaged over sequences.

    scores [B, T, E] (or [T, E] for one sequence): the router's unbiased affinities (sigmoid scores;
    softmax probabilities work too), differentiable. topk_idx [B, T, k] (or [T, k]). Per sequence:
    ``s'_{i,t} = s_{i,t} / Σ_j s_{j,t}``, ``P_i = mean_t s'_{i,t}``,
    ``f_i = E/(k·T) · #{t : i ∈ topk_t}`` (no gradient), ``L = α Σ_i f_i P_i``. A perfectly balanced
    sequence gives ``L = α`` (f_i = 1, Σ P_i = 1); collapse onto k experts gives up to ``α · E/k``.
    """
    if scores.dim() == 2:
        scores, topk_idx = scores.unsqueeze(0), topk_idx.unsqueeze(0)
    if scores.dim() != 3 or topk_idx.dim() != 3 or scores.shape[:2] != topk_idx.shape[:2]:
        raise ValueError(f"scores must be [B, T, E] and topk_idx [B, T, k], got {tuple(scores.shape)} "
                         f"and {tuple(topk_idx.shape)}")
    B, T, E = scores.shape
    k = topk_idx.shape[-1]
    s_norm = scores / scores.sum(dim=-1, keepdim=True)                     # s'  [B, T, E]
    P = s_norm.mean(dim=1)                                                 # [B, E]
    counts = torch.zeros(B, E, device=scores.device, dtype=torch.float32)
    counts.scatter_add_(1, rearrange(topk_idx, "b t k -> b (t k)").long(),
                        torch.ones(B, T * k, device=scores.device))
    f = counts * (E / (k * T))                                             # [B, E], 1 when uniform
    return alpha * (f * P.float()).sum(dim=-1).mean()


# ----------------------------------------------------------------------------------------------------
# Experts
# ----------------------------------------------------------------------------------------------------


class Experts(nn.Module):
    """E SwiGLU experts with stacked weights, laid out as HF ``Glm4MoeExperts``:

    * ``gate_up_proj [E, 2I, H]`` — rows [:I] gate, rows [I:] up (``linear(x, gate_up_proj[e])`` → gate ‖ up)
    * ``down_proj [E, H, I]``

    ``forward(x [N, H], topk_idx [N, k], topk_weight [N, k]) -> [N, H]`` in x's dtype; ``impl`` picks
    "sorted" (default, ``experts_sorted``), "loop" (``experts_loop``) or any callable with that signature
    plus the module as fourth argument (the Triton kernels plug in here).
    """

    def __init__(self, n_experts: int, hidden_size: int, intermediate_size: int,
                 impl: str | Callable = "sorted", init_std: float = INIT_STD):
        super().__init__()
        self.n_experts, self.hidden_size, self.intermediate_size = n_experts, hidden_size, intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden_size, intermediate_size))
        nn.init.normal_(self.gate_up_proj, std=init_std)
        nn.init.normal_(self.down_proj, std=init_std)
        self.impl = impl

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        if callable(self.impl):
            return self.impl(x, topk_idx, topk_weight, self)
        if self.impl == "sorted":
            return experts_sorted(x, topk_idx, topk_weight, self)
        if self.impl == "loop":
            return experts_loop(x, topk_idx, topk_weight, self)
        raise ValueError(f"impl must be 'sorted', 'loop' or a callable, got {self.impl!r}")

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, hidden={self.hidden_size}, intermediate={self.intermediate_size}"


def pack_experts(gate: list[torch.Tensor] | torch.Tensor, up: list[torch.Tensor] | torch.Tensor,
                 down: list[torch.Tensor] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert checkpoint weights → stacked: gate/up E×[I, H], down E×[H, I] →
    ``(gate_up_proj [E, 2I, H], down_proj [E, H, I])`` — transformers' MergeModulelist(0) + Concatenate(1)."""
    gate, up, down = (torch.stack(list(t)) if not isinstance(t, torch.Tensor) else t for t in (gate, up, down))
    return torch.cat([gate, up], dim=1), down


def unpack_experts(gate_up_proj: torch.Tensor, down_proj: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of ``pack_experts``: → gate [E, I, H], up [E, I, H], down [E, H, I] (views)."""
    gate, up = gate_up_proj.chunk(2, dim=1)
    return gate, up, down_proj


def _check_routing(x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor, experts: Experts,
                   check_range: bool = True) -> None:
    if not isinstance(experts, Experts):
        raise TypeError(f"experts must be a glmkit.moe.Experts, got {type(experts).__name__}")
    _check_x(x, experts.hidden_size)
    if x.dim() != 2:
        raise ValueError(f"x must be [N, H], got {tuple(x.shape)}")
    if topk_idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"topk_idx must be int64 or int32, got {topk_idx.dtype}")
    if topk_idx.dim() != 2 or topk_idx.shape[0] != x.shape[0]:
        raise ValueError(f"topk_idx must be [N={x.shape[0]}, k], got {tuple(topk_idx.shape)}")
    if topk_weight.shape != topk_idx.shape:
        raise ValueError(f"topk_weight must match topk_idx {tuple(topk_idx.shape)}, got {tuple(topk_weight.shape)}")
    if check_range and topk_idx.numel() and (topk_idx.min() < 0 or topk_idx.max() >= experts.n_experts):
        raise ValueError(f"topk_idx values must be in [0, {experts.n_experts}), got "
                         f"[{int(topk_idx.min())}, {int(topk_idx.max())}]")


def _swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2I] gate ‖ up → silu(gate) · up [..., I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def experts_loop(x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor,
                 experts: Experts) -> torch.Tensor:
    """Readable reference: ``y_t = Σ_j topk_weight[t, j] · E_{topk_idx[t, j]}(x_t)``, one expert at a time.

    x [N, H], topk_idx [N, k], topk_weight [N, k] → y [N, H] in x's dtype. Expert matmuls run in x's
    dtype; the weighting and the sum over k are fp32, rounded once at the end (HF's grouped_mm path does
    the same; its eager Glm4MoeExperts rounds each expert's weighted output to x's dtype before
    ``index_add_``, so in bf16 it differs from both by rounding).
    """
    _check_routing(x, topk_idx, topk_weight, experts)
    out = torch.zeros(x.shape, device=x.device, dtype=torch.float32)
    for e in range(experts.n_experts):
        token, slot = torch.where(topk_idx == e)       # the tokens that chose e, and in which of their k slots
        if token.numel() == 0:
            continue                                   # an expert nobody picked costs nothing
        h = F.linear(x[token], experts.gate_up_proj[e])                  # [n_e, 2I]
        y = F.linear(_swiglu(h), experts.down_proj[e])                  # [n_e, H]
        out.index_add_(0, token, y.float() * topk_weight[token, slot, None].float())
    return out.to(x.dtype)


def grouped_mm_ok(x: torch.Tensor, experts: Experts) -> bool:
    """Whether ``torch._grouped_mm`` can run the expert GEMMs for x [S, H] here (device, dtype, strides).

    CPU: torch ≥ 2.9 has a kernel (transformers' ``_can_use_grouped_mm``); fp32/bf16/fp16 checked on
    2.13. CUDA: SM80+ on torch ≥ 2.9, bf16 only (the dtype the CUDA kernel is built for; others fall
    back). Both: every row stride (H, 2I, I elements) a multiple of 16 bytes, 16-byte aligned pointers.
    """
    w = experts.gate_up_proj
    if not hasattr(torch, "_grouped_mm") or x.dtype != w.dtype or x.device != w.device:
        return False
    if x.device.type == "cuda":
        if x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device) < (8, 0):
            return False
    elif x.device.type == "cpu":
        major, minor = (int(v) for v in torch.__version__.split(".")[:2])
        if (major, minor) < (2, 9) or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return False
    else:
        return False
    es = x.element_size()
    H, I = experts.hidden_size, experts.intermediate_size
    return all(n * es % _GMM_ALIGN_BYTES == 0 for n in (H, 2 * I, I)) and all(
        t.data_ptr() % _GMM_ALIGN_BYTES == 0 for t in (x, w, experts.down_proj))


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """torch._grouped_mm with a contiguous incoming gradient (its backward rejects the stride-0 grads
    that e.g. ``.sum()`` produces: "Invalid strides/sizes")."""
    out = torch._grouped_mm(a, b, offs=offs)
    if out.requires_grad:
        out.register_hook(lambda g: g.contiguous())
    return out


def _segment_mm(a: torch.Tensor, b: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Fallback grouped GEMM: a [S, K] sorted by group, b [E, K, N], counts[e] rows per group → [S, N]."""
    outs = [a_e @ b[e] for e, a_e in enumerate(a.split(counts)) if counts[e]]
    return torch.cat(outs) if outs else a.new_zeros(0, b.shape[-1])


def experts_sorted(x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor, experts: Experts,
                   use_grouped_mm: bool | None = None) -> torch.Tensor:
    """Fast torch path: sort slots by expert, grouped GEMM, SwiGLU, grouped GEMM, weighted combine.

    x [N, H], topk_idx [N, k], topk_weight [N, k] → y [N, H] in x's dtype; equals ``experts_loop`` up to
    rounding. ``use_grouped_mm``: None = ``torch._grouped_mm`` when ``grouped_mm_ok`` says it can run,
    False = per-expert matmuls over the sorted segments, True = insist (errors if it cannot run).
    Steps (HF ``grouped_mm_experts_forward``, transformers 5.23 ``integrations/moe.py``):

    1. flatten the routing to S = N·k slots and stable-sort them by expert id → ``perm [S]``;
    2. gather ``x_g = x[perm // k]`` [S, H] (the Triton kernel gathers inside the GEMM instead);
    3. per-expert row counts → offsets; ``h = x_g @ gate_up_proj[e]ᵀ`` per segment [S, 2I];
    4. ``a = silu(gate) · up`` [S, I]; ``y_g = a @ down_proj[e]ᵀ`` per segment [S, H];
    5. scale by the slot's weight (fp32), un-sort with the inverse permutation, sum the k slots of each
       token: a reshape-sum, deterministic (index_add_ with repeated indices is not, on CUDA).
    """
    _check_routing(x, topk_idx, topk_weight, experts, check_range=not x.is_cuda)  # no host sync on GPU
    N, k = topk_idx.shape
    E = experts.n_experts
    if N == 0:
        return torch.zeros_like(x)
    flat_e = topk_idx.reshape(-1).long()                                  # [S] expert of each slot
    sorted_e, perm = torch.sort(flat_e, stable=True)                      # [S]
    x_g = x[perm // k]                                                    # [S, H], rows grouped by expert
    counts = torch.bincount(sorted_e, minlength=E)                        # [E] rows per expert

    w_gate_up = experts.gate_up_proj.transpose(-2, -1)                    # [E, H, 2I] (a view)
    w_down = experts.down_proj.transpose(-2, -1)                          # [E, I, H] (a view)
    if use_grouped_mm is None:
        use_grouped_mm = grouped_mm_ok(x_g, experts)
    if use_grouped_mm:
        offs = counts.cumsum(0).to(torch.int32)                          # end row of each expert's segment
        h = _grouped_mm(x_g, w_gate_up, offs)                             # [S, 2I]
        y_g = _grouped_mm(_swiglu(h), w_down, offs)                       # [S, H]
    else:
        c = counts.tolist()                                               # one host sync
        h = _segment_mm(x_g, w_gate_up, c)
        y_g = _segment_mm(_swiglu(h), w_down, c)

    y_g = y_g.float() * topk_weight.reshape(-1)[perm].float().unsqueeze(-1)   # weighted, fp32 [S, H]
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)                # sorted position of slot s
    y = rearrange(y_g[inv], "(n k) h -> n k h", k=k).sum(dim=1)              # [N, H]
    return y.to(x.dtype)


# ----------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------


class SwiGLUMLP(nn.Module):
    """``down(silu(gate(x)) · up(x))``, bias-free, with HF ``Glm4MoeMLP``'s parameter names
    (``gate_proj [I, H]``, ``up_proj [I, H]``, ``down_proj [H, I]``): the shared expert, and the dense FFN of
    the first ``first_k_dense_replace`` layers."""

    def __init__(self, hidden_size: int, intermediate_size: int, init_std: float = INIT_STD):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        for lin in (self.gate_proj, self.up_proj, self.down_proj):
            nn.init.normal_(lin.weight, std=init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """GLM-4.5's MoE FFN: ``y = Σ_{j∈topk} w_j E_j(x) + Shared(x)`` (HF ``Glm4MoeMoE``).

    Submodules ``gate`` (router), ``experts``, ``shared_experts`` carry HF's names, so
    ``model.layers.{i}.mlp.*`` loads directly. ``router="sigmoid"`` is GLM-4.5's; ``"softmax"`` the classic
    (for comparisons in the lesson). ``n_shared_experts=0`` drops the shared expert.

    ``forward(x [..., H]) -> [..., H]``. In training mode each forward also updates, without gradient:

    * ``load_last [E]`` — slots per expert in this forward;
    * ``load_accum [E]``, ``tokens_accum`` — sums since the last ``update_bias``/``reset_load``;
    * ``aux_loss`` — ``sequence_aux_loss`` of this forward (a differentiable scalar the trainer adds to
      the loss) when ``aux_loss_alpha > 0``, else None. A 3-D input [B, T, H] is B sequences; 2-D is one.

    These buffers are not saved in the state dict. Under data parallelism, all-reduce ``load_accum``
    before ``update_bias`` so every rank applies the same step (not done here).
    """

    def __init__(self, hidden_size: int, n_experts: int, top_k: int, moe_intermediate_size: int,
                 n_shared_experts: int = 1, router: str = "sigmoid", n_group: int = 1, topk_group: int = 1,
                 norm_topk_prob: bool = True, routed_scaling_factor: float = 1.0, aux_loss_alpha: float = 0.0,
                 impl: str | Callable = "sorted", init_std: float = INIT_STD):
        super().__init__()
        self.hidden_size, self.n_experts, self.top_k = hidden_size, n_experts, top_k
        if router == "sigmoid":
            self.gate = SigmoidGroupRouter(hidden_size, n_experts, top_k, n_group, topk_group, norm_topk_prob,
                                           routed_scaling_factor, init_std)
        elif router == "softmax":
            self.gate = SoftmaxTopKRouter(hidden_size, n_experts, top_k, norm_topk_prob, init_std)
        else:
            raise ValueError(f"router must be 'sigmoid' or 'softmax', got {router!r}")
        self.experts = Experts(n_experts, hidden_size, moe_intermediate_size, impl, init_std)
        self.shared_experts = (SwiGLUMLP(hidden_size, moe_intermediate_size * n_shared_experts, init_std)
                               if n_shared_experts > 0 else None)
        self.aux_loss_alpha = aux_loss_alpha
        self.aux_loss: torch.Tensor | None = None
        self.register_buffer("load_last", torch.zeros(n_experts), persistent=False)
        self.register_buffer("load_accum", torch.zeros(n_experts), persistent=False)
        self.tokens_accum = 0

    @classmethod
    def from_config(cls, cfg, **overrides) -> "MoE":
        """From any object with HF ``Glm4MoeConfig``'s field names (HF's config or ``glmkit.moe_configs``)."""
        kw = dict(hidden_size=cfg.hidden_size, n_experts=cfg.n_routed_experts, top_k=cfg.num_experts_per_tok,
                  moe_intermediate_size=cfg.moe_intermediate_size, n_shared_experts=cfg.n_shared_experts,
                  n_group=cfg.n_group, topk_group=cfg.topk_group, norm_topk_prob=cfg.norm_topk_prob,
                  routed_scaling_factor=cfg.routed_scaling_factor,
                  init_std=getattr(cfg, "initializer_range", INIT_STD))
        kw.update(overrides)
        return cls(**kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_x(x, self.hidden_size)
        flat = x.reshape(-1, self.hidden_size)                               # [N, H]
        topk_idx, topk_weight, scores = self.gate(flat)
        y = self.experts(flat, topk_idx, topk_weight)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        if self.training:
            with torch.no_grad():
                load = expert_load(topk_idx, self.n_experts).to(self.load_last.device)
                self.load_last.copy_(load)
                self.load_accum.add_(load)
                self.tokens_accum += flat.shape[0]
            self.aux_loss = None
            if self.aux_loss_alpha > 0:
                seqs = x.shape[0] if x.dim() == 3 else 1
                self.aux_loss = sequence_aux_loss(scores.view(seqs, -1, self.n_experts),
                                                  topk_idx.view(seqs, -1, self.top_k), self.aux_loss_alpha)
        return y.view(x.shape)

    def _apply(self, fn, recurse=True):
        # Keep the load counters fp32 under .to(bfloat16): bf16 counts stop being exact above 256.
        super()._apply(fn, recurse)
        for name in ("load_last", "load_accum"):
            buf = getattr(self, name)
            if buf.dtype != torch.float32:
                setattr(self, name, buf.float())
        return self

    def reset_load(self) -> None:
        self.load_accum.zero_()
        self.tokens_accum = 0

    @torch.no_grad()
    def update_bias(self, gamma: float) -> torch.Tensor:
        """Apply ``update_bias`` to the router's ``e_score_correction_bias`` with the load accumulated since
        the last call, then reset the accumulator; returns that load [E]. Call after ``optimizer.step()``.
        No-op (the load is still returned and reset) for the softmax router or when nothing accumulated."""
        load = self.load_accum.clone()
        if isinstance(self.gate, SigmoidGroupRouter) and load.sum() > 0 and gamma != 0:
            update_bias(self.gate.e_score_correction_bias, load, gamma)
        self.reset_load()
        return load


def total_aux_loss(layers: list["MoE"]) -> torch.Tensor | None:
    """Sum of the MoE layers' sequence-wise balance losses from their last training forward (None when none
    computed one: ``aux_loss_alpha`` is 0, or no training forward ran)."""
    losses = [m.aux_loss for m in layers if m.aux_loss is not None]
    return torch.stack(losses).sum() if losses else None


def update_all_biases(model: nn.Module, gamma: float) -> list[torch.Tensor]:
    """``MoE.update_bias(gamma)`` on every MoE layer of ``model``; returns their loads (one [E] per layer)."""
    return [m.update_bias(gamma) for m in model.modules() if isinstance(m, MoE)]


def ffn_for_layer(cfg, layer_idx: int, **moe_overrides) -> nn.Module:
    """The FFN of decoder layer ``layer_idx``: dense ``SwiGLUMLP(hidden, intermediate_size)`` when
    ``layer_idx < first_k_dense_replace`` (HF Glm4MoeDecoderLayer), else ``MoE.from_config(cfg)``."""
    if layer_idx < cfg.first_k_dense_replace:
        return SwiGLUMLP(cfg.hidden_size, cfg.intermediate_size, getattr(cfg, "initializer_range", INIT_STD))
    return MoE.from_config(cfg, **moe_overrides)
