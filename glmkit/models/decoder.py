"""One decoder for the GLM lineage from ChatGLM2 on: every published checkpoint family and every course preset is a
setting of ``DecoderConfig`` (HF field names), and every layer is ``norm → mixer → residual → norm → FFN →
residual`` with its mixer and FFN chosen per layer.

    embed_tokens ─► [ Block 0 … Block N−1 ] ─► final_norm ─► lm_head ─► logits
                      x = x + mixer(input_norm(x))          mixer: MIXERS[layer_types[i]]  (attention; next
                      x = x + mlp(pre_mlp_norm(x))          lessons: mla, dsa, gdn, kda); mlp: "dense" SwiGLU or
                                                            "sparse" (MoE) per mlp_layer_types[i]
                    (+ MTP modules: depth k = 1..D predicts token i+k+1 from the true token i+k and depth k−1's
                     output, the last hidden state for k = 1; trained as an aux loss, drafting for glmkit.speculative)

How the generations it covers differ (facts: shared/reference/glm-lineage.md §2–§5):
* ChatGLM2/3, GLM-4-9B (HF ``glm``): RMSNorm pre-norm, GQA with 2 KV heads, bias on q/k/v, SwiGLU, partial RoPE
  on half of each head with interleaved pairs. No prefix mask any more: plain causal (``sep`` stays available).
* GLM-4-9B-0414 (``glm4``): ``sandwich_norms`` — the mixer and FFN outputs are normalised too before they join the
  residual, four RMSNorms per layer.
* GLM-4.5/4.6/4.7 (``glm4_moe``): MoE FFNs after ``first_k_dense_replace`` dense layers (sigmoid router with a
  selection-only bias, a shared expert), QK-norm, half-split RoPE pairs, θ = 1e6, and one stored MTP layer.
* GLM-5.3-Flash (``glm5_next``) adds the clamped SwiGLU (``swiglu_limit``) and mHC hyper-connections: with
  ``hc_mult`` = N > 1 the residual is N streams [B, T, N, d], each branch's ``+`` becomes a ``HyperConnection``
  (``glmkit.mhc``), the embedding is copied into the N streams and their mean goes to the final norm. N = 1 is the
  plain residual above.
The older members (GLM-2021's learned 2D positions, ChatGLM-6B's 2D RoPE, GLM-130B's DeepNorm and GeGLU) have no
checkpoint loader here: GLM-2021 is ``glmkit.models.glm2021`` (lesson 01), the rest ``glmkit.course.lineage``.

Extending it: a new mixer is a file in ``glmkit/mixers`` (the contract is in its ``__init__``) — nothing here
changes. Inference state lives in ``glmkit.cache.Cache`` (``new_cache``). The forward does no host-device sync
and checks only shapes: values are checked at the edges (``check_tokens``, called by ``train`` and ``generate``).

Shapes: B batch, T new tokens, L = cached + new positions, d hidden size, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from glmkit.cache import Cache
from glmkit.layers import MLP, RMSNorm
from glmkit.mhc import expand_streams, merge_streams, residual
from glmkit.mixers import MIXERS, Step
from glmkit.moe import MoE, max_violation
from glmkit.ops.swiglu import check_limit

FFN_TYPES = ("dense", "sparse")
ROUTERS = ("sigmoid", "softmax")
MOE_IMPLS = ("auto", "sorted", "loop", "triton")
IGNORE_INDEX = -100
MTP_AUX = "mtp"  # the name of the MTP loss in ``aux_losses()`` (the trainer weights it by λ)


@dataclass
class DecoderConfig:
    """A decoder of the GLM lineage. Field names and meanings are Hugging Face's where HF has the field.

    ``layer_types[i]``: the mixer of layer i (a key of ``glmkit.mixers.MIXERS``; default all "attention").
    ``mlp_layer_types[i]``: "dense" (SwiGLU of ``intermediate_size``) or "sparse" (MoE of ``n_routed_experts``
    experts of ``moe_intermediate_size``, ``num_experts_per_tok`` routed + ``n_shared_experts`` shared); default:
    all dense without experts, else ``first_k_dense_replace`` dense then sparse.
    ``head_dim`` defaults to hidden_size / heads; RoPE rotates int(head_dim · partial_rotary_factor) dims with
    interleaved (``rope_interleave``) or half-split pairs. ``extra``: the fields a mixer declares in its
    ``options`` (read with ``opt``). ``mtp_tied``: the MTP layer reads the main embedding and head.
    Multi-token prediction: ``num_nextn_predict_layers`` = M stored MTP modules, ``mtp_depth`` = D prediction depths
    trained (0: D = M); depth k uses module min(k, M), so M = D is DeepSeek-V3's separate modules and M = 1 < D
    GLM-5's one module applied recursively.
    """

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    layer_types: list[str] | None = None
    mlp_layer_types: list[str] | None = None
    max_position_embeddings: int = 2048
    attention_bias: bool = False
    use_qk_norm: bool = False
    partial_rotary_factor: float = 0.5
    rope_theta: float = 10000.0
    rope_interleave: bool = True
    sandwich_norms: bool = False
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    # mixture of experts
    n_routed_experts: int = 0
    num_experts_per_tok: int = 1
    moe_intermediate_size: int = 0
    n_shared_experts: int = 0
    first_k_dense_replace: int = 0
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    router: str = "sigmoid"
    aux_loss_alpha: float = 0.0
    moe_impl: str = "auto"
    # GLM-5.3-Flash: clamped SwiGLU (None: plain) and mHC residual streams (hc_mult = 1: the plain residual)
    swiglu_limit: float | None = None
    hc_mult: int = 1
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    # multi-token prediction
    num_nextn_predict_layers: int = 0
    mtp_tied: bool = True
    mtp_layer_type: str = "attention"
    mtp_depth: int = 0  # D depths trained (0: one per module); see the class docstring
    # token ids a checkpoint carries (generation stops on eos)
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        def bad(name, why):
            raise ValueError(f"DecoderConfig.{name}={getattr(self, name)!r}: {why}")

        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        if self.head_dim is None and self.hidden_size % self.num_attention_heads == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
            "num_experts_per_tok",
            "n_group",
            "topk_group",
            "hc_mult",
            "hc_sinkhorn_iters",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                bad(
                    name,
                    "must be a positive int"
                    + (" (set head_dim: heads do not divide hidden_size)" if name == "head_dim" else ""),
                )
        for name in (
            "n_routed_experts",
            "moe_intermediate_size",
            "n_shared_experts",
            "first_k_dense_replace",
            "num_nextn_predict_layers",
            "mtp_depth",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                bad(name, "must be an int >= 0")
        if self.mtp_depth and not 0 < self.num_nextn_predict_layers <= self.mtp_depth:
            bad(
                "mtp_depth",
                f"needs 1 <= num_nextn_predict_layers={self.num_nextn_predict_layers} <= mtp_depth (depth k uses "
                f"MTP module min(k, num_nextn_predict_layers))",
            )
        for name, zero_ok in (
            ("partial_rotary_factor", True),
            ("rope_theta", False),
            ("rms_norm_eps", False),
            ("initializer_range", False),
            ("routed_scaling_factor", False),
            ("aux_loss_alpha", True),
            ("hc_eps", True),
        ):
            v = getattr(self, name)
            if (
                isinstance(v, bool)
                or not isinstance(v, (int, float))
                or not math.isfinite(v)
                or v < 0
                or (v == 0 and not zero_ok)
            ):
                bad(name, f"must be a finite number {'>= 0' if zero_ok else '> 0'}")
        if self.partial_rotary_factor > 1:
            bad("partial_rotary_factor", "must be in [0, 1] (0: no rotation)")
        if self.num_attention_heads % self.num_key_value_heads:
            bad(
                "num_key_value_heads",
                f"must divide num_attention_heads={self.num_attention_heads} (grouped-query "
                f"attention shares each k/v head among H / H_kv query heads)",
            )
        L = self.num_hidden_layers
        self.layer_types = list(self.layer_types or ["attention"] * L)
        if self.mlp_layer_types is None:
            k = self.first_k_dense_replace if self.n_routed_experts else L
            self.mlp_layer_types = ["dense"] * min(k, L) + ["sparse"] * max(L - k, 0)
        self.mlp_layer_types = list(self.mlp_layer_types)
        for name, allowed in (("layer_types", MIXERS), ("mlp_layer_types", FFN_TYPES)):
            values = getattr(self, name)
            if len(values) != L or any(t not in allowed for t in values):
                bad(name, f"must list {L} entries from {sorted(allowed)}")
        if self.mtp_layer_type not in MIXERS:
            bad("mtp_layer_type", f"must be one of {sorted(MIXERS)}")
        if "sparse" in self.mlp_layer_types or (self.num_nextn_predict_layers and self.n_routed_experts):
            if not (self.n_routed_experts and self.moe_intermediate_size):
                bad("n_routed_experts", "sparse layers need n_routed_experts > 0 and moe_intermediate_size > 0")
            if self.num_experts_per_tok > self.n_routed_experts:
                bad("num_experts_per_tok", f"is more than n_routed_experts={self.n_routed_experts}")
            if (
                self.n_routed_experts % self.n_group
                or self.topk_group > self.n_group
                or self.topk_group * (self.n_routed_experts // self.n_group) < self.num_experts_per_tok
            ):
                bad(
                    "n_group",
                    "must divide n_routed_experts, with topk_group <= n_group groups holding at least "
                    "num_experts_per_tok experts",
                )
        if self.router not in ROUTERS:
            bad("router", f"must be one of {ROUTERS}")
        try:
            self.swiglu_limit = check_limit(self.swiglu_limit)
        except ValueError:
            bad("swiglu_limit", "must be None (plain SwiGLU) or a finite number > 0")
        if self.moe_impl not in MOE_IMPLS:
            bad("moe_impl", f"must be one of {MOE_IMPLS}")
        self.eos_token_id = (self.eos_token_id,) if isinstance(self.eos_token_id, int) else tuple(self.eos_token_id)
        for name in ("pad_token_id", "bos_token_id"):
            t = getattr(self, name)
            if t is not None and not 0 <= t < self.vocab_size:
                bad(name, f"is outside the vocabulary [0, {self.vocab_size})")
        if any(not 0 <= t < self.vocab_size for t in self.eos_token_id):
            bad("eos_token_id", f"has ids outside the vocabulary [0, {self.vocab_size})")
        owned = {
            k: cls
            for t in set(self.layer_types) | {self.mtp_layer_type}
            for cls in [MIXERS[t]]
            for k in getattr(cls, "options", {})
        }
        unknown = sorted(set(self.extra) - set(owned))
        if unknown:
            raise ValueError(
                f"DecoderConfig.extra has fields {unknown} that no mixer of this model declares "
                f"(declared: {sorted(owned) or 'none'})"
            )

    def opt(self, name: str) -> Any:
        """A mixer option: ``extra[name]``, else the default the mixer declares."""
        if name in self.extra:
            return self.extra[name]
        for cls in MIXERS.values():
            if name in getattr(cls, "options", {}):
                return cls.options[name]
        raise KeyError(f"no mixer declares the option {name!r}")

    @property
    def active_ffn_width(self) -> int:
        """Expert width a token passes through in a sparse layer: (k routed + shared) × I."""
        return (self.num_experts_per_tok + self.n_shared_experts) * self.moe_intermediate_size

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_token_id"] = list(self.eos_token_id)
        return {**{k: v for k, v in d.items() if k != "extra"}, **d["extra"]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DecoderConfig:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(
            **{k: v for k, v in d.items() if k in names},
            extra={k: v for k, v in d.items() if k not in names and k != "model_type"},
        )


def count_distinct(params, skip: set[int] = frozenset()) -> int:
    """Elements of the distinct tensors in ``params`` (a tied tensor counts once), leaving out ids in ``skip``."""
    seen, total = set(skip), 0
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


# ----------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------
class Block(nn.Module):
    """One layer: ``x + mixer(input_norm(x))``, then ``x + mlp(pre_mlp_norm(x))``; with ``sandwich_norms`` each
    branch's output is normalised too (``post_mixer_norm``, ``post_mlp_norm``) before the residual add. The two
    ``+`` are ``attn_hc`` and ``ffn_hc``: ``glmkit.mhc.Residual``, or with ``hc_mult`` > 1 a ``HyperConnection``
    over the streams [B, T, N, d] (glm5_next's names)."""

    def __init__(self, cfg: DecoderConfig, layer_idx: int, mixer_type: str, ffn_type: str):
        super().__init__()
        d, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_norm = RMSNorm(d, eps)
        self.mixer = MIXERS[mixer_type](cfg, layer_idx)
        self.pre_mlp_norm = RMSNorm(d, eps)
        if ffn_type == "dense":
            self.mlp = MLP(d, cfg.intermediate_size, cfg.swiglu_limit)
        else:
            self.mlp = MoE(
                d,
                cfg.n_routed_experts,
                cfg.num_experts_per_tok,
                cfg.moe_intermediate_size,
                cfg.n_shared_experts,
                cfg.router,
                cfg.n_group,
                cfg.topk_group,
                cfg.norm_topk_prob,
                cfg.routed_scaling_factor,
                cfg.aux_loss_alpha,
                cfg.moe_impl,
                cfg.initializer_range,
                cfg.swiglu_limit,
            )
        if cfg.sandwich_norms:
            self.post_mixer_norm, self.post_mlp_norm = RMSNorm(d, eps), RMSNorm(d, eps)
        hc = (d, cfg.hc_mult, cfg.hc_sinkhorn_iters, cfg.hc_eps, eps)
        self.attn_hc, self.ffn_hc = residual(*hc), residual(*hc)

    def mixer_branch(self, h: torch.Tensor, step: Step, state) -> torch.Tensor:
        h = self.mixer(self.input_norm(h), step, state)
        return self.post_mixer_norm(h) if hasattr(self, "post_mixer_norm") else h

    def mlp_branch(self, h: torch.Tensor) -> torch.Tensor:
        h = self.mlp(self.pre_mlp_norm(h))
        return self.post_mlp_norm(h) if hasattr(self, "post_mlp_norm") else h

    def forward(self, x: torch.Tensor, step: Step, state) -> torch.Tensor:
        """x [B, T, d], or [B, T, N, d] with hc_mult = N > 1; the branches see [B, T, d]."""
        x = self.attn_hc(x, lambda h: self.mixer_branch(h, step, state))
        return self.ffn_hc(x, self.mlp_branch)


class MTPLayer(nn.Module):
    """One multi-token-prediction module (DeepSeek-V3 §2.2; GLM-4.5 stores it as ``model.layers.{N}``)::

        h' = eh_proj([enorm(Emb(t_{i+1})) ; hnorm(h_i)])      embedding first, then the hidden state
        logits_{i+2} = head(shared_head_norm(block(h')))       block: a full decoder layer

    ``embed_tokens`` and ``head`` are the main model's when ``mtp_tied`` (the paper), else its own copies. At depth
    k > 1 the same computation reads t_{i+k} and the previous depth's ``hidden`` output (shared_head_norm(block(h')),
    the normalised vector the head reads, as the main model hands its final-norm output to depth 1)."""

    def __init__(self, cfg: DecoderConfig, layer_idx: int):
        super().__init__()
        d = cfg.hidden_size
        self.enorm, self.hnorm = RMSNorm(d, cfg.rms_norm_eps), RMSNorm(d, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * d, d, bias=False)
        self.block = Block(cfg, layer_idx, cfg.mtp_layer_type, "sparse" if cfg.n_routed_experts else "dense")
        self.hc_mult = cfg.hc_mult
        self.shared_head_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, d)
        self.head = nn.Linear(d, cfg.vocab_size, bias=False)

    def hidden(self, hidden: torch.Tensor, next_ids: torch.Tensor, step: Step, state=None) -> torch.Tensor:
        """hidden [B, T, d] (h_i), next_ids [B, T] (t_{i+k}) → [B, T, d], the vector the head reads; ``state``: the
        block's mixer state (a cache of this depth, for decoding) or None."""
        x = self.eh_proj(torch.cat((self.enorm(self.embed_tokens(next_ids)), self.hnorm(hidden)), dim=-1))
        x = merge_streams(self.block(expand_streams(x, self.hc_mult), step, state), self.hc_mult)  # mHC: N streams
        return self.shared_head_norm(x)

    def forward(self, hidden: torch.Tensor, next_ids: torch.Tensor, step: Step, state=None) -> torch.Tensor:
        return self.head(self.hidden(hidden, next_ids, step, state))


