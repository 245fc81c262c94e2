"""Hugging Face checkpoint interop for the dense GLM models: ``load_hf`` and ``save_hf``.

What it implements
    A Hugging Face checkpoint folder is ``config.json`` plus the weights as safetensors: one
    ``model.safetensors``, or shards ``model-0000i-of-0000n.safetensors`` listed by
    ``model.safetensors.index.json`` (``{"metadata": {"total_size": bytes}, "weight_map": {name: file}}``).
    ``load_hf(folder)`` reads the config into a ``GLMDenseConfig``, maps each tensor name onto
    ``GLMDenseModel``'s and returns the model; ``save_hf(model, folder)`` writes the same layout back, so
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

SUPPORTED_MODEL_TYPES = ("glm", "glm4")
_ARCHITECTURES = {"glm": "GlmForCausalLM", "glm4": "Glm4ForCausalLM"}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Tensors some exporters store that are not parameters: ignored on load.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


class HFCheckpointError(ValueError):
    """A checkpoint glmkit cannot load (or a model it cannot save) — the message says what and why."""


# ----------------------------------------------------------------------------------------------------
# config.json <-> GLMDenseConfig
# ----------------------------------------------------------------------------------------------------
def config_from_hf(hf: dict[str, Any], **overrides: Any) -> GLMDenseConfig:
    """A ``GLMDenseConfig`` from a ``glm``/``glm4`` config.json dict. ``overrides`` replace fields
    afterwards (e.g. ``rope_pairing="half"`` — wrong for these checkpoints; the lesson shows what it does)."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise HFCheckpointError(
            f"unsupported model_type {model_type!r} in config.json: glmkit.hf loads the dense GLM types "
            f"{', '.join(repr(t) for t in SUPPORTED_MODEL_TYPES)} (GLM-4-9B → 'glm', GLM-4-0414 → 'glm4')"
        )
    need = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
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
    fields = dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim"), intermediate_size=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048), qkv_bias=bool(hf.get("attention_bias", True)),
        o_bias=False, qk_norm=False, position="rope", partial_rotary_factor=float(factor),
        rope_pairing="interleaved", rope_theta=float(theta),
        block="sandwich" if model_type == "glm4" else "pre", norm="rmsnorm",
        norm_eps=float(hf.get("rms_norm_eps", 1.5625e-07)), activation="swiglu", mlp_bias=False,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        pad_token_id=hf.get("pad_token_id"), eos_token_ids=eos, bos_token_id=hf.get("bos_token_id"),
    )
    vocab = fields["vocab_size"]
    for name in ("pad_token_id", "bos_token_id"):   # HF tolerates ids outside tiny test vocabularies
        if fields[name] is not None and not 0 <= fields[name] < vocab:
            fields[name] = None
    fields["eos_token_ids"] = tuple(t for t in eos if 0 <= t < vocab)
    fields.update(overrides)
    try:
        return GLMDenseConfig(**fields)
    except (TypeError, ValueError) as e:
        raise HFCheckpointError(f"config.json ({model_type}) contradicts itself: {e}") from None


