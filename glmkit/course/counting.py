"""A parameter counter for GLM-4.5-style configs, independent of the model code: totals and active parameters,
tensor by tensor from the config alone, for lessons 02 and 04 (the tests check ``Decoder.num_parameters`` against
it on the meta device, and both against the published figures).

What changed from GLM-4 (dense, HF ``glm4``): the FFN of every layer from ``first_k_dense_replace`` on is
an MoE (``glmkit.moe``), attention gets 96 query heads of 128 (2.4× the hidden size in GLM-4.5) over 8
KV heads, optional per-head QK-norm, half-split partial RoPE on 64 of the 128 dims (θ = 1e6), and one
multi-token-prediction (MTP) layer is stored after the last decoder layer.

The configs are the presets ``glm-4.5`` and ``glm-4.5-air`` (``glmkit.models.presets``, with their sources). Note
that HF's ``Glm4MoeConfig`` class defaults (46 layers, 128 experts, attention_bias False) are neither model.

Counting (``param_counts``), per tensor stored in the checkpoint:

* embedding ``V·H``; lm head ``V·H`` unless tied; final norm ``H``.
* attention per layer: q ``H·(nh·hd) + nh·hd`` (bias), k and v ``H·(nkv·hd) + nkv·hd`` each, o
  ``(nh·hd)·H`` (no bias), QK-norm ``2·hd`` when ``use_qk_norm``; two RMSNorms ``2H``. MLA layers (GLM-4.7-Flash,
  ``glm4_moe_lite``; every layer MLA) instead: ``q_a_proj`` H·q_lora + ``q_a_layernorm`` q_lora + ``q_b_proj``
  q_lora·nh·(nope + rope) (or one ``q_proj`` H·nh·(nope + rope) without q_lora), ``kv_a_proj_with_mqa`` H·(kv_lora
  + rope) + ``kv_a_layernorm`` kv_lora, ``kv_b_proj`` kv_lora·nh·(nope + v), ``o_proj`` nh·v·H (biases on q_a,
  kv_a and o with ``attention_bias``).
* dense FFN ``3·H·intermediate_size``; MoE FFN: router ``E·H`` + bias ``E`` (the bias is a buffer in
  HF, so ``model.parameters()`` leaves it out, but the checkpoint stores it), routed experts
  ``E·3·H·I_moe``, shared experts ``n_shared·3·H·I_moe``.
* active per token: every layer's attention and norms, dense FFNs, the router, k routed and all shared
  experts. Reported three ways: without the embedding and the LM head (``active``, the convention that
  matches the published figures), with the head, and with both.
* MTP (``num_nextn_predict_layers`` layers, counted separately, not in ``total``): one full MoE decoder
  block + ``enorm``, ``hnorm`` (H each), ``eh_proj`` (2H → H, no bias), ``shared_head.norm`` (H). The
  checkpoint also stores ``embed_tokens`` and ``shared_head.head`` copies under the MTP layer (V·H each);
  HF and the paper tie them to the main model, so they are reported apart (``mtp_copies``).

Which convention matches the published 355B/32B and 106B/12B (tests/course/test_counting.py): totals
WITHOUT the MTP layer (GLM-4.5 352.8B, −0.6%; Air 106.85B, +0.8%; with the MTP block they would be
356.8B, +0.5%, and 109.2B, +3.0%, so Air rules MTP out), active WITHOUT embedding and LM head
(GLM-4.5 32.08B, +0.25%; Air 12.18B, +1.5%: the published "12B" is rounded to 2 significant digits).
"""

from __future__ import annotations

from dataclasses import dataclass

from glmkit.models.presets import PRESETS, PUBLISHED, B

