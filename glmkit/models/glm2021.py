"""GLM-2021: the transformer behind autoregressive blank infilling (Du et al. 2021, arXiv:2103.10360).

What it is
    A decoder-style transformer trained with GLM's objective (``glmkit.blank_infilling``): the input is
    Part A (the text with each sampled span replaced by one mask token) followed by Part B (the spans,
    each fed as ``[START] span`` and predicted as ``span [END]``). One network both reads Part A like an
    encoder and writes Part B like a decoder; the attention mask is what tells the two apart.

How it differs from GPT-2 (its predecessor in this course's lineage)
    * 2D learned positions. GPT-2 adds one learned position embedding. GLM adds two: the *position*
      (row 0 of ``position_ids``: a token's index in Part A; every Part-B token carries the position of
      its span's mask token) and the *block position* (row 1: 0 in Part A, 1, 2, ... inside a span). So
      the model knows *which* blank it is filling and *how far into it* it is, without knowing the
      span's length in advance.
    * The mask. GPT-2 is causal everywhere. GLM's Part A is bidirectional (every Part-A token sees all
      of Part A) and cannot see Part B; Part B sees all of Part A plus its own causal prefix. The mask
      is applied inside ``glmkit.attention.glm_attention`` from the per-sample Part-A length ``sep``.
    * The same pieces otherwise: pre-LN blocks (``LN -> attention -> +residual -> LN -> MLP ->
      +residual``, a final LayerNorm), a GeLU (tanh approximation) MLP of width 4d, and an output head
      tied to the word embedding (logits = h @ E^T), as in GPT-2 and in GLM's code.
    * Scaled init of the residual-output projections (std / sqrt(2 * n_layers)), Megatron's rule that
      GLM's code inherits.

Shapes: B batch, T sequence length (Part A + Part B + padding), H heads, D head dim, d model width,
V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from glmkit.presets import preset
from glmkit.attention import glm_attention

MODEL_TYPE = "glmkit_glm2021"
IGNORE_INDEX = -100  # targets with this value carry no loss (Part A and padding)


# ----------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------
@dataclass
class GLMConfig:
    """Sizes of a GLM-2021 model. ``d_ff`` is the MLP width (4 * d_model in every published GLM).

    ``max_seq_len`` is the longest input (Part A + Part B) the model accepts; the position and
    block-position tables have ``max_seq_len + 1`` rows, as in GLM's code, so block positions may run
    from 0 to ``max_seq_len`` inclusive.
    """

    vocab_size: int
    n_layers: int
    n_heads: int
    d_model: int
    d_ff: int
    max_seq_len: int
    dropout: float = 0.0
    layernorm_eps: float = 1e-5
    init_std: float = 0.02
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layers", "n_heads", "d_model", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"GLMConfig.{name} must be an int, got {type(value).__name__} {value!r}")
            if value <= 0:
                raise ValueError(f"GLMConfig.{name} must be positive, got {value}")
        if self.d_model % self.n_heads != 0:
            raise ValueError(
                f"GLMConfig.n_heads={self.n_heads} must divide d_model={self.d_model} "
                f"(each head gets d_model / n_heads dimensions)"
            )
        if not (0.0 <= float(self.dropout) < 1.0):
            raise ValueError(f"GLMConfig.dropout must be in [0, 1), got {self.dropout}")
        if not float(self.layernorm_eps) > 0:
            raise ValueError(f"GLMConfig.layernorm_eps must be > 0, got {self.layernorm_eps}")
        if not float(self.init_std) > 0:
            raise ValueError(f"GLMConfig.init_std must be > 0, got {self.init_std}")
        if not isinstance(self.tie_word_embeddings, bool):
            raise TypeError(f"GLMConfig.tie_word_embeddings must be a bool, got {self.tie_word_embeddings!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GLMConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"GLMConfig.from_dict: unknown keys {unknown}; known keys are {sorted(known)}")
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.default is dataclasses.MISSING and f.name not in d)
        if missing:
            raise ValueError(f"GLMConfig.from_dict: missing keys {missing}")
        return cls(**dict(d))

    def replace(self, **overrides: Any) -> "GLMConfig":
        return get_config(self, **overrides)


# The byte tokenizer's vocabulary: 256 bytes + GLM's special tokens, checked against
# glmkit.tokenizer.ByteTokenizer().vocab_size in tests/test_model.py.
BYTE_VOCAB = 264

PRESETS: dict[str, GLMConfig] = {
    # Published sizes (arXiv:2103.10360, THUDM/GLM configs). Build them on the meta device to count
    # parameters without allocating: ``with torch.device("meta"): GLMModel(get_config("glm-10b"))``.
    # vocab_size is the tokenizer's (BERT WordPiece for base/large, GPT-2 BPE for 10B); GLM's own
    # checkpoints add their special tokens and round the table up, so their counts differ slightly.
    "glm-base": GLMConfig(vocab_size=30522, n_layers=12, n_heads=12, d_model=768, d_ff=3072,
                          max_seq_len=512, dropout=0.1),
    "glm-large": GLMConfig(vocab_size=30522, n_layers=24, n_heads=16, d_model=1024, d_ff=4096,
                           max_seq_len=512, dropout=0.1),
    "glm-10b": GLMConfig(vocab_size=50257, n_layers=48, n_heads=64, d_model=4096, d_ff=16384,
                         max_seq_len=1024, dropout=0.1),
    # Course presets on the byte tokenizer. cpu-tiny learns to fill blanks visibly within a few
    # minutes on a 2-core CPU (lesson 01; figures in the train module's docstring).
    "cpu-tiny": GLMConfig(vocab_size=BYTE_VOCAB, n_layers=4, n_heads=4, d_model=128, d_ff=512,
                          max_seq_len=256, dropout=0.0),
    # cpu-tiny's shape on the word tokenizer (``glmkit.tokenizer.WordTokenizer.fit`` on the training part
    # of the "stories" corpus: 231 pieces + 9 specials = 240 rows; for another text pass
    # ``vocab_size=tok.vocab_size``). Lesson 01's recipe: seq_len 64 words, batch 16, lr 3e-3,
    # span_prob 0.75. Measured on 2 CPU threads, torch 2.13: ~21 steps/s on free cores (words make
    # sequences ~3.5x shorter than bytes). 2000 steps (~95 s) -> loss 0.77, 28% exact single-word fills
    # on 100 held-out masked words (untrained 0%; always answering the commonest word 7%), 66% of fills
    # ending with [END]; but 3000 steps gave 16% / 35% and span_prob 0.5 or 0.9 gave 14% / 0%: not yet a
    # robust recipe. Fills are often right and then run on, copying the text after the blank.
    "cpu-words": GLMConfig(vocab_size=240, n_layers=4, n_heads=4, d_model=128, d_ff=512,
                           max_seq_len=256, dropout=0.0),
    # A few minutes on one GPU.
    "gpu-small": GLMConfig(vocab_size=BYTE_VOCAB, n_layers=8, n_heads=8, d_model=512, d_ff=2048,
                           max_seq_len=512, dropout=0.0),
}


def get_config(name: str | GLMConfig, **overrides: Any) -> GLMConfig:
    """A preset by name (or a config to copy), with fields overridden: ``get_config("cpu-tiny", n_layers=2)``."""
    return preset(GLMConfig, PRESETS, name, overrides)


# ----------------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head self-attention under the GLM mask: one fused QKV projection, heads split with einops."""

    def __init__(self, cfg: GLMConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor, sep: torch.Tensor) -> torch.Tensor:
        # x [B, T, d] -> q, k, v [B, H, T, D]
        q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.n_heads)
        out = glm_attention(q, k, v, sep)                       # [B, H, T, D]
        return self.proj(rearrange(out, "b h t d -> b t (h d)"))


