"""DeepSeek Sparse Attention (DSA) as GLM-5/5.1 ship it (HF ``glm_moe_dsa``): MLA whose queries each attend only to
the k earlier tokens a lightning indexer picks. The ``"dsa"`` mixer of ``glmkit.models.decoder``. Facts:
shared/reference/glm-lineage.md §5.2–§5.5.

What it adds to the ``"mla"`` mixer (lesson 05, whose class it extends and whose weights, cache and paths it keeps):

    c_Q, q, (c_KV, k_rot)   exactly MLA's (``MLA.query``, ``MLA.latent_kv``)
    q_I  = RoPE(wq_b(c_Q))                     [B, T, 32, 128]   index queries from MLA's q latent; RoPE on the
    k_I  = RoPE(LayerNorm(wk(x)))              [B, T, 128]       FIRST qk_rope_head_dim dims (MLA rotates its LAST)
    w_I  = weights_proj(x) · H_I^-½            [B, T, 32]        per-head weights (fp32)
    I    = Σ_h w_I · ReLU(q_I · k_I · 128^-½)  causal            ``glmkit.ops.lightning_indexer``
    idx  = top-k(I), k = index_topk (2048)     [B, T, k]         −1 where fewer keys are visible
    o    = sparse MLA over idx, MQA mode       ``glmkit.ops.sparse_mla`` (W_UK folded into q, W_UV after)

With T ≤ k every causal key is selected and the layer equals MLA (tests/mixers/test_dsa.py). The cache (``DSAState``)
keeps MLA's latent [c_KV | k_rot] plus one index key per token; it grows with T, so ``Cache.rollback`` only moves the
length. The indexer's RoPE pairing follows ``indexer_rope_interleave`` (GLM-5 configs: true; transformers' GLM class
always interleaves, DeepSeek-V3.2's HF class always half-splits).

Index sharing (``indexer_types``, GLM-5.2's IndexShare, arXiv:2603.12201): a "shared" layer has no indexer and reuses
the top-k of the last "full" layer before it in the same forward (carried on the ``Step``). None = every layer full,
GLM-5/5.1's setting.

Training, DeepSeek-V3.2 §2.1 (``dsa_stage``; ``set_dsa_stage(model, stage)`` switches a model and freezes for it):
* "warmup": dense attention (MLA's paths); only the indexers train (``set_dsa_stage`` freezes the rest), on
  KL(p ‖ softmax(I)) over every visible key, p = the main attention summed over heads, L1-normalised.
* "sparse" (the default, and what inference runs): top-k attention; the indexer loss covers the selected set only and
  the indexer reads detached inputs, so the indexer learns from its loss alone and the model from the LM loss alone.
A training forward sets ``aux_loss`` (``dsa_loss_coeff`` × the KL, named "dsa_indexer": ``train()`` adds it and keeps
its curve) and ``aux_stats["dsa_recall"]``: the share of the true attention's top-k (by p over all visible keys) the
indexer selected, over the queries that see more than k keys (``dsa_track_recall``; it costs the dense attention
probabilities, O(T²·H) memory).

GLM-5.3-Flash (HF ``glm5_next``) changes two things, both options here:
* NoPE: ``qk_rope_head_dim = 0`` (MLA's, see ``mla.py``); the indexer then rotates nothing either.
* KPool (``index_kpool`` = K, ``glmkit.kpool``): the indexer scores pooled keys, one per K consecutive tokens (a
  learned softmax-weighted mean of their index keys: ``index_kpool_compress_gate`` [D_I, d] scores each token per
  channel, ``index_kpool_compress_ape`` [K, D_I] adds a per-slot offset), selects the top index_topk / K pools and
  attends to their tokens, plus the newest tokens of the incomplete pool (``index_kpool_always_select_tail``). The
  cache keeps each token's gate scores beside its index key. Training: the same two stages, the KL taken over pools
  (the attention target summed over each pool's tokens: ``glmkit.kpool.pooled_attention_target``); the recall is
  still counted in tokens. The selection is torch (its logits are [T, L / K] per head); the attention is
  ``sparse_mla`` on the kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from glmkit.kpool import (
    first_real,
    kpool_topk,
    pool_candidates,
    pool_keys,
    pool_layout,
    pool_logits,
    pooled_attention_target,
)
from glmkit.mixers import Step, register
from glmkit.mixers.mla import MLA, MLAState, rope_columns
from glmkit.ops.lightning_indexer import (
    attention_target,
    indexer_kl_loss,
    indexer_topk,
    lightning_indexer,
    lightning_indexer_at,
    visibility,
)
from glmkit.ops.rope import rope
from glmkit.ops.sparse_mla import selected_mask, sparse_mla, sparse_mla_decode

KPOOL_GATE_STD = 0.02  # the decoder's initializer_range default
INDEXER_NORM_EPS = 1e-6  # transformers' nn.LayerNorm(index_head_dim, eps=1e-6) (DeepSeek's reference too)
STAGES = ("warmup", "sparse")
INDEXER_TYPES = ("full", "shared")


class DSAState(MLAState):
    """MLA's latent ``[B, T_max, R + P]`` plus the indexer's keys ``index_keys [B, T_max, D_I]`` (one per token, after
    its LayerNorm and RoPE), both written at the cache's length; with KPool also each token's gate scores
    ``pool_gates [B, T_max, D_I]``."""

    def __init__(self, batch_size, max_len, kv_lora_rank, rope_dim, index_dim, dtype, device, kpool: bool = False):
        super().__init__(batch_size, max_len, kv_lora_rank, rope_dim, dtype, device)
        self.index_keys = torch.zeros(batch_size, max_len, index_dim, dtype=dtype, device=device)
        if kpool:
            self.pool_gates = torch.zeros(batch_size, max_len, index_dim, dtype=dtype, device=device)

    def append_index_keys(self, k: torch.Tensor, start: int) -> torch.Tensor:
        """Store k [B, T, D_I] at [start, start + T); return the view of [0, start + T)."""
        end = start + k.shape[1]
        self.index_keys[:, start:end] = k
        return self.index_keys[:, :end]

    def append_pool_gates(self, g: torch.Tensor, start: int) -> torch.Tensor:
        """KPool: store the gate scores g [B, T, D_I] at [start, start + T); return the view of [0, start + T)."""
        end = start + g.shape[1]
        self.pool_gates[:, start:end] = g
        return self.pool_gates[:, :end]


class Indexer(nn.Module):
    """The lightning indexer's projections, under transformers' names (``self_attn.indexer.*``); with KPool (``kpool``
    = K) also ``index_kpool_compress_gate`` [D_I, d] and ``index_kpool_compress_ape`` [K, D_I]."""

    def __init__(self, hidden_size, q_lora_rank, n_heads, head_dim, rope_dim, pairing, theta, kpool=None):
        super().__init__()
        self.n_heads, self.head_dim, self.rope_dim, self.pairing, self.theta = (
            n_heads,
            head_dim,
            rope_dim,
            pairing,
            theta,
        )
        self.wq_b = nn.Linear(q_lora_rank, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(hidden_size, head_dim, bias=False)
        self.k_norm = nn.LayerNorm(head_dim, eps=INDEXER_NORM_EPS)
        self.weights_proj = nn.Linear(hidden_size, n_heads, bias=False)
        self.kpool = kpool
        if kpool:
            self.index_kpool_compress_ape = nn.Parameter(torch.empty(kpool, head_dim))
            self.index_kpool_compress_gate = nn.Parameter(torch.empty(head_dim, hidden_size))
            with torch.no_grad():
                self.index_kpool_compress_gate.normal_(0.0, KPOOL_GATE_STD)
            self.post_init()

    def post_init(self) -> None:
        """KPool: the slot offsets start at 0 (transformers' init); the gate keeps a small normal init (the decoder's
        for matrices), so pools start as near-uniform means of their keys. transformers fills the gate with ones,
        which gives every channel the same sharp softmax of Σ_i x_i: a placeholder for loaded weights."""
        if self.kpool:
            with torch.no_grad():
                self.index_kpool_compress_ape.zero_()

    def forward(self, x: torch.Tensor, c_q: torch.Tensor, step: Step):
        """x [B, T, d], c_Q [B, T, q_lora_rank] → q_I [B, T, H_I, D_I], k_I [B, T, D_I], w_I [B, T, H_I] fp32, and
        with KPool the gate scores [B, T, D_I] (else None)."""
        q = rearrange(self.wq_b(c_q), "b t (h d) -> b h t d", h=self.n_heads)
        k = self.k_norm(self.wk(x)).to(q.dtype)[:, None]  # one key per token: one head [B, 1, T, D_I] (the cast:
        # autocast runs LayerNorm in fp32)
        if self.rope_dim:  # NoPE models rotate nothing
            cos, sin = step.rope(self.rope_dim, self.theta)
            q, k = rope(q, k, cos, sin, self.rope_dim, self.pairing)  # the first rope_dim dims of each head
        w = self.weights_proj(x).float() * self.n_heads**-0.5
        gates = F.linear(x, self.index_kpool_compress_gate).to(q.dtype) if self.kpool else None
        return q.transpose(1, 2), k[:, 0], w, gates


def _option(cfg, name, check, want):
    v = cfg.opt(name)
    if not check(v):
        raise ValueError(f"dsa option {name}={v!r} must be {want}")
    return v


def _pos_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


@register("dsa")
class DSA(MLA):
    """MLA (all its parameters and names) plus ``indexer`` (``wq_b``, ``wk``, ``k_norm``, ``weights_proj``) on
    "full" layers."""

    # MLA's options plus the indexer's (HF names; glmkit's own: dsa_stage, dsa_loss_coeff, dsa_track_recall). Defaults
    # make a tiny working layer whose top-k bites from 17 tokens on (GLM-5: 32 heads × 128, k = 2048).
    options: dict = {
        **MLA.options,
        "index_n_heads": 8,
        "index_head_dim": 32,
        "index_topk": 16,
        "indexer_rope_interleave": True,
        "indexer_types": None,  # list of "full"/"shared" per layer; None = all full (GLM-5/5.1)
        "index_kpool": None,  # KPool's pool size K (GLM-5.3-Flash: 16); None = score every token (GLM-5)
        "index_kpool_always_select_tail": True,  # KPool: always attend the incomplete pool's tokens
        "dsa_stage": "sparse",
        "dsa_loss_coeff": 1.0,
        "dsa_track_recall": True,
    }
    aux_name = "dsa_indexer"

    def __init__(self, cfg, layer_idx: int):
        super().__init__(cfg, layer_idx)
        if self.q_lora_rank is None:
            raise ValueError("dsa needs q_lora_rank (its indexer projects MLA's query latent c_Q), got None")
        self.index_heads = _option(cfg, "index_n_heads", _pos_int, "a positive int")
        self.index_dim = _option(cfg, "index_head_dim", _pos_int, "a positive int")
        if self.index_dim < self.rope_dim:
            raise ValueError(
                f"dsa option index_head_dim={self.index_dim} must be >= qk_rope_head_dim={self.rope_dim} (the "
                "indexer rotates its first qk_rope_head_dim dims)"
            )
        self.topk = _option(cfg, "index_topk", _pos_int, "a positive int")
        interleave = _option(cfg, "indexer_rope_interleave", lambda v: isinstance(v, bool), "True or False")
        self.stage = _option(cfg, "dsa_stage", lambda v: v in STAGES, f"one of {STAGES}")
        number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0  # noqa: E731
        self.loss_coeff = float(_option(cfg, "dsa_loss_coeff", number, "a number >= 0"))
        self.track_recall = bool(cfg.opt("dsa_track_recall"))
        self.kpool = cfg.opt("index_kpool")
        if self.kpool is not None and (not _pos_int(self.kpool) or self.topk % self.kpool):
            raise ValueError(
                f"dsa option index_kpool={self.kpool!r} must be None or a positive int dividing index_topk={self.topk} "
                "(the indexer selects index_topk / index_kpool pools)"
            )
        self.kpool_tail = _option(cfg, "index_kpool_always_select_tail", lambda v: isinstance(v, bool), "True or False")
        kinds = cfg.opt("indexer_types")
        L = cfg.num_hidden_layers
        if kinds is not None and (
            not isinstance(kinds, (list, tuple)) or len(kinds) != L or any(k not in INDEXER_TYPES for k in kinds)
        ):
            raise ValueError(
                f"dsa option indexer_types must be None or {L} entries from {INDEXER_TYPES}, got {kinds!r}"
            )
        self.full = kinds is None or layer_idx >= L or kinds[layer_idx] == "full"  # the MTP layer (idx L): its own
        if not self.full and not any(cfg.layer_types[j] == "dsa" and kinds[j] == "full" for j in range(layer_idx)):
            raise ValueError(
                f"dsa layer {layer_idx} is 'shared' but no 'full' dsa layer comes before it to share top-k indices with"
            )
        if self.full:
            pairing = "interleaved" if interleave else "half"
            self.indexer = Indexer(
                cfg.hidden_size,
                self.q_lora_rank,
                self.index_heads,
                self.index_dim,
                self.rope_dim,
                pairing,
                self.theta,
                self.kpool,
            )
        self.aux_loss = None
        self.aux_stats: dict[str, torch.Tensor] = {}

    # -- the contract ----------------------------------------------------------------------------------------------
    def new_state(self, batch_size: int, max_len: int, dtype, device) -> MLAState:
        if not self.full:  # a shared layer keeps no index keys
            return MLAState(batch_size, max_len, self.kv_lora_rank, self.rope_dim, dtype, device)
        kpool = self.kpool is not None
        return DSAState(batch_size, max_len, self.kv_lora_rank, self.rope_dim, self.index_dim, dtype, device, kpool)

    @staticmethod
    def state_bytes(cfg, seq_len: int, batch_size: int = 1, dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes of one full layer's cache for ``seq_len`` positions: MLA's latent plus the index key, and with KPool
        the gate scores (GLM-5, one token, bf16: (512 + 64 + 128) · 2 = 1408 bytes; GLM-5.3-Flash, NoPE and KPool:
        (512 + 128 + 128) · 2 = 1536 bytes)."""
        index = cfg.opt("index_head_dim") * (1 if cfg.opt("index_kpool") is None else 2)
        per_token = cfg.opt("kv_lora_rank") + cfg.opt("qk_rope_head_dim") + index
        return batch_size * seq_len * per_token * torch.empty((), dtype=dtype).element_size()

    def forward(self, x: torch.Tensor, step: Step, state: MLAState | None) -> torch.Tensor:
        self.aux_loss, self.aux_stats = None, {}
        q_nope, q_rot, c_q = self.query(x, step)
        c_kv, k_rot = self.latent_kv(x, step)
        if state is not None:
            c_kv, k_rot = state.append(c_kv, k_rot, step.offset)  # [B, L, R], [B, L, P]
        key_mask = None if step.visible is None else step.visible[:, -1, :]  # real keys (left padding) [B, L]
        training = self.training and torch.is_grad_enabled()
        sparse = self.stage == "sparse"
        if self.full:
            detach = training and sparse  # the indexer learns from its own loss only
            q_i, k_i, w_i, g_i = self.indexer(x.detach() if detach else x, c_q.detach() if detach else c_q, step)
            if state is not None:
                k_i = state.append_index_keys(k_i, step.offset)
                q_i = q_i.to(k_i.dtype)  # under autocast the cache keeps the model's dtype
                if self.kpool:
                    g_i = state.append_pool_gates(g_i, step.offset)
            idx = pools = None
            if (sparse or training) and self.kpool:
                ape = self.indexer.index_kpool_compress_ape
                idx, pools = kpool_topk(q_i, k_i, g_i, w_i, ape, self.topk, step.offset, key_mask, self.kpool_tail)
            elif sparse or training:
                idx = indexer_topk(q_i, k_i, w_i, self.topk, step.offset, key_mask)
            step.dsa_topk = idx  # for the "shared" layers after this one
        else:
            idx = step.dsa_topk
        if not sparse and not training:
            out = self.attend(q_nope, q_rot, c_kv, k_rot, step)  # dense warm-up: MLA as it is
        else:
            w_uk, w_uv = self.absorbed_weights()
            q_lat = torch.einsum("bhtn,hnr->bthr", q_nope, w_uk).to(c_kv.dtype)  # MQA mode: W_UK in the query
            q_rope = q_rot.transpose(1, 2).to(c_kv.dtype)  # [B, T, H, P]; the cache's dtype under autocast
            if sparse:
                attend = sparse_mla_decode if state is not None and step.offset > 0 else sparse_mla
                q_r, k_r = rope_columns(q_rope, k_rot)  # NoPE: one zero column
                o_lat = attend(q_lat, q_r, c_kv, k_r, idx, self.scale)
                out = torch.einsum("bthr,hvr->bhtv", o_lat, w_uv)  # W_UV after the weighted sum
            else:
                out = self.attend(q_nope, q_rot, c_kv, k_rot, step)
            if training and self.full and self.kpool:
                self._kpool_loss(q_lat, q_rope, c_kv, k_rot, q_i, k_i, g_i, w_i, idx, pools, step.offset, key_mask)
            elif training and self.full:
                self._indexer_loss(q_lat, q_rope, c_kv, k_rot, q_i, k_i, w_i, idx, step.offset, key_mask)
        return self.o_proj(rearrange(out, "b h t v -> b t (h v)"))

    # -- training ----------------------------------------------------------------------------------------------------
    def _indexer_loss(self, q_lat, q_rope, c_kv, k_rot, q_i, k_i, w_i, idx, offset, key_mask) -> None:
        """``aux_loss`` = coeff · KL(p ‖ softmax(I)) (dense: every visible key; sparse: the selected set) and
        ``aux_stats["dsa_recall"]``; p comes from the main attention with no gradient."""
        T, L = q_lat.shape[1], c_kv.shape[1]
        q_abs = torch.cat((q_lat, q_rope), dim=-1).detach()  # every head against the shared latent rows
        kv = torch.cat((c_kv, k_rot), dim=-1).detach()
        vis = visibility(T, L, offset, key_mask, q_lat.device)
        p_dense = None
        if self.stage == "warmup":
            p_dense = attention_target(q_abs, kv, self.scale, visible=vis)
            loss = indexer_kl_loss(lightning_indexer(q_i, k_i, w_i, offset, key_mask), p_dense)
        else:
            p_sel = attention_target(q_abs, kv, self.scale, idx=idx)
            loss = indexer_kl_loss(lightning_indexer_at(q_i, k_i, w_i, idx), p_sel)
        self.aux_loss = self.loss_coeff * loss
        if self.track_recall:
            if p_dense is None:
                p_dense = attention_target(q_abs, kv, self.scale, visible=vis)
            self.aux_stats = {"dsa_recall": topk_recall(p_dense, vis, idx, self.topk)}

    def _kpool_loss(self, q_lat, q_rope, c_kv, k_rot, q_i, k_i, g_i, w_i, idx, chosen, offset, key_mask) -> None:
        """KPool's ``aux_loss``: coeff · KL(P ‖ softmax(I)) over pools, P = the attention target summed over each pool's
        tokens (dense stage: every candidate pool; sparse stage: the selected pools, with the attention over the
        selected tokens), I = the pool logits (differentiable in the indexer's weights); ``aux_stats["dsa_recall"]``
        in tokens, as without KPool."""
        B, T, L = q_lat.shape[0], q_lat.shape[1], c_kv.shape[1]
        q_abs = torch.cat((q_lat, q_rope), dim=-1).detach()
        kv = torch.cat((c_kv, k_rot), dim=-1).detach()
        vis = visibility(T, L, offset, key_mask, q_lat.device)
        first = first_real(key_mask, B, L, q_lat.device)
        tokens, complete, ends = pool_layout(first, L, self.kpool)
        cand = pool_candidates(ends, complete, offset, T)
        logits = pool_logits(q_i, pool_keys(k_i, g_i, self.indexer.index_kpool_compress_ape, tokens), w_i)
        # dense stage: every candidate pool, the attention over every visible key; sparse: the chosen pools, the
        # attention over the selected tokens (the chosen pools' and the tail's)
        selected = selected_mask(idx, L)
        pools, allowed = (cand, None) if self.stage == "warmup" else (chosen, selected)
        recall_k = self.topk if self.track_recall else None
        target, recall = pooled_attention_target(q_abs, kv, self.scale, vis, tokens, allowed, pools, recall_k, selected)
        self.aux_loss = self.loss_coeff * indexer_kl_loss(logits.masked_fill(~pools, float("-inf")), target)
        if recall is not None:
            self.aux_stats = {"dsa_recall": recall}


