"""Softmax self-attention as GLM has used it since ChatGLM2: grouped-query heads, bias on q/k/v only, optional
per-head QK-norm, partial RoPE in either pairing. The ``"attention"`` mixer of ``glmkit.models.decoder``.

How it moved along the lineage (config fields in brackets):
* ChatGLM2/3 and GLM-4 (HF ``glm``/``glm4``): "multi-query" attention that is really GQA with 2 KV heads
  [num_key_value_heads], bias on the fused QKV only [attention_bias], RoPE on the first half of each head with
  interleaved pairs [partial_rotary_factor 0.5, rope_interleave True].
* GLM-4.5 (``glm4_moe``): 96 query heads over 8 KV heads, RMSNorm over each head's q and k before RoPE
  [use_qk_norm], the same partial RoPE with half-split pairs and θ = 1e6 [rope_interleave False, rope_theta].
* GLM-2021 uses it too, without rotation (its positions are learned tables added at the input).

State: k and v per layer (``glmkit.cache.KVState``). A prefill runs ``glmkit.ops.attention.attention`` (the
flash-attention kernels on a GPU, with GLM's prefix mask ``sep``); a decode step or a left-padded batch runs the
explicit-mask math ``attention_masked``.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn

from glmkit import backend
from glmkit.cache import KVState
from glmkit.layers import RMSNorm
from glmkit.mixers import Step, register
from glmkit.ops.attention import attention, attention_masked
from glmkit.ops.rope import rope


@register("attention")
class Attention(nn.Module):
    """q/k/v from one fused projection ``qkv_proj`` (rows: q (H·D) | k (H_kv·D) | v (H_kv·D)), ``o_proj``."""

    options: dict = {}

    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.H, self.Hkv, self.D = H, Hkv, D
        self.qkv_proj = nn.Linear(cfg.hidden_size, (H + 2 * Hkv) * D, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(H * D, cfg.hidden_size, bias=False)
        if cfg.use_qk_norm:  # GLM-4.5: over each head's D dims, before RoPE
            self.q_norm, self.k_norm = RMSNorm(D, cfg.rms_norm_eps), RMSNorm(D, cfg.rms_norm_eps)
        self.rotary_dim = int(D * cfg.partial_rotary_factor)  # HF's rule; 0 = no rotation
        if self.rotary_dim % 2:
            raise ValueError(f"rotary dim = int(head_dim {D} · partial_rotary_factor) = {self.rotary_dim} must be even")
        self.pairing = "interleaved" if cfg.rope_interleave else "half"
        self.theta = cfg.rope_theta
        self.scale = 1.0 / math.sqrt(D)

    def new_state(self, batch_size: int, max_len: int, dtype, device) -> KVState:
        return KVState(batch_size, self.Hkv, max_len, self.D, dtype, device)

    @staticmethod
    def state_bytes(cfg, seq_len: int, batch_size: int = 1, dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes of one layer's k/v cache for ``seq_len`` positions: 2 · B · H_kv · T · head_dim · itemsize
        (GLM-4.5, one token, bf16: 2 · 8 · 128 · 2 = 4 KiB; MHA is H_kv = H, MQA H_kv = 1)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * batch_size * cfg.num_key_value_heads * seq_len * cfg.head_dim * itemsize

    def forward(self, x: torch.Tensor, step: Step, state: KVState | None) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.H * self.D, self.Hkv * self.D, self.Hkv * self.D], dim=-1)
        q, k, v = (rearrange(t, "b t (h d) -> b h t d", d=self.D) for t in (q, k, v))
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary_dim:
            cos, sin = step.rope(self.rotary_dim, self.theta)
            q, k = rope(q, k, cos, sin, self.rotary_dim, self.pairing)
        if state is not None:
            k, v = state.append(k, v, step.offset)  # [B, H_kv, L, D]
        if step.visible is None:
            out = attention(q, k.contiguous(), v.contiguous(), step.sep, self.scale)
        else:
            backend.record("attention_decode", "torch")
            out = attention_masked(q, k, v, step.visible, self.scale)
        return self.o_proj(rearrange(out, "b h t d -> b t (h d)"))

    @staticmethod
    def hf_to_ours(sd: dict, cfg) -> dict:
        """HF keeps q, k, v apart; here they are one ``qkv_proj`` (weights and biases stacked in that order)."""
        out = {k: v for k, v in sd.items() if k.split(".")[0] not in ("q_proj", "k_proj", "v_proj")}
        for kind in ("weight", "bias"):
            if f"q_proj.{kind}" in sd:
                out[f"qkv_proj.{kind}"] = torch.cat([sd[f"{p}_proj.{kind}"] for p in "qkv"])
        return out

    @staticmethod
    def ours_to_hf(sd: dict, cfg) -> dict:
        H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        out = {k: v for k, v in sd.items() if not k.startswith("qkv_proj.")}
        for kind in ("weight", "bias"):
            if f"qkv_proj.{kind}" in sd:
                for p, part in zip("qkv", sd[f"qkv_proj.{kind}"].split([H * D, Hkv * D, Hkv * D])):
                    out[f"{p}_proj.{kind}"] = part
        return out
