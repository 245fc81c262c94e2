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

The experts' computation (loop, sorted, kernels) is ``glmkit.ops.moe_experts``; this module holds the
router, the balancing and the layer that ties them together with the shared expert.

Shapes: N tokens (batch and sequence flattened), H hidden size, E routed experts, k experts per token,
I expert intermediate size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from glmkit.layers import MLP
from glmkit.ops.moe_experts import moe_experts
from glmkit.ops.swiglu import check_limit

# Added to the sum of the chosen sigmoid scores before dividing (HF Glm4MoeTopkRouter: `+ 1e-20`), so a
# token whose k scores all underflow to 0 gets weights 0 instead of NaN.
NORM_EPS = 1e-20
# Group score = sum of the top-2 (biased) scores in the group (HF Glm4MoeTopkRouter: `.topk(2)[0].sum()`).
GROUP_TOPK = 2
INIT_STD = 0.02  # HF Glm4MoeConfig.initializer_range


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

    def __init__(
        self, hidden_size: int, n_experts: int, top_k: int, norm_topk_prob: bool = True, init_std: float = INIT_STD
    ):
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k must be in [1, n_experts={n_experts}], got {top_k}")
        self.hidden_size, self.n_experts, self.top_k = hidden_size, n_experts, top_k
        self.norm_topk_prob = norm_topk_prob
        self.weight = nn.Parameter(torch.empty(n_experts, hidden_size))  # W_r [E, H]
        nn.init.normal_(self.weight, std=init_std)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        _check_x(x, self.hidden_size)
        with torch.autocast(x.device.type, enabled=False):  # fp32 even under autocast
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

    scores = logits.sigmoid()  # s: the weights come from these
    choice = scores if bias is None else scores + bias  # s + b: used ONLY for selection
    if n_group > 1 and topk_group < n_group:
        grouped = rearrange(choice, "n (g e) -> n g e", g=n_group)
        group_scores = grouped.topk(GROUP_TOPK, dim=-1).values.sum(dim=-1)  # [N, G]
        group_idx = group_scores.topk(topk_group, dim=-1, sorted=False).indices  # [N, topk_group]
        group_keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
        expert_keep = rearrange(group_keep, "n g -> n g 1").expand(-1, -1, group_size).reshape(-1, E)
        # -inf (not 0 as some DeepSeek code had): s + b may be negative, and a 0 would outrank it.
        choice = choice.masked_fill(~expert_keep, float("-inf"))
    topk_idx = choice.topk(top_k, dim=-1, sorted=False).indices
    topk_weight = scores.gather(1, topk_idx)  # unbiased s of the chosen experts
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

    def __init__(
        self,
        hidden_size: int,
        n_experts: int,
        top_k: int,
        n_group: int = 1,
        topk_group: int = 1,
        norm_topk_prob: bool = True,
        routed_scaling_factor: float = 1.0,
        init_std: float = INIT_STD,
    ):
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
        with torch.autocast(x.device.type, enabled=False):  # fp32 even under autocast (bf16 would flip ties)
            logits = F.linear(x.reshape(-1, self.hidden_size).float(), self.weight.float())  # [N, E], fp32 as HF
        return sigmoid_topk_route(
            logits,
            self.e_score_correction_bias,
            self.top_k,
            self.n_group,
            self.topk_group,
            self.norm_topk_prob,
            self.routed_scaling_factor,
        )


