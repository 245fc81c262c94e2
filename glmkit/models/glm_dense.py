"""The dense GLM family as one configurable model: GLM-2021 → ChatGLM-6B → GLM-130B → ChatGLM2/3 → GLM-4 →
GLM-4-9B-0414, each generation a setting of ``GLMDenseConfig`` (facts: shared/reference/glm-lineage.md §1–§3, §9).

What it implements
    ``GLMDenseModel``: token embedding → N blocks (attention + MLP, normalised one of three ways) → final
    norm → LM head. Attention goes through ``glmkit.attention.glm_attention`` for a prefill (the GLM mask:
    ``sep`` = length of the bidirectional prefix, 0 = causal) and through a ``glmkit.kv_cache.KVCache``
    with plain torch math for decoding (and for left-padded batches). ``glmkit.sampling.generate`` drives it.

How each generation differs from its predecessor, and the config fields that say so
    * GLM-2021 (``position="learned2d"``, ``block="pre"``, LayerNorm, GeLU, biases everywhere, tied head):
      pre-LN transformer; two learned position tables (position, block position) added to the tokens.
    * ChatGLM-6B (``position="rope2d"``, ``block="deepnorm"``): positions move into attention. Each head is
      cut in two halves; the first is rotated by the position, the second by the block position
      (half-split pairs inside each half, θ = 1e4). Blocks become DeepNorm (post-LN with the residual
      scaled by α = √(2N)). The MLP stays GeLU. (Its layer-id scaling of q before the softmax is a
      numerically safer rewrite of 1/√D and is not reproduced: the result is the same.)
    * GLM-130B (``position="rope"``, ``partial_rotary_factor=1``, ``rope_pairing="half"``, ``activation="geglu"``):
      1D RoPE over the whole head, DeepNorm, GeGLU (``x1 · gelu(x2)``).
    * ChatGLM2/3 (``position="rope"``, ``partial_rotary_factor=0.5``, ``rope_pairing="interleaved"``,
      ``block="pre"``, RMSNorm, SwiGLU, ``n_kv_heads=2``): back to pre-norm, now RMSNorm; "multi-query"
      attention that is really GQA with 2 KV heads; bias on the fused QKV only; RoPE on the first half
      of each head with interleaved pairs; the prefix-LM mask gives way to a plain causal mask; untied head.
    * GLM-4 / GLM-4-9B (HF ``glm``): the ChatGLM2 block at 40 layers and a 151552 vocabulary, RMSNorm eps
      1.5625e-7.
    * GLM-4-9B-0414 (HF ``glm4``, ``block="sandwich"``): four RMSNorms per layer — the attention and MLP
      outputs are normalised too before they join the residual:
      ``h = x + post_attn_norm(Attn(input_norm(x)))``, ``y = h + post_mlp_norm(MLP(pre_mlp_norm(h)))``.
    * (GLM-4.5, next lesson: ``qk_norm=True`` and ``rope_pairing="half"`` on the same partial RoPE, θ = 1e6.)

Parameter names follow the pieces: ``embed_tokens``, ``layers.i.{input_norm, attn.qkv_proj, attn.o_proj,
attn.q_norm, attn.k_norm, post_attn_norm, pre_mlp_norm, mlp.gate_up_proj|up_proj, mlp.down_proj,
post_mlp_norm}``, ``final_norm``, ``lm_head``. ``glmkit.hf`` maps them to Hugging Face names (HF keeps
q/k/v separate; here they are one fused ``qkv_proj`` whose rows are ``[q (H·D) | k (H_kv·D) | v (H_kv·D)]``).

Shapes: B batch, T new tokens, L keys (cached + new), H query heads, H_kv key/value heads, D head dim,
d hidden size, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from einops import rearrange
from torch import nn

from glmkit import backend
from glmkit.presets import preset
from glmkit.attention import glm_attention
from glmkit.kv_cache import KVCache
from glmkit.mlp import MLP
from glmkit.norms import RMSNorm
from glmkit.rope import apply_rope_2d, apply_rope_qk, rope_cos_sin

MODEL_TYPE = "glmkit_glm_dense"
POSITIONS = ("learned2d", "rope2d", "rope")
BLOCKS = ("pre", "deepnorm", "sandwich")
NORMS = ("rmsnorm", "layernorm")
ACTIVATIONS = ("gelu", "geglu", "swiglu")
PAIRINGS = ("interleaved", "half")


# ----------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------
@dataclass
class GLMDenseConfig:
    """Every knob of the dense GLM family. Defaults are the ChatGLM2 / GLM-4 block.

    Sizes: ``n_kv_heads`` defaults to ``n_heads`` (MHA); 1 is MQA, anything dividing ``n_heads`` GQA.
    ``head_dim`` defaults to ``hidden_size // n_heads`` (GLM-4 sets it explicitly: 128).
    ``vocab_size`` is the number of real tokens (the logits' width); the embedding and head tables have
    ``padded_vocab_size`` rows (rounded up to ``pad_vocab_multiple``, for tensor-core friendly shapes; the
    extra rows are never predicted).
    ``attn_scale`` None means 1/√head_dim. ``rotary_dim`` = int(head_dim · partial_rotary_factor) (HF's rule).
    """

    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    intermediate_size: int
    n_kv_heads: int | None = None
    head_dim: int | None = None
    max_seq_len: int = 2048
    # attention
    qkv_bias: bool = True
    o_bias: bool = False
    qk_norm: bool = False
    attn_scale: float | None = None
    # positions
    position: str = "rope"
    partial_rotary_factor: float = 0.5
    rope_pairing: str = "interleaved"
    rope_theta: float = 10000.0
    # block
    block: str = "pre"
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    activation: str = "swiglu"
    mlp_bias: bool = False
    # embeddings / head
    tie_word_embeddings: bool = False
    pad_vocab_multiple: int = 1
    # training
    init_std: float = 0.02
    dropout: float = 0.0
    # token ids a checkpoint carries (generation stops on eos; padding uses pad)
    pad_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        ints = ("vocab_size", "hidden_size", "n_layers", "n_heads", "intermediate_size", "n_kv_heads",
                "max_seq_len", "pad_vocab_multiple")
        for name in ints + (("head_dim",) if self.head_dim is not None else ()):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"GLMDenseConfig.{name} must be an int, got {type(value).__name__} {value!r}")
            if value <= 0:
                raise ValueError(f"GLMDenseConfig.{name} must be positive, got {value}")
        if self.head_dim is None:
            if self.hidden_size % self.n_heads:
                raise ValueError(
                    f"GLMDenseConfig: n_heads={self.n_heads} does not divide hidden_size={self.hidden_size}; "
                    f"either choose heads that divide it or set head_dim explicitly (GLM-4 sets head_dim=128)"
                )
            self.head_dim = self.hidden_size // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"GLMDenseConfig: n_kv_heads={self.n_kv_heads} does not divide n_heads={self.n_heads} "
                f"(grouped-query attention shares each k/v head among n_heads / n_kv_heads query heads)"
            )
        for name, value, allowed in (("position", self.position, POSITIONS), ("block", self.block, BLOCKS),
                                     ("norm", self.norm, NORMS), ("activation", self.activation, ACTIVATIONS),
                                     ("rope_pairing", self.rope_pairing, PAIRINGS)):
            if value not in allowed:
                raise ValueError(f"GLMDenseConfig.{name}={value!r} is not one of {allowed}")
        if self.position == "rope":
            f = self.partial_rotary_factor
            if not (isinstance(f, (int, float)) and 0 < f <= 1):
                raise ValueError(f"GLMDenseConfig.partial_rotary_factor must be in (0, 1], got {f!r}")
            if self.rotary_dim % 2 or self.rotary_dim == 0:
                raise ValueError(
                    f"GLMDenseConfig: rotary_dim = int(head_dim {self.head_dim} × partial_rotary_factor {f}) = "
                    f"{self.rotary_dim} must be even and > 0 (RoPE rotates pairs of dimensions)"
                )
        if self.position == "rope2d" and self.head_dim % 4:
            raise ValueError(f"GLMDenseConfig: position='rope2d' needs head_dim divisible by 4 (two rotated halves "
                             f"of pairs), got head_dim={self.head_dim}")
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0):
            raise ValueError(f"GLMDenseConfig.rope_theta must be positive, got {self.rope_theta!r}")
        if self.block == "sandwich" and self.norm != "rmsnorm":
            raise ValueError("GLMDenseConfig: block='sandwich' (GLM-4-0414) is defined with norm='rmsnorm'")
        if not (isinstance(self.norm_eps, (int, float)) and self.norm_eps > 0):
            raise ValueError(f"GLMDenseConfig.norm_eps must be > 0, got {self.norm_eps!r}")
        if self.attn_scale is not None and not (isinstance(self.attn_scale, (int, float)) and self.attn_scale > 0):
            raise ValueError(f"GLMDenseConfig.attn_scale must be None or a positive number, got {self.attn_scale!r}")
        if not (0.0 <= float(self.dropout) < 1.0):
            raise ValueError(f"GLMDenseConfig.dropout must be in [0, 1), got {self.dropout}")
        if not float(self.init_std) > 0:
            raise ValueError(f"GLMDenseConfig.init_std must be > 0, got {self.init_std}")
        self.eos_token_ids = tuple(int(t) for t in (self.eos_token_ids or ()))
        for name in ("pad_token_id", "bos_token_id"):
            t = getattr(self, name)
            if t is not None and not (0 <= int(t) < self.vocab_size):
                raise ValueError(f"GLMDenseConfig.{name}={t} is outside the vocabulary [0, {self.vocab_size})")
        for t in self.eos_token_ids:
            if not 0 <= t < self.vocab_size:
                raise ValueError(f"GLMDenseConfig.eos_token_ids contains {t}, outside [0, {self.vocab_size})")

    @property
    def rotary_dim(self) -> int:
        """Dims of each head that RoPE rotates ("rope": head_dim · factor; "rope2d": all; "learned2d": 0)."""
        if self.position == "rope":
            return int(self.head_dim * self.partial_rotary_factor)
        return self.head_dim if self.position == "rope2d" else 0

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_multiple
        return -(-self.vocab_size // m) * m

    @property
    def deepnorm_alpha(self) -> float:
        """DeepNorm's residual scale α = √(2N) (GLM-130B, ChatGLM-6B)."""
        return math.sqrt(2 * self.n_layers)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d


# Published sizes the presets are checked against (tests/test_glm_dense.py, within 1 %):
#   chatglm2-6b    6,243,584,032 parameters: THUDM/chatglm2-6b pytorch_model.bin.index.json "total_size"
#                  12,487,168,064 bytes in fp16 (that total includes 32 entries of a stored rotary
#                  inv_freq buffer, which is not a parameter; our count, 6,243,584,000, has no buffer).
#   glm-4-9b       "9.4B params": the Hugging Face model card of THUDM/glm-4-9b-chat-hf (safetensors count).
#   glm-4-9b-0414  "9.4B params": the Hugging Face model card of THUDM/GLM-4-9B-0414 (safetensors count);
#                  the sandwich norms add only 2 · 4096 · 40 = 327,680 parameters over glm-4-9b.
PUBLISHED_PARAMS = {"chatglm2-6b": 6_243_584_032, "glm-4-9b": 9.4e9, "glm-4-9b-0414": 9.4e9}

_BYTE_VOCAB = 264  # glmkit.tokenizer.ByteTokenizer().vocab_size (bytes + GLM specials)

PRESETS: dict[str, GLMDenseConfig] = {
    # ChatGLM2-6B (HF remote code config: 28 layers, 4096, 32 heads, multi_query_group_num=2, kv_channels=128,
    # ffn 13696, padded_vocab_size 65024, RMSNorm 1e-5, add_qkv_bias, untied output_layer, seq_length 32768).
    "chatglm2-6b": GLMDenseConfig(vocab_size=65024, hidden_size=4096, n_layers=28, n_heads=32, n_kv_heads=2,
                                  head_dim=128, intermediate_size=13696, max_seq_len=32768, qkv_bias=True,
                                  position="rope", partial_rotary_factor=0.5, rope_pairing="interleaved",
                                  block="pre", norm="rmsnorm", norm_eps=1e-5, activation="swiglu",
                                  eos_token_ids=(2,), pad_token_id=0),
    # GLM-4-9B (HF `glm`, GlmConfig defaults = THUDM/glm-4-9b-chat-hf).
    "glm-4-9b": GLMDenseConfig(vocab_size=151552, hidden_size=4096, n_layers=40, n_heads=32, n_kv_heads=2,
                               head_dim=128, intermediate_size=13696, max_seq_len=131072, qkv_bias=True,
                               position="rope", partial_rotary_factor=0.5, rope_pairing="interleaved",
                               block="pre", norm="rmsnorm", norm_eps=1.5625e-07, activation="swiglu",
                               pad_token_id=151329, eos_token_ids=(151329, 151336, 151338)),
    # GLM-4-9B-0414 (HF `glm4`): the same shapes with sandwich norms, eps 1e-5, 32K positions.
    "glm-4-9b-0414": GLMDenseConfig(vocab_size=151552, hidden_size=4096, n_layers=40, n_heads=32, n_kv_heads=2,
                                    head_dim=128, intermediate_size=13696, max_seq_len=32768, qkv_bias=True,
                                    position="rope", partial_rotary_factor=0.5, rope_pairing="interleaved",
                                    block="sandwich", norm="rmsnorm", norm_eps=1e-5, activation="swiglu",
                                    pad_token_id=151329, eos_token_ids=(151329, 151336, 151338)),
    # A GLM-4-0414-style model that trains in minutes on a 2-core CPU with the byte tokenizer (~0.8M params).
    "cpu-small": GLMDenseConfig(vocab_size=_BYTE_VOCAB, hidden_size=128, n_layers=4, n_heads=4, n_kv_heads=2,
                                head_dim=32, intermediate_size=352, max_seq_len=256, block="sandwich",
                                tie_word_embeddings=True),
    # The same style for one GPU (~23M params), sized for the Triton kernels (D = 64).
    "gpu-small": GLMDenseConfig(vocab_size=_BYTE_VOCAB, hidden_size=512, n_layers=8, n_heads=8, n_kv_heads=2,
                                head_dim=64, intermediate_size=1408, max_seq_len=1024, block="sandwich",
                                tie_word_embeddings=True),
}


def get_config(name: str | GLMDenseConfig, **overrides: Any) -> GLMDenseConfig:
    """A preset by name (or a config to copy), with fields overridden: ``get_config("cpu-small", n_layers=2)``."""
    return preset(GLMDenseConfig, PRESETS, name, overrides)


# ----------------------------------------------------------------------------------------------------
# Pieces
# ----------------------------------------------------------------------------------------------------
def count_distinct(params, skip: set[int]) -> int:
    """Elements of the distinct tensors in ``params`` (a tied tensor counts once), leaving out ids in ``skip``."""
    seen, total = set(skip), 0
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def _make_norm(cfg: GLMDenseConfig, size: int | None = None) -> nn.Module:
    size = cfg.hidden_size if size is None else size
    if cfg.norm == "rmsnorm":
        return RMSNorm(size, eps=cfg.norm_eps)
    return nn.LayerNorm(size, eps=cfg.norm_eps)


def attention_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Attention with an explicit mask, written out (the decode path and left-padded batches).

    q [B, H, Tq, D], k/v [B, H_kv, L, D], visible [B, Tq, L] bool (True = may attend) → [B, H, Tq, D].
    Scores and softmax in fp32; query head h reads k/v head h // (H / H_kv).
    """
    Hkv = k.shape[1]
    qg = rearrange(q.float(), "b (hkv g) t d -> b hkv g t d", hkv=Hkv)  # group query heads by their k/v head
    scores = torch.einsum("bkgtd,bkld->bkgtl", qg, k.float()) * scale
    scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bkgtl,bkld->bkgtd", probs, v.float())
    return rearrange(out, "b hkv g t d -> b (hkv g) t d").to(q.dtype)


class Attention(nn.Module):
    """Self-attention with MHA/MQA/GQA, a fused QKV projection (bias optional), optional per-head QK-norm
    before RoPE, RoPE (1D partial in either pairing, or ChatGLM-6B's 2D) and an output projection."""

    def __init__(self, cfg: GLMDenseConfig, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        H, Hkv, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, (H + 2 * Hkv) * D, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(H * D, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:  # GLM-4.5: RMSNorm over each head's D dims, before RoPE
            self.q_norm = _make_norm(cfg, D)
            self.k_norm = _make_norm(cfg, D)
        self.scale = cfg.attn_scale if cfg.attn_scale is not None else 1.0 / math.sqrt(D)

    def forward(self, x: torch.Tensor, rope: tuple, ctx: "_StepContext") -> torch.Tensor:
        cfg = self.cfg
        H, Hkv, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        qkv = self.qkv_proj(x)                                            # [B, T, (H + 2 H_kv) D]
        q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
        q = rearrange(q, "b t (h d) -> b h t d", d=D)
        k = rearrange(k, "b t (h d) -> b h t d", d=D)
        v = rearrange(v, "b t (h d) -> b h t d", d=D)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if cfg.position == "rope":
            cos, sin = rope
            q, k = apply_rope_qk(q, k, cos, sin, cfg.rotary_dim, cfg.rope_pairing)
        elif cfg.position == "rope2d":
            q, k = apply_rope_2d(q, *rope), apply_rope_2d(k, *rope)
        if ctx.cache is not None:
            k, v = ctx.cache.write(self.layer_idx, k, v)                  # [B, H_kv, L, D]
        if ctx.visible is None:   # prefill without padding: the GLM-mask attention kernel / SDPA
            out = glm_attention(q, k.contiguous(), v.contiguous(), ctx.sep, scale=self.scale)
        else:                     # decode step or padded batch: explicit mask
            backend.record("attention_decode", "torch")
            out = attention_masked(q, k, v, ctx.visible, self.scale)
        return self.o_proj(rearrange(out, "b h t d -> b t (h d)"))


class Block(nn.Module):
    """One layer, normalised as ``cfg.block`` says:

    pre       h = x + Attn(n_in(x));              y = h + MLP(n_mlp(h))
    deepnorm  a = n_in(x); h = α·a + Attn(a);    m = n_mlp(h); y = α·m + MLP(m)      (α = √(2N), post-LN)
    sandwich  h = x + n_post_attn(Attn(n_in(x)));  y = h + n_post_mlp(MLP(n_mlp(h)))
    """

    def __init__(self, cfg: GLMDenseConfig, layer_idx: int):
        super().__init__()
        self.cfg = cfg
        self.input_norm = _make_norm(cfg)
        self.attn = Attention(cfg, layer_idx)
        self.pre_mlp_norm = _make_norm(cfg)
        self.mlp = self.make_ffn(cfg, layer_idx)
        if cfg.block == "sandwich":
            self.post_attn_norm = _make_norm(cfg)
            self.post_mlp_norm = _make_norm(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.alpha = cfg.deepnorm_alpha

    def make_ffn(self, cfg: GLMDenseConfig, layer_idx: int) -> nn.Module:
        """The feed-forward network of this layer (the MoE model overrides this)."""
        return MLP(cfg.hidden_size, cfg.intermediate_size, cfg.activation, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor, rope: tuple, ctx: "_StepContext") -> torch.Tensor:
        block = self.cfg.block
        if block == "deepnorm":
            a = self.input_norm(x)
            h = self.alpha * a + self.drop(self.attn(a, rope, ctx))
            m = self.pre_mlp_norm(h)
            return self.alpha * m + self.drop(self.mlp(m))
        if block == "sandwich":
            h = x + self.drop(self.post_attn_norm(self.attn(self.input_norm(x), rope, ctx)))
            return h + self.drop(self.post_mlp_norm(self.mlp(self.pre_mlp_norm(h))))
        h = x + self.drop(self.attn(self.input_norm(x), rope, ctx))
        return h + self.drop(self.mlp(self.pre_mlp_norm(h)))


@dataclass
class _StepContext:
    """What every layer's attention needs for one forward call."""

    cache: KVCache | None
    sep: torch.Tensor | None        # [B] prefix lengths for glm_attention (prefill path)
    visible: torch.Tensor | None    # [B, T, L] explicit mask (decode / padded path), or None


# ----------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------
class GLMDenseModel(nn.Module):
    """A dense GLM of any generation. ``forward(input_ids [B, T], position_ids=None, sep=None,
    attention_mask=None, cache=None) -> logits [B, T, vocab_size]``; ``new_cache(B, max_len)`` for decoding."""

    block_class = Block  # the layer type (the MoE model plugs in its own)
    config_class = GLMDenseConfig

    def __init__(self, config: GLMDenseConfig):
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__} (see get_config), "
                            f"got {type(config).__name__}")
        self.config = cfg = config
        V = cfg.padded_vocab_size
        self.embed_tokens = nn.Embedding(V, cfg.hidden_size)
        if cfg.position == "learned2d":
            # max_seq_len + 1 rows, as GLM-2021: block positions run 1..span_len + 1 inside Part B.
            self.pos_embed = nn.Embedding(cfg.max_seq_len + 1, cfg.hidden_size)
            self.block_pos_embed = nn.Embedding(cfg.max_seq_len + 1, cfg.hidden_size)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(self.block_class(cfg, i) for i in range(cfg.n_layers))
        self.final_norm = _make_norm(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, V, bias=False)
        self.reset_parameters()
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    # -- init --------------------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """Normal(0, init_std) for weights, zeros for biases, ones for norm scales. Residual-output
        projections (o_proj, down_proj) get std / √(2N) (pre/sandwich: Megatron's rule) or, for DeepNorm,
        the β = (2N)^(-1/2) scaling of GLM-130B on the value and output projections and the MLP."""
        cfg = self.config
        std = cfg.init_std
        beta = (2 * cfg.n_layers) ** -0.5
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_out = name.endswith("o_proj") or name.endswith("down_proj")
                s = std
                if cfg.block == "deepnorm" and (is_out or ".mlp." in name):
                    s = std * beta
                elif is_out:
                    s = std / math.sqrt(2 * cfg.n_layers)
                nn.init.normal_(module.weight, mean=0.0, std=s)
                if cfg.block == "deepnorm" and name.endswith("qkv_proj"):
                    qk_rows = (cfg.n_heads + cfg.n_kv_heads) * cfg.head_dim
                    with torch.no_grad():
                        module.weight[qk_rows:].mul_(beta)  # the v rows
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    # -- bookkeeping -------------------------------------------------------------------------------
    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Distinct parameters (a tied head counts once)."""
        return count_distinct(self.parameters(), {id(self.embed_tokens.weight)} if exclude_embeddings else set())

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        """An empty ``KVCache`` for this model: k/v [B, H_kv, max_len, D] per layer (default max_len: max_seq_len)."""
        cfg = self.config
        return KVCache(cfg.n_layers, batch_size, cfg.n_kv_heads, cfg.head_dim,
                       cfg.max_seq_len if max_len is None else max_len,
                       dtype=dtype or self.dtype, device=self.device)

    # -- input checks --------------------------------------------------------------------------------
    def _check(self, input_ids, position_ids, sep, attention_mask, cache):
        cfg = self.config
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be an integer tensor [B, T], got "
                            f"{getattr(input_ids, 'dtype', type(input_ids).__name__)}")
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must have shape [B, T] with T >= 1, got {tuple(input_ids.shape)}")
        if input_ids.device != self.device:
            raise ValueError(f"input_ids is on {input_ids.device} but the model is on {self.device}")
        B, T = input_ids.shape
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= cfg.vocab_size:
            raise ValueError(f"input_ids contains token id {lo if lo < 0 else hi}, outside [0, vocab_size={cfg.vocab_size})")
        offset = 0
        if cache is not None:
            if not isinstance(cache, KVCache):
                raise TypeError(f"cache must be a glmkit.kv_cache.KVCache (model.new_cache), got {type(cache).__name__}")
            if cache.batch_size != B or cache.n_layers != cfg.n_layers or cache.n_kv_heads != cfg.n_kv_heads \
                    or cache.head_dim != cfg.head_dim:
                raise ValueError(f"cache {cache!r} does not fit this model/batch (B={B}, layers={cfg.n_layers}, "
                                 f"H_kv={cfg.n_kv_heads}, D={cfg.head_dim})")
            offset = cache.length
        two_d = cfg.position in ("learned2d", "rope2d")
        if position_ids is None:
            pos = torch.arange(offset, offset + T, device=input_ids.device)[None].expand(B, T)
            position_ids = torch.stack([pos, torch.zeros_like(pos)], dim=1) if two_d else pos
        if not isinstance(position_ids, torch.Tensor) or position_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError("position_ids must be an integer tensor")
        if two_d:
            if tuple(position_ids.shape) != (B, 2, T):
                raise ValueError(f"position_ids must be [B, 2, T] = {(B, 2, T)} for position={cfg.position!r} "
                                 f"(row 0 position, row 1 block position), got {tuple(position_ids.shape)}")
        else:
            if position_ids.dim() == 1:
                position_ids = position_ids[None].expand(B, T)
            if tuple(position_ids.shape) != (B, T):
                raise ValueError(f"position_ids must be [B, T] = {(B, T)} or [T] for position='rope', "
                                 f"got {tuple(position_ids.shape)}")
        position_ids = position_ids.to(self.device)
        if cfg.position == "learned2d" and (int(position_ids.min()) < 0 or int(position_ids.max()) > cfg.max_seq_len):
            raise ValueError(f"position_ids must lie in [0, max_seq_len={cfg.max_seq_len}] for learned positions")
        if sep is None:
            sep = 0
        if isinstance(sep, int):
            sep = torch.full((B,), sep, dtype=torch.int64, device=self.device)
        if not isinstance(sep, torch.Tensor) or sep.dtype not in (torch.int64, torch.int32) or tuple(sep.shape) != (B,):
            raise ValueError("sep must be an int or an integer tensor [B] of prefix lengths")
        sep = sep.to(self.device)
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (B, T):
                raise ValueError(f"attention_mask must be a [B, T] = {(B, T)} tensor (1/True = real token, "
                                 f"0/False = padding), got {tuple(getattr(attention_mask, 'shape', ()))}")
            attention_mask = attention_mask.to(device=self.device, dtype=torch.bool)
        return position_ids, sep, attention_mask, offset

    # -- forward -------------------------------------------------------------------------------------
    def _rope(self, position_ids: torch.Tensor):
        cfg = self.config
        if cfg.position == "rope":
            return rope_cos_sin(position_ids, cfg.rotary_dim, cfg.rope_theta)          # [B, T, R/2] each
        if cfg.position == "rope2d":
            half = cfg.head_dim // 2
            return (*rope_cos_sin(position_ids[:, 0], half, cfg.rope_theta),
                    *rope_cos_sin(position_ids[:, 1], half, cfg.rope_theta))
        return ()

    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                      sep: torch.Tensor | int | None = None, attention_mask: torch.Tensor | None = None,
                      cache: KVCache | None = None) -> torch.Tensor:
        """The final-norm output [B, T, d]. See ``forward`` for the arguments."""
        cfg = self.config
        position_ids, sep, attention_mask, offset = self._check(input_ids, position_ids, sep, attention_mask, cache)
        B, T = input_ids.shape
        x = self.embed_tokens(input_ids)
        if cfg.position == "learned2d":
            x = x + self.pos_embed(position_ids[:, 0]) + self.block_pos_embed(position_ids[:, 1])
        x = self.drop(x)
        L = offset + T
        if int(sep.min()) < 0 or int(sep.max()) > L:
            raise ValueError(f"sep (prefix length) must lie in [0, {L}], got [{int(sep.min())}, {int(sep.max())}]")
        padded = attention_mask is not None and not bool(attention_mask.all())
        if cache is not None:
            cache.set_valid(attention_mask, T)
        visible = None
        if offset > 0 or padded:
            # Query t sits at absolute index offset + t. Key j is visible iff it is in the prefix (j < sep) or
            # not in the future (j <= i), and is a real token; a query always sees itself (so padding rows
            # never softmax over nothing).
            i = torch.arange(offset, L, device=self.device)[:, None]
            j = torch.arange(L, device=self.device)[None, :]
            visible = (j <= i)[None] | (j[None] < sep[:, None, None])                         # [B, T, L]
            keys = cache.valid[:, :L] if cache is not None else attention_mask
            visible = (visible & keys[:, None, :]) | (j == i)[None]
        elif int(sep.max()) > T:
            raise ValueError(f"sep must lie in [0, T={T}] for a prefill, got max {int(sep.max())}")
        ctx = _StepContext(cache=cache, sep=sep, visible=visible)
        rope = self._rope(position_ids)
        for layer in self.layers:
            x = layer(x, rope, ctx)
        if cache is not None:
            cache.advance(T)
        return self.final_norm(x)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                sep: torch.Tensor | int | None = None, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """input_ids [B, T] → logits [B, T, vocab_size].

        position_ids: [B, T] or [T] (``position="rope"``) or [B, 2, T] (2D: position, block position); None =
            ``cache.length + arange(T)`` (block position 0).
        sep: int or [B] — the first ``sep`` positions (absolute, counting cached ones) attend bidirectionally
            (GLM's Part A / ChatGLM-6B's prompt); 0 or None = causal.
        attention_mask: [B, T] 1/True for real tokens, 0/False for (left) padding; stored in the cache so
            later steps ignore padded keys.
        cache: a ``KVCache`` (``new_cache``): the chunk's keys/values are appended and attention covers the
            cached positions too. An empty cache with no padding still runs the prefill through
            ``glm_attention`` (the kernel on CUDA); later chunks use plain torch math.
        """
        logits = self.lm_head(self.hidden_states(input_ids, position_ids, sep, attention_mask, cache))
        return logits[..., : self.config.vocab_size] if self.config.padded_vocab_size != self.config.vocab_size \
            else logits

    def loss(self, input_ids: torch.Tensor, targets: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Mean next-token cross entropy (fp32) over targets != -100; ``targets`` [B, T] aligned with the
        logits (shift them yourself: targets[:, t] is the token after input_ids[:, t])."""
        logits = self.forward(input_ids, **kwargs).float()
        return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten().long(), ignore_index=-100)

    def extra_repr(self) -> str:
        c = self.config
        return (f"layers={c.n_layers}, d={c.hidden_size}, heads={c.n_heads}/{c.n_kv_heads} kv, D={c.head_dim}, "
                f"ffn={c.intermediate_size} {c.activation}, {c.position} "
                f"(rotary_dim={c.rotary_dim}, {c.rope_pairing}), block={c.block}, norm={c.norm}, "
                f"vocab={c.vocab_size}, tied={c.tie_word_embeddings}")
