"""Named configurations: the published GLM checkpoints (build them on the meta device to count parameters) and
the course's CPU/GPU training presets, all settings of the one ``DecoderConfig``. ``get_config(name, **changes)``.

Sources: shared/reference/glm-lineage.md §2.2 (ChatGLM2), §3 (GLM-4), §4.1 (GLM-4.5; no copy of its own
config.json was available: the GLM-4.7 config, Megatron-Bridge's providers and the INTELLECT-3-Base config agree).
Published sizes the presets are checked against (tests/models/test_presets.py, within 1 %):
  chatglm2-6b    6,243,584,032: THUDM/chatglm2-6b ``pytorch_model.bin.index.json`` total_size / 2 bytes (it includes
                 32 stored rotary inv_freq entries that are not parameters; the count here has none)
  glm-4-9b       "9.4B params": the HF model card of THUDM/glm-4-9b-chat-hf
  glm-4-9b-0414  "9.4B params": the HF model card of THUDM/GLM-4-9B-0414
  glm-4.5        355B total / 32B active, glm-4.5-air 106B / 12B: zai-org/GLM-4.5 README. They match counting the
                 main model without the MTP layer, and active parameters without embedding and LM head (with the
                 MTP block Air's total would miss by 3 %, which rules that convention out).
  glm-4.7-flash  "30B-A3B": the zai-org/GLM-4.7-Flash model card (Megatron-Bridge's docs: "about 30B total parameters
                 and 3B active"). The main model without the MTP layer counts 29.94B (−0.2 %); with the MTP layer
                 30.59B (+2.0 %), and with its stored embedding and head copies 31.22B, the "31B params" the Hugging
                 Face page computes from the safetensors files. Active without embedding and head: 3.26B, which
                 "A3B" rounds to one digit (tests/mixers/test_mla.py checks these figures).
  glm-5          744B total / 40B active: the zai-org/GLM-5 README. The main model without the MTP layer counts
                 743.91B (−0.01 %; routing-bias buffers not counted, DSA indexers counted); active without embedding
                 and head 39.88B (−0.3 %): every attention weight with its indexer, the 3 dense FFNs, 8 routed + 1
                 shared experts in each of the 75 MoE layers, routers and norms (tests/test_hf_dsa.py).
  glm-5.3-flash  320B total / 18B active: the GLM-5.3-Flash card (glm-lineage.md §5.7); the preset is transformers'
                 Glm5NextTextConfig defaults (no config.json of the checkpoint was available). The card counts the
                 whole checkpoint: the language model 313.33B + its MTP layer 7.43B + the vision tower 0.46B
                 (``GLM_5_3_FLASH_VISION``) = 321.22B (+0.4 %); active per token: 16.11B in the language model
                 (KDA and MLA-DSA weights with the indexers, mHC, 3 dense FFNs, 8 routed + 1 shared experts in each of
                 42 MoE layers) + embedding and head 1.27B + the (dense) vision tower 0.46B = 17.84B (−0.9 %). The
                 conventions of the presets above miss: 313.33B (−2.1 %) without the MTP layer, 16.11B (−10.5 %)
                 active without embedding and head, 17.38B (−3.5 %) with them but without the tower
                 (tests/test_hf_glm5_next.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from glmkit.models.decoder import DecoderConfig

BYTE_VOCAB = 264  # glmkit.data.tokenizer.ByteTokenizer().vocab_size: 256 bytes + GLM's special tokens
B = 1_000_000_000

PUBLISHED = {
    "chatglm2-6b": (6_243_584_032, None),
    "glm-4-9b": (9.4e9, None),
    "glm-4-9b-0414": (9.4e9, None),
    "glm-4.5": (355 * B, 32 * B),
    "glm-4.5-air": (106 * B, 12 * B),
    "glm-4.7-flash": (30 * B, 3 * B),
    "glm-5": (744 * B, 40 * B),
    "glm-5.3-flash": (320 * B, 18 * B),
}

_GLM4 = dict(
    vocab_size=151552,
    hidden_size=4096,
    num_hidden_layers=40,
    num_attention_heads=32,
    num_key_value_heads=2,
    head_dim=128,
    intermediate_size=13696,
    attention_bias=True,
    partial_rotary_factor=0.5,
    rope_interleave=True,
    pad_token_id=151329,
    eos_token_id=(151329, 151336, 151338),
)
_GLM45 = dict(
    vocab_size=151552,
    num_attention_heads=96,
    num_key_value_heads=8,
    head_dim=128,
    attention_bias=True,
    partial_rotary_factor=0.5,
    rope_interleave=False,
    rope_theta=1e6,
    max_position_embeddings=131072,
    n_shared_experts=1,
    num_experts_per_tok=8,
    num_nextn_predict_layers=1,
    pad_token_id=151329,
    eos_token_id=(151329, 151336, 151338),
)
# the course presets: GLM-4-0414-style (dense) and GLM-4.5-style (MoE) blocks on the byte tokenizer
_SMALL = dict(vocab_size=BYTE_VOCAB, tie_word_embeddings=True)
_MOE_STYLE = dict(use_qk_norm=True, rope_interleave=False, rope_theta=1e6, n_shared_experts=1, first_k_dense_replace=1)

PRESETS: dict[str, DecoderConfig] = {
    # ChatGLM2-6B (remote-code config: 28 layers, 4096, 32 heads, multi_query_group_num=2, kv_channels=128, ffn
    # 13696, padded_vocab_size 65024, add_qkv_bias, untied output_layer, seq_length 32768).
    "chatglm2-6b": DecoderConfig(
        **{
            **_GLM4,
            "vocab_size": 65024,
            "num_hidden_layers": 28,
            "max_position_embeddings": 32768,
            "pad_token_id": 0,
            "eos_token_id": (2,),
        }
    ),
    # GLM-4-9B (HF `glm`, GlmConfig defaults = THUDM/glm-4-9b-chat-hf).
    "glm-4-9b": DecoderConfig(**_GLM4, max_position_embeddings=131072, rms_norm_eps=1.5625e-07),
    # GLM-4-9B-0414 (HF `glm4`): the same shapes with sandwich norms, eps 1e-5, 32K positions.
    "glm-4-9b-0414": DecoderConfig(**_GLM4, max_position_embeddings=32768, sandwich_norms=True),
    # GLM-4.5 (355B-A32B) and GLM-4.5-Air (106B-A12B), HF `glm4_moe`.
    "glm-4.5": DecoderConfig(
        **_GLM45,
        hidden_size=5120,
        num_hidden_layers=92,
        intermediate_size=12288,
        moe_intermediate_size=1536,
        n_routed_experts=160,
        first_k_dense_replace=3,
        routed_scaling_factor=2.5,
        use_qk_norm=True,
    ),
    "glm-4.5-air": DecoderConfig(
        **_GLM45,
        hidden_size=4096,
        num_hidden_layers=46,
        intermediate_size=10944,
        moe_intermediate_size=1408,
        n_routed_experts=128,
        first_k_dense_replace=1,
    ),
    # Trains in minutes on a 2-core CPU (~0.8M parameters).
    "cpu-small": DecoderConfig(
        **_SMALL,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        intermediate_size=352,
        max_position_embeddings=256,
        attention_bias=True,
        sandwich_norms=True,
    ),
    # One GPU (~23M parameters), D = 64 for the kernels.
    "gpu-small": DecoderConfig(
        **_SMALL,
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        intermediate_size=1408,
        max_position_embeddings=1024,
        attention_bias=True,
        sandwich_norms=True,
    ),
    # CPU MoE: 4 layers (1 dense + 3 MoE), 8 experts of 128 (top-2 + 1 shared); ~1.4M parameters, ~0.7M active.
    "cpu-moe": DecoderConfig(
        **_SMALL,
        **_MOE_STYLE,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        intermediate_size=384,
        max_position_embeddings=256,
        attention_bias=True,
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=128,
    ),
    # GPU MoE: 8 layers (1 dense + 7 MoE), 32 experts of 256 (top-4 + 1 shared), D = 64 for the kernels.
    "gpu-moe": DecoderConfig(
        **_SMALL,
        **_MOE_STYLE,
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        intermediate_size=1280,
        max_position_embeddings=1024,
        attention_bias=True,
        n_routed_experts=32,
        num_experts_per_tok=4,
        moe_intermediate_size=256,
    ),
    # GLM-4.7-Flash (HF `glm4_moe_lite`; glmkit.mixers.mla): 47 MLA layers of 20 heads (q_lora 768, kv_lora 512, q·k
    # 192 + 64, v 256; head_dim here is the q·k head), interleaved RoPE on the 64-dim slice, θ = 1e6; layer 0 dense,
    # then 46 MoE layers of 64 experts of 1536 (top-4 + 1 shared, ×1.8); one MTP layer (stored as layer 47).
    "glm-4.7-flash": DecoderConfig(
        vocab_size=154880,
        hidden_size=2048,
        num_hidden_layers=47,
        num_attention_heads=20,
        head_dim=256,
        intermediate_size=10240,
        max_position_embeddings=202752,
        partial_rotary_factor=1.0,
        rope_theta=1e6,
        layer_types=["mla"] * 47,
        mtp_layer_type="mla",
        n_routed_experts=64,
        num_experts_per_tok=4,
        moe_intermediate_size=1536,
        n_shared_experts=1,
        first_k_dense_replace=1,
        routed_scaling_factor=1.8,
        num_nextn_predict_layers=1,
        extra=dict(q_lora_rank=768, kv_lora_rank=512, qk_nope_head_dim=192, qk_rope_head_dim=64, v_head_dim=256),
    ),
    # CPU MLA (GLM-4.7-Flash-style): cpu-moe's sizes with MLA mixers (q_lora 64, kv_lora 64, q·k 48 + 16 = 64,
    # v 32: the mixer's defaults) and no QK-norm; ~1.8M parameters (~0.9M active). Its MTP layer is MLA too.
    "cpu-mla": DecoderConfig(
        **_SMALL,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        head_dim=64,
        intermediate_size=384,
        max_position_embeddings=256,
        rope_theta=1e6,
        layer_types=["mla"] * 4,
        mtp_layer_type="mla",
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=128,
        n_shared_experts=1,
        first_k_dense_replace=1,
        extra=dict(q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=48, qk_rope_head_dim=16, v_head_dim=32),
    ),
    # GPU MLA: gpu-moe's sizes with MLA (q_lora 256, kv_lora 256, q·k 64 + 64, v 128: the kernels' D = 128 tiles);
    # ~105M parameters, ~28M active.
    "gpu-mla": DecoderConfig(
        **_SMALL,
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        head_dim=128,
        intermediate_size=1280,
        max_position_embeddings=1024,
        rope_theta=1e6,
        layer_types=["mla"] * 8,
        mtp_layer_type="mla",
        n_routed_experts=32,
        num_experts_per_tok=4,
        moe_intermediate_size=256,
        n_shared_experts=1,
        first_k_dense_replace=1,
        extra=dict(q_lora_rank=256, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=128),
    ),
}
# GLM-5 / GLM-5.1 (HF `glm_moe_dsa`; glmkit.mixers.dsa): 78 DSA layers (MLA of 64 heads, q_lora 2048, kv_lora 512,
# q·k 192 + 64, v 256, interleaved RoPE, θ = 1e6; indexer 32 heads × 128, top-2048), 3 dense layers then 75 MoE
# layers of 256 experts of 2048 (top-8 + 1 shared, ×2.5); one MTP layer (stored as layer 78). glm-lineage.md §5.1.
PRESETS["glm-5"] = DecoderConfig(
    vocab_size=154880,
    hidden_size=6144,
    num_hidden_layers=78,
    num_attention_heads=64,
    head_dim=256,
    intermediate_size=12288,
    max_position_embeddings=202752,
    partial_rotary_factor=1.0,
    rope_theta=1e6,
    layer_types=["dsa"] * 78,
    mtp_layer_type="dsa",
    n_routed_experts=256,
    num_experts_per_tok=8,
    moe_intermediate_size=2048,
    n_shared_experts=1,
    first_k_dense_replace=3,
    routed_scaling_factor=2.5,
    num_nextn_predict_layers=1,
    pad_token_id=154820,
    eos_token_id=(154820, 154827, 154829),
    extra=dict(
        q_lora_rank=2048,
        kv_lora_rank=512,
        qk_nope_head_dim=192,
        qk_rope_head_dim=64,
        v_head_dim=256,
        index_n_heads=32,
        index_head_dim=128,
        index_topk=2048,
    ),
)
# The course's DSA models (lesson 06): cpu-mla / gpu-mla with DSA layers (indexer 8 heads × 32, RoPE on its first 16
# dims; gpu: 16 heads × 64), top-32 on the CPU (lesson 06 trains at 128 tokens), top-256 on the GPU.
PRESETS["cpu-dsa"] = dataclasses.replace(
    PRESETS["cpu-mla"],
    layer_types=["dsa"] * 4,
    mtp_layer_type="dsa",
    extra={**PRESETS["cpu-mla"].extra, "index_n_heads": 8, "index_head_dim": 32, "index_topk": 32},
)
PRESETS["gpu-dsa"] = dataclasses.replace(
    PRESETS["gpu-mla"],
    layer_types=["dsa"] * 8,
    mtp_layer_type="dsa",
    extra={**PRESETS["gpu-mla"].extra, "index_n_heads": 16, "index_head_dim": 64, "index_topk": 256},
)
# The 3:1 hybrids (lesson 07): GLM-5.3-Flash's pattern (glm5_next: layer i is full attention when i % 4 == 3, KDA
# otherwise; Qwen3-Next places its Gated DeltaNet layers the same way). KDA, not GDN: it is the GLM lineage's own
# linear layer. Every other field is cpu-small's / gpu-small's, so those two are the full-attention twins.
PRESETS["cpu-hybrid"] = dataclasses.replace(PRESETS["cpu-small"], layer_types=["kda", "kda", "kda", "attention"])
PRESETS["gpu-hybrid"] = dataclasses.replace(PRESETS["gpu-small"], layer_types=["kda", "kda", "kda", "attention"] * 2)
# GLM-5.3-Flash (HF `glm5_next`; transformers' Glm5NextTextConfig defaults, glm-lineage.md §5.7): 45 layers, KDA where
# i % 4 != 3 (34) and NoPE MLA-DSA with the KPool indexer at i % 4 == 3 (11): MLA of 64 heads (q_lora 1536, kv_lora
# 512, q·k 256 + 0, v 256), indexer 32 heads × 128, top-2048 in pools of 16 with the tail; KDA 64 heads × 128, conv 4,
# safe gate −5; 3 dense FFNs of 12288 then 42 MoE layers of 288 experts of 2048 (top-8 + 1 shared, ×2.5), clamped
# SwiGLU (10); mHC with 4 streams, 20 Sinkhorn rounds. One MTP layer (layer 45, which transformers ignores; its mixer
# is not documented: a DSA block here, as GLM-5's).
_G5N_DSA = dict(
    q_lora_rank=1536,
    kv_lora_rank=512,
    qk_nope_head_dim=256,
    qk_rope_head_dim=0,
    v_head_dim=256,
    latent_norm_eps=1e-5,
    index_n_heads=32,
    index_head_dim=128,
    index_topk=2048,
    index_kpool=16,
    index_kpool_always_select_tail=True,
)
GLM_5_3_FLASH_VISION = 460_072_448  # transformers' Glm5NextVisionModel at its config defaults, on the meta device
PRESETS["glm-5.3-flash"] = DecoderConfig(
    vocab_size=154880,
    hidden_size=4096,
    num_hidden_layers=45,
    num_attention_heads=64,
    head_dim=256,
    intermediate_size=12288,
    max_position_embeddings=1048576,
    partial_rotary_factor=0.0,
    layer_types=["kda" if i % 4 != 3 else "dsa" for i in range(45)],
    mtp_layer_type="dsa",
    n_routed_experts=288,
    num_experts_per_tok=8,
    moe_intermediate_size=2048,
    n_shared_experts=1,
    first_k_dense_replace=3,
    routed_scaling_factor=2.5,
    swiglu_limit=10.0,
    hc_mult=4,
    num_nextn_predict_layers=1,
    pad_token_id=154820,
    extra=dict(
        **_G5N_DSA,
        linear_num_heads=64,
        linear_head_dim=128,
        linear_conv_kernel_dim=4,
        linear_lower_bound=-5.0,
    ),
)
# The capstone (lesson 09): GLM-5.3-Flash's architecture at a size one H200 trains from random init to code-like
# samples in minutes, on the python-stdlib corpus with its 8192-token BPE (glmkit.data.python_corpus). 8 layers,
# d = 768: KDA, KDA, KDA, DSA twice (KDA 6 heads × 128; NoPE MLA 6 heads, q_lora 384, kv_lora 256, q·k 128, v 128;
# KPool indexer 8 heads × 64, top-512 = 32 pools of 16, with the tail); layer 0 dense (2048), then 7 MoE layers of 32
# experts of 256 (top-4 + 1 shared, ×2.5); clamped SwiGLU (10); mHC with 4 streams; one MTP layer (a DSA block).
# 175.7M parameters (198.6M with the MTP layer), 47.5M active without embedding and head (60.1M with them); trained
# at T = 1024 (configs/capstone_h200.toml; its FLOPs per token: benchmarks/bench_capstone.py).
PRESETS["capstone"] = DecoderConfig(
    vocab_size=8192,
    hidden_size=768,
    num_hidden_layers=8,
    num_attention_heads=6,
    head_dim=128,
    intermediate_size=2048,
    max_position_embeddings=2048,
    partial_rotary_factor=0.0,
    layer_types=["kda", "kda", "kda", "dsa"] * 2,
    mtp_layer_type="dsa",
    n_routed_experts=32,
    num_experts_per_tok=4,
    moe_intermediate_size=256,
    n_shared_experts=1,
    first_k_dense_replace=1,
    routed_scaling_factor=2.5,
    swiglu_limit=10.0,
    hc_mult=4,
    num_nextn_predict_layers=1,
    extra=dict(
        q_lora_rank=384,
        kv_lora_rank=256,
        qk_nope_head_dim=128,
        qk_rope_head_dim=0,
        v_head_dim=128,
        latent_norm_eps=1e-5,
        index_n_heads=8,
        index_head_dim=64,
        index_topk=512,
        index_kpool=16,
        linear_num_heads=6,
        linear_head_dim=128,
    ),
)
# Its CPU twin (lesson 09 on 2 cores): the same pattern at d = 128, 4 layers (KDA ×3, DSA), KDA 4 heads × 32, NoPE MLA
# 4 heads (q_lora 64, kv_lora 64, q·k 32, v 32), KPool 8 heads × 32, top-64 in pools of 8; layer 0 dense (384), 3 MoE
# layers of 8 experts of 128 (top-2 + 1 shared); mHC 4 streams; one MTP layer. 1.98M parameters (2.57M with the MTP
# layer), 1.03M active, on the byte vocabulary (the python corpus's BPE replaces it: configs/capstone_cpu.toml).
PRESETS["cpu-capstone"] = dataclasses.replace(
    PRESETS["capstone"],
    vocab_size=BYTE_VOCAB,
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    head_dim=32,
    intermediate_size=384,
    max_position_embeddings=512,
    layer_types=["kda", "kda", "kda", "dsa"],
    n_routed_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=128,
    mlp_layer_types=None,
    extra=dict(
        q_lora_rank=64,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=0,
        v_head_dim=32,
        latent_norm_eps=1e-5,
        index_n_heads=8,
        index_head_dim=32,
        index_topk=64,
        index_kpool=8,
        linear_num_heads=4,
        linear_head_dim=32,
    ),
)


def preset(cls: type, presets: dict, name, overrides: dict[str, Any]):
    """``presets[name]`` (or ``name`` itself, a config to copy) with fields overridden and re-validated."""
    if isinstance(name, cls):
        base = name
    elif name in presets:
        base = presets[name]
    else:
        raise ValueError(f"unknown preset {name!r}; valid names: {', '.join(presets)}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"get_config: unknown fields {unknown}; {cls.__name__} fields are {sorted(known)}")
    if (
        {"num_hidden_layers", "first_k_dense_replace", "n_routed_experts"} & set(overrides)
        and "mlp_layer_types" not in overrides
        and hasattr(base, "mlp_layer_types")
    ):
        overrides = {**overrides, "mlp_layer_types": None}  # re-derived from the new sizes
    if (
        "num_hidden_layers" in overrides
        and "layer_types" not in overrides
        and hasattr(base, "layer_types")
        and len(set(base.layer_types)) == 1
    ):
        overrides = {**overrides, "layer_types": base.layer_types[:1] * overrides["num_hidden_layers"]}  # same mixer
    return dataclasses.replace(base, **overrides)


def get_config(name: str | DecoderConfig, **overrides: Any) -> DecoderConfig:
    """A preset by name (or a config to copy) with fields overridden:
    ``get_config("cpu-small", num_hidden_layers=2)``."""
    return preset(DecoderConfig, PRESETS, name, overrides)


def dense_twin(cfg: DecoderConfig, **overrides: Any) -> DecoderConfig:
    """The dense model with the same attention, norms and vocabulary whose FFN width equals an MoE layer's active
    width ((k + shared)·I), so both spend the same compute per token."""
    return get_config(
        cfg,
        intermediate_size=cfg.active_ffn_width,
        n_routed_experts=0,
        moe_intermediate_size=0,
        n_shared_experts=0,
        first_k_dense_replace=0,
        mlp_layer_types=None,
        num_nextn_predict_layers=0,
        **overrides,
    )
