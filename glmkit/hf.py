"""Hugging Face checkpoint interop for the GLM models (dense and GLM-4.5 MoE): ``load_hf`` and ``save_hf``.

What it implements
    A Hugging Face checkpoint folder is ``config.json`` plus the weights as safetensors: one
    ``model.safetensors``, or shards ``model-0000i-of-0000n.safetensors`` listed by
    ``model.safetensors.index.json`` (``{"metadata": {"total_size": bytes}, "weight_map": {name: file}}``).
    ``load_hf(folder)`` reads the config into a ``GLMDenseConfig`` (or ``GLMMoEConfig``), maps each tensor
    name onto the model's and returns the model; ``save_hf(model, folder)`` writes the same layout back, so
    ``transformers``' ``from_pretrained`` loads it. transformers itself is not needed for either.

Which checkpoints (model types; names and conventions read from transformers 5.23.0, models/glm and
models/glm4; glm-lineage.md §3, §9)
    * ``glm`` (``GlmForCausalLM``; GLM-4-9B-chat-hf and kin): the ChatGLM2 block — pre-norm RMSNorm,
      GQA, bias on q/k/v but not on o_proj, SwiGLU on a fused ``gate_up_proj`` (gate first), partial RoPE
      on the first ``head_dim · partial_rotary_factor`` dims with **interleaved** pairs.
    * ``glm4`` (``Glm4ForCausalLM``; GLM-4-9B-0414, GLM-4-32B-0414): the same plus the sandwich norms —
      ``post_self_attn_layernorm`` on the attention output and ``post_mlp_layernorm`` on the MLP output;
      note that HF's ``post_attention_layernorm`` is the norm *before* the MLP (ours: ``pre_mlp_norm``).
    How GLM's layout differs from what came before: ChatGLM2/3 shipped one fused ``query_key_value`` and
    ``dense_h_to_4h`` under ``transformer.encoder.layers.*`` with remote code; the HF-native ``glm``/``glm4``
    port splits q/k/v (we fuse them again on load) and renames everything Llama-style. GLM-4.5 (``glm4_moe``)
    keeps the partial RoPE but switches to half-split pairs — loading it with the wrong pairing runs
    without any error and gives wrong logits (tests/test_hf_parity.py shows how wrong).
    * ``glm4_moe`` (``Glm4MoeForCausalLM``; GLM-4.5/4.6/4.7, Air) → ``GLMMoEModel``: pre-norm, QK-norm when
      ``use_qk_norm``, half-split partial RoPE; dense layers store ``mlp.{gate,up,down}_proj`` (fused to our
      ``gate_up_proj`` on load), MoE layers ``mlp.gate.{weight, e_score_correction_bias}``,
      ``mlp.experts.{j}.{gate,up,down}_proj.weight`` one expert at a time (stacked to ``gate_up_proj [E, 2I, H]``
      / ``down_proj [E, H, I]`` on load; transformers' stacked in-memory layout is accepted too) and
      ``mlp.shared_experts.*``. The MTP layer is ``model.layers.{N}.*`` (N = num_hidden_layers): a decoder block
      plus ``enorm``, ``hnorm``, ``eh_proj``, ``shared_head.{norm,head}`` and ``embed_tokens`` (→ our ``mtp.0.*``).
      transformers neither loads nor writes it; glmkit does both (tests/test_hf_parity_moe.py checks it against
      transformers' ``MtpModel``).

HF name → ours (``model.`` prefix on everything but the head)
    embed_tokens.weight                        embed_tokens.weight
    layers.i.input_layernorm.weight            layers.i.input_norm.weight
    layers.i.self_attn.{q,k,v}_proj.{w,b}      layers.i.attn.qkv_proj.{w,b}   (rows: q | k | v)
    layers.i.self_attn.o_proj.weight           layers.i.attn.o_proj.weight
    layers.i.post_self_attn_layernorm.weight   layers.i.post_attn_norm.weight   (glm4)
    layers.i.post_attention_layernorm.weight   layers.i.pre_mlp_norm.weight
    layers.i.mlp.gate_up_proj.weight           layers.i.mlp.gate_up_proj.weight
    layers.i.mlp.down_proj.weight              layers.i.mlp.down_proj.weight
    layers.i.post_mlp_layernorm.weight         layers.i.post_mlp_norm.weight    (glm4)
    norm.weight                                final_norm.weight
    lm_head.weight (absent when tied)          lm_head.weight
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from glmkit.models.glm_dense import GLMDenseConfig, GLMDenseModel
from glmkit.models.glm_moe import GLMMoEConfig, GLMMoEModel
from glmkit.moe import pack_experts, unpack_experts

SUPPORTED_MODEL_TYPES = ("glm", "glm4", "glm4_moe")
_ARCHITECTURES = {"glm": "GlmForCausalLM", "glm4": "Glm4ForCausalLM", "glm4_moe": "Glm4MoeForCausalLM"}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Tensors some exporters store that are not parameters: ignored on load.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


class HFCheckpointError(ValueError):
    """A checkpoint glmkit cannot load (or a model it cannot save) — the message says what and why."""


# ----------------------------------------------------------------------------------------------------
# config.json <-> GLMDenseConfig / GLMMoEConfig
# ----------------------------------------------------------------------------------------------------
def config_from_hf(hf: dict[str, Any], **overrides: Any) -> GLMDenseConfig:
    """A ``GLMDenseConfig`` (``glm``/``glm4``) or ``GLMMoEConfig`` (``glm4_moe``) from a config.json dict.
    ``overrides`` replace fields afterwards (e.g. ``rope_pairing="half"`` on a ``glm`` checkpoint — wrong; the
    lesson shows what it does)."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise HFCheckpointError(
            f"unsupported model_type {model_type!r} in config.json: glmkit.hf loads the GLM types "
            f"{', '.join(repr(t) for t in SUPPORTED_MODEL_TYPES)} (GLM-4-9B → 'glm', GLM-4-0414 → 'glm4', "
            f"GLM-4.5/4.6/4.7 → 'glm4_moe')"
        )
    need = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"]
    if model_type == "glm4_moe":
        need += ["moe_intermediate_size", "n_routed_experts", "num_experts_per_tok"]
    missing = [k for k in need if k not in hf]
    if missing:
        raise HFCheckpointError(f"config.json ({model_type}) lacks required fields {missing}")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise HFCheckpointError(f"config.json: hidden_act={act!r}, but {model_type} uses SwiGLU (hidden_act='silu')")
    rope = dict(hf.get("rope_parameters") or {})
    if hf.get("rope_scaling"):       # transformers 4.x name
        rope.update(hf["rope_scaling"])
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise HFCheckpointError(f"config.json: rope_type={rope_type!r} is not supported (only 'default' RoPE)")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    factor = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5))
    eos = hf.get("eos_token_id")
    eos = () if eos is None else ((eos,) if isinstance(eos, int) else tuple(eos))
    moe = model_type == "glm4_moe"
    fields = dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim"), intermediate_size=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        qkv_bias=bool(hf.get("attention_bias", not moe)),   # HF Glm4MoeConfig's class default is False
        o_bias=False, qk_norm=bool(hf.get("use_qk_norm", False)), position="rope",
        partial_rotary_factor=float(factor),
        rope_pairing="half" if moe else "interleaved",      # glm4_moe: gpt_neox's half-split pairs (§4.2)
        rope_theta=float(theta), block="sandwich" if model_type == "glm4" else "pre", norm="rmsnorm",
        norm_eps=float(hf.get("rms_norm_eps", 1e-5 if moe else 1.5625e-07)), activation="swiglu", mlp_bias=False,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        pad_token_id=hf.get("pad_token_id"), eos_token_ids=eos, bos_token_id=hf.get("bos_token_id"),
    )
    if moe:
        fields.update(
            n_routed_experts=hf["n_routed_experts"], num_experts_per_tok=hf["num_experts_per_tok"],
            moe_intermediate_size=hf["moe_intermediate_size"], n_shared_experts=hf.get("n_shared_experts", 1),
            first_k_dense_replace=hf.get("first_k_dense_replace", 1), n_group=hf.get("n_group", 1),
            topk_group=hf.get("topk_group", 1), norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
            routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
            num_nextn_predict_layers=hf.get("num_nextn_predict_layers", 0),
        )
    vocab = fields["vocab_size"]
    for name in ("pad_token_id", "bos_token_id"):   # HF tolerates ids outside tiny test vocabularies
        if fields[name] is not None and not 0 <= fields[name] < vocab:
            fields[name] = None
    fields["eos_token_ids"] = tuple(t for t in eos if 0 <= t < vocab)
    fields.update(overrides)
    try:
        return (GLMMoEConfig if moe else GLMDenseConfig)(**fields)
    except (TypeError, ValueError) as e:
        raise HFCheckpointError(f"config.json ({model_type}) contradicts itself: {e}") from None


