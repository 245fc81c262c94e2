"""Hugging Face checkpoint interop: ``load_hf(folder)`` reads a GLM checkpoint into a glmkit ``Decoder``,
``save_hf(model, folder)`` writes one that transformers loads. transformers itself is needed for neither.

A checkpoint folder is ``config.json`` plus safetensors: ``model.safetensors``, or shards listed by
``model.safetensors.index.json``. Families (names and conventions read from transformers 5.24; facts in
shared/reference/glm-lineage.md §3, §4, §9):

* ``glm`` (GLM-4-9B-chat-hf and kin): pre-norm RMSNorm, GQA, bias on q/k/v, SwiGLU on a fused ``gate_up_proj``,
  partial RoPE with **interleaved** pairs. ChatGLM2/3 shipped a fused ``query_key_value`` under remote code; the
  HF-native port splits q/k/v (fused again here) and renames everything Llama-style.
* ``glm4`` (GLM-4-9B-0414): the same plus the sandwich norms ``post_self_attn_layernorm`` and
  ``post_mlp_layernorm``; note that HF's ``post_attention_layernorm`` is the norm *before* the MLP.
* ``glm4_moe`` (GLM-4.5/4.6/4.7, Air): QK-norm, **half-split** RoPE pairs (loading it with the wrong pairing runs
  without error and gives wrong logits), dense layers with separate ``gate_proj``/``up_proj``, MoE layers with
  the router ``mlp.gate.{weight, e_score_correction_bias}``, experts one by one (transformers' stacked layout is
  accepted too) and ``mlp.shared_experts.*`` (zero-size when ``n_shared_experts`` is 0, as transformers writes
  them). The MTP layer is ``model.layers.{N}.*``: a decoder block plus ``enorm``, ``hnorm``, ``eh_proj``,
  ``shared_head.{norm,head}``, ``embed_tokens``; transformers' model class ignores it, glmkit loads and saves it.
* ``glm4_moe_lite`` (GLM-4.7-Flash): ``glm4_moe``'s MoE with Multi-head Latent Attention (the ``"mla"`` mixer, whose
  parameters carry transformers' names: ``self_attn.{q_a_proj, q_a_layernorm, q_b_proj | q_proj, kv_a_proj_with_mqa,
  kv_a_layernorm, kv_b_proj, o_proj}``), no QK-norm, RoPE over the whole ``qk_rope_head_dim`` slice in the pairing
  ``rope_interleave`` names (default interleaved), dense/sparse layers listed in ``mlp_layer_types``. Its
  ``head_dim`` is transformers' alias of ``qk_rope_head_dim``; glmkit's ``head_dim`` is the q·k head (nope + rope).
* ``glm_moe_dsa`` (GLM-5/5.1): ``glm4_moe_lite``'s layout with DeepSeek Sparse Attention (the ``"dsa"`` mixer): MLA plus
  ``self_attn.indexer.{wq_b, wk, k_norm (LayerNorm, weight and bias), weights_proj}`` on "full" layers, top
  ``index_topk`` keys per query; ``indexer_types`` (or transformers' ``index_topk_pattern``/``index_topk_freq``/
  ``index_skip_topk_offset``) marks index-sharing layers. Both RoPE pairings follow ``rope_interleave`` and
  ``indexer_rope_interleave`` (GLM-5 configs: true for both; transformers' class always interleaves, so parity holds
  for those).
* ``glm5_next`` (GLM-5.3-Flash, ``Glm5NextForConditionalGeneration``): a vision-language checkpoint whose language
  model (``text_config``; tensors under ``model.language_model.``, the head at ``lm_head``) is the 3:1 hybrid —
  ``layer_types`` "linear_attention" → the ``"kda"`` mixer, "indexed_attention" → ``"dsa"`` with NoPE MLA
  (``qk_rope_head_dim`` 0, latent norms at ``rms_norm_eps``) and the KPool indexer (``index_kpool``,
  ``index_kpool_always_select_tail``; ``self_attn.indexer.index_kpool_compress_{gate,ape}``), ``glm4_moe``'s MoE with
  the clamped SwiGLU (``swiglu_limit``), and mHC around every branch (``hc_mult`` streams; the files store
  ``hc_attn_{fn,base,scale}`` and ``hc_ffn_*``, KDA's q/k/v filters apart, ``f_a_proj``/``f_b_proj``/``dt_bias``/
  ``A_log`` directly under ``self_attn.``; transformers' in-memory names — ``attn_hc.fn``, one ``conv1d``,
  ``forget_gate.`` — and a flat ``model.layers.`` prefix are read too). transformers has no text-only class: its
  oracle is the conditional-generation model run on text. ``load_hf`` skips the vision tower (``model.visual.*``)
  with a warning, or keeps its tensors and config for ``save_hf`` (``keep_vision=True``); ``save_hf`` writes the
  text weights with the kept tower, or with none (transformers then builds a tower of the small ``vision_config``
  written here from random weights, and reports its tensors missing). glmkit's ``hc_mult`` = 1 is the plain
  residual, which glm5_next cannot express (it always builds mHC modules): its checkpoints need ``hc_mult`` >= 2.
  The MTP layer is ``model.language_model.layers.{N}`` (transformers ignores it), a KDA or DSA block by its tensors.

Names map mechanically: the model's own state dict, built on the meta device from the config, converted to HF
names, *is* the list of tensors (and shapes) a checkpoint must hold, so a mismatch is reported tensor by tensor.
Per layer, the mixer's own ``hf_to_ours``/``ours_to_hf`` (``glmkit.mixers``) handles its tensors.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from glmkit.mixers import MIXERS
from glmkit.models.decoder import Decoder, DecoderConfig

ARCHITECTURES = {
    "glm": "GlmForCausalLM",
    "glm4": "Glm4ForCausalLM",
    "glm4_moe": "Glm4MoeForCausalLM",
    "glm4_moe_lite": "Glm4MoeLiteForCausalLM",
    "glm_moe_dsa": "GlmMoeDsaForCausalLM",
    "glm5_next": "Glm5NextForConditionalGeneration",
}
MLA_FIELDS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")  # glm4_moe_lite
DSA_FIELDS = ("index_n_heads", "index_head_dim", "index_topk")  # glm_moe_dsa, beside MLA_FIELDS
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")  # stored by some exporters; not a parameter
# (ours, HF) name pieces inside one decoder layer, outside the mixer
_LAYER_NAMES = [
    ("input_norm.", "input_layernorm."),
    ("pre_mlp_norm.", "post_attention_layernorm."),
    ("post_mixer_norm.", "post_self_attn_layernorm."),
    ("post_mlp_norm.", "post_mlp_layernorm."),
    ("attn_hc.", "hc_attn_"),  # glm5_next's mHC (the files' names; transformers renames them on load)
    ("ffn_hc.", "hc_ffn_"),
]
_MTP_NAMES = [("shared_head_norm.", "shared_head.norm."), ("head.", "shared_head.head.")]


class HFCheckpointError(ValueError):
    """A checkpoint glmkit cannot load (or a model it cannot save): the message says what and why."""


# ----------------------------------------------------------------------------------------------------
# config.json <-> DecoderConfig
# ----------------------------------------------------------------------------------------------------
def _positive(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def config_from_hf(hf: dict[str, Any], **overrides: Any) -> DecoderConfig:
    """A ``DecoderConfig`` from a config.json dict; ``overrides`` replace fields afterwards (e.g.
    ``rope_interleave=False`` on a ``glm`` checkpoint — wrong; lesson 02 shows what it does)."""
    family = hf.get("model_type")
    if family not in ARCHITECTURES:
        raise HFCheckpointError(
            f"unsupported model_type {family!r} in config.json: glmkit.hf loads "
            f"{sorted(ARCHITECTURES)} (GLM-4-9B: glm, GLM-4-0414: glm4, GLM-4.5/4.6/4.7: glm4_moe, "
            f"GLM-4.7-Flash: glm4_moe_lite, GLM-5/5.1: glm_moe_dsa, GLM-5.3-Flash: glm5_next)"
        )
    if family == "glm5_next":
        return _config_from_glm5_next(hf, overrides)
    dsa = family == "glm_moe_dsa"
    lite = family in ("glm4_moe_lite", "glm_moe_dsa")  # MLA
    moe = family in ("glm4_moe", "glm4_moe_lite", "glm_moe_dsa")
    need = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"]
    need += ["moe_intermediate_size", "n_routed_experts", "num_experts_per_tok"] if moe else []
    missing = [k for k in need + (list(MLA_FIELDS) if lite else []) + (list(DSA_FIELDS) if dsa else []) if k not in hf]
    if missing:
        raise HFCheckpointError(f"config.json ({family}) lacks required fields {missing}")
    if hf.get("hidden_act", "silu") != "silu":
        raise HFCheckpointError(f"config.json: hidden_act={hf['hidden_act']!r}, but {family} uses SwiGLU ('silu')")
    rope = {**(hf.get("rope_parameters") or {}), **(hf.get("rope_scaling") or {})}  # transformers 5 / 4 names
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise HFCheckpointError(
            f"config.json: rope_type={rope.get('rope_type', rope.get('type'))!r} is not supported (only 'default' RoPE)"
        )
    bad = [
        k
        for k in MLA_FIELDS
        if lite and not (hf[k] is None and k == "q_lora_rank" and not dsa) and not _positive(hf[k])
    ]
    bad += [k for k in DSA_FIELDS if dsa and not _positive(hf[k])]
    if bad:
        raise HFCheckpointError(
            f"config.json ({family}): {bad[0]}={hf[bad[0]]!r} must be a positive int"
            + (" or null" if bad[0] == "q_lora_rank" and not dsa else "")
        )
    if lite and float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
        raise HFCheckpointError(
            f"config.json (glm4_moe_lite): partial_rotary_factor={rope['partial_rotary_factor']} is not supported "
            f"(MLA rotates its whole qk_rope_head_dim slice)"
        )
    if lite and hf.get("num_key_value_heads", hf["num_attention_heads"]) != hf["num_attention_heads"]:
        raise HFCheckpointError(
            f"config.json (glm4_moe_lite): num_key_value_heads={hf['num_key_value_heads']} must equal "
            f"num_attention_heads={hf['num_attention_heads']} (MLA expands keys and values for every head)"
        )
    vocab = hf["vocab_size"]
    ok = lambda t: t if t is not None and 0 <= t < vocab else None  # noqa: E731  (tiny test configs)
    eos = hf.get("eos_token_id")
    eos = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
    fields = dict(
        vocab_size=vocab,
        hidden_size=hf["hidden_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"],
        num_key_value_heads=hf.get("num_key_value_heads"),
        head_dim=hf.get("head_dim"),
        intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        attention_bias=bool(hf.get("attention_bias", not moe)),  # Glm4MoeConfig's class default is False
        use_qk_norm=bool(hf.get("use_qk_norm", False)),
        partial_rotary_factor=float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5))),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        rope_interleave=not moe,  # glm4_moe: gpt_neox's half-split pairs (§4.2)
        sandwich_norms=family == "glm4",
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5 if moe else 1.5625e-07)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        initializer_range=float(hf.get("initializer_range", 0.02)),
        pad_token_id=ok(hf.get("pad_token_id")),
        bos_token_id=ok(hf.get("bos_token_id")),
        eos_token_id=tuple(t for t in eos if ok(t) is not None),
    )
    if moe:
        fields.update(
            {k: hf[k] for k in ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size")},
            n_shared_experts=hf.get("n_shared_experts", 1),
            first_k_dense_replace=hf.get("first_k_dense_replace", 1),
            n_group=hf.get("n_group", 1),
            topk_group=hf.get("topk_group", 1),
            norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
            routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
            num_nextn_predict_layers=min(int(hf.get("num_nextn_predict_layers", 0) or 0), 1),
        )
    if lite:  # MLA: the mixer's options; dense/sparse layers as listed (transformers' default: one dense first)
        L = hf["num_hidden_layers"]
        fields.update(
            num_key_value_heads=hf["num_attention_heads"],
            head_dim=hf["qk_nope_head_dim"] + hf["qk_rope_head_dim"],
            partial_rotary_factor=1.0,
            rope_interleave=bool(hf.get("rope_interleave", True)),
            attention_bias=bool(hf.get("attention_bias", False)),
            layer_types=["mla"] * L,
            mtp_layer_type="mla",
            mlp_layer_types=list(hf.get("mlp_layer_types") or ["dense"] + ["sparse"] * (L - 1)),
            extra={k: hf[k] for k in MLA_FIELDS},
        )
    if dsa:  # GLM-5: MLA + the indexer; three dense layers first by default (GlmMoeDsaConfig)
        n_dense = min(int(hf.get("first_k_dense_replace", 3)), L)
        fields.update(
            layer_types=["dsa"] * L,
            mtp_layer_type="dsa",
            mlp_layer_types=list(hf.get("mlp_layer_types") or ["dense"] * n_dense + ["sparse"] * (L - n_dense)),
            extra={
                **fields["extra"],
                **{k: hf[k] for k in DSA_FIELDS},
                "indexer_rope_interleave": bool(hf.get("indexer_rope_interleave", True)),
                "indexer_types": _indexer_types(hf, L),
            },
        )
    fields.update(overrides)
    try:
        return DecoderConfig(**fields)
    except (TypeError, ValueError) as e:
        raise HFCheckpointError(f"config.json ({family}) contradicts itself: {e}") from None


# glm5_next: transformers' Glm5NextTextConfig defaults (= GLM-5.3-Flash) for the fields a config.json may leave out
G5N_DEFAULTS = dict(
    n_shared_experts=1,
    routed_scaling_factor=2.5,
    n_group=1,
    topk_group=1,
    norm_topk_prob=True,
    max_position_embeddings=1048576,
    initializer_range=0.02,
    rms_norm_eps=1e-5,
    attention_bias=False,
    swiglu_limit=10.0,
    linear_head_dim=128,
    linear_num_heads=64,
    linear_conv_kernel_dim=4,
    linear_lower_bound=-5.0,
    hc_mult=4,
    hc_eps=1e-6,
    hc_sinkhorn_iters=20,
    index_kpool=16,
    index_kpool_always_select_tail=True,
)
G5N_LAYERS = {"linear_attention": "kda", "indexed_attention": "dsa", "full_attention": "dsa"}  # HF → our mixers
KDA_FIELDS = ("linear_num_heads", "linear_head_dim", "linear_conv_kernel_dim", "linear_lower_bound")
KPOOL_FIELDS = ("index_kpool", "index_kpool_always_select_tail")
G5N_PREFIX = "model.language_model."  # the text model's tensors in a glm5_next checkpoint
G5N_VISION = "model.visual."


def _g5n_text(hf: dict[str, Any]) -> dict[str, Any]:
    """The language model's fields of a glm5_next config.json: ``text_config`` (flat text-only configs keep them at
    the top level), transformers' defaults filled in, ``linear_attn_config`` (the original checkpoints' spelling of
    the KDA fields) unpacked as transformers does."""
    text = dict(hf.get("text_config") or hf)
    if "tie_word_embeddings" in hf and "tie_word_embeddings" not in text:
        text["tie_word_embeddings"] = hf["tie_word_embeddings"]
    linear = text.get("linear_attn_config") or {}
    for ours, theirs in (
        ("linear_head_dim", "head_dim"),
        ("linear_num_heads", "num_heads"),
        ("linear_conv_kernel_dim", "short_conv_kernel_size"),
        ("linear_lower_bound", "gate_lower_bound"),
    ):
        if theirs in linear:
            text[ours] = linear[theirs]
    if linear and linear.get("safe_gate", True) and text.get("linear_lower_bound", -5.0) is None:
        text["linear_lower_bound"] = -5.0  # transformers: a safe gate without its bound gets -5
    return {**G5N_DEFAULTS, **text}


def _config_from_glm5_next(hf: dict[str, Any], overrides: dict[str, Any]) -> DecoderConfig:
    """glm5_next's language model as a ``DecoderConfig`` (module docstring); ``overrides`` as ``config_from_hf``."""
    text = _g5n_text(hf)
    need = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"]
    need += ["moe_intermediate_size", "n_routed_experts", "num_experts_per_tok", *MLA_FIELDS, *DSA_FIELDS]
    missing = [k for k in need if k not in text]
    if missing:
        raise HFCheckpointError(f"config.json (glm5_next) lacks required fields {missing}")
    if text.get("hidden_act", "silu") != "silu":
        raise HFCheckpointError(f"config.json: hidden_act={text['hidden_act']!r}, but glm5_next uses SwiGLU ('silu')")
    bad = [
        k
        for k in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "v_head_dim", *DSA_FIELDS)
        if not _positive(text[k])
    ]
    if bad:
        raise HFCheckpointError(f"config.json (glm5_next): {bad[0]}={text[bad[0]]!r} must be a positive int")
    if text["qk_rope_head_dim"] != 0:
        raise HFCheckpointError(
            f"config.json (glm5_next): qk_rope_head_dim={text['qk_rope_head_dim']!r}, but glm5_next's MLA is NoPE "
            "(transformers refuses a RoPE slice too)"
        )
    if text.get("num_key_value_heads", text["num_attention_heads"]) != text["num_attention_heads"]:
        raise HFCheckpointError(
            f"config.json (glm5_next): num_key_value_heads={text['num_key_value_heads']} must equal "
            f"num_attention_heads={text['num_attention_heads']} (MLA expands keys and values for every head)"
        )
    L = text["num_hidden_layers"]
    kinds = text.get("layer_types") or ["linear_attention" if i % 4 != 3 else "indexed_attention" for i in range(L)]
    if len(kinds) != L or any(k not in G5N_LAYERS for k in kinds):
        raise HFCheckpointError(
            f"config.json (glm5_next): layer_types must list {L} of {sorted(G5N_LAYERS)}, got {kinds}"
        )
    layer_types = [G5N_LAYERS[k] for k in kinds]
    if not (_positive(text["hc_mult"]) and text["hc_mult"] >= 2):
        raise HFCheckpointError(
            f"config.json (glm5_next): hc_mult={text['hc_mult']!r}; glmkit reads glm5_next with hc_mult >= 2 "
            "(its hc_mult = 1 is the plain residual, while transformers builds mHC modules for one stream too)"
        )
    mtp_type = overrides.pop("mtp_layer_type", "dsa")
    vocab = text["vocab_size"]
    ok = lambda t: t if t is not None and 0 <= t < vocab else None  # noqa: E731  (tiny test configs)
    eos = text.get("eos_token_id")
    eos = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
    extra: dict[str, Any] = {}
    if "dsa" in layer_types + [mtp_type]:
        extra.update({k: text[k] for k in (*MLA_FIELDS, *DSA_FIELDS, *KPOOL_FIELDS)})
        extra.update(latent_norm_eps=float(text["rms_norm_eps"]), indexer_types=_indexer_types(text, L))
    if "kda" in layer_types + [mtp_type]:
        extra.update({k: text[k] for k in KDA_FIELDS})
    n_dense = min(3, L)
    mlp_types = list(text.get("mlp_layer_types") or ["dense"] * n_dense + ["sparse"] * (L - n_dense))
    fields = dict(
        vocab_size=vocab,
        hidden_size=text["hidden_size"],
        num_hidden_layers=L,
        num_attention_heads=text["num_attention_heads"],
        num_key_value_heads=text["num_attention_heads"],
        head_dim=text["qk_nope_head_dim"],  # glmkit's head_dim is the q·k head: nope + rope, rope = 0
        intermediate_size=text["intermediate_size"],
        max_position_embeddings=text["max_position_embeddings"],
        attention_bias=bool(text["attention_bias"]),
        partial_rotary_factor=0.0,  # nothing rotates: KDA has no RoPE and the MLA is NoPE
        rms_norm_eps=float(text["rms_norm_eps"]),
        tie_word_embeddings=bool(text.get("tie_word_embeddings", False)),
        initializer_range=float(text["initializer_range"]),
        pad_token_id=ok(text.get("pad_token_id")),
        bos_token_id=ok(text.get("bos_token_id")),
        eos_token_id=tuple(t for t in eos if ok(t) is not None),
        layer_types=layer_types,
        mlp_layer_types=mlp_types,
        first_k_dense_replace=(mlp_types + ["sparse"]).index("sparse"),
        **{k: text[k] for k in ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size")},
        **{k: text[k] for k in ("n_shared_experts", "n_group", "topk_group", "hc_mult", "hc_sinkhorn_iters")},
        norm_topk_prob=bool(text["norm_topk_prob"]),
        routed_scaling_factor=float(text["routed_scaling_factor"]),
        swiglu_limit=text["swiglu_limit"],
        hc_eps=float(text["hc_eps"]),
        num_nextn_predict_layers=min(int(text.get("num_nextn_predict_layers", 0) or 0), 1),
        mtp_layer_type=mtp_type,
        extra=extra,
    )
    fields.update(overrides)
    try:
        return DecoderConfig(**fields)
    except (TypeError, ValueError) as e:
        raise HFCheckpointError(f"config.json (glm5_next) contradicts itself: {e}") from None


def _indexer_types(hf: dict[str, Any], L: int) -> list[str] | None:
    """glm_moe_dsa's per-layer "full"/"shared" indexers: ``indexer_types``, else transformers' rule from
    ``index_topk_pattern`` (F/S letters) or ``index_topk_freq``/``index_skip_topk_offset`` (defaults 1, 2: all full).
    None when every layer is full (GLM-5/5.1)."""
    kinds = hf.get("indexer_types")
    if kinds is None and hf.get("index_topk_pattern") is not None:
        pattern = hf["index_topk_pattern"]
        kinds = [{"F": "full", "S": "shared"}.get(c, c) for c in pattern] if isinstance(pattern, str) else pattern
    if kinds is None:
        freq, offset = max(int(hf.get("index_topk_freq", 1)), 1), int(hf.get("index_skip_topk_offset", 2))
        kinds = ["full" if max(i - offset + 1, 0) % freq == 0 else "shared" for i in range(L)]
    kinds = list(kinds)
    if len(kinds) != L or any(k not in ("full", "shared") for k in kinds):
        raise HFCheckpointError(
            f"config.json (glm_moe_dsa): indexer_types must list {L} of 'full'/'shared', got {kinds}"
        )
    return None if all(k == "full" for k in kinds) else kinds


def _is_glm5_next(cfg: DecoderConfig) -> bool:
    """Whether only glm5_next could hold this model (its pieces: mHC, the clamped SwiGLU, KDA layers)."""
    return cfg.hc_mult != 1 or cfg.swiglu_limit is not None or "kda" in cfg.layer_types


def _glm5_next_problems(cfg: DecoderConfig) -> list[str]:
    """What keeps ``cfg`` from being a glm5_next language model (empty: nothing)."""
    problems = [
        f"{k}={getattr(cfg, k)!r} (glm5_next needs {v})"
        for k, v, ok in (
            ("hc_mult", ">= 2 (mHC)", cfg.hc_mult >= 2),
            ("swiglu_limit", "a number (the clamped SwiGLU)", cfg.swiglu_limit is not None),
            ("layer_types", "'kda' and 'dsa' layers", set(cfg.layer_types) <= {"kda", "dsa"}),
            ("mtp_layer_type", "'kda' or 'dsa'", cfg.mtp_layer_type in ("kda", "dsa")),
            ("router", "'sigmoid'", cfg.router == "sigmoid"),
            ("sandwich_norms", "False", not cfg.sandwich_norms),
            ("use_qk_norm", "False", not cfg.use_qk_norm),
            ("num_key_value_heads", "num_attention_heads", cfg.num_key_value_heads == cfg.num_attention_heads),
        )
        if not ok
    ]
    if "dsa" in cfg.layer_types + [cfg.mtp_layer_type]:
        for k, v, ok in (
            ("qk_rope_head_dim", "0 (NoPE)", cfg.opt("qk_rope_head_dim") == 0),
            ("q_lora_rank", "an int (the indexer reads c_Q)", cfg.opt("q_lora_rank") is not None),
            ("index_kpool", "an int (KPool; 1 scores single tokens)", cfg.opt("index_kpool") is not None),
            ("latent_norm_eps", f"rms_norm_eps={cfg.rms_norm_eps}", cfg.opt("latent_norm_eps") == cfg.rms_norm_eps),
        ):
            if not ok:
                problems.append(f"{k}={cfg.opt(k)!r} (glm5_next needs {v})")
    return problems


def family_of(cfg: DecoderConfig) -> str:
    """The HF family a config belongs to, or an ``HFCheckpointError`` saying why none can express it."""
    if _is_glm5_next(cfg):  # mHC, the clamped SwiGLU or KDA: none of the other families has them
        problems = _glm5_next_problems(cfg)
        if problems:
            raise HFCheckpointError("this model has no Hugging Face equivalent (glm5_next): " + "; ".join(problems))
        return "glm5_next"
    for mixer, family in (("dsa", "glm_moe_dsa"), ("mla", "glm4_moe_lite")):  # MLA-based, MoE only, one mixer
        if mixer not in cfg.layer_types:
            continue
        want = dict(
            router="sigmoid",
            layer_types=[mixer] * cfg.num_hidden_layers,
            mtp_layer_type=mixer,
            sandwich_norms=False,
            use_qk_norm=False,
        )
        problems = [f"{k}={getattr(cfg, k)!r} ({family} needs {v!r})" for k, v in want.items() if getattr(cfg, k) != v]
        if not cfg.n_routed_experts:
            problems.append(f"n_routed_experts=0 ({family} stores MoE layers)")
        if problems:
            raise HFCheckpointError("this model has no Hugging Face equivalent: " + "; ".join(problems))
        return family
    moe = cfg.n_routed_experts > 0
    family = "glm4_moe" if moe else "glm4" if cfg.sandwich_norms else "glm"
    want = dict(
        rope_interleave=not moe,
        router="sigmoid",
        layer_types=["attention"] * cfg.num_hidden_layers,
        mtp_layer_type="attention",
    )
    if moe:
        want.update(sandwich_norms=False, mlp_layer_types=None)
    else:
        want.update(use_qk_norm=False, num_nextn_predict_layers=0)
    problems = [
        f"{k}={getattr(cfg, k)!r} ({family} needs {v!r})"
        for k, v in want.items()
        if v is not None and getattr(cfg, k) != v
    ]
    if moe and cfg.mlp_layer_types != DecoderConfig(**{**cfg.to_dict(), "mlp_layer_types": None}).mlp_layer_types:
        problems.append("mlp_layer_types (glm4_moe stores first_k_dense_replace dense layers, then sparse ones)")
    if problems:
        raise HFCheckpointError("this model has no Hugging Face equivalent: " + "; ".join(problems))
    return family


def hf_config_from(cfg: DecoderConfig, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """The config.json dict of a model HF can express (``family_of``)."""
    family = family_of(cfg)
    if family == "glm5_next":
        return _glm5_next_config(cfg, dtype)
    eos = list(cfg.eos_token_id)
    out = {
        "architectures": [ARCHITECTURES[family]],
        "model_type": family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "attention_bias": cfg.attention_bias,
        "max_position_embeddings": cfg.max_position_embeddings,
        "initializer_range": cfg.initializer_range,
        "rms_norm_eps": cfg.rms_norm_eps,
        "use_cache": True,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": cfg.rope_theta,
            "partial_rotary_factor": cfg.partial_rotary_factor,
        },
        "pad_token_id": cfg.pad_token_id,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
    }
    if family in ("glm4_moe", "glm4_moe_lite", "glm_moe_dsa"):
        out.update(
            {
                k: getattr(cfg, k)
                for k in (
                    "moe_intermediate_size",
                    "n_routed_experts",
                    "num_experts_per_tok",
                    "n_shared_experts",
                    "n_group",
                    "topk_group",
                    "norm_topk_prob",
                    "routed_scaling_factor",
                    "num_nextn_predict_layers",
                )
            },
            use_qk_norm=cfg.use_qk_norm,
            first_k_dense_replace=cfg.mlp_layer_types.count("dense"),
        )
    if family in ("glm4_moe_lite", "glm_moe_dsa"):  # MLA fields; RoPE over the whole rope slice; heads = KV heads
        for k in ("use_qk_norm", "first_k_dense_replace", "head_dim"):
            del out[k]
        out.update({k: cfg.opt(k) for k in MLA_FIELDS}, num_key_value_heads=cfg.num_attention_heads)
        out.update(rope_interleave=cfg.rope_interleave, mlp_layer_types=list(cfg.mlp_layer_types))
        out["rope_parameters"]["partial_rotary_factor"] = 1.0
    if family == "glm_moe_dsa":  # the indexer; every layer "full" unless the model shares indices
        kinds = cfg.opt("indexer_types")
        out.update({k: cfg.opt(k) for k in DSA_FIELDS}, indexer_rope_interleave=cfg.opt("indexer_rope_interleave"))
        out.update(indexer_types=list(kinds) if kinds is not None else ["full"] * cfg.num_hidden_layers)
    if dtype is not None:
        out["dtype"] = str(dtype).removeprefix("torch.")
    return out


def _glm5_next_config(cfg: DecoderConfig, dtype: torch.dtype | None) -> dict[str, Any]:
    """glm5_next's nested config.json: the language model in ``text_config`` (transformers' field names), a small
    ``vision_config`` (``save_hf`` replaces it by a kept tower's)."""
    eos = list(cfg.eos_token_id)
    kinds = {v: k for k, v in G5N_LAYERS.items() if k != "full_attention"}  # ours → HF
    L = cfg.num_hidden_layers
    text = {
        "model_type": "glm5_next_text",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": L,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_attention_heads,
        "hidden_act": "silu",
        "attention_bias": cfg.attention_bias,
        "attention_dropout": 0.0,
        "max_position_embeddings": cfg.max_position_embeddings,
        "initializer_range": cfg.initializer_range,
        "rms_norm_eps": cfg.rms_norm_eps,
        "use_cache": True,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "pad_token_id": cfg.pad_token_id,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "layer_types": [kinds[t] for t in cfg.layer_types],
        "mlp_layer_types": list(cfg.mlp_layer_types),
        "swiglu_limit": cfg.swiglu_limit,
        "hc_mult": cfg.hc_mult,
        "hc_eps": cfg.hc_eps,
        "hc_sinkhorn_iters": cfg.hc_sinkhorn_iters,
        "num_nextn_predict_layers": cfg.num_nextn_predict_layers,
        **{
            k: getattr(cfg, k)
            for k in (
                "moe_intermediate_size",
                "n_routed_experts",
                "num_experts_per_tok",
                "n_shared_experts",
                "n_group",
                "topk_group",
                "norm_topk_prob",
                "routed_scaling_factor",
            )
        },
    }
    types = set(cfg.layer_types) | {cfg.mtp_layer_type}
    if "dsa" in types:
        kinds_i = cfg.opt("indexer_types")
        text.update({k: cfg.opt(k) for k in (*MLA_FIELDS, *DSA_FIELDS, *KPOOL_FIELDS)})
        text["indexer_types"] = list(kinds_i) if kinds_i is not None else ["full"] * L
    if "kda" in types:
        text["linear_num_heads"], text["linear_head_dim"], text["linear_conv_kernel_dim"] = MIXERS["kda"].dims(cfg)
        text["linear_lower_bound"] = cfg.opt("linear_lower_bound")
    out = {
        "architectures": [ARCHITECTURES["glm5_next"]],
        "model_type": "glm5_next",
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "text_config": text,
        "vision_config": {  # the smallest tower transformers builds; the language model never calls it on text
            "depth": 1,
            "hidden_size": 32,
            "num_heads": 2,
            "intermediate_size": 32,
            "out_hidden_size": cfg.hidden_size,
            "projection_intermediate_size": 32,
        },
    }
    if dtype is not None:
        out["dtype"] = text["dtype"] = str(dtype).removeprefix("torch.")
    return out


# ----------------------------------------------------------------------------------------------------
# Tensor names
# ----------------------------------------------------------------------------------------------------
def _sub(sd: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def _rename(name: str, pairs, reverse: bool) -> str:
    for ours, hf in pairs:
        a, b = (hf, ours) if reverse else (ours, hf)
        if name.startswith(a):
            return b + name[len(a) :]
    return name


def _layer(sd: dict, cfg: DecoderConfig, mixer_type: str, to_hf: bool) -> dict:
    """One layer's tensors, ours → HF (``to_hf``) or back: norms renamed, the mixer by its own hooks, the FFN."""
    mixer_cls = MIXERS[mixer_type]
    src_mixer, dst_mixer = ("mixer.", "self_attn.") if to_hf else ("self_attn.", "mixer.")
    hook = getattr(mixer_cls, "ours_to_hf" if to_hf else "hf_to_ours", None)
    mixer = _sub(sd, src_mixer)
    out = {dst_mixer + k: v for k, v in (hook(mixer, cfg) if hook else mixer).items()}
    split_mlp = cfg.n_routed_experts > 0 or _is_glm5_next(cfg)  # glm4_moe/glm5_next store gate and up apart
    for name, t in sd.items():
        if name.startswith(src_mixer):
            continue
        name = _rename(name, _LAYER_NAMES, reverse=not to_hf)
        if (
            to_hf
            and split_mlp
            and name.endswith("gate_up_proj.weight")
            and "experts." not in name.replace("shared_experts.", "")
        ):
            gate, up = t.chunk(2)
            out[name.replace("gate_up_proj", "gate_proj")], out[name.replace("gate_up_proj", "up_proj")] = gate, up
        elif to_hf and name == "mlp.experts.gate_up_proj":  # stacked → one expert at a time
            for j, (g, u) in enumerate(zip(*t.chunk(2, dim=1))):
                out[f"mlp.experts.{j}.gate_proj.weight"], out[f"mlp.experts.{j}.up_proj.weight"] = g, u
        elif to_hf and name == "mlp.experts.down_proj":
            out.update({f"mlp.experts.{j}.down_proj.weight": d for j, d in enumerate(t)})
        elif not to_hf and re.fullmatch(r"mlp\.experts\.\d+\..*", name):
            continue  # stacked below
        elif not to_hf and name.split(".")[-2] == "gate_proj":
            out[name.replace("gate_proj", "gate_up_proj")] = torch.cat([t, sd[name.replace("gate_proj", "up_proj")]])
        elif not to_hf and name.split(".")[-2] == "up_proj":
            continue
        else:
            out[name] = t
    if not to_hf and "mlp.experts.0.gate_proj.weight" in sd:
        E = sum(1 for k in sd if re.fullmatch(r"mlp\.experts\.\d+\.down_proj\.weight", k))
        out["mlp.experts.gate_up_proj"] = torch.stack(
            [
                torch.cat([sd[f"mlp.experts.{j}.gate_proj.weight"], sd[f"mlp.experts.{j}.up_proj.weight"]])
                for j in range(E)
            ]
        )
        out["mlp.experts.down_proj"] = torch.stack([sd[f"mlp.experts.{j}.down_proj.weight"] for j in range(E)])
    return out


def to_hf_names(sd: dict[str, torch.Tensor], cfg: DecoderConfig) -> dict[str, torch.Tensor]:
    """Our state dict under HF names (a tied head omitted; the MTP layer as ``model.layers.{N}``; an absent shared
    expert as the zero-size tensors transformers writes)."""
    out = {"model.embed_tokens.weight": sd["embed_tokens.weight"], "model.norm.weight": sd["final_norm.weight"]}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    n = cfg.num_hidden_layers
    for i in range(n + cfg.num_nextn_predict_layers):
        if i < n:
            layer, kind = _sub(sd, f"layers.{i}."), cfg.layer_types[i]
        else:
            mtp = _sub(sd, f"mtp.{i - n}.")
            layer, kind = _sub(mtp, "block."), cfg.mtp_layer_type
            out.update(
                {
                    f"model.layers.{i}." + _rename(k, _MTP_NAMES, False): v
                    for k, v in mtp.items()
                    if not k.startswith("block.")
                }
            )
        hf = _layer(layer, cfg, kind, to_hf=True)
        if "mlp.gate.weight" in hf and cfg.n_shared_experts == 0:
            d = cfg.hidden_size
            hf.update(
                {
                    f"mlp.shared_experts.{p}_proj.weight": torch.empty(0, d) if p != "down" else torch.empty(d, 0)
                    for p in ("gate", "up", "down")
                }
            )
        out.update({f"model.layers.{i}.{k}": v for k, v in hf.items()})
    if _is_glm5_next(cfg):  # the language model inside the conditional-generation checkpoint
        out = {G5N_PREFIX + k.removeprefix("model.") if k.startswith("model.") else k: v for k, v in out.items()}
    return out


def from_hf_names(tensors: dict[str, torch.Tensor], cfg: DecoderConfig) -> dict[str, torch.Tensor]:
    """The inverse of ``to_hf_names``: HF tensors under our names (zero-size shared experts dropped)."""
    if _is_glm5_next(cfg):
        tensors = {
            "model." + k.removeprefix(G5N_PREFIX) if k.startswith(G5N_PREFIX) else k: v for k, v in tensors.items()
        }
    out = {
        "embed_tokens.weight": tensors["model.embed_tokens.weight"],
        "final_norm.weight": tensors["model.norm.weight"],
        "lm_head.weight": tensors["model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"],
    }
    n = cfg.num_hidden_layers
    for i in range(n + cfg.num_nextn_predict_layers):
        layer = {
            k: v
            for k, v in _sub(tensors, f"model.layers.{i}.").items()
            if not (k.startswith("mlp.shared_experts.") and v.numel() == 0)
        }
        if i < n:
            out.update({f"layers.{i}.{k}": v for k, v in _layer(layer, cfg, cfg.layer_types[i], False).items()})
        else:
            extra = {"enorm.", "hnorm.", "eh_proj.", "shared_head.", "embed_tokens."}
            block = {k: v for k, v in layer.items() if not any(k.startswith(e) for e in extra)}
            out.update({f"mtp.{i - n}.block.{k}": v for k, v in _layer(block, cfg, cfg.mtp_layer_type, False).items()})
            out.update({f"mtp.{i - n}." + _rename(k, _MTP_NAMES, True): v for k, v in layer.items() if k not in block})
    return out


def _stack_to_per_expert(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' in-memory layout (``mlp.experts.gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``) → the
    per-expert tensors the checkpoints store."""
    out = dict(tensors)
    for name in [k for k in tensors if k.endswith("mlp.experts.gate_up_proj")]:
        prefix = name[: -len("gate_up_proj")]
        gate_up, down = out.pop(name), out.pop(prefix + "down_proj")
        for j, (g, u) in enumerate(zip(*gate_up.chunk(2, dim=1))):
            out.update(
                {
                    f"{prefix}{j}.gate_proj.weight": g,
                    f"{prefix}{j}.up_proj.weight": u,
                    f"{prefix}{j}.down_proj.weight": down[j],
                }
            )
    return out


def _check_names(present: dict[str, torch.Tensor], cfg: DecoderConfig) -> None:
    """Compare a checkpoint's tensors with what a model of ``cfg`` stores (built on the meta device)."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in to_hf_names(Decoder(cfg).state_dict(), cfg).items()}
    missing = [k for k in expected if k not in present and 0 not in expected[k]]  # zero-size: optional
    unexpected = [k for k in present if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(present[k].shape)}, config expects {expected[k]}"
        for k in expected
        if k in present and tuple(present[k].shape) != expected[k]
    ]
    if missing or unexpected or mismatched:
        parts = [
            f"missing {len(missing)}: " + ", ".join(f"{k} {expected[k]}" for k in missing[:12]) if missing else "",
            f"unexpected {len(unexpected)}: " + ", ".join(f"{k} {tuple(present[k].shape)}" for k in unexpected[:12])
            if unexpected
            else "",
            f"{len(mismatched)} shape mismatches: " + "; ".join(mismatched[:12]) if mismatched else "",
        ]
        raise HFCheckpointError("checkpoint does not match its config.json: " + " | ".join(p for p in parts if p))


# ----------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------
def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise HFCheckpointError(f"{index} has no weight_map")
        files = sorted(set(weight_map.values()))
        absent = [f for f in files if not (folder / f).is_file()]
        if absent:
            raise HFCheckpointError(f"{index.name} lists shard files that are not in {folder}: {absent}")
        tensors = {}
        for f in files:
            for name, t in load_file(str(folder / f)).items():
                if weight_map.get(name) != f:
                    raise HFCheckpointError(
                        f"tensor {name} is in {f} but {index.name} maps it to {weight_map.get(name)!r}"
                    )
                tensors[name] = t
        if set(weight_map) - set(tensors):
            raise HFCheckpointError(
                f"{index.name} lists tensors no shard holds: {sorted(set(weight_map) - set(tensors))[:12]}"
            )
        return tensors
    if (folder / "model.safetensors").is_file():
        return load_file(str(folder / "model.safetensors"))
    have = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise HFCheckpointError(
        f"no model.safetensors or model.safetensors.index.json in {folder} (found: {have}); "
        f"only safetensors checkpoints are read (not pytorch_model.bin)"
    )


def _glm5_next_tensors(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A glm5_next checkpoint's tensors as ``save_hf`` names them (the files' names under ``G5N_PREFIX``), whichever
    spelling it used (transformers' in-memory names, a flat text-only ``model.layers.`` prefix), and its vision
    tower's apart: (text tensors, vision tensors)."""
    text, vision = {}, {}
    for name, t in tensors.items():
        if name.startswith(G5N_VISION):
            vision[name] = t
            continue
        if name.startswith("model.") and not name.startswith(G5N_PREFIX):
            name = G5N_PREFIX + name.removeprefix("model.")
        name = re.sub(r"\.(attn|ffn)_hc\.(fn|base|scale)$", r".hc_\1_\2", name)
        name = name.replace(".self_attn.forget_gate.", ".self_attn.")
        if name.endswith(".self_attn.conv1d.weight"):  # one depthwise filter over [q | k | v] channels
            for part, w in zip(("q", "k", "v"), t.chunk(3)):
                text[name.replace(".conv1d.", f".{part}_conv1d.")] = w
            continue
        text[name] = t
    return text, vision


def load_hf(
    folder: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    keep_vision: bool = False,
    **config_overrides: Any,
) -> Decoder:
    """Load a ``glm``/``glm4``/``glm4_moe``/``glm4_moe_lite``/``glm_moe_dsa``/``glm5_next`` checkpoint folder into a
    ``Decoder``, in eval mode.

    dtype: convert the weights (default: as stored; the routing bias stays fp32); device: default CPU.
    ``config_overrides`` change config fields after reading config.json. ``glm4_moe(_lite)``: the MTP layer is loaded
    when the files hold it (checkpoints written by transformers do not, whatever ``num_nextn_predict_layers``
    says), sharing the main embedding and head when its stored copies equal them (``mtp_tied``).
    ``glm5_next``: the language model; its vision tower is skipped with a warning, or with ``keep_vision`` kept as
    ``model.hf_vision`` (its config and tensors, on the CPU as stored) for ``save_hf`` to write back.
    """
    folder = Path(folder)
    try:
        hf = json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise HFCheckpointError(f"no config.json in {folder}") from None
    except json.JSONDecodeError as e:
        raise HFCheckpointError(f"{folder / 'config.json'} is not valid JSON: {e}") from None
    tensors = _stack_to_per_expert({k: v for k, v in _read_tensors(folder).items() if not _IGNORED.match(k)})
    g5n, vision = hf.get("model_type") == "glm5_next", None
    text_hf, p = (_g5n_text(hf), G5N_PREFIX) if g5n else (hf, "model.")
    if g5n:
        tensors, vision = _glm5_next_tensors(tensors)
        if vision:
            n_params = sum(t.numel() for t in vision.values())
            warnings.warn(
                f"{folder}: a glm5_next checkpoint; loaded its language model only and "
                + (
                    "kept the vision tower for save_hf (model.hf_vision)"
                    if keep_vision
                    else f"skipped the vision tower ({len(vision)} tensors under {G5N_VISION}, {n_params / 1e6:.1f}M "
                    "parameters; load_hf(..., keep_vision=True) keeps it for save_hf)"
                ),
                stacklevel=2,
            )
        n = int(text_hf.get("num_hidden_layers", 0))
        if "mtp_layer_type" not in config_overrides and f"{p}layers.{n}.self_attn.q_proj.weight" in tensors:
            config_overrides["mtp_layer_type"] = "kda"  # a KDA block (a DSA block has q_a_proj: the default)
    if (
        hf.get("model_type") in ("glm4_moe", "glm4_moe_lite", "glm_moe_dsa", "glm5_next")
        and "num_nextn_predict_layers" not in config_overrides
    ):
        n = int(text_hf.get("num_hidden_layers", 0))
        stored = any(k.startswith(f"{p}layers.{n}.") for k in tensors)
        config_overrides["num_nextn_predict_layers"] = (
            min(int(text_hf.get("num_nextn_predict_layers", 0) or 0), 1) * stored
        )
        if stored and "mtp_tied" not in config_overrides:
            main = (
                tensors.get(f"{p}embed_tokens.weight"),
                tensors.get("lm_head.weight", tensors.get(f"{p}embed_tokens.weight")),
            )
            own = (
                tensors.get(f"{p}layers.{n}.embed_tokens.weight"),
                tensors.get(f"{p}layers.{n}.shared_head.head.weight"),
            )
            config_overrides["mtp_tied"] = all(
                a is not None and b is not None and a.shape == b.shape and torch.equal(a, b) for a, b in zip(main, own)
            )
    cfg = config_from_hf(hf, **config_overrides)
    if cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # a tied head may be stored too: it is the embedding
    _check_names(tensors, cfg)
    sd = from_hf_names(tensors, cfg)
    with torch.device("meta"):
        model = Decoder(cfg)
    model.load_state_dict(sd, strict=True, assign=True)
    model.tie_weights()  # assign=True replaced parameters one name at a time (tied MTP copies equal the main ones)
    for module in model.modules():  # non-persistent buffers (MoE load counters) are not in the files
        for name, buf in module.named_buffers(recurse=False):
            if buf.is_meta:
                setattr(module, name, torch.zeros(buf.shape, dtype=buf.dtype))
    if g5n and keep_vision and vision:
        model.hf_vision = {"config": hf.get("vision_config"), "tensors": vision}
    return model.to(device=device or "cpu", dtype=dtype).eval()


def _parse_size(size: int | str) -> int:
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB)?\s*", str(size))
    if not m:
        raise ValueError(f"max_shard_size must be a positive int (bytes) or a string like '5GB', got {size!r}")
    unit = {"B": 1, None: 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
    return int(float(m.group(1)) * unit[m.group(2)])


def save_hf(model: Decoder, folder: str | os.PathLike, max_shard_size: int | str | None = None) -> Path:
    """Write ``model`` as a Hugging Face checkpoint: config.json and model.safetensors, or shards of at most
    ``max_shard_size`` bytes (a bigger tensor gets a shard of its own) with model.safetensors.index.json.
    glm5_next: the vision tower ``load_hf(..., keep_vision=True)`` kept is written back with its config."""
    from safetensors.torch import save_file

    if type(model) is not Decoder:
        raise TypeError(f"save_hf needs a glmkit Decoder, got {type(model).__name__}")
    config = hf_config_from(model.config, model.dtype)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # clone: safetensors refuses tensors that share memory (split q/k/v views, tied MTP copies)
    tensors = {
        k: v.detach().to("cpu").clone().contiguous() for k, v in to_hf_names(model.state_dict(), model.config).items()
    }
    vision = getattr(model, "hf_vision", None)
    if vision and config["model_type"] == "glm5_next":
        config["vision_config"] = vision["config"]
        tensors.update({k: v.detach().to("cpu").clone().contiguous() for k, v in vision["tensors"].items()})
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for stale in [*folder.glob("model*.safetensors"), *folder.glob("model.safetensors.index.json")]:
        stale.unlink()
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    limit = None if max_shard_size is None else _parse_size(max_shard_size)
    if limit is None or total <= limit:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder
    shards, size = [{}], 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > limit:
            shards, size = shards + [{}], 0
        shards[-1][name] = tensors[name]
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    index = {
        "metadata": {"total_size": total, "total_parameters": sum(t.numel() for t in tensors.values())},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder
