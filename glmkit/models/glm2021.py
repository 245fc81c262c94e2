"""GLM-2021: the transformer behind autoregressive blank infilling (Du et al. 2021, arXiv:2103.10360), lesson 01.

A decoder-style transformer trained with GLM's objective (``glmkit.data.blank_infilling``): the input is Part A
(the text with each sampled span replaced by one mask token) followed by Part B (the spans, each fed as
``[START] span`` and predicted as ``span [END]``). One network reads Part A like an encoder and writes Part B
like a decoder; the attention mask (``sep`` = the Part-A length) is what tells the two apart.

How it differs from GPT-2, its predecessor in this course's lineage
* 2D learned positions: two tables added to the token embedding, the *position* (row 0 of ``position_ids``: a
  token's index in Part A; every Part-B token carries the position of its span's mask) and the *block position*
  (row 1: 0 in Part A, 1, 2, ... inside a span). The model knows which blank it fills and how far into it it
  is, without knowing the span's length in advance.
* The mask: Part A bidirectional, Part B causal plus all of Part A (``glmkit.ops.attention``).
* Otherwise GPT-2's pieces: pre-LN blocks with LayerNorm, a GeLU (tanh) MLP of width 4d, biases everywhere, the
  output head tied to the word embedding, residual-output projections initialised with std / √(2N).

It is ``glmkit.models.decoder.Decoder`` with its own layers and embedding: the same attention mixer (without
rotation), so the one cache, generator and trainer serve it. What came after it (2D RoPE, DeepNorm, GeGLU) is in
``glmkit.course.lineage``; from ChatGLM2 on, every GLM is a ``DecoderConfig``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from glmkit.mixers.attention import Attention
from glmkit.models.decoder import IGNORE_INDEX, Decoder
from glmkit.models.presets import BYTE_VOCAB, preset


@dataclass
class GLMConfig:
    """Sizes of a GLM-2021 model (HF-style names). The position tables have ``max_position_embeddings + 1`` rows,
    as in GLM's code, so block positions may run from 0 to max_position_embeddings inclusive."""

    vocab_size: int
    num_hidden_layers: int
    num_attention_heads: int
    hidden_size: int
    intermediate_size: int
    max_position_embeddings: int
    dropout: float = 0.0
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    # what the shared attention mixer reads: multi-head, bias on q/k/v, no QK-norm, no rotation
    attention_bias = True
    use_qk_norm = False
    partial_rotary_factor = 0.0
    rope_interleave = True
    rope_theta = 10000.0
    num_experts_per_tok = 0

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "num_hidden_layers",
            "num_attention_heads",
            "hidden_size",
            "intermediate_size",
            "max_position_embeddings",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"GLMConfig.{name} must be a positive int, got {v!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"GLMConfig.num_attention_heads={self.num_attention_heads} must divide hidden_size={self.hidden_size}"
            )
        if not 0.0 <= float(self.dropout) < 1.0 or not self.layer_norm_eps > 0 or not self.initializer_range > 0:
            raise ValueError("GLMConfig: dropout must be in [0, 1), layer_norm_eps and initializer_range > 0")

    num_key_value_heads = property(lambda self: self.num_attention_heads)
    head_dim = property(lambda self: self.hidden_size // self.num_attention_heads)
    rms_norm_eps = property(lambda self: self.layer_norm_eps)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GLMConfig:
        return cls(**{k: v for k, v in d.items() if k != "model_type"})


PRESETS: dict[str, GLMConfig] = {
    # Published sizes (arXiv:2103.10360, THUDM/GLM configs); vocab_size is the tokenizer's (BERT WordPiece for
    # base/large, GPT-2 BPE for 10B). Build them on the meta device to count parameters.
    "glm-base": GLMConfig(30522, 12, 12, 768, 3072, 512, dropout=0.1),
    "glm-large": GLMConfig(30522, 24, 16, 1024, 4096, 512, dropout=0.1),
    "glm-10b": GLMConfig(50257, 48, 64, 4096, 16384, 1024, dropout=0.1),
    # Course presets: bytes (cpu-tiny) and the word tokenizer of the built-in stories (cpu-words: 231 words + 9
    # specials; pass vocab_size=tok.vocab_size for another text). Lesson 01's figures are in its notebook.
    "cpu-tiny": GLMConfig(BYTE_VOCAB, 4, 4, 128, 512, 256),
    "cpu-words": GLMConfig(240, 4, 4, 128, 512, 256),
    "gpu-small": GLMConfig(BYTE_VOCAB, 8, 8, 512, 2048, 512),
}


def get_config(name: str | GLMConfig, **overrides: Any) -> GLMConfig:
    """A preset by name (or a config to copy), fields overridden: ``get_config("cpu-tiny", num_hidden_layers=2)``."""
    return preset(GLMConfig, PRESETS, name, overrides)


class _Attention(Attention):
    """The shared attention mixer with GLM-2021's bias on the output projection too."""

    def __init__(self, cfg: GLMConfig, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.o_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)


class Block(nn.Module):
    """Pre-LN layer: x + Attn(LN(x)), then x + MLP(LN(x)), MLP = down(gelu(up(x)))."""

    def __init__(self, cfg: GLMConfig, layer_idx: int):
        super().__init__()
        self.input_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mixer = _Attention(cfg, layer_idx)
        self.pre_mlp_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = nn.Sequential()
        self.mlp.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.mlp.act = nn.GELU(approximate="tanh")
        self.mlp.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, step, state):
        x = x + self.drop(self.mixer(self.input_norm(x), step, state))
        return x + self.drop(self.mlp(self.pre_mlp_norm(x)))