def expert_load(topk_idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Slots per expert: topk_idx [N, k] (or any shape) → load [E] fp32, ``load.sum() == topk_idx.numel()``."""
    if topk_idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"topk_idx must be int64 or int32, got {topk_idx.dtype}")
    flat = topk_idx.reshape(-1).long()
    # scatter_add, not bincount: bincount reads the max id back to the host (a sync on CUDA)
    return torch.zeros(n_experts, device=flat.device).scatter_add_(0, flat, torch.ones(flat.shape, device=flat.device))


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
        raise ValueError(
            f"scores must be [B, T, E] and topk_idx [B, T, k], got {tuple(scores.shape)} and {tuple(topk_idx.shape)}"
        )
    B, T, E = scores.shape
    k = topk_idx.shape[-1]
    s_norm = scores / scores.sum(dim=-1, keepdim=True)  # s'  [B, T, E]
    P = s_norm.mean(dim=1)  # [B, E]
    counts = torch.zeros(B, E, device=scores.device, dtype=torch.float32)
    counts.scatter_add_(1, rearrange(topk_idx, "b t k -> b (t k)").long(), torch.ones(B, T * k, device=scores.device))
    f = counts * (E / (k * T))  # [B, E], 1 when uniform
    return alpha * (f * P.float()).sum(dim=-1).mean()


class Experts(nn.Module):
    """E SwiGLU experts' weights, stacked as HF ``Glm4MoeExperts``: ``gate_up_proj [E, 2I, H]`` (rows [:I] gate,
    [I:] up) and ``down_proj [E, H, I]``. ``forward(x [N, H], topk_idx, topk_weight)`` runs
    ``glmkit.ops.moe_experts`` with ``impl`` ("auto", "loop", "sorted", "triton") and the clamped SwiGLU when
    ``swiglu_limit`` is set (GLM-5.3-Flash)."""

    def __init__(
        self,
        n_experts: int,
        hidden_size: int,
        intermediate_size: int,
        impl: str = "auto",
        init_std: float = INIT_STD,
        swiglu_limit: float | None = None,
    ):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(n_experts, 2 * intermediate_size, hidden_size) * init_std)
        self.down_proj = nn.Parameter(torch.randn(n_experts, hidden_size, intermediate_size) * init_std)
        self.impl = impl
        self.swiglu_limit = check_limit(swiglu_limit)

    def forward(self, x, topk_idx, topk_weight):
        return moe_experts(
            x, topk_idx, topk_weight, self.gate_up_proj, self.down_proj, self.impl, swiglu_limit=self.swiglu_limit
        )

    def extra_repr(self) -> str:
        E, two_i, H = self.gate_up_proj.shape
        limit = f", swiglu_limit={self.swiglu_limit}" if self.swiglu_limit is not None else ""
        return f"n_experts={E}, hidden={H}, intermediate={two_i // 2}, impl={self.impl!r}{limit}"


class MoE(nn.Module):
    """GLM-4.5's MoE FFN: ``y = Σ_{j∈topk} w_j E_j(x) + Shared(x)`` (HF ``Glm4MoeMoE``).

    Submodules ``gate`` (router), ``experts``, ``shared_experts`` (an ``MLP`` of width I · n_shared, or None)
    carry HF's names. ``router="sigmoid"`` is GLM-4.5's, ``"softmax"`` the classic one (for the lesson's
    comparisons). ``forward(x [..., H]) -> [..., H]``. In training mode each forward also records, without
    gradient, ``load_last [E]`` (slots per expert) and adds it to ``load_accum`` (summed until the next
    ``update_bias``), and sets ``aux_loss`` (``sequence_aux_loss`` when ``aux_loss_alpha > 0``, else None; a
    3-D input [B, T, H] is B sequences). Under data parallelism, all-reduce ``load_accum`` before
    ``update_bias`` so every rank applies the same step. ``swiglu_limit`` clamps the SwiGLU of the routed and the
    shared experts alike (GLM-5.3-Flash, ``glmkit.ops.swiglu``).
    """

    def __init__(
        self,
        hidden_size: int,
        n_experts: int,
        top_k: int,
        moe_intermediate_size: int,
        n_shared_experts: int = 1,
        router: str = "sigmoid",
        n_group: int = 1,
        topk_group: int = 1,
        norm_topk_prob: bool = True,
        routed_scaling_factor: float = 1.0,
        aux_loss_alpha: float = 0.0,
        impl: str = "auto",
        init_std: float = INIT_STD,
        swiglu_limit: float | None = None,
    ):
        super().__init__()
        self.hidden_size, self.n_experts, self.top_k = hidden_size, n_experts, top_k
        if router == "sigmoid":
            self.gate = SigmoidGroupRouter(
                hidden_size, n_experts, top_k, n_group, topk_group, norm_topk_prob, routed_scaling_factor, init_std
            )
        elif router == "softmax":
            self.gate = SoftmaxTopKRouter(hidden_size, n_experts, top_k, norm_topk_prob, init_std)
        else:
            raise ValueError(f"router must be 'sigmoid' or 'softmax', got {router!r}")
        self.experts = Experts(n_experts, hidden_size, moe_intermediate_size, impl, init_std, swiglu_limit)
        self.shared_experts = (
            MLP(hidden_size, moe_intermediate_size * n_shared_experts, swiglu_limit) if n_shared_experts else None
        )
        self.aux_loss_alpha = aux_loss_alpha
        self.aux_loss: torch.Tensor | None = None
        self.register_buffer("load_last", torch.zeros(n_experts), persistent=False)
        self.register_buffer("load_accum", torch.zeros(n_experts), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_x(x, self.hidden_size)
        flat = x.reshape(-1, self.hidden_size)  # [N, H]
        topk_idx, topk_weight, scores = self.gate(flat)
        y = self.experts(flat, topk_idx, topk_weight)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        if self.training:
            with torch.no_grad():
                load = expert_load(topk_idx, self.n_experts)
                self.load_last.copy_(load)
                self.load_accum.add_(load)
            self.aux_loss = None
            if self.aux_loss_alpha > 0:
                seqs = x.shape[0] if x.dim() == 3 else 1
                self.aux_loss = sequence_aux_loss(
                    scores.view(seqs, -1, self.n_experts), topk_idx.view(seqs, -1, self.top_k), self.aux_loss_alpha
                )
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

    @torch.no_grad()
    def update_bias(self, gamma: float) -> torch.Tensor:
        """Apply ``update_bias`` to the router's selection bias with the load accumulated since the last call,
        then reset the accumulator; returns that load [E]. Call after ``optimizer.step()``. The softmax router
        has no bias: only the load is returned and reset."""
        load = self.load_accum.clone()
        if isinstance(self.gate, SigmoidGroupRouter) and gamma != 0:
            update_bias(self.gate.e_score_correction_bias, load, gamma)
        self.reset_load()
        return load
