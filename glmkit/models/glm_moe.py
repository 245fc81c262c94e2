"""GLM-4.5 (HF ``glm4_moe``) as a model: the GLM-4 block with Mixture-of-Experts FFNs, QK-norm, half-split
partial RoPE, and the stored multi-token-prediction (MTP) layer (facts: shared/reference/glm-lineage.md §4, §7).

What it implements
    ``GLMMoEModel``: embedding → N pre-norm blocks → final RMSNorm → LM head, like ``GLMDenseModel`` (it is a
    subclass and shares attention, RoPE, the KV cache, generation, input checks), with:
    * the FFN of layer i a dense SwiGLU MLP for ``i < first_k_dense_replace`` and an MoE
      (``glmkit.moe.MoE``: sigmoid router with the selection-only bias, k routed experts, a shared expert)
      from there on;
    * an optional MTP module (``num_nextn_predict_layers = 1``) stored after the last layer, as the
      checkpoints do (``model.layers.{N}.*``), whose ``mtp_logits`` predicts the token after next.

How GLM-4.5 differs from its predecessor GLM-4-0414 (``glmkit.models.glm_dense``, HF ``glm4``)
    * FFN: dense SwiGLU → MoE from layer ``first_k_dense_replace`` on (GLM-4.5: 3 dense layers, then 89
      MoE layers of 160 experts, 8 routed + 1 shared per token).
    * Attention: 96 query heads over 8 KV heads (the query width, 12288, is 2.4× the hidden size),
      per-head QK-norm before RoPE (GLM-4.5; not Air), and the same partial RoPE on 64 of 128 dims but
      with **half-split** pairs (``rope_pairing="half"``, θ = 1e6) where GLM-4 used interleaved ones.
    * Block: plain pre-norm again (the 0414 sandwich norms are gone).
    * One MTP layer in the checkpoint (HF's ``Glm4MoeForCausalLM`` ignores it on load; glmkit keeps it).

Expert compute (``moe_impl``): "auto" runs the Triton grouped-GEMM kernels (``glmkit.kernels.moe_gemm``)
when ``glmkit.backend`` resolves to "triton" (CUDA tensors by default) and the sorted torch path
(``glmkit.moe.experts_sorted``) otherwise; "sorted", "loop" and "triton" force one. Under CUDA autocast the
kernels get the autocast dtype (bf16), as ``nn.Linear`` would.

Parameter names: those of ``GLMDenseModel`` plus, in an MoE layer, ``layers.i.mlp.gate.{weight,
e_score_correction_bias}``, ``layers.i.mlp.experts.{gate_up_proj [E, 2I, H], down_proj [E, H, I]}``,
``layers.i.mlp.shared_experts.{gate,up,down}_proj.weight`` (HF's names below ``mlp``), and ``mtp.*``.
``glmkit.hf`` maps them to and from the checkpoint layout.

Shapes: B batch, T tokens, d hidden size, E routed experts, k experts per token, I expert width.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from glmkit import backend
from glmkit.mlp import MLP, swiglu
from glmkit.moe import MoE, SigmoidGroupRouter, experts_loop, experts_sorted, max_violation, total_aux_loss
from glmkit.moe_configs import GLM_4_5, GLM_4_5_AIR, GLM45Config
from glmkit.models.glm_dense import Block, GLMDenseConfig, GLMDenseModel, _StepContext, count_distinct
from glmkit.norms import RMSNorm
from glmkit.presets import preset

MODEL_TYPE = "glmkit_glm_moe"
ROUTERS = ("sigmoid", "softmax")
MOE_IMPLS = ("auto", "sorted", "loop", "triton")


# ----------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------
@dataclass
class GLMMoEConfig(GLMDenseConfig):
    """``GLMDenseConfig`` plus the MoE fields (HF ``Glm4MoeConfig``'s meaning, shorter names where ours
    existed). Defaults are GLM-4.5's attention: QK-norm, half-split partial RoPE, θ = 1e6, pre-norm.

    ``intermediate_size`` is the dense FFN of the first ``first_k_dense_replace`` layers;
    ``moe_intermediate_size`` one expert's width (the shared expert is ``n_shared_experts`` times that).
    ``aux_loss_alpha`` > 0 adds DeepSeek-V3's sequence-wise balance loss (``GLMMoEModel.aux_loss``).
    ``mtp_tied``: the MTP layer reads the main model's embedding and LM head (the paper; False when a
    checkpoint's stored copies differ from the main ones).
    """

    qk_norm: bool = True
    rope_pairing: str = "half"
    rope_theta: float = 1e6
    # MoE
    n_routed_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 64
    n_shared_experts: int = 1
    first_k_dense_replace: int = 1
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    router: str = "sigmoid"
    aux_loss_alpha: float = 0.0
    moe_impl: str = "auto"
    # multi-token prediction
    num_nextn_predict_layers: int = 0
    mtp_tied: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "n_group", "topk_group"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"GLMMoEConfig.{name} must be a positive int, got {v!r}")
        for name in ("n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"GLMMoEConfig.{name} must be a non-negative int, got {v!r}")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ValueError(f"GLMMoEConfig: num_experts_per_tok={self.num_experts_per_tok} is more than "
                             f"n_routed_experts={self.n_routed_experts}")
        if self.n_routed_experts % self.n_group or self.topk_group > self.n_group:
            raise ValueError(f"GLMMoEConfig: n_group={self.n_group} must divide n_routed_experts="
                             f"{self.n_routed_experts} and topk_group={self.topk_group} must be <= n_group")
        if self.topk_group * (self.n_routed_experts // self.n_group) < self.num_experts_per_tok:
            raise ValueError(f"GLMMoEConfig: the {self.topk_group} kept group(s) of "
                             f"{self.n_routed_experts // self.n_group} experts hold fewer than "
                             f"num_experts_per_tok={self.num_experts_per_tok} experts")
        if self.first_k_dense_replace > self.n_layers:
            raise ValueError(f"GLMMoEConfig: first_k_dense_replace={self.first_k_dense_replace} exceeds "
                             f"n_layers={self.n_layers}")
        if self.router not in ROUTERS:
            raise ValueError(f"GLMMoEConfig.router={self.router!r} is not one of {ROUTERS}")
        if self.moe_impl not in MOE_IMPLS:
            raise ValueError(f"GLMMoEConfig.moe_impl={self.moe_impl!r} is not one of {MOE_IMPLS}")
        if self.activation != "swiglu" or self.norm != "rmsnorm":
            raise ValueError("GLMMoEConfig: the MoE model is defined with activation='swiglu' and norm='rmsnorm'")
        if self.position != "rope":
            raise ValueError("GLMMoEConfig: the MoE model uses 1D partial RoPE (position='rope')")
        if not (isinstance(self.routed_scaling_factor, (int, float)) and self.routed_scaling_factor > 0):
            raise ValueError(f"GLMMoEConfig.routed_scaling_factor must be > 0, got {self.routed_scaling_factor!r}")
        if not (isinstance(self.aux_loss_alpha, (int, float)) and self.aux_loss_alpha >= 0):
            raise ValueError(f"GLMMoEConfig.aux_loss_alpha must be >= 0, got {self.aux_loss_alpha!r}")

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.first_k_dense_replace

    @property
    def active_ffn_width(self) -> int:
        """Expert width a token passes through in an MoE layer: (k routed + shared) × I."""
        return (self.num_experts_per_tok + self.n_shared_experts) * self.moe_intermediate_size


def from_glm45(c: GLM45Config, **overrides: Any) -> GLMMoEConfig:
    """A ``GLMMoEConfig`` from a ``glmkit.moe_configs.GLM45Config`` (HF field names)."""
    fields = dict(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, n_layers=c.num_hidden_layers,
        n_heads=c.num_attention_heads, n_kv_heads=c.num_key_value_heads, head_dim=c.head_dim,
        intermediate_size=c.intermediate_size, max_seq_len=c.max_position_embeddings,
        qkv_bias=c.attention_bias, qk_norm=c.use_qk_norm, partial_rotary_factor=c.partial_rotary_factor,
        rope_pairing="half", rope_theta=c.rope_theta, norm_eps=c.rms_norm_eps,
        tie_word_embeddings=c.tie_word_embeddings, init_std=c.initializer_range,
        n_routed_experts=c.n_routed_experts, num_experts_per_tok=c.num_experts_per_tok,
        moe_intermediate_size=c.moe_intermediate_size, n_shared_experts=c.n_shared_experts,
        first_k_dense_replace=c.first_k_dense_replace, n_group=c.n_group, topk_group=c.topk_group,
        norm_topk_prob=c.norm_topk_prob, routed_scaling_factor=c.routed_scaling_factor,
        num_nextn_predict_layers=c.num_nextn_predict_layers,
        pad_token_id=151329, eos_token_ids=(151329, 151336, 151338),
    )
    fields.update(overrides)
    return GLMMoEConfig(**fields)


_BYTE_VOCAB = 264  # glmkit.tokenizer.ByteTokenizer().vocab_size

PRESETS: dict[str, GLMMoEConfig] = {
    # The published models (instantiate them on the meta device: 355B / 106B parameters).
    "glm-4.5": from_glm45(GLM_4_5),
    "glm-4.5-air": from_glm45(GLM_4_5_AIR),
    # CPU: 4 layers (1 dense + 3 MoE), 8 experts of 128 (top-2 + 1 shared), byte vocabulary.
    # ~1.4M parameters, ~0.7M active per token; dense_twin() gives the same active size densely.
    "cpu-moe": GLMMoEConfig(vocab_size=_BYTE_VOCAB, hidden_size=128, n_layers=4, n_heads=4, n_kv_heads=2,
                            head_dim=32, intermediate_size=384, max_seq_len=256, tie_word_embeddings=True,
                            n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=128,
                            n_shared_experts=1, first_k_dense_replace=1),
    # One GPU: 8 layers (1 dense + 7 MoE), 32 experts of 256 (top-4 + 1 shared), D = 64 for the kernels.
    "gpu-moe": GLMMoEConfig(vocab_size=_BYTE_VOCAB, hidden_size=512, n_layers=8, n_heads=8, n_kv_heads=2,
                            head_dim=64, intermediate_size=1280, max_seq_len=1024, tie_word_embeddings=True,
                            n_routed_experts=32, num_experts_per_tok=4, moe_intermediate_size=256,
                            n_shared_experts=1, first_k_dense_replace=1),
}


def get_config(name: str | GLMMoEConfig, **overrides: Any) -> GLMMoEConfig:
    """A preset by name (or a config to copy) with fields overridden: ``get_config("cpu-moe", n_layers=2)``."""
    return preset(GLMMoEConfig, PRESETS, name, overrides)


def dense_twin(cfg: GLMMoEConfig, **overrides: Any) -> GLMDenseConfig:
    """The dense model with the same attention, norms and vocabulary whose FFN width equals an MoE layer's
    active width ((k + shared)·I), so both spend the same compute per token (FFN layers before
    ``first_k_dense_replace`` keep their own width in the MoE model; the twin uses the active width
    everywhere, which the lesson's FLOP count accounts for by counting active parameters)."""
    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(GLMDenseConfig)}
    shared.update(intermediate_size=cfg.active_ffn_width, block="pre")
    shared.update(overrides)
    return GLMDenseConfig(**shared)