def hf_config_from(cfg: GLMDenseConfig, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """The config.json dict for a model HF can express as ``glm`` (block "pre") or ``glm4`` ("sandwich")."""
    problems = []
    want = dict(position="rope", rope_pairing="interleaved", norm="rmsnorm", activation="swiglu", o_bias=False,
                mlp_bias=False, qk_norm=False, attn_scale=None, dropout=0.0)
    for k, v in want.items():
        if getattr(cfg, k) != v:
            problems.append(f"{k}={getattr(cfg, k)!r} (HF glm/glm4 needs {v!r})")
    if cfg.block not in ("pre", "sandwich"):
        problems.append(f"block={cfg.block!r} (HF glm needs 'pre', glm4 'sandwich')")
    if cfg.padded_vocab_size != cfg.vocab_size:
        problems.append(f"pad_vocab_multiple={cfg.pad_vocab_multiple} pads the vocabulary (HF has no padded rows)")
    if problems:
        raise HFCheckpointError("this model has no Hugging Face glm/glm4 equivalent: " + "; ".join(problems))
    model_type = "glm4" if cfg.block == "sandwich" else "glm"
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
    if dtype is not None:
        out["dtype"] = str(dtype).removeprefix("torch.")
    return out


# ----------------------------------------------------------------------------------------------------
# Tensor names
# ----------------------------------------------------------------------------------------------------
def _layer_map(cfg: GLMDenseConfig) -> list[tuple[str, str]]:
    """(HF suffix, our suffix) for the one-to-one tensors of a layer."""
    pairs = [("input_layernorm.weight", "input_norm.weight"),
             ("self_attn.o_proj.weight", "attn.o_proj.weight"),
             ("post_attention_layernorm.weight", "pre_mlp_norm.weight"),
             ("mlp.gate_up_proj.weight", "mlp.gate_up_proj.weight"),
             ("mlp.down_proj.weight", "mlp.down_proj.weight")]
    if cfg.block == "sandwich":
        pairs += [("post_self_attn_layernorm.weight", "post_attn_norm.weight"),
                  ("post_mlp_layernorm.weight", "post_mlp_norm.weight")]
    return pairs


def expected_hf_shapes(cfg: GLMDenseConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name a ``glm``/``glm4`` checkpoint of this config holds, with its shape."""
    d, V, I = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size
    qd, kvd = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    shapes = {"model.embed_tokens.weight": (V, d), "model.norm.weight": (d,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, d)
    per = {"input_layernorm.weight": (d,), "self_attn.o_proj.weight": (d, qd),
           "post_attention_layernorm.weight": (d,), "mlp.gate_up_proj.weight": (2 * I, d),
           "mlp.down_proj.weight": (d, I), "post_self_attn_layernorm.weight": (d,),
           "post_mlp_layernorm.weight": (d,),
           "self_attn.q_proj.weight": (qd, d), "self_attn.k_proj.weight": (kvd, d), "self_attn.v_proj.weight": (kvd, d),
           "self_attn.q_proj.bias": (qd,), "self_attn.k_proj.bias": (kvd,), "self_attn.v_proj.bias": (kvd,)}
    names = [hf for hf, _ in _layer_map(cfg)] + [f"self_attn.{p}_proj.weight" for p in "qkv"]
    if cfg.qkv_bias:
        names += [f"self_attn.{p}_proj.bias" for p in "qkv"]
    for i in range(cfg.n_layers):
        for n in names:
            shapes[f"model.layers.{i}.{n}"] = per[n]
    return shapes


def hf_to_glmkit(tensors: dict[str, torch.Tensor], cfg: GLMDenseConfig) -> dict[str, torch.Tensor]:
    """Rename (and fuse q/k/v of) an HF state dict into ``GLMDenseModel``'s. Raises ``HFCheckpointError``
    naming every missing, unexpected or wrongly shaped tensor (with both shapes)."""
    expected = expected_hf_shapes(cfg)
    present = {k: v for k, v in tensors.items() if not _IGNORED.match(k)}
    if cfg.tie_word_embeddings:
        present.pop("lm_head.weight", None)   # a tied head may be stored too: it is the embedding
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
    out = {"embed_tokens.weight": present["model.embed_tokens.weight"],
           "final_norm.weight": present["model.norm.weight"]}
    out["lm_head.weight"] = present["model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"]
    for i in range(cfg.n_layers):
        hp, op = f"model.layers.{i}.", f"layers.{i}."
        for hf, ours in _layer_map(cfg):
            out[op + ours] = present[hp + hf]
        out[op + "attn.qkv_proj.weight"] = torch.cat([present[f"{hp}self_attn.{p}_proj.weight"] for p in "qkv"])
        if cfg.qkv_bias:
            out[op + "attn.qkv_proj.bias"] = torch.cat([present[f"{hp}self_attn.{p}_proj.bias"] for p in "qkv"])
    return out


def glmkit_to_hf(model: GLMDenseModel) -> dict[str, torch.Tensor]:
    """``GLMDenseModel``'s weights under HF ``glm``/``glm4`` names (q/k/v split; a tied head omitted)."""
    cfg = model.config
    hf_config_from(cfg)   # raises if HF cannot express this model
    sd = model.state_dict()
    qd, kvd = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    out = {"model.embed_tokens.weight": sd["embed_tokens.weight"], "model.norm.weight": sd["final_norm.weight"]}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layers):
        hp, op = f"model.layers.{i}.", f"layers.{i}."
        for hf, ours in _layer_map(cfg):
            out[hp + hf] = sd[op + ours]
        for kind in ("weight", "bias") if cfg.qkv_bias else ("weight",):
            q, k, v = sd[f"{op}attn.qkv_proj.{kind}"].split([qd, kvd, kvd])
            out[f"{hp}self_attn.q_proj.{kind}"], out[f"{hp}self_attn.k_proj.{kind}"] = q, k
            out[f"{hp}self_attn.v_proj.{kind}"] = v
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
    """Load a ``glm``/``glm4`` Hugging Face checkpoint folder into a ``GLMDenseModel`` (eval mode).

    dtype: convert the weights (default: keep the stored dtype); device: where the model lives (default
    CPU). ``config_overrides`` change ``GLMDenseConfig`` fields after reading config.json.
    """
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise HFCheckpointError(f"no config.json in {folder}")
    hf = json.loads(cfg_path.read_text())
    cfg = config_from_hf(hf, **config_overrides)
    tensors = _read_tensors(folder)
    sd = hf_to_glmkit(tensors, cfg)
    with torch.device("meta"):
        model = GLMDenseModel(cfg)
    model.load_state_dict(sd, strict=True, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model = model.to(device=device or "cpu", dtype=dtype)
    return model.eval()


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
    """Write ``model`` as a Hugging Face ``glm``/``glm4`` checkpoint: config.json and model.safetensors, or
    shards of at most ``max_shard_size`` bytes (a tensor bigger than that gets a shard of its own) with
    model.safetensors.index.json. Returns the folder."""
    from safetensors.torch import save_file

    if not isinstance(model, GLMDenseModel):
        raise TypeError(f"save_hf needs a GLMDenseModel, got {type(model).__name__}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in glmkit_to_hf(model).items()}
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