# ----------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------
class Decoder(nn.Module):
    """``forward(input_ids [B, T], position_ids=None, sep=None, attention_mask=None, cache=None) -> logits [B, T, V]``;
    ``loss(batch)``; ``new_cache(B, max_len)``; MoE bookkeeping; ``mtp_logits``; parameter counts."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        if not isinstance(config, DecoderConfig):
            raise TypeError(
                f"Decoder needs a DecoderConfig (glmkit.models.presets.get_config), got {type(config).__name__}"
            )
        self.config = cfg = config
        self.hc_mult = cfg.hc_mult
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            Block(cfg, i, cfg.layer_types[i], cfg.mlp_layer_types[i]) for i in range(cfg.num_hidden_layers)
        )
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPLayer(cfg, cfg.num_hidden_layers + j) for j in range(cfg.num_nextn_predict_layers))
        self.reset_parameters()
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        if self.config.mtp_tied:
            for m in self.mtp:
                m.embed_tokens.weight, m.head.weight = self.embed_tokens.weight, self.lm_head.weight

    def reset_parameters(self) -> None:
        """Normal(0, initializer_range) for matrices, the residual outputs (o_proj, down_proj, the experts' down)
        scaled by 1/√(2N) (Megatron's rule); ones for norm gains, zeros for biases and routing biases. A module
        with special parameters (a mixer's decay, say) sets them in its own ``post_init()``."""
        std = self.config.initializer_range
        out_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if p.dim() >= 2:
                    p.normal_(
                        0.0, out_std if name.endswith(("o_proj.weight", "down_proj.weight", "down_proj")) else std
                    )
                else:
                    p.zero_() if name.endswith("bias") else p.fill_(1.0)
            for name, b in self.named_buffers():
                if name.endswith("e_score_correction_bias"):
                    b.zero_()
        for m in self.modules():
            if m is not self and hasattr(m, "post_init"):
                m.post_init()

    # -- bookkeeping -------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def num_parameters(self, exclude_embeddings: bool = False, include_mtp: bool = False) -> int:
        """Distinct parameters (tied ones once), without the MTP layer unless ``include_mtp``. Routing biases are
        buffers and not counted."""
        skip = (
            set()
            if include_mtp
            else {id(p) for p in self.mtp.parameters()} - {id(self.embed_tokens.weight), id(self.lm_head.weight)}
        )
        if exclude_embeddings:
            skip.add(id(self.embed_tokens.weight))
        return count_distinct(self.parameters(), skip)

    def num_active_parameters(self, include_embeddings: bool = False) -> int:
        """Parameters one token passes through in the main model: all but the routed experts it was not sent to;
        without the embedding and LM head unless asked (the convention of the published "32B active")."""
        cfg = self.config
        total = self.num_parameters(exclude_embeddings=True)
        if not cfg.tie_word_embeddings:
            total -= self.lm_head.weight.numel()
        unused = (cfg.n_routed_experts - cfg.num_experts_per_tok) * 3 * cfg.hidden_size * cfg.moe_intermediate_size
        total -= cfg.mlp_layer_types.count("sparse") * unused
        if include_embeddings:
            total += self.embed_tokens.weight.numel() + (0 if cfg.tie_word_embeddings else self.lm_head.weight.numel())
        return total

    def new_cache(
        self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None, max_rollback: int = 0
    ) -> Cache:
        """An empty ``Cache`` for this model: each layer's state from its mixer (default max_len: max positions;
        ``max_rollback``: how many positions ``cache.rollback`` must be able to undo, for speculative decoding)."""
        max_len = max_len or self.config.max_position_embeddings
        states = [layer.mixer.new_state(batch_size, max_len, dtype or self.dtype, self.device) for layer in self.layers]
        return Cache(states, batch_size, max_len, self.device, max_rollback)

    def new_mtp_cache(
        self,
        depth: int,
        batch_size: int,
        max_len: int | None = None,
        dtype: torch.dtype | None = None,
        max_rollback: int = 0,
    ) -> Cache:
        """A ``Cache`` for MTP depth ``depth`` (one layer: its module's block). Every depth needs its own, even when
        depths share one module: each sees its own inputs (``mtp_hidden``)."""
        max_len = max_len or self.config.max_position_embeddings
        state = self.mtp_module(depth).block.mixer.new_state(batch_size, max_len, dtype or self.dtype, self.device)
        return Cache([state], batch_size, max_len, self.device, max_rollback)

    # -- MoE -----------------------------------------------------------------------------------------
    def moe_layers(self) -> list[MoE]:
        """The MoE FFNs of the main layers, in order."""
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, MoE)]

    def update_bias(self, gamma: float) -> torch.Tensor:
        """Aux-loss-free balancing step on every MoE layer with the load accumulated since the last call; returns
        those loads [n_moe_layers, E]. Call after ``optimizer.step()``."""
        loads = [m.update_bias(gamma) for m in self.moe_layers()]
        return torch.stack(loads) if loads else torch.zeros(0, self.config.n_routed_experts)

    def expert_load(self) -> torch.Tensor:
        """Slots per expert in the last training-mode forward, [n_moe_layers, E]."""
        return torch.stack([m.load_last for m in self.moe_layers()])

    def max_violation(self) -> float:
        """max over MoE layers of (max load − mean load) / mean load in the last training forward."""
        return max((max_violation(m.load_last) for m in self.moe_layers()), default=0.0)

    def aux_losses(self) -> dict[str, torch.Tensor]:
        """Auxiliary losses of the last training forward, by name (each module that sets an ``aux_loss``
        contributes under its ``aux_name``, default its class name; the trainer adds them to the loss)."""
        out: dict[str, torch.Tensor] = {}
        for m in self.modules():
            loss = getattr(m, "aux_loss", None)
            if isinstance(loss, torch.Tensor):
                name = getattr(m, "aux_name", type(m).__name__)
                out[name] = out[name] + loss if name in out else loss
        return out

    # -- forward -------------------------------------------------------------------------------------
    def check_tokens(self, input_ids: torch.Tensor) -> None:
        """Value checks that need the data (a host sync): call at the edges, never inside the forward."""
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(
                f"input_ids contains token id {lo if lo < 0 else hi}, outside [0, vocab_size={self.config.vocab_size})"
            )

    def _step(self, input_ids, position_ids, sep, attention_mask, cache, n_layers: int | None = None) -> Step:
        if (
            not isinstance(input_ids, torch.Tensor)
            or input_ids.dim() != 2
            or input_ids.shape[1] == 0
            or input_ids.is_floating_point()
        ):
            raise ValueError(
                f"input_ids must be an integer tensor [B, T] with T >= 1, got "
                f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} "
                f"{tuple(getattr(input_ids, 'shape', ()))}"
            )
        B, T = input_ids.shape
        dev = input_ids.device
        n_layers = len(self.layers) if n_layers is None else n_layers  # 1 for an MTP depth's cache
        if cache is not None and (
            not isinstance(cache, Cache) or cache.batch_size != B or len(cache.layers) != n_layers
        ):
            raise ValueError(
                f"cache {cache!r} does not fit this model and batch (B={B}, layers={n_layers}): "
                f"make one with model.new_cache(batch_size, max_len)"
            )
        offset = 0 if cache is None else cache.begin(T, attention_mask)
        if position_ids is None:
            position_ids = torch.arange(offset, offset + T, device=dev)
        if position_ids.dim() == 3 and self.two_d_positions:
            position_ids = position_ids[:, 0]  # GLM-2021: row 0 is the position (row 1 the block's)
        if position_ids.dim() == 1:
            position_ids = position_ids[None].expand(B, T)
        if tuple(position_ids.shape) != (B, T):
            raise ValueError(
                f"position_ids must be [B, T] = {(B, T)} or [T]{' or [B, 2, T]' * self.two_d_positions},"
                f" got {tuple(position_ids.shape)}"
            )
        if sep is None or isinstance(sep, int):
            sep = torch.full((B,), sep or 0, dtype=torch.int64, device=dev)
        if tuple(sep.shape) != (B,):
            raise ValueError(f"sep must be an int or a [B] = [{B}] tensor of prefix lengths, got {tuple(sep.shape)}")
        visible = None
        if offset > 0 or attention_mask is not None:
            # Query t sits at absolute index offset + t. Key j is visible iff it is in the prefix (j < sep) or not
            # in the future (j <= i), and is a real token; a query always sees itself (padding rows stay finite).
            i = torch.arange(offset, offset + T, device=dev)[:, None]
            j = torch.arange(offset + T, device=dev)[None, :]
            keys = cache.valid[:, : offset + T] if cache is not None else attention_mask.to(torch.bool)
            visible = (((j <= i)[None] | (j[None] < sep[:, None, None])) & keys[:, None, :]) | (j == i)[None]
        max_rollback = 0 if cache is None else cache.max_rollback
        return Step(position_ids=position_ids, sep=sep, offset=offset, visible=visible, max_rollback=max_rollback)

    two_d_positions = False  # GLM-2021 (a subclass) takes [B, 2, T] positions: position and block position
    hc_mult = 1  # residual streams (config.hc_mult; GLM-2021 has one)

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None, step: Step) -> torch.Tensor:
        """Token vectors [B, T, d] (GLM-2021 adds its learned position tables here; RoPE models rotate later)."""
        return self.embed_tokens(input_ids)

    def hidden_states(self, input_ids, position_ids=None, sep=None, attention_mask=None, cache=None) -> torch.Tensor:
        """The final-norm output [B, T, d]. See ``forward`` for the arguments."""
        step = self._step(input_ids, position_ids, sep, attention_mask, cache)
        x = expand_streams(self.embed(input_ids, position_ids, step), self.hc_mult)  # mHC: [B, T, N, d]
        for i, layer in enumerate(self.layers):
            x = layer(x, step, None if cache is None else cache.layers[i])
        if cache is not None:
            cache.end(input_ids.shape[1])
        return self.final_norm(merge_streams(x, self.hc_mult))

    def forward(self, input_ids, position_ids=None, sep=None, attention_mask=None, cache=None) -> torch.Tensor:
        """input_ids [B, T] → logits [B, T, V].

        position_ids: [B, T] or [T]; None = ``cache.length + arange(T)``. sep: int or [B] — the first ``sep``
        positions (absolute, counting cached ones) attend bidirectionally (GLM's Part A); 0/None = causal.
        attention_mask: [B, T], True for real tokens, False for (left) padding; kept in the cache for later steps.
        cache: a ``Cache`` (``new_cache``): the chunk is appended and attention covers the cached positions.
        """
        return self.lm_head(self.hidden_states(input_ids, position_ids, sep, attention_mask, cache))

    def loss(self, batch) -> torch.Tensor:
        """Mean next-token cross entropy (fp32) over targets != -100. ``batch`` has (as attributes or keys)
        ``input_ids`` and ``targets`` [B, T] (already shifted: targets[:, t] follows input_ids[:, t]), and
        optionally ``sep``. In training mode a model with MTP modules also sets ``aux_loss`` (under ``MTP_AUX``):
        the mean over depths of ``mtp_losses``, which the trainer weights by λ."""
        get = batch.get if isinstance(batch, Mapping) else lambda k, d=None: getattr(batch, k, d)
        input_ids, targets = get("input_ids"), get("targets")
        if not isinstance(targets, torch.Tensor) or targets.shape != getattr(input_ids, "shape", None):
            raise ValueError("loss(batch): batch needs input_ids and targets of the same [B, T] shape")
        pos = get("position_ids")
        if pos is not None and pos.dim() == 3 and not self.two_d_positions:
            raise ValueError(
                "this batch has 2D (GLM-2021) positions; the decoder uses 1D RoPE positions: train it "
                "on next-token batches (glmkit.data.lm_data.LMData) or use glmkit.models.glm2021"
            )
        hidden = self.hidden_states(input_ids, pos, get("sep"))
        logits = self.lm_head(hidden).float()
        self.aux_loss = self.mtp_losses(input_ids, targets, hidden, pos).mean() if self.training and self.mtp else None
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten().long(), ignore_index=IGNORE_INDEX)

    # -- multi-token prediction ----------------------------------------------------------------------
    aux_name = MTP_AUX  # ``aux_loss`` (set by ``loss`` in training) is the MTP loss

    @property
    def mtp_depth(self) -> int:
        """D, the depths the MTP loss trains: ``config.mtp_depth``, else one per stored module."""
        return getattr(self.config, "mtp_depth", 0) or len(self.mtp)

    def mtp_module(self, depth: int) -> MTPLayer:
        """The module of depth k >= 1: module min(k, M) (M = 1: one module applied recursively)."""
        if not len(self.mtp):
            raise ValueError("this model has no MTP layer (config.num_nextn_predict_layers = 0)")
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"MTP depth must be an int >= 1, got {depth!r}")
        return self.mtp[min(depth, len(self.mtp)) - 1]

    def mtp_hidden(
        self, depth: int, hidden, next_ids, position_ids=None, attention_mask=None, cache: Cache | None = None
    ) -> torch.Tensor:
        """One forward of MTP depth k: hidden [B, T, d] (h^{k−1} at positions i: the main model's final-norm output
        for k = 1), next_ids [B, T] (t_{i+k}) → h^k [B, T, d]; ``mtp_module(k).head(h^k)`` predicts t_{i+k+1}.
        position_ids, attention_mask and cache (``new_mtp_cache(k, ...)``) as in ``forward``, for positions i."""
        step = self._step(next_ids, position_ids, None, attention_mask, cache, n_layers=1)
        h = self.mtp_module(depth).hidden(hidden, next_ids, step, None if cache is None else cache.layers[0])
        if cache is not None:
            cache.end(next_ids.shape[1])
        return h

    def _mtp_chain(self, input_ids, hidden, position_ids, depths: int):
        """h^1 … h^depths over a sequence whose tokens are all known: depth k at positions i < T − k reads t_{i+k}."""
        T = input_ids.shape[1]
        if T <= depths:
            raise ValueError(f"MTP depth {depths} needs sequences longer than {depths} tokens, got T={T}")
        h = hidden
        for k in range(1, depths + 1):
            pos = None if position_ids is None else position_ids[..., : T - k]
            h = self.mtp_hidden(k, h[:, : T - k], input_ids[:, k:], pos)
            yield k, h

    def mtp_logits(self, input_ids: torch.Tensor, hidden: torch.Tensor | None = None, depth: int = 1) -> torch.Tensor:
        """Depth k's prediction of token i+k+1 at each position i < T−k: input_ids [B, T] → logits [B, T−k, V]
        (k = 1: token i+2). ``hidden`` [B, T, d]: the main model's final-norm output (computed when None)."""
        self.mtp_module(depth)  # checks
        hidden = self.hidden_states(input_ids) if hidden is None else hidden
        for k, h in self._mtp_chain(input_ids, hidden, None, depth):
            if k == depth:
                return self.mtp_module(k).head(h)

    def mtp_losses(self, input_ids, targets, hidden, position_ids=None) -> torch.Tensor:
        """Cross entropy (fp32) of each depth k = 1..D, [D]: depth k at position i reads the true t_{i+k}
        (``input_ids[:, i+k]``) and h^{k−1}_i, and is scored on t_{i+k+1} (``targets[:, i+k]``, −100 skipped).
        DeepSeek-V3's L_MTP is λ · mean of these."""
        losses = []
        for k, h in self._mtp_chain(input_ids, hidden, position_ids, self.mtp_depth):
            logits = self.mtp_module(k).head(h).float()
            losses.append(
                F.cross_entropy(logits.flatten(0, 1), targets[:, k:].flatten().long(), ignore_index=IGNORE_INDEX)
            )
        return torch.stack(losses)

    def extra_repr(self) -> str:
        c = self.config
        kinds = ", ".join(f"{t}×{c.layer_types.count(t)}" for t in dict.fromkeys(c.layer_types))
        ffn = ", ".join(f"{t}×{c.mlp_layer_types.count(t)}" for t in dict.fromkeys(c.mlp_layer_types))
        return (
            f"layers={c.num_hidden_layers} ({kinds}; ffn {ffn}), d={c.hidden_size}, "
            f"heads={c.num_attention_heads}/{c.num_key_value_heads}, vocab={c.vocab_size}, mtp={len(self.mtp)}"
        )