# ----------------------------------------------------------------------------------------------------
# Pieces
# ----------------------------------------------------------------------------------------------------
class SharedExpert(nn.Module):
    """The shared expert (and HF ``Glm4MoeMLP``): ``down(silu(gate(x)) · up(x))`` with HF's separate
    ``gate_proj``/``up_proj``/``down_proj`` weights; the activation goes through ``glmkit.mlp.swiglu`` (the
    fused kernel on CUDA) on one GEMM against the stacked [gate; up] weight."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = F.linear(x, torch.cat((self.gate_proj.weight, self.up_proj.weight)))   # [..., 2I]
        return self.down_proj(swiglu(gate_up))


def experts_auto(x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor, experts,
                 force: str | None = None) -> torch.Tensor:
    """The routed experts on the Triton grouped GEMMs or the sorted torch path (see the module docstring)."""
    path = force or ("triton" if backend.resolve(x) == "triton" else "torch")
    backend.record("moe_experts", path)
    if path == "triton":
        from glmkit.kernels.moe_gemm import moe_experts

        w_gu, w_d = experts.gate_up_proj, experts.down_proj
        dtype = x.dtype
        if x.is_cuda and torch.is_autocast_enabled("cuda"):
            dtype = torch.get_autocast_dtype("cuda")
        elif w_gu.dtype != x.dtype:
            dtype = w_gu.dtype
        return moe_experts(x.to(dtype), topk_idx, topk_weight, w_gu.to(dtype), w_d.to(dtype), check=not x.is_cuda)
    return experts_sorted(x, topk_idx, topk_weight, experts)


def _impl(name: str):
    if name == "auto":
        return experts_auto
    if name == "triton":
        return lambda x, i, w, e: experts_auto(x, i, w, e, force="triton")
    return {"sorted": experts_sorted, "loop": experts_loop}[name]


def make_moe(cfg: GLMMoEConfig) -> MoE:
    moe = MoE(cfg.hidden_size, cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size,
              n_shared_experts=0, router=cfg.router, n_group=cfg.n_group, topk_group=cfg.topk_group,
              norm_topk_prob=cfg.norm_topk_prob, routed_scaling_factor=cfg.routed_scaling_factor,
              aux_loss_alpha=cfg.aux_loss_alpha, impl=_impl(cfg.moe_impl), init_std=cfg.init_std)
    if cfg.n_shared_experts:
        moe.shared_experts = SharedExpert(cfg.hidden_size, cfg.n_shared_experts * cfg.moe_intermediate_size)
    return moe


class MoEBlock(Block):
    """A pre-norm GLM-4.5 layer: attention, then a dense SwiGLU MLP (``layer_idx < first_k_dense_replace``)
    or an MoE."""

    def make_ffn(self, cfg: GLMMoEConfig, layer_idx: int) -> nn.Module:
        if layer_idx < cfg.first_k_dense_replace:
            return MLP(cfg.hidden_size, cfg.intermediate_size, "swiglu")
        return make_moe(cfg)


class MTPLayer(nn.Module):
    """One multi-token-prediction module (DeepSeek-V3 §2.2; GLM-4.5 stores one as ``model.layers.{N}``)::

        h' = eh_proj([enorm(Emb(t_{i+1})) ; hnorm(h_i)])      embedding first, then the hidden state
        h  = block(h')                                         a full MoE decoder layer
        logits_{i+2} = head(shared_head_norm(h))

    ``embed_tokens`` and ``head`` are the main model's (tied) unless ``config.mtp_tied`` is False, when
    this layer owns the copies the checkpoint stores.
    """

    def __init__(self, cfg: GLMMoEConfig, layer_idx: int):
        super().__init__()
        d = cfg.hidden_size
        self.enorm = RMSNorm(d, eps=cfg.norm_eps)
        self.hnorm = RMSNorm(d, eps=cfg.norm_eps)
        self.eh_proj = nn.Linear(2 * d, d, bias=False)
        self.block = MoEBlock(cfg, layer_idx)
        self.shared_head_norm = RMSNorm(d, eps=cfg.norm_eps)
        self.embed_tokens = nn.Embedding(cfg.padded_vocab_size, d)
        self.head = nn.Linear(d, cfg.padded_vocab_size, bias=False)

    def forward(self, hidden: torch.Tensor, next_embeds: torch.Tensor, rope: tuple,
                ctx: _StepContext) -> torch.Tensor:
        """hidden [B, T, d] (the main model's final-norm output at positions i), next_embeds [B, T, d]
        (embeddings of tokens i+1) → this layer's hidden state [B, T, d] (before ``shared_head_norm``)."""
        x = self.eh_proj(torch.cat((self.enorm(next_embeds), self.hnorm(hidden)), dim=-1))
        return self.block(x, rope, ctx)


# ----------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------
class GLMMoEModel(GLMDenseModel):
    """GLM-4.5-style MoE model. ``forward``/``loss``/``new_cache``/``hidden_states`` as ``GLMDenseModel``;
    MoE bookkeeping: ``moe_layers()``, ``aux_loss()``, ``update_bias(gamma)``, ``expert_load()``;
    ``num_parameters(include_mtp)``, ``num_active_parameters()``; ``mtp_logits(input_ids)``."""

    block_class = MoEBlock
    config_class = GLMMoEConfig

    def __init__(self, config: GLMMoEConfig):
        super().__init__(config)
        cfg = config
        self.mtp = nn.ModuleList(MTPLayer(cfg, cfg.n_layers + j) for j in range(cfg.num_nextn_predict_layers))
        self._init_moe()
        if cfg.mtp_tied:
            for m in self.mtp:
                m.embed_tokens.weight = self.embed_tokens.weight
                m.head.weight = self.lm_head.weight

    # -- init --------------------------------------------------------------------------------------
    def _init_moe(self) -> None:
        """Routers and experts Normal(0, init_std), the expert down projections (residual outputs) scaled
        by 1/√(2N) like o_proj; the routing bias zero; the MTP layer like any other."""
        cfg = self.config
        std = cfg.init_std
        out_std = std / math.sqrt(2 * cfg.n_layers)
        for name, module in self.mtp.named_modules():
            if isinstance(module, nn.Linear):
                is_out = name.endswith("o_proj") or name.endswith("down_proj")
                nn.init.normal_(module.weight, std=out_std if is_out else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        for moe in self.moe_layers(include_mtp=True):
            nn.init.normal_(moe.gate.weight, std=std)
            nn.init.normal_(moe.experts.gate_up_proj, std=std)
            nn.init.normal_(moe.experts.down_proj, std=out_std)
            if isinstance(moe.gate, SigmoidGroupRouter):
                moe.gate.e_score_correction_bias.zero_()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "mtp"):
            self._init_moe()

    # -- MoE bookkeeping ---------------------------------------------------------------------------
    def moe_layers(self, include_mtp: bool = False) -> list[MoE]:
        """The MoE FFNs of the main layers in order (and of the MTP layer when ``include_mtp``)."""
        mods = [layer.mlp for layer in self.layers if isinstance(layer.mlp, MoE)]
        if include_mtp and hasattr(self, "mtp"):
            mods += [m.block.mlp for m in self.mtp if isinstance(m.block.mlp, MoE)]
        return mods

    def aux_loss(self) -> torch.Tensor | None:
        """Sum of the MoE layers' sequence-wise balance losses from the last training-mode forward (None
        when ``aux_loss_alpha`` is 0 or there was no training forward)."""
        return total_aux_loss(self.moe_layers())

    @torch.no_grad()
    def update_bias(self, gamma: float) -> torch.Tensor:
        """Aux-loss-free balancing on every MoE layer (``MoE.update_bias``) with the load accumulated since
        the last call; returns those loads [n_moe_layers, E] (slots per expert). Call after
        ``optimizer.step()``."""
        loads = [m.update_bias(gamma) for m in self.moe_layers()]
        return torch.stack(loads) if loads else torch.zeros(0, self.config.n_routed_experts)

    def expert_load(self) -> torch.Tensor:
        """Slots per expert in the last training-mode forward, [n_moe_layers, E]."""
        return torch.stack([m.load_last for m in self.moe_layers()])

    def max_violation(self) -> float:
        """max over MoE layers of (max load − mean load) / mean load in the last training forward."""
        return max((max_violation(m.load_last) for m in self.moe_layers()), default=0.0)

    # -- counting ----------------------------------------------------------------------------------
    def num_parameters(self, exclude_embeddings: bool = False, include_mtp: bool = False) -> int:
        """Distinct parameters (tied ones once), without the MTP layer unless ``include_mtp``. The routing
        bias is a buffer and not counted (``glmkit.moe_configs.param_counts`` lists it apart)."""
        skip = set() if include_mtp else {id(p) for p in self.mtp.parameters()} - {
            id(self.embed_tokens.weight), id(self.lm_head.weight)}
        if exclude_embeddings:
            skip.add(id(self.embed_tokens.weight))
        return count_distinct(self.parameters(), skip)

    def num_active_parameters(self, include_embeddings: bool = False) -> int:
        """Parameters one token passes through in the main model: everything except the routed experts
        it was not sent to (k of E are used); without the embedding and the LM head unless asked (the
        convention of the published "32B active")."""
        cfg = self.config
        total = self.num_parameters(exclude_embeddings=True)
        if not cfg.tie_word_embeddings:
            total -= self.lm_head.weight.numel()
        per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
        total -= cfg.n_moe_layers * (cfg.n_routed_experts - cfg.num_experts_per_tok) * per_expert
        if include_embeddings:
            total += self.embed_tokens.weight.numel()
            if not cfg.tie_word_embeddings:
                total += self.lm_head.weight.numel()
        return total

    # -- multi-token prediction ----------------------------------------------------------------------
    def mtp_logits(self, input_ids: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """The first MTP layer's prediction of token i+2 at each position i < T−1: input_ids [B, T] →
        logits [B, T−1, vocab_size]. ``hidden`` [B, T, d]: the main model's final-norm output (computed
        when None). No KV cache (speculative decoding, lesson 08, builds on this)."""
        if not len(self.mtp):
            raise ValueError("this model has no MTP layer (config.num_nextn_predict_layers = 0)")
        if hidden is None:
            hidden = self.hidden_states(input_ids)
        B, T = input_ids.shape
        if T < 2:
            raise ValueError("mtp_logits needs T >= 2 (position i reads token i+1)")
        mtp = self.mtp[0]
        pos = torch.arange(T - 1, device=input_ids.device)[None].expand(B, T - 1)
        ctx = _StepContext(cache=None, sep=torch.zeros(B, dtype=torch.int64, device=input_ids.device), visible=None)
        h = mtp(hidden[:, :-1], mtp.embed_tokens(input_ids[:, 1:]), self._rope(pos), ctx)
        logits = mtp.head(mtp.shared_head_norm(h))
        return logits[..., : self.config.vocab_size]

    def extra_repr(self) -> str:
        c = self.config
        return (super().extra_repr() + f", experts={c.n_routed_experts}×{c.moe_intermediate_size} top-{c.num_experts_per_tok}"
                f" + {c.n_shared_experts} shared, dense layers={c.first_k_dense_replace}, router={c.router}, "
                f"mtp={c.num_nextn_predict_layers}")