class GLMModel(Decoder):
    """GLM-2021. ``forward(input_ids [B, T], position_ids [B, 2, T], sep [B]) -> logits [B, T, V]``; position_ids
    None = positions 0..T-1 and block position 0; ``loss(batch)`` averages over Part B only."""

    two_d_positions = True

    def __init__(self, config: GLMConfig):
        nn.Module.__init__(self)
        if not isinstance(config, GLMConfig):
            raise TypeError(
                f"GLMModel needs a GLMConfig (glmkit.models.glm2021.get_config), got {type(config).__name__}"
            )
        self.config = cfg = config
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.pos_embed = nn.Embedding(cfg.max_position_embeddings + 1, cfg.hidden_size)
        self.block_pos_embed = nn.Embedding(cfg.max_position_embeddings + 1, cfg.hidden_size)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.final_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList()
        self.reset_parameters()
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def embed(self, input_ids, position_ids, step):
        if position_ids is None or position_ids.dim() != 3:
            position_ids = torch.stack([step.position_ids, torch.zeros_like(step.position_ids)], dim=1)
        x = self.embed_tokens(input_ids) + self.pos_embed(position_ids[:, 0]) + self.block_pos_embed(position_ids[:, 1])
        return self.drop(x)

    def loss(self, batch) -> torch.Tensor:
        """Mean cross entropy over Part B (targets != -100), in fp32; only the Part-B rows go through the head.
        ``batch``: a ``GLMBatch`` (or anything with input_ids, targets, position_ids and sep)."""
        get = batch.get if isinstance(batch, Mapping) else lambda k: getattr(batch, k, None)
        input_ids, targets = get("input_ids"), get("targets")
        h = self.hidden_states(input_ids, get("position_ids"), get("sep"))
        keep = targets != IGNORE_INDEX
        return F.cross_entropy(self.lm_head(h[keep]).float(), targets[keep].long())

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"layers={c.num_hidden_layers}, d={c.hidden_size}, heads={c.num_attention_heads}, "
            f"ffn={c.intermediate_size}, vocab={c.vocab_size}, max_positions={c.max_position_embeddings}"
        )
