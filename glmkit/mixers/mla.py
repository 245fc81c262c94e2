"""Multi-head Latent Attention (MLA) as GLM ships it: GLM-4.7-Flash (HF ``glm4_moe_lite``) and the attention of GLM-5
(HF ``glm_moe_dsa``, whose top-k indexer lesson 06 adds). The ``"mla"`` mixer of ``glmkit.models.decoder``.

What it changes against the ``"attention"`` mixer (GQA, every GLM up to GLM-4.5): the cache. GQA keeps a key and a
value per KV head and token (GLM-4.5: 2 · 8 · 128 = 2048 values); MLA keeps one compressed latent per token that
every head expands for itself, plus one small rotary key that all heads share (576 values for GLM-4.7-Flash and
GLM-5). The equations (shared/reference/glm-lineage.md §5.2), with GLM-4.7-Flash's sizes (d = 2048, H = 20):

    c_Q           = RMSNorm(q_a_proj(x))                 [B, T, 768]   the query latent (q_lora_rank; DSA's indexer
                                                                       reads it); q_lora_rank None: one q_proj
    q_nope | q_rot = q_b_proj(c_Q)                       [B, H, T, 192 | 64]
    c_KV | k_rot   = kv_a_proj_with_mqa(x)               [B, T, 512 | 64];  c_KV = RMSNorm(c_KV)
    q_rot, k_rot   = RoPE(q_rot), RoPE(k_rot)            one rotary key per token, shared by every head
    cache         ← (c_KV, k_rot)                        576 values per token and layer (``MLAState``)
    k_nope | v     = kv_b_proj(c_KV)                     [B, H, L, 192 | 256]: W_UK and W_UV, per head
    o_h            = softmax((q_nope·k_nope + q_rot·k_rot) / √(192 + 64)) v → o_proj

Why a separate rotary key: RoPE multiplies a key by a rotation that depends on its position, which sits between W_UK
and c_KV and keeps W_UK from being folded into the query (below). So the position lives in a few extra dims (64) that
are rotated and cached as they are, and the compressed part carries no position at all ("decoupled RoPE",
DeepSeek-V2).

Two inference paths, one result (``options["mla_absorb"]`` picks; ``attend`` takes ``absorb=`` too):
* naive — expand k and v for every head from the cached latents (``expand``) and run ordinary attention with q·k
  head dim 192 + 64 and v head dim 256 (``glmkit.ops.attention``: the flash kernels take the two sizes). What training
  and a prefill do: the expansion costs little next to the T × T attention.
* absorbed ("MQA mode") — fold W_UK into the query, q_lat_h = W_UK_hᵀ q_nope_h ∈ R^512, so that every head attends
  to the same cached row [c_KV | k_rot], and apply W_UV after the weighted sum (``glmkit.ops.mla_decode``). What a
  decode step does: it reads 576 values per cached token instead of expanding H · (192 + 256) of them.
``"auto"`` (default) takes the naive path for a plain prefill and the absorbed one whenever there is an explicit mask
(a decode step against the cache, a left-padded batch).

NoPE (``qk_rope_head_dim = 0``, GLM-5.3-Flash's MLA layers): no rotary slice at all. The q·k head is the nope head
(256 there), the cache row is c_KV alone (512 values), and the layer sees no position: order reaches it only through
the causal mask and the layers around it (GLM-5.3-Flash's KDA layers, whose recurrence is ordered). The absorbed
kernels take a rotary part of at least one column, so one zero column stands in for it there (``rope_columns``:
it adds 0 to every score).

For DSA (lesson 06) the pieces are public: ``query`` (also returns the query latent c_Q), ``latent_kv``, ``attend``
(with an optional per-query set of key indices ``keys`` [B, T, K], as DSA's top-k selection gives it), ``expand``,
``absorbed_weights`` and ``MLAState``.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn

from glmkit import backend
from glmkit.layers import RMSNorm
from glmkit.mixers import Step, register
from glmkit.ops.attention import attention, attention_mask, attention_masked
from glmkit.ops.mla_decode import mla_decode
from glmkit.ops.rope import rope

# transformers' Glm4MoeLiteAttention and DeepSeek's reference build q_a_layernorm and kv_a_layernorm with the RMSNorm
# class default, not the config's rms_norm_eps; so does this mixer by default, for parity (glm5_next uses the config's:
# the option latent_norm_eps).
LATENT_NORM_EPS = 1e-6
ABSORB = ("auto", "always", "never")


class MLAState:
    """MLA's inference state: per token one row ``[c_KV | k_rot]`` of R + P values (R = kv_lora_rank,
    P = qk_rope_head_dim) in one buffer ``latent [B, T_max, R + P]``, written at the cache's length. It grows with
    T, so ``Cache.rollback`` needs nothing from it."""

    def __init__(self, batch_size: int, max_len: int, kv_lora_rank: int, rope_dim: int, dtype, device):
        self.latent = torch.zeros(batch_size, max_len, kv_lora_rank + rope_dim, dtype=dtype, device=device)
        self.rank = kv_lora_rank

    def append(self, c_kv: torch.Tensor, k_rot: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store c_kv [B, T, R] and k_rot [B, T, P] at [start, start + T); return views of [0, start + T)."""
        end = start + c_kv.shape[1]
        self.latent[:, start:end, : self.rank] = c_kv
        self.latent[:, start:end, self.rank :] = k_rot
        return self.latent[:, :end, : self.rank], self.latent[:, :end, self.rank :]