def hf_config_from(cfg: GLMDenseConfig, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """The config.json dict for a model HF can express: ``glm`` (dense, block "pre"), ``glm4`` (dense,
    "sandwich") or ``glm4_moe`` (a ``GLMMoEConfig`` with the sigmoid router)."""
    moe = isinstance(cfg, GLMMoEConfig)
    problems = []
    want = dict(position="rope", rope_pairing="half" if moe else "interleaved", norm="rmsnorm",
                activation="swiglu", o_bias=False, mlp_bias=False, attn_scale=None, dropout=0.0)
    if not moe:
        want["qk_norm"] = False
    else:
        want.update(block="pre", router="sigmoid", aux_loss_alpha=cfg.aux_loss_alpha)  # alpha: training only
        if cfg.num_nextn_predict_layers > 1:
            problems.append(f"num_nextn_predict_layers={cfg.num_nextn_predict_layers} (glm4_moe stores at most 1)")
    for k, v in want.items():
        if getattr(cfg, k) != v:
            problems.append(f"{k}={getattr(cfg, k)!r} (HF {'glm4_moe' if moe else 'glm/glm4'} needs {v!r})")
    if not moe and cfg.block not in ("pre", "sandwich"):
        problems.append(f"block={cfg.block!r} (HF glm needs 'pre', glm4 'sandwich')")
    if cfg.padded_vocab_size != cfg.vocab_size:
        problems.append(f"pad_vocab_multiple={cfg.pad_vocab_multiple} pads the vocabulary (HF has no padded rows)")
    if problems:
        raise HFCheckpointError("this model has no Hugging Face equivalent: " + "; ".join(problems))
    model_type = "glm4_moe" if moe else ("glm4" if cfg.block == "sandwich" else "glm")
    eos = list(cfg.eos_token_ids)
    out = {
        "architectures": [_ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "attention_bias": cfg.qkv_bias,
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        "use_cache": True,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta,
                            "partial_rotary_factor": cfg.partial_rotary_factor},
        "pad_token_id": cfg.pad_token_id,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
    }
    if moe:
        out.update(use_qk_norm=cfg.qk_norm, moe_intermediate_size=cfg.moe_intermediate_size,
                   n_routed_experts=cfg.n_routed_experts, num_experts_per_tok=cfg.num_experts_per_tok,
                   n_shared_experts=cfg.n_shared_experts, first_k_dense_replace=cfg.first_k_dense_replace,
                   n_group=cfg.n_group, topk_group=cfg.topk_group, norm_topk_prob=cfg.norm_topk_prob,
                   routed_scaling_factor=cfg.routed_scaling_factor,
                   num_nextn_predict_layers=cfg.num_nextn_predict_layers)
    if dtype is not None:
        out["dtype"] = str(dtype).removeprefix("torch.")
    return out


# ----------------------------------------------------------------------------------------------------
# Tensor names
# ----------------------------------------------------------------------------------------------------
# Tensors of the MTP layer (model.layers.{N}.*) that are not part of its decoder block: HF suffix → ours.
_MTP_EXTRA = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight", "eh_proj.weight": "eh_proj.weight",
              "shared_head.norm.weight": "shared_head_norm.weight", "shared_head.head.weight": "head.weight",
              "embed_tokens.weight": "embed_tokens.weight"}