GLM_4_5, GLM_4_5_AIR = PRESETS["glm-4.5"], PRESETS["glm-4.5-air"]


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of a ``glm4_moe`` config (see the module docstring for what each includes)."""

    embedding: int
    lm_head: int
    final_norm: int
    attention: int  # one layer: q/k/v/o (+ biases, + QK-norm) and the two RMSNorms
    dense_ffn: int  # one dense layer's FFN
    moe_ffn: int  # one MoE layer's FFN: router (+ bias) + routed + shared experts
    moe_ffn_active: int  # of which one token uses: router + k routed + shared
    router_bias: int  # per MoE layer (a buffer in HF, stored in the checkpoint)
    n_dense_layers: int
    n_moe_layers: int
    mtp: int  # all MTP layers, without their embedding/head copies
    mtp_active: int
    mtp_copies: int  # the MTP layers' stored embed_tokens + shared_head.head

    @property
    def layers(self) -> int:
        return self.n_dense_layers * (self.attention + self.dense_ffn) + self.n_moe_layers * (
            self.attention + self.moe_ffn
        )

    @property
    def total(self) -> int:
        """Main model, as stored: embedding + layers + final norm + lm head (no MTP)."""
        return self.embedding + self.layers + self.final_norm + self.lm_head

    @property
    def total_with_mtp(self) -> int:
        return self.total + self.mtp

    @property
    def total_with_mtp_copies(self) -> int:
        """Everything in the checkpoint files."""
        return self.total + self.mtp + self.mtp_copies

    @property
    def active(self) -> int:
        """Per token, main model, without the embedding table and the LM head."""
        return (
            self.n_dense_layers * (self.attention + self.dense_ffn)
            + self.n_moe_layers * (self.attention + self.moe_ffn_active)
            + self.final_norm
        )

    @property
    def active_with_head(self) -> int:
        return self.active + self.lm_head

    @property
    def active_with_embeddings(self) -> int:
        return self.active + self.lm_head + self.embedding

    @property
    def active_with_mtp(self) -> int:
        return self.active + self.mtp_active


def param_counts(cfg) -> ParamCounts:
    """Count ``cfg``'s parameters tensor by tensor (module docstring); exact integers."""
    H, V = cfg.hidden_size, cfg.vocab_size
    q_out = cfg.num_attention_heads * cfg.head_dim
    kv_out = cfg.num_key_value_heads * cfg.head_dim
    bias = 1 if cfg.attention_bias else 0
    attention = (
        H * q_out
        + bias * q_out  # q_proj
        + 2 * (H * kv_out + bias * kv_out)  # k_proj, v_proj
        + q_out * H  # o_proj (no bias)
        + (2 * cfg.head_dim if cfg.use_qk_norm else 0)  # q_norm, k_norm (per head_dim, shared by heads)
        + 2 * H
    )  # input_layernorm, post_attention_layernorm
    if "mla" in cfg.layer_types:
        if set(cfg.layer_types) != {"mla"}:
            raise ValueError("param_counts counts all-GQA or all-MLA models, not a mix of the two")
        attention = mla_attention(cfg) + 2 * H
    expert = 3 * H * cfg.moe_intermediate_size  # gate, up [I, H] and down [H, I]
    router = cfg.n_routed_experts * H
    router_bias = cfg.n_routed_experts
    shared = cfg.n_shared_experts * expert
    moe_ffn = router + router_bias + cfg.n_routed_experts * expert + shared
    moe_ffn_active = router + router_bias + cfg.num_experts_per_tok * expert + shared
    n_dense = cfg.mlp_layer_types.count("dense")
    n_mtp = cfg.num_nextn_predict_layers
    mtp_extra = 2 * H + 2 * H * H + H  # enorm, hnorm; eh_proj [H, 2H]; shared_head.norm
    return ParamCounts(
        embedding=V * H,
        lm_head=0 if cfg.tie_word_embeddings else V * H,
        final_norm=H,
        attention=attention,
        dense_ffn=3 * H * cfg.intermediate_size,
        moe_ffn=moe_ffn,
        moe_ffn_active=moe_ffn_active,
        router_bias=router_bias,
        n_dense_layers=n_dense,
        n_moe_layers=cfg.num_hidden_layers - n_dense,
        mtp=n_mtp * (attention + moe_ffn + mtp_extra),
        mtp_active=n_mtp * (attention + moe_ffn_active + mtp_extra),
        mtp_copies=n_mtp * 2 * V * H,
    )


def mla_attention(cfg) -> int:
    """One MLA layer's attention tensors (module docstring), from the mixer's options in ``cfg``."""
    H, nh = cfg.hidden_size, cfg.num_attention_heads
    q_lora, kv_lora = cfg.opt("q_lora_rank"), cfg.opt("kv_lora_rank")
    nope, rope, v = cfg.opt("qk_nope_head_dim"), cfg.opt("qk_rope_head_dim"), cfg.opt("v_head_dim")
    bias = 1 if cfg.attention_bias else 0
    q = H * nh * (nope + rope) if q_lora is None else (H + bias + 1) * q_lora + q_lora * nh * (nope + rope)
    kv = (H + bias) * (kv_lora + rope) + kv_lora + kv_lora * nh * (nope + v)
    return q + kv + nh * v * H + bias * H


def summary(name: str) -> str:
    """A short table of a preset's counts against its published figures (for the lesson)."""
    cfg = PRESETS[name]
    c = param_counts(cfg)
    pub = PUBLISHED.get(name)
    rows = [
        ("total (no MTP)", c.total, 0),
        ("total + MTP", c.total_with_mtp, 0),
        ("total + MTP + its emb/head copies", c.total_with_mtp_copies, 0),
        ("active (no emb, no head)", c.active, 1),
        ("active + head", c.active_with_head, 1),
        ("active + emb + head", c.active_with_embeddings, 1),
    ]
    lines = [name]
    for label, n, which in rows:
        rel = f"  ({(n / pub[which] - 1) * 100:+.2f}% vs {pub[which] / B:.0f}B)" if pub else ""
        lines.append(f"  {label:<36}{n / B:9.3f}B{rel}")
    return "\n".join(lines)
