"""KDA (Kimi Delta Attention) as a token mixer (``"kda"``): the linear-attention layer of GLM-5.3-Flash
(HF ``glm5_next``, ``Glm5NextTextLinearAttention``), the first GLM with linear layers (3 KDA : 1 MLA/DSA).

It is Gated DeltaNet (``gdn.py``, whose short convolution, state, padding and rollback it reuses) with one change
in the recurrence and two in the wrapper:
* the decay is per key channel: H ← Diag(exp(g_t)) H with g_t ∈ R^{d_k}, so each row of the memory fades at its
  own rate (``gated_delta_rule`` with g [B, T, H, d_k]);
* the decay input is a low-rank projection of x, f = f_b_proj(f_a_proj(x)) + dt_bias ([B, T, H·d_k], rank d_k),
  squashed into a bounded log-decay: g = lower · sigmoid(exp(A_log) · f), lower = ``linear_lower_bound`` = −5 (so
  α ≥ e⁻⁵ per step: the "safe gate"); with lower = None, Gated DeltaNet's −exp(A_log) · softplus(f), per channel;
* the output gate is low-rank too and a sigmoid: RMSNorm(o) ⊙ sigmoid(g_b_proj(g_a_proj(x))).
q, k and v have the same H heads of d_k (no grouped values).

Checkpoints: GLM-5.3-Flash stores ``q_proj``, ``k_proj``, ``v_proj`` and one depthwise filter each
(``q_conv1d``, ``k_conv1d``, ``v_conv1d`` [H·d_k, 1, W]); here they are stacked as ``qkv_proj`` and ``conv1d``.
Every other tensor keeps its checkpoint name (``f_a_proj``, ``f_b_proj``, ``dt_bias``, ``A_log``, ``b_proj``,
``g_a_proj``, ``g_b_proj``, ``o_norm``, ``o_proj``; transformers' loader moves the first four under
``forget_gate.``, the files do not).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from glmkit.mixers import register
from glmkit.mixers.gdn import DeltaRuleLayer, mamba_dt_bias_, option_int

_STACKED = ("q", "k", "v")


@register("kda")
class KimiDeltaAttention(DeltaRuleLayer):
    """GLM-5.3-Flash's KDA layer. Option defaults (None) follow the attention shapes: ``num_attention_heads``
    heads of ``head_dim``."""

    options = {
        "linear_num_heads": None,
        "linear_head_dim": None,
        "linear_conv_kernel_dim": 4,
        "linear_lower_bound": -5.0,
    }

    @staticmethod
    def dims(cfg) -> tuple[int, int, int]:
        """(H, d_k = d_v, W) from the config, defaults filled in and checked."""
        H = option_int(cfg, "linear_num_heads", cfg.num_attention_heads, "num_attention_heads")
        D = option_int(cfg, "linear_head_dim", cfg.head_dim, "head_dim")
        return H, D, option_int(cfg, "linear_conv_kernel_dim", 4, "4")

    @staticmethod
    def state_bytes(cfg, seq_len: int, batch_size: int = 1, dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes of one layer's decoding state, the same for every ``seq_len`` (``DeltaRuleLayer.bytes_of_state``;
        GLM-5.3-Flash, one sequence, bf16 conv tail: 64 · 128 · 128 · 4 B = 4 MiB of memory + 144 KiB of tail)."""
        H, D, W = KimiDeltaAttention.dims(cfg)
        return DeltaRuleLayer.bytes_of_state(H, H, D, D, W, batch_size=batch_size, dtype=dtype)

    def __init__(self, cfg, layer_idx: int):
        H, D, W = self.dims(cfg)
        super().__init__(cfg, H, H, D, D, W)
        lower = cfg.opt("linear_lower_bound")
        if lower is not None and (
            isinstance(lower, bool) or not isinstance(lower, (int, float)) or not -math.inf < lower < 0
        ):
            raise ValueError(f"DecoderConfig.linear_lower_bound={lower!r}: must be a finite number < 0 or None")
        self.lower_bound = None if lower is None else float(lower)
        d = cfg.hidden_size
        self.f_a_proj = nn.Linear(d, D, bias=False)
        self.f_b_proj = nn.Linear(D, H * D, bias=False)
        self.dt_bias = nn.Parameter(torch.empty(H * D))
        self.A_log = nn.Parameter(torch.empty(H))
        self.b_proj = nn.Linear(d, H, bias=False)
        self.g_a_proj = nn.Linear(d, D, bias=False)
        self.g_b_proj = nn.Linear(D, H * D, bias=False)
        self.post_init()

    def post_init(self) -> None:
        """As fla and HF: A_log = 0 under the lower bound, else A ~ U(1, 16); dt_bias Mamba's."""
        with torch.no_grad():
            if self.lower_bound is None:
                self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1.0, 16.0).log())
            else:
                self.A_log.zero_()
            mamba_dt_bias_(self.dt_bias)

    def gates(self, x):
        f = (self.f_b_proj(self.f_a_proj(x)).float() + self.dt_bias.float()).unflatten(-1, (self.Hv, self.dk))
        rate = self.A_log.float().exp()[:, None]  # [H, 1]: one rate per head, over its d_k channels
        g = -rate * F.softplus(f) if self.lower_bound is None else self.lower_bound * torch.sigmoid(rate * f)
        return g, self.b_proj(x).sigmoid()

    def output_gate(self, x):
        return torch.sigmoid(self.g_b_proj(self.g_a_proj(x))).unflatten(-1, (self.Hv, self.dv))

    @staticmethod
    def hf_to_ours(sd: dict, cfg) -> dict:
        """GLM-5.3-Flash's checkpoint names → ours: q/k/v projections and filters stacked."""
        stacked = {f"{p}_{kind}.weight" for p in _STACKED for kind in ("proj", "conv1d")}
        out = {k: v for k, v in sd.items() if k not in stacked}
        if "q_proj.weight" in sd:
            out["qkv_proj.weight"] = torch.cat([sd[f"{p}_proj.weight"] for p in _STACKED])
        if "q_conv1d.weight" in sd:
            out["conv1d.weight"] = torch.cat([sd[f"{p}_conv1d.weight"] for p in _STACKED])
        return out

    @staticmethod
    def ours_to_hf(sd: dict, cfg) -> dict:
        out = {k: v for k, v in sd.items() if k not in ("qkv_proj.weight", "conv1d.weight")}
        for ours, theirs in (("qkv_proj.weight", "{}_proj.weight"), ("conv1d.weight", "{}_conv1d.weight")):
            if ours in sd:
                for p, part in zip(_STACKED, sd[ours].chunk(3)):
                    out[theirs.format(p)] = part
        return out