def _layer_shapes(cfg: GLMDenseConfig, i: int) -> dict[str, tuple[int, ...]]:
    """HF suffix → shape of every tensor decoder layer ``i`` stores (``i = n_layers``: the MTP layer)."""
    d, V = cfg.hidden_size, cfg.vocab_size
    qd, kvd = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    s = {"input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
         "self_attn.q_proj.weight": (qd, d), "self_attn.k_proj.weight": (kvd, d),
         "self_attn.v_proj.weight": (kvd, d), "self_attn.o_proj.weight": (d, qd)}
    if cfg.qkv_bias:
        s.update({"self_attn.q_proj.bias": (qd,), "self_attn.k_proj.bias": (kvd,), "self_attn.v_proj.bias": (kvd,)})
    if cfg.qk_norm:
        s.update({"self_attn.q_norm.weight": (cfg.head_dim,), "self_attn.k_norm.weight": (cfg.head_dim,)})
    if cfg.block == "sandwich":
        s.update({"post_self_attn_layernorm.weight": (d,), "post_mlp_layernorm.weight": (d,)})
    if not isinstance(cfg, GLMMoEConfig):                       # glm / glm4: fused gate_up
        I = cfg.intermediate_size
        s.update({"mlp.gate_up_proj.weight": (2 * I, d), "mlp.down_proj.weight": (d, I)})
        return s
    if i < cfg.first_k_dense_replace:                           # glm4_moe dense layer: separate gate, up
        I = cfg.intermediate_size
        s.update({"mlp.gate_proj.weight": (I, d), "mlp.up_proj.weight": (I, d), "mlp.down_proj.weight": (d, I)})
    else:
        E, Im = cfg.n_routed_experts, cfg.moe_intermediate_size
        s.update({"mlp.gate.weight": (E, d), "mlp.gate.e_score_correction_bias": (E,)})
        for j in range(E):
            s.update({f"mlp.experts.{j}.gate_proj.weight": (Im, d), f"mlp.experts.{j}.up_proj.weight": (Im, d),
                      f"mlp.experts.{j}.down_proj.weight": (d, Im)})
        if cfg.n_shared_experts:
            Is = cfg.n_shared_experts * Im
            s.update({"mlp.shared_experts.gate_proj.weight": (Is, d), "mlp.shared_experts.up_proj.weight": (Is, d),
                      "mlp.shared_experts.down_proj.weight": (d, Is)})
    if i >= cfg.n_layers:                                       # the MTP layer's own tensors
        s.update({"enorm.weight": (d,), "hnorm.weight": (d,), "eh_proj.weight": (d, 2 * d),
                  "shared_head.norm.weight": (d,), "shared_head.head.weight": (V, d), "embed_tokens.weight": (V, d)})
    return s