def _positive_int(cfg, name: str, allow_none: bool = False, allow_zero: bool = False):
    v = cfg.opt(name)
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < (0 if allow_zero else 1):
        want = "an int >= 0" if allow_zero else "a positive int"
        raise ValueError(f"mla option {name}={v!r} must be {want}" + (" or None" if allow_none else ""))
    return v


def rope_columns(q_rope: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary parts as the absorbed ops take them (q [..., P], k [..., P] with P >= 1). NoPE (P = 0): one zero
    column each, which adds 0 to every score and costs one masked column in the kernels."""
    if q_rope.shape[-1]:
        return q_rope, k_rope
    return q_rope.new_zeros(*q_rope.shape[:-1], 1), k_rope.new_zeros(*k_rope.shape[:-1], 1)


@register("mla")
class MLA(nn.Module):
    """Parameters under transformers' names (so a ``glm4_moe_lite`` checkpoint maps one to one): ``q_a_proj``,
    ``q_a_layernorm``, ``q_b_proj`` (or ``q_proj`` when q_lora_rank is None), ``kv_a_proj_with_mqa``,
    ``kv_a_layernorm``, ``kv_b_proj`` (rows per head: k_nope then v), ``o_proj``. ``attention_bias`` puts a bias
    on q_a_proj, kv_a_proj_with_mqa and o_proj, as transformers does."""

    # HF field names; defaults small enough for a tiny layer at any preset size (the q·k head, 48 + 16 = 64,
    # differs from the v head, 32, as in DeepSeek-V3; GLM-4.7-Flash: 768, 512, 192, 64, 256)
    options: dict = {
        "q_lora_rank": 64,
        "kv_lora_rank": 64,
        "qk_nope_head_dim": 48,
        "qk_rope_head_dim": 16,
        "v_head_dim": 32,
        "mla_absorb": "auto",  # glmkit's: "auto" | "always" | "never" (module docstring)
        "latent_norm_eps": LATENT_NORM_EPS,  # glmkit's: eps of q_a_layernorm / kv_a_layernorm (glm5_next: rms_norm_eps)
    }

    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        d, H = cfg.hidden_size, cfg.num_attention_heads
        self.H = H
        self.q_lora_rank = _positive_int(cfg, "q_lora_rank", allow_none=True)
        self.kv_lora_rank = R = _positive_int(cfg, "kv_lora_rank")
        self.nope = _positive_int(cfg, "qk_nope_head_dim")
        self.rope_dim = P = _positive_int(cfg, "qk_rope_head_dim", allow_zero=True)  # 0: NoPE (GLM-5.3-Flash)
        self.v_dim = _positive_int(cfg, "v_head_dim")
        if P % 2:
            raise ValueError(f"mla option qk_rope_head_dim={P} must be even (RoPE rotates pairs)")
        self.absorb = cfg.opt("mla_absorb")
        if self.absorb not in ABSORB:
            raise ValueError(f"mla option mla_absorb={self.absorb!r} must be one of {ABSORB}")
        self.qk_dim = self.nope + P
        bias = cfg.attention_bias
        eps = cfg.opt("latent_norm_eps")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f"mla option latent_norm_eps={eps!r} must be a number > 0")
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(d, H * self.qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(d, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, eps)
            self.q_b_proj = nn.Linear(self.q_lora_rank, H * self.qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, R + P, bias=bias)
        self.kv_a_layernorm = RMSNorm(R, eps)
        self.kv_b_proj = nn.Linear(R, H * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_dim, d, bias=bias)
        self.pairing = "interleaved" if cfg.rope_interleave else "half"
        self.theta = cfg.rope_theta
        self.scale = 1.0 / math.sqrt(self.qk_dim)  # over the whole q·k head, nope + rope (HF; no YaRN mscale)

    # -- the contract --------------------------------------------------------------------------------------
    def new_state(self, batch_size: int, max_len: int, dtype, device) -> MLAState:
        return MLAState(batch_size, max_len, self.kv_lora_rank, self.rope_dim, dtype, device)

    @staticmethod
    def state_bytes(cfg, seq_len: int, batch_size: int = 1, dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes of one layer's cache for ``seq_len`` positions: B · T · (kv_lora_rank + qk_rope_head_dim) · itemsize
        (GLM-4.7-Flash, one token, bf16: (512 + 64) · 2 = 1152 bytes), whatever the number of heads."""
        per_token = cfg.opt("kv_lora_rank") + cfg.opt("qk_rope_head_dim")
        return batch_size * seq_len * per_token * torch.empty((), dtype=dtype).element_size()

    def forward(self, x: torch.Tensor, step: Step, state: MLAState | None) -> torch.Tensor:
        q_nope, q_rot, _ = self.query(x, step)
        c_kv, k_rot = self.latent_kv(x, step)
        if state is not None:
            c_kv, k_rot = state.append(c_kv, k_rot, step.offset)  # [B, L, R], [B, L, P]
        out = self.attend(q_nope, q_rot, c_kv, k_rot, step)
        return self.o_proj(rearrange(out, "b h t v -> b t (h v)"))

    # -- the pieces (DSA reuses them) ----------------------------------------------------------------------
    def query(self, x: torch.Tensor, step: Step) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """x [B, T, d] → q_nope [B, H, T, nope], q_rot [B, H, T, P] (rotated), and the normalised query latent
        c_Q [B, T, q_lora_rank] (None without a q_lora_rank)."""
        if self.q_lora_rank is None:
            c_q, q = None, self.q_proj(x)
        else:
            c_q = self.q_a_layernorm(self.q_a_proj(x))
            q = self.q_b_proj(c_q)
        q = rearrange(q, "b t (h d) -> b h t d", h=self.H)
        q_nope, q_rot = q.split([self.nope, self.rope_dim], dim=-1)
        if self.rope_dim:  # NoPE: q_rot is [B, H, T, 0]
            cos, sin = step.rope(self.rope_dim, self.theta)
            q_rot, _ = rope(q_rot, None, cos, sin, self.rope_dim, self.pairing)
        return q_nope, q_rot, c_q

    def latent_kv(self, x: torch.Tensor, step: Step) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, d] → what the cache keeps: c_KV [B, T, R] (normalised) and k_rot [B, T, P] (rotated)."""
        c_kv, k_rot = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        if self.rope_dim:  # NoPE: k_rot is [B, T, 0]
            cos, sin = step.rope(self.rope_dim, self.theta)
            k_rot = rope(k_rot[:, None], None, cos, sin, self.rope_dim, self.pairing)[0][:, 0]  # as one head
        return self.kv_a_layernorm(c_kv), k_rot

    def expand(self, c_kv: torch.Tensor, k_rot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The naive path's keys and values from the latents: c_kv [B, L, R], k_rot [B, L, P] →
        k [B, H, L, nope + P] (k_nope of each head, then the shared k_rot), v [B, H, L, v_head_dim]."""
        kv = rearrange(self.kv_b_proj(c_kv), "b l (h e) -> b h l e", h=self.H)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_rot[:, None].expand(-1, self.H, -1, -1).to(k_nope.dtype)), dim=-1)
        return k, v

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [H, nope, R] and W_UV [H, v_head_dim, R]: views of ``kv_b_proj.weight``, so that
        k_nope_h = W_UK[h] c_KV and v_h = W_UV[h] c_KV."""
        w = self.kv_b_proj.weight.view(self.H, self.nope + self.v_dim, self.kv_lora_rank)
        return w[:, : self.nope], w[:, self.nope :]

    def attend(self, q_nope, q_rot, c_kv, k_rot, step: Step, keys: torch.Tensor | None = None, absorb=None):
        """Attention of the queries (q_nope, q_rot [B, H, T, ·]) over the latents (c_kv [B, L, R], k_rot
        [B, L, P], L = step.offset + T) → [B, H, T, v_head_dim], before o_proj.

        keys [B, T, K] int (optional): for each query, the only key positions it may attend (DSA's top-k), on
        top of the causal/padding mask (an index the mask hides stays hidden). absorb: True/False to force a
        path; None follows the ``mla_absorb`` option."""
        mode = self.absorb if absorb is None else ("always" if absorb else "never")
        visible = step.visible
        if keys is not None or (mode == "always" and visible is None):
            if visible is None:  # a plain prefill (offset 0): the causal/prefix rule written out
                visible = attention_mask(step.sep, q_nope.shape[2])
            if keys is not None:
                chosen = torch.zeros_like(visible).scatter_(-1, keys.long(), True)
                visible = visible & chosen
        if mode == "always" or (mode == "auto" and visible is not None):
            return self._attend_absorbed(q_nope, q_rot, c_kv, k_rot, visible)
        k, v = self.expand(c_kv, k_rot)
        q = torch.cat((q_nope, q_rot), dim=-1)
        k, v = k.to(q.dtype), v.to(q.dtype)  # no-ops, but under autocast a cache may hold another dtype than q
        if visible is None:
            return attention(q, k, v, step.sep, self.scale)  # flash kernels: q·k head nope + P, v head v_dim
        backend.record("attention_decode", "torch")
        return attention_masked(q, k, v, visible, self.scale)

    def _attend_absorbed(self, q_nope, q_rot, c_kv, k_rot, visible) -> torch.Tensor:
        """MQA mode: every head attends to the shared rows [c_KV | k_rot] (``glmkit.ops.mla_decode``)."""
        w_uk, w_uv = self.absorbed_weights()
        q_lat = torch.einsum("bhtn,hnr->bthr", q_nope, w_uk)  # W_UK folded into the query: [B, T, H, R]
        dt = c_kv.dtype  # the cache's (autocast may give q another): cast the small queries, never the cache
        q_rope, k_rope = rope_columns(q_rot.transpose(1, 2).to(dt), k_rot.to(dt))
        o_lat = mla_decode(q_lat.to(dt), q_rope, c_kv, k_rope, self.scale, visible=visible)
        return torch.einsum("bthr,hvr->bhtv", o_lat, w_uv)  # W_UV applied after the weighted sum