class MLP(nn.Module):
    """d -> d_ff -> d with GeLU (tanh approximation, as GLM's and GPT-2's code)."""

    def __init__(self, cfg: GLMConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_ff)
        self.fc2 = nn.Linear(cfg.d_ff, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-LN transformer layer: x + Attn(LN(x)), then + MLP(LN(.))."""

    def __init__(self, cfg: GLMConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, eps=cfg.layernorm_eps)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model, eps=cfg.layernorm_eps)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, sep: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), sep))
        return x + self.drop(self.mlp(self.ln2(x)))


class GLMModel(nn.Module):
    """GLM-2021. ``forward(input_ids [B,T], position_ids [B,2,T], sep [B]) -> logits [B,T,V]``."""

    def __init__(self, config: GLMConfig):
        super().__init__()
        if not isinstance(config, GLMConfig):
            raise TypeError(f"GLMModel needs a GLMConfig (see glmkit.models.get_config), got {type(config).__name__}")
        self.config = cfg = config
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        # GLM's tables have max_seq_len + 1 rows: block positions run 1..span_len+1 inside Part B.
        self.position_embeddings = nn.Embedding(cfg.max_seq_len + 1, cfg.d_model)
        self.block_position_embeddings = nn.Embedding(cfg.max_seq_len + 1, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.layernorm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters()
        if cfg.tie_word_embeddings:
            # One tensor, two names: state_dict() lists both, checkpoint.save_pretrained stores it once.
            self.lm_head.weight = self.word_embeddings.weight

    # -- init --------------------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layers)  # residual-output projections
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_out = name.endswith("attn.proj") or name.endswith("mlp.fc2")
                nn.init.normal_(module.weight, mean=0.0, std=out_std if is_out else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    # -- bookkeeping -------------------------------------------------------------------------------
    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of distinct parameters (the tied head counts once)."""
        skip = set()
        if exclude_embeddings:
            skip = {id(self.word_embeddings.weight), id(self.position_embeddings.weight),
                    id(self.block_position_embeddings.weight)}
        return sum(p.numel() for p in self.parameters() if id(p) not in skip)

    @property
    def device(self) -> torch.device:
        return self.word_embeddings.weight.device

    # -- input checks --------------------------------------------------------------------------------
    def _check_inputs(self, input_ids, position_ids, sep):
        cfg = self.config
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor of token ids [B, T], got {type(input_ids).__name__}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be an integer tensor (int64 token ids), got dtype {input_ids.dtype}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape [B, T], got {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if T == 0:
            raise ValueError("input_ids is empty (T = 0): there is nothing to run the model on")
        if T > cfg.max_seq_len:
            raise ValueError(
                f"sequence length {T} is longer than the model allows: max_seq_len = {cfg.max_seq_len} "
                f"(Part A + Part B); shorten the text or use a config with a larger max_seq_len"
            )
        if input_ids.device != self.device:
            raise ValueError(f"input_ids is on {input_ids.device} but the model is on {self.device}")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= cfg.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"input_ids contains token id {bad}, outside [0, vocab_size={cfg.vocab_size})")

        if position_ids is None:  # plain positions 0..T-1, block position 0
            pos = torch.arange(T, device=input_ids.device)
            position_ids = torch.stack([pos, torch.zeros_like(pos)])[None].expand(B, 2, T)
        if not isinstance(position_ids, torch.Tensor):
            raise TypeError(f"position_ids must be a torch.Tensor [B, 2, T], got {type(position_ids).__name__}")
        if position_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"position_ids must be an integer tensor, got dtype {position_ids.dtype}")
        if tuple(position_ids.shape) != (B, 2, T):
            raise ValueError(
                f"position_ids must have shape [B, 2, T] = {(B, 2, T)} (row 0 position, row 1 block position), "
                f"got {tuple(position_ids.shape)}"
            )
        if position_ids.device != self.device:
            raise ValueError(f"position_ids is on {position_ids.device} but the model is on {self.device}")
        plo, phi = int(position_ids.min()), int(position_ids.max())
        if plo < 0 or phi > cfg.max_seq_len:
            raise ValueError(
                f"position_ids must lie in [0, max_seq_len={cfg.max_seq_len}], got values in [{plo}, {phi}]"
            )

        if isinstance(sep, int):
            sep = torch.full((B,), sep, dtype=torch.int64, device=input_ids.device)
        if not isinstance(sep, torch.Tensor):
            raise TypeError(f"sep must be a torch.Tensor [B] of Part-A lengths (or an int), got {type(sep).__name__}")
        if sep.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"sep must be an integer tensor of Part-A lengths, got dtype {sep.dtype}")
        if tuple(sep.shape) != (B,):
            raise ValueError(f"sep must have shape [B] = ({B},), one Part-A length per sample, got {tuple(sep.shape)}")
        if sep.device != self.device:
            raise ValueError(f"sep is on {sep.device} but the model is on {self.device}")
        slo, shi = int(sep.min()), int(sep.max())
        if slo < 0 or shi > T:
            raise ValueError(f"sep (Part-A length) must lie in [0, T={T}], got values in [{slo}, {shi}]")
        return input_ids, position_ids, sep

    # -- forward -------------------------------------------------------------------------------------
    def hidden_states(self, input_ids, position_ids, sep, *, check: bool = True) -> torch.Tensor:
        """The final-LayerNorm output [B, T, d] (logits before the head)."""
        if check:
            input_ids, position_ids, sep = self._check_inputs(input_ids, position_ids, sep)
        x = (self.word_embeddings(input_ids)
             + self.position_embeddings(position_ids[:, 0])
             + self.block_position_embeddings(position_ids[:, 1]))
        x = self.drop(x)
        for layer in self.layers:
            x = layer(x, sep)
        return self.ln_f(x)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None, sep: torch.Tensor | int,
                *, check: bool = True) -> torch.Tensor:
        """input_ids [B, T] int64, position_ids [B, 2, T] int64 (or None: 0..T-1 and block 0),
        sep [B] int64 Part-A lengths (or an int for all) -> logits [B, T, V]."""
        return self.lm_head(self.hidden_states(input_ids, position_ids, sep, check=check))

    def loss(self, batch: Any) -> torch.Tensor:
        """Mean cross entropy over the tokens whose target is not -100 (Part B only), in fp32.

        ``batch``: a ``glmkit.blank_infilling.GLMBatch`` (or anything with ``input_ids``, ``targets``,
        ``position_ids`` and ``sep``, attributes or keys). Only the Part-B rows go through the head.
        """
        get = (lambda k: batch[k]) if isinstance(batch, Mapping) else (lambda k: getattr(batch, k))
        try:
            input_ids, targets, position_ids, sep = (get(k) for k in ("input_ids", "targets", "position_ids", "sep"))
        except (KeyError, AttributeError) as e:
            raise TypeError(f"loss(batch): batch needs input_ids, targets, position_ids and sep ({e})") from None
        if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"batch.targets must be an integer tensor [B, T], got "
                            f"{getattr(targets, 'dtype', type(targets).__name__)}")
        if not isinstance(input_ids, torch.Tensor) or targets.shape != input_ids.shape:
            raise ValueError(f"batch.targets shape {tuple(targets.shape)} must equal input_ids shape "
                             f"{tuple(getattr(input_ids, 'shape', ()))}")
        h = self.hidden_states(input_ids, position_ids, sep)
        keep = targets != IGNORE_INDEX
        if not bool(keep.any()):
            raise ValueError("batch has no Part-B targets (every target is -100): nothing to compute a loss on")
        logits = self.lm_head(h[keep]).float()  # [N, V], N = number of Part-B tokens
        return F.cross_entropy(logits, targets[keep].long())

    def extra_repr(self) -> str:
        c = self.config
        return (f"layers={c.n_layers}, d_model={c.d_model}, heads={c.n_heads}, d_ff={c.d_ff}, "
                f"vocab={c.vocab_size}, max_seq_len={c.max_seq_len}, tied={c.tie_word_embeddings}")