def topk_recall(p: torch.Tensor, visible: torch.Tensor, idx: torch.Tensor, k: int) -> torch.Tensor:
    """Share of the true top-k keys (largest p among the visible ones) that the indexer's idx [B, T, N] holds,
    averaged over the queries that see more than k keys (1 when none does: then every key is selected)."""
    p, L = p.detach(), p.shape[-1]
    vis = visible.expand_as(p)
    true_top = p.masked_fill(~vis, -1.0).topk(min(k, L), dim=-1).indices  # [B, T, k]
    hit = selected_mask(idx, L).gather(-1, true_top).float().mean(-1)  # [B, T]
    rows = (vis.sum(-1) > k).float()
    return torch.where(rows.sum() > 0, (hit * rows).sum() / rows.sum().clamp_min(1.0), torch.ones((), device=p.device))


def set_dsa_stage(model: nn.Module, stage: str) -> None:
    """Switch every DSA layer of ``model`` to ``stage`` ("warmup" or "sparse") and record it in the config (a
    checkpoint keeps it). "warmup" freezes every parameter but the indexers' (DeepSeek-V3.2's dense warm-up trains the
    indexer alone; ``train()`` optimises the parameters that require a gradient); "sparse" unfreezes them all."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    layers = [m for m in model.modules() if isinstance(m, DSA)]
    if not layers:
        raise ValueError("this model has no dsa layer")
    indexers = {id(p) for m in layers if m.full for p in m.indexer.parameters()}
    for p in model.parameters():
        p.requires_grad_(stage == "sparse" or id(p) in indexers)
    for m in layers:
        m.stage = stage
    config = getattr(model, "config", None)
    if config is not None:
        config.extra = {**config.extra, "dsa_stage": stage}