def expected_hf_shapes(cfg: GLMDenseConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name a checkpoint of this config holds, with its shape."""
    d, V = cfg.hidden_size, cfg.vocab_size
    shapes = {"model.embed_tokens.weight": (V, d), "model.norm.weight": (d,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, d)
    n_mtp = cfg.num_nextn_predict_layers if isinstance(cfg, GLMMoEConfig) else 0
    for i in range(cfg.n_layers + n_mtp):
        shapes.update({f"model.layers.{i}.{k}": v for k, v in _layer_shapes(cfg, i).items()})
    return shapes


def _unstack_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept transformers' in-memory layout too (``mlp.experts.gate_up_proj [E, 2I, H]``,
    ``mlp.experts.down_proj [E, H, I]``): split it into the per-expert tensors the checkpoints store."""
    out = dict(tensors)
    for name in [k for k in tensors if k.endswith("mlp.experts.gate_up_proj")]:
        prefix = name[: -len("gate_up_proj")]
        gate_up = out.pop(name)
        down = out.pop(prefix + "down_proj", None)
        if down is None:
            raise HFCheckpointError(f"{name} is stored stacked but {prefix}down_proj is missing")
        gates, ups, downs = unpack_experts(gate_up, down)
        for j in range(gate_up.shape[0]):
            out[f"{prefix}{j}.gate_proj.weight"] = gates[j]
            out[f"{prefix}{j}.up_proj.weight"] = ups[j]
            out[f"{prefix}{j}.down_proj.weight"] = downs[j]
    return out


def _check_names(present: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> None:
    missing = [k for k in expected if k not in present]
    unexpected = [k for k in present if k not in expected]
    mismatched = [f"{k}: checkpoint {tuple(present[k].shape)}, config expects {expected[k]}"
                  for k in expected if k in present and tuple(present[k].shape) != expected[k]]
    if missing or unexpected or mismatched:
        msg = []
        if missing:
            msg.append(f"missing {len(missing)} tensors: " + ", ".join(f"{k} {expected[k]}" for k in missing[:12])
                       + (" ..." if len(missing) > 12 else ""))
        if unexpected:
            msg.append(f"unexpected {len(unexpected)} tensors: "
                       + ", ".join(f"{k} {tuple(present[k].shape)}" for k in unexpected[:12])
                       + (" ..." if len(unexpected) > 12 else ""))
        if mismatched:
            msg.append(f"{len(mismatched)} shape mismatches: " + "; ".join(mismatched[:12]))
        raise HFCheckpointError("checkpoint does not match its config.json: " + " | ".join(msg))


def _renames(cfg: GLMDenseConfig, i: int) -> list[tuple[str, str]]:
    """(HF suffix, our suffix) of layer ``i``'s tensors that only change name (the rest are fused/stacked)."""
    pairs = [("input_layernorm.weight", "input_norm.weight"),
             ("post_attention_layernorm.weight", "pre_mlp_norm.weight"),
             ("self_attn.o_proj.weight", "attn.o_proj.weight")]
    if cfg.qk_norm:
        pairs += [("self_attn.q_norm.weight", "attn.q_norm.weight"), ("self_attn.k_norm.weight", "attn.k_norm.weight")]
    if cfg.block == "sandwich":
        pairs += [("post_self_attn_layernorm.weight", "post_attn_norm.weight"),
                  ("post_mlp_layernorm.weight", "post_mlp_norm.weight")]
    if not isinstance(cfg, GLMMoEConfig):
        pairs += [("mlp.gate_up_proj.weight", "mlp.gate_up_proj.weight")]
    if not isinstance(cfg, GLMMoEConfig) or i < cfg.first_k_dense_replace:
        return pairs + [("mlp.down_proj.weight", "mlp.down_proj.weight")]
    pairs += [("mlp.gate.weight", "mlp.gate.weight"),
              ("mlp.gate.e_score_correction_bias", "mlp.gate.e_score_correction_bias")]
    if cfg.n_shared_experts:
        pairs += [(f"mlp.shared_experts.{p}_proj.weight",) * 2 for p in ("gate", "up", "down")]
    return pairs


def _moe_layer(cfg: GLMDenseConfig, i: int) -> bool:
    return isinstance(cfg, GLMMoEConfig) and i >= cfg.first_k_dense_replace


def _layer_to_ours(t: dict[str, torch.Tensor], cfg: GLMDenseConfig, i: int, hp: str, op: str) -> dict[str, torch.Tensor]:
    """One decoder layer's HF tensors (prefix ``hp``) under our names (prefix ``op``): renamed, q/k/v fused,
    a glm4_moe dense MLP's gate and up fused, experts stacked."""
    out = {op + ours: t[hp + hf] for hf, ours in _renames(cfg, i)}
    for kind in ("weight", "bias") if cfg.qkv_bias else ("weight",):
        out[f"{op}attn.qkv_proj.{kind}"] = torch.cat([t[f"{hp}self_attn.{p}_proj.{kind}"] for p in "qkv"])
    if isinstance(cfg, GLMMoEConfig) and not _moe_layer(cfg, i):
        out[op + "mlp.gate_up_proj.weight"] = torch.cat([t[hp + "mlp.gate_proj.weight"], t[hp + "mlp.up_proj.weight"]])
    if _moe_layer(cfg, i):
        E = cfg.n_routed_experts
        out[op + "mlp.gate.e_score_correction_bias"] = out[op + "mlp.gate.e_score_correction_bias"].float()
        gate_up, down = pack_experts(*([t[f"{hp}mlp.experts.{j}.{p}_proj.weight"] for j in range(E)]
                                       for p in ("gate", "up", "down")))
        out[op + "mlp.experts.gate_up_proj"], out[op + "mlp.experts.down_proj"] = gate_up, down
    return out


def _layer_to_hf(sd: dict[str, torch.Tensor], cfg: GLMDenseConfig, i: int, hp: str, op: str) -> dict[str, torch.Tensor]:
    """The inverse of ``_layer_to_ours``: q/k/v split, a dense MLP's gate and up split, experts one by one."""
    out = {hp + hf: sd[op + ours] for hf, ours in _renames(cfg, i)}
    qd, kvd = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    for kind in ("weight", "bias") if cfg.qkv_bias else ("weight",):
        for p, part in zip("qkv", sd[f"{op}attn.qkv_proj.{kind}"].split([qd, kvd, kvd])):
            out[f"{hp}self_attn.{p}_proj.{kind}"] = part
    if isinstance(cfg, GLMMoEConfig) and not _moe_layer(cfg, i):
        out[hp + "mlp.gate_proj.weight"], out[hp + "mlp.up_proj.weight"] = sd[op + "mlp.gate_up_proj.weight"].chunk(2)
    if _moe_layer(cfg, i):
        experts = unpack_experts(sd[op + "mlp.experts.gate_up_proj"], sd[op + "mlp.experts.down_proj"])
        for p, stacked in zip(("gate", "up", "down"), experts):
            for j in range(cfg.n_routed_experts):
                out[f"{hp}mlp.experts.{j}.{p}_proj.weight"] = stacked[j]
    return out


def hf_to_glmkit(tensors: dict[str, torch.Tensor], cfg: GLMDenseConfig) -> dict[str, torch.Tensor]:
    """Rename (fuse q/k/v, stack experts of) an HF state dict into our model's. Raises ``HFCheckpointError``
    naming every missing, unexpected or wrongly shaped tensor (with both shapes)."""
    present = _unstack_experts({k: v for k, v in tensors.items() if not _IGNORED.match(k)})
    if cfg.tie_word_embeddings:
        present.pop("lm_head.weight", None)   # a tied head may be stored too: it is the embedding
    _check_names(present, expected_hf_shapes(cfg))
    out = {"embed_tokens.weight": present["model.embed_tokens.weight"],
           "final_norm.weight": present["model.norm.weight"]}
    out["lm_head.weight"] = present["model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"]
    for i in range(cfg.n_layers):
        out.update(_layer_to_ours(present, cfg, i, f"model.layers.{i}.", f"layers.{i}."))
    for j in range(cfg.num_nextn_predict_layers if isinstance(cfg, GLMMoEConfig) else 0):
        i = cfg.n_layers + j
        hp, op = f"model.layers.{i}.", f"mtp.{j}."
        out.update(_layer_to_ours(present, cfg, i, hp, op + "block."))
        out.update({op + ours: present[hp + hf] for hf, ours in _MTP_EXTRA.items()})
    return out


def glmkit_to_hf(model: GLMDenseModel) -> dict[str, torch.Tensor]:
    """Our model's weights under HF names (q/k/v split, experts one by one as the zai-org checkpoints
    store them; a tied head omitted; the MTP layer as ``model.layers.{N}`` with its own copies of the
    embedding and head)."""
    cfg = model.config
    hf_config_from(cfg)   # raises if HF cannot express this model
    sd = model.state_dict()
    out = {"model.embed_tokens.weight": sd["embed_tokens.weight"], "model.norm.weight": sd["final_norm.weight"]}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layers):
        out.update(_layer_to_hf(sd, cfg, i, f"model.layers.{i}.", f"layers.{i}."))
    for j in range(cfg.num_nextn_predict_layers if isinstance(cfg, GLMMoEConfig) else 0):
        i = cfg.n_layers + j
        hp, op = f"model.layers.{i}.", f"mtp.{j}."
        out.update(_layer_to_hf(sd, cfg, i, hp, op + "block."))
        out.update({hp + hf: sd[op + ours] for hf, ours in _MTP_EXTRA.items()})
    return out


# ----------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------
def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise HFCheckpointError(f"{index} has no weight_map")
        files = sorted(set(weight_map.values()))
        absent = [f for f in files if not (folder / f).is_file()]
        if absent:
            raise HFCheckpointError(f"{index.name} lists shard files that are not in {folder}: {absent}")
        tensors: dict[str, torch.Tensor] = {}
        for f in files:
            shard = load_file(str(folder / f))
            for name, t in shard.items():
                if weight_map.get(name) != f:
                    raise HFCheckpointError(f"tensor {name} is in {f} but {index.name} maps it to "
                                            f"{weight_map.get(name)!r}")
                tensors[name] = t
        not_found = [n for n in weight_map if n not in tensors]
        if not_found:
            raise HFCheckpointError(f"{index.name} lists tensors no shard holds: {not_found[:12]}")
        return tensors
    if single.is_file():
        return load_file(str(single))
    have = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise HFCheckpointError(f"no model.safetensors or model.safetensors.index.json in {folder} (found: {have}); "
                            f"only safetensors checkpoints are read (not pytorch_model.bin)")


def load_hf(folder: str | os.PathLike, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
            **config_overrides: Any) -> GLMDenseModel:
    """Load a ``glm``/``glm4`` (→ ``GLMDenseModel``) or ``glm4_moe`` (→ ``GLMMoEModel``) Hugging Face
    checkpoint folder, in eval mode.

    dtype: convert the weights (default: keep the stored dtype; the routing bias stays fp32); device: where
    the model lives (default CPU). ``config_overrides`` change config fields after reading config.json.
    ``glm4_moe``: the MTP layer (``model.layers.{N}.*``) is loaded when the files hold it — checkpoints
    written by transformers do not, whatever ``num_nextn_predict_layers`` says — and it shares the main
    embedding and head when its stored copies equal them (``mtp_tied``).
    """
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise HFCheckpointError(f"no config.json in {folder}")
    try:
        hf = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise HFCheckpointError(f"{cfg_path} is not valid JSON: {e}") from None
    tensors = _read_tensors(folder)
    if hf.get("model_type") == "glm4_moe" and "num_nextn_predict_layers" not in config_overrides:
        n = int(hf.get("num_hidden_layers", 0))
        stored = any(k.startswith(f"model.layers.{n}.") for k in tensors)
        config_overrides["num_nextn_predict_layers"] = min(int(hf.get("num_nextn_predict_layers", 0) or 0), 1) \
            if stored else 0
        if stored and "mtp_tied" not in config_overrides:
            emb, head = tensors.get("model.embed_tokens.weight"), tensors.get("lm_head.weight", tensors.get(
                "model.embed_tokens.weight"))
            own_emb, own_head = tensors.get(f"model.layers.{n}.embed_tokens.weight"), tensors.get(
                f"model.layers.{n}.shared_head.head.weight")
            config_overrides["mtp_tied"] = all(a is not None and b is not None and a.shape == b.shape
                                               and torch.equal(a, b) for a, b in ((emb, own_emb), (head, own_head)))
    cfg = config_from_hf(hf, **config_overrides)
    sd = hf_to_glmkit(tensors, cfg)
    cls = GLMMoEModel if isinstance(cfg, GLMMoEConfig) else GLMDenseModel
    if isinstance(cfg, GLMMoEConfig) and cfg.mtp_tied:   # tied copies: one tensor under every tied name
        for j in range(cfg.num_nextn_predict_layers):
            sd[f"mtp.{j}.embed_tokens.weight"] = sd["embed_tokens.weight"]
            sd[f"mtp.{j}.head.weight"] = sd["lm_head.weight"]
    with torch.device("meta"):
        model = cls(cfg)
    model.load_state_dict(sd, strict=True, assign=True)
    _retie(model)
    for module in model.modules():   # non-persistent buffers (MoE load counters) are not in the files
        for name, buf in module.named_buffers(recurse=False):
            if buf.is_meta:
                setattr(module, name, torch.zeros(buf.shape, dtype=buf.dtype))
    model = model.to(device=device or "cpu", dtype=dtype)
    return model.eval()


def _retie(model: GLMDenseModel) -> None:
    """``load_state_dict(assign=True)`` replaces parameters one name at a time, which unties them."""
    cfg = model.config
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    if isinstance(model, GLMMoEModel) and cfg.mtp_tied:
        for m in model.mtp:
            m.embed_tokens.weight = model.embed_tokens.weight
            m.head.weight = model.lm_head.weight


def _parse_size(size: int | str) -> int:
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    if isinstance(size, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB)?\s*", size)
        if m:
            unit = {"B": 1, None: 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KiB": 2**10, "MiB": 2**20,
                    "GiB": 2**30}[m.group(2)]
            return int(float(m.group(1)) * unit)
    raise ValueError(f"max_shard_size must be a positive int (bytes) or a string like '5GB' / '200KiB', got {size!r}")


def save_hf(model: GLMDenseModel, folder: str | os.PathLike, max_shard_size: int | str | None = None) -> Path:
    """Write ``model`` as a Hugging Face ``glm``/``glm4``/``glm4_moe`` checkpoint: config.json and model.safetensors, or
    shards of at most ``max_shard_size`` bytes (a tensor bigger than that gets a shard of its own) with
    model.safetensors.index.json. Returns the folder."""
    from safetensors.torch import save_file

    if not isinstance(model, GLMDenseModel):
        raise TypeError(f"save_hf needs a GLMDenseModel, got {type(model).__name__}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # clone: safetensors refuses tensors that share memory (split q/k/v views, tied MTP copies)
    tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in glmkit_to_hf(model).items()}
    (folder / "config.json").write_text(json.dumps(hf_config_from(model.config, model.dtype), indent=2) + "\n")
    for stale in list(folder.glob("model*.safetensors")) + list(folder.glob("model.safetensors.index.json")):
        stale.unlink()
    meta = {"format": "pt"}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    limit = None if max_shard_size is None else _parse_size(max_shard_size)
    if limit is None or total <= limit:
        save_file(tensors, str(folder / "model.safetensors"), metadata=meta)
        return folder
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    n = len(shards)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file(shard, str(folder / fname), metadata=meta)
        weight_map.update({k: fname for k in shard})
    index = {"metadata": {"total_size": total, "total_parameters": sum(t.numel() for t in tensors.values())},
             "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder
