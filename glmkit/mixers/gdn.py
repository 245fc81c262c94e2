"""Gated DeltaNet as a token mixer (``"gdn"``): the layer Qwen3-Next ships around the gated delta rule, and the
state every delta-rule layer keeps for decoding (``DeltaRuleState``; KDA in ``kda.py`` reuses both).

Its predecessor is softmax attention (``attention.py``), whose state is a KV cache that grows with every token.
Here each head keeps one matrix H ∈ R^{d_k×d_v} instead, written by the gated delta rule (``glmkit.ops.delta_rule``:
the recurrence, its chunked form and the kernels). The layer around it, as Qwen3-Next (``Qwen3NextGatedDeltaNet``)
and fla's ``GatedDeltaNet`` build it (glm-lineage §6.3):

    q, k, v = split(qkv_proj(x))                            H_k key heads of d_k, H_v value heads of d_v
    q, k, v = SiLU(causal depthwise conv of width W = 4)    the "short convolution": a few tokens of local context
    q, k    = q / ‖q‖, k / ‖k‖                              (eps 1e-6): the write strength is β alone
    β       = sigmoid(b_proj(x))                            [B, T, H_v]
    g       = −exp(A_log) · softplus(a_proj(x) + dt_bias)   [B, T, H_v], the log-decay (Mamba's parameterisation)
    o       = gated_delta_rule(q, k, v, g, β)               each key head serves H_v / H_k value heads
    y       = o_proj( RMSNorm(o) ⊙ SiLU(z_proj(x)) )        the output gate, per value head

The recurrence is causal: GLM's bidirectional prefix (``sep``) does not apply to these layers.

State (``DeltaRuleState``): the recurrent H of every head [B, H_v, d_k, d_v] in fp32 and the conv tail (the last
W−1 inputs of the convolution). Training and prefill run ``gated_delta_rule`` (the chunked kernels on the triton
backend); a forward of at most 64 tokens against a state runs the recurrent step ``gated_delta_rule_step``
(fla's rule). Left padding: a padded position enters with zero input, no decay (g = 0) and no write (β = 0), so
the state passes through it unchanged. Rollback (speculative decoding): with ``Step.max_rollback = m`` the state
keeps a copy of itself from before each of the last m tokens, and ``rollback(n)`` restores the one n tokens back.

Checkpoints: Qwen3-Next fuses q, k, v, z into ``in_proj_qkvz`` and b, a into ``in_proj_ba``, grouped by key head
(rows [q_i k_i v_i z_i] for key head i, its H_v/H_k value heads together); here they are separate projections
with q | k | v stacked in ``qkv_proj`` (the channel order the convolution sees in both). The hooks regroup rows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from glmkit.layers import RMSNorm
from glmkit.mixers import Step, register
from glmkit.ops.delta_rule import gated_delta_rule, gated_delta_rule_step

DECODE_MAX_TOKENS = 64  # a forward against a state of at most this many tokens runs the recurrent step
L2_EPS = 1e-6  # x / sqrt(Σx² + eps), fla's and HF's l2norm


def l2norm(x: torch.Tensor) -> torch.Tensor:
    """x / sqrt(Σ x² + 1e-6) over the last dim, computed in fp32, in x's dtype."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).sum(-1, keepdim=True) + L2_EPS)).to(x.dtype)


def real_tokens(step: Step, T: int) -> torch.Tensor | None:
    """[B, T] True where this forward's tokens are real (None: all are). Batches are left-padded, so a row's last
    token is real and the last query row of ``step.visible`` shows which keys are."""
    return None if step.visible is None else step.visible[:, -1, step.offset : step.offset + T]


def mamba_dt_bias_(p: torch.Tensor, dt_min: float = 1e-3, dt_max: float = 0.1, floor: float = 1e-4) -> None:
    """Fill ``p`` with softplus⁻¹(dt), dt log-uniform in [dt_min, dt_max] (Mamba's init; fla and HF use it)."""
    dt = torch.exp(torch.rand_like(p) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp_min(floor)
    p.copy_(dt + torch.log(-torch.expm1(-dt)))


class ShortConv(nn.Module):
    """Causal depthwise convolution over time, then SiLU: channel c at token t mixes its own inputs at tokens
    t−W+1 … t. ``weight`` [C, 1, W] is ``nn.Conv1d``'s layout, as the checkpoints store it."""

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, 1, width))
        self.post_init()

    def post_init(self) -> None:
        bound = 1 / math.sqrt(self.weight.shape[-1])  # nn.Conv1d's default: a depthwise filter's fan-in is W
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)

    def forward(self, x: torch.Tensor, tail: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, C], tail [B, W−1, C]: the inputs before x (None: zeros) → (SiLU(conv) [B, T, C], the inputs
        with the tail in front [B, W−1+T, C]; its last W−1 rows are the next tail)."""
        W = self.weight.shape[-1]
        xs = F.pad(x, (0, 0, W - 1, 0)) if tail is None else torch.cat([tail.to(x.dtype), x], dim=1)
        y = F.conv1d(xs.transpose(1, 2), self.weight, groups=x.shape[-1]).transpose(1, 2)
        return F.silu(y), xs


class DeltaRuleState:
    """A delta-rule layer's inference state; neither part grows with T. ``recurrent`` [B, H, d_k, d_v] fp32: the
    memory of every head. ``conv`` [B, W−1, C]: the short convolution's last inputs. For rollback, ``past[-j]``
    holds (recurrent, conv) as they were j tokens ago, for j up to the cache's ``max_rollback``."""

    def __init__(self, batch_size, heads, key_dim, value_dim, conv_channels, conv_width, dtype, device):
        self.recurrent = torch.zeros(batch_size, heads, key_dim, value_dim, dtype=torch.float32, device=device)
        self.conv = torch.zeros(batch_size, conv_width - 1, conv_channels, dtype=dtype, device=device)
        self.past: list[tuple[torch.Tensor, torch.Tensor]] = []

    def clear(self) -> None:
        """A new sequence (a forward at offset 0, e.g. after ``Cache.reset``) starts from zeros."""
        self.recurrent.zero_()
        self.conv.zero_()
        self.past = []

    def remember(self, before: list[tuple[torch.Tensor, torch.Tensor]], max_rollback: int) -> None:
        """After a forward: ``before[i]`` is the state from before the i-th of its last len(before) tokens."""
        self.past = (self.past + before)[-max_rollback:] if max_rollback else []

    def rollback(self, n: int) -> None:
        """Restore the state of n tokens ago (``Cache.rollback`` calls this for every layer)."""
        if not 0 <= n <= len(self.past):
            raise ValueError(
                f"cannot roll a delta-rule state back {n} tokens: it kept {len(self.past)} (a cache made with "
                f"model.new_cache(..., max_rollback=m) keeps the last m)"
            )
        if n:
            recurrent, conv = self.past[-n]
            self.recurrent.copy_(recurrent)
            self.conv.copy_(conv)
            del self.past[-n:]


def option_int(cfg, name: str, default: int, default_is: str) -> int:
    """The mixer option ``name`` as a positive int; None means ``default`` (described by ``default_is``)."""
    value = cfg.opt(name)
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"DecoderConfig.{name}={cfg.opt(name)!r}: must be a positive int (None: {default_is})")
    return value


class DeltaRuleLayer(nn.Module):
    """What Gated DeltaNet and KDA share: ``qkv_proj`` → ``conv1d`` (short conv + SiLU) → L2-normalised q, k →
    the gated delta rule → ``o_norm`` (RMSNorm over d_v) ⊙ output gate → ``o_proj``; the state, padding and
    rollback. A subclass adds its parameters and defines ``gates(x) -> (g, β)`` and ``output_gate(x)``."""

    def __init__(self, cfg, key_heads: int, value_heads: int, key_dim: int, value_dim: int, conv_width: int):
        super().__init__()
        self.Hk, self.Hv, self.dk, self.dv = key_heads, value_heads, key_dim, value_dim
        d, self.qkv_split = cfg.hidden_size, [key_heads * key_dim, key_heads * key_dim, value_heads * value_dim]
        self.qkv_proj = nn.Linear(d, sum(self.qkv_split), bias=False)
        self.conv1d = ShortConv(sum(self.qkv_split), conv_width)
        self.o_norm = RMSNorm(value_dim, cfg.rms_norm_eps)
        self.o_proj = nn.Linear(value_heads * value_dim, d, bias=False)

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, d] → (g: the log-decay, fp32, [B, T, H_v] or [B, T, H_v, d_k]; β [B, T, H_v])."""
        raise NotImplementedError

    def output_gate(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, d] → the gate on the normalised output [B, T, H_v, d_v]."""
        raise NotImplementedError

    def new_state(self, batch_size: int, max_len: int, dtype, device) -> DeltaRuleState:
        W = self.conv1d.weight.shape[-1]
        return DeltaRuleState(batch_size, self.Hv, self.dk, self.dv, sum(self.qkv_split), W, dtype, device)

    @staticmethod
    def bytes_of_state(Hk, Hv, dk, dv, W, batch_size: int = 1, dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes of one ``DeltaRuleState``: the fp32 memory B · H_v · d_k · d_v · 4 plus the conv tail
        B · (W − 1) · (2 · H_k · d_k + H_v · d_v) in ``dtype``. Neither depends on the context length."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return batch_size * (Hv * dk * dv * 4 + (W - 1) * (2 * Hk * dk + Hv * dv) * itemsize)

    def forward(self, x: torch.Tensor, step: Step, state: DeltaRuleState | None) -> torch.Tensor:
        B, T, _ = x.shape
        real = real_tokens(step, T)
        if real is not None:
            x = x * real[..., None].to(x.dtype)  # padding enters as zeros (HF does the same)
        if state is not None and step.offset == 0:
            state.clear()
        qkv, conv_in = self.conv1d(self.qkv_proj(x), None if state is None else state.conv)
        q, k, v = qkv.split(self.qkv_split, dim=-1)
        q, k = l2norm(q.unflatten(-1, (self.Hk, self.dk))), l2norm(k.unflatten(-1, (self.Hk, self.dk)))
        v = v.unflatten(-1, (self.Hv, self.dv))
        if self.Hv != self.Hk:  # key head i serves value heads i·r … i·r + r − 1
            q, k = (t.repeat_interleave(self.Hv // self.Hk, dim=2) for t in (q, k))
        g, beta = self.gates(x)
        if real is not None:  # no decay and no write: padding leaves the state as it was
            g = g * real.view(B, T, *[1] * (g.dim() - 2))
            beta = beta * real[..., None].to(beta.dtype)
        o = self._recurrence(q, k, v, g, beta, step, state, conv_in)
        return self.o_proj((self.o_norm(o) * self.output_gate(x)).flatten(2))

    def _recurrence(self, q, k, v, g, beta, step: Step, state: DeltaRuleState | None, conv_in) -> torch.Tensor:
        """o [B, T, H_v, d_v]. Without a state: the chunked op from zero. With one: its tokens advance the state in
        place, the last min(T, max_rollback) of them one at a time, each leaving a copy of the state before it."""
        if state is None:
            return gated_delta_rule(q, k, v, g, beta)[0]
        T, W1 = q.shape[1], state.conv.shape[1]
        kept = min(T, step.max_rollback)
        outs, before = [], []
        if T > kept:
            n = T - kept
            outs.append(self._advance(state, q[:, :n], k[:, :n], v[:, :n], g[:, :n], beta[:, :n]))
        for t in range(T - kept, T):
            before.append((state.recurrent.clone(), conv_in[:, t : t + W1].clone()))
            s = slice(t, t + 1)
            outs.append(gated_delta_rule_step(q[:, s], k[:, s], v[:, s], g[:, s], beta[:, s], state.recurrent))
        state.conv.copy_(conv_in[:, T:])
        state.remember(before, step.max_rollback)
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    @staticmethod
    def _advance(state: DeltaRuleState, q, k, v, g, beta) -> torch.Tensor:
        """These tokens from ``state.recurrent``, updated in place: the recurrent step for a few tokens, the
        chunked op for many."""
        if q.shape[1] <= DECODE_MAX_TOKENS:
            return gated_delta_rule_step(q, k, v, g, beta, state.recurrent)
        o, final = gated_delta_rule(q, k, v, g, beta, initial_state=state.recurrent, output_final_state=True)
        state.recurrent.copy_(final)
        return o


@register("gdn")
class GatedDeltaNet(DeltaRuleLayer):
    """Qwen3-Next's Gated DeltaNet layer: a scalar decay per value head, value heads grouped over key heads (GVA),
    a SiLU output gate ``z_proj``. Option defaults (None) follow the attention shapes: ``num_attention_heads`` key
    heads of ``head_dim``, as many value heads of the same width."""

    options = {
        "linear_num_key_heads": None,
        "linear_num_value_heads": None,
        "linear_key_head_dim": None,
        "linear_value_head_dim": None,
        "linear_conv_kernel_dim": 4,
    }

    @staticmethod
    def dims(cfg) -> tuple[int, int, int, int, int]:
        """(H_k, H_v, d_k, d_v, W) from the config, defaults filled in and checked."""
        Hk = option_int(cfg, "linear_num_key_heads", cfg.num_attention_heads, "num_attention_heads")
        Hv = option_int(cfg, "linear_num_value_heads", Hk, "linear_num_key_heads")
        dk = option_int(cfg, "linear_key_head_dim", cfg.head_dim, "head_dim")
        dv = option_int(cfg, "linear_value_head_dim", dk, "linear_key_head_dim")
        W = option_int(cfg, "linear_conv_kernel_dim", 4, "4")
        if Hv % Hk:
            raise ValueError(
                f"DecoderConfig.linear_num_value_heads={Hv}: must be a multiple of linear_num_key_heads={Hk}"
            )
        return Hk, Hv, dk, dv, W

    @staticmethod
    def state_bytes(cfg, seq_len: int, batch_size: int = 1, dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes of one layer's decoding state, the same for every ``seq_len`` (``DeltaRuleLayer.bytes_of_state``;
        Qwen3-Next, one sequence, bf16 conv tail: 32 · 128 · 128 · 4 B = 2 MiB of memory + 48 KiB of tail)."""
        return DeltaRuleLayer.bytes_of_state(*GatedDeltaNet.dims(cfg), batch_size=batch_size, dtype=dtype)

    def __init__(self, cfg, layer_idx: int):
        Hk, Hv, dk, dv, W = self.dims(cfg)
        super().__init__(cfg, Hk, Hv, dk, dv, W)
        d = cfg.hidden_size
        self.z_proj = nn.Linear(d, Hv * dv, bias=False)
        self.b_proj = nn.Linear(d, Hv, bias=False)
        self.a_proj = nn.Linear(d, Hv, bias=False)
        self.A_log = nn.Parameter(torch.empty(Hv))
        self.dt_bias = nn.Parameter(torch.empty(Hv))
        self.post_init()

    def post_init(self) -> None:
        """A = exp(A_log) ~ U(1, 16) (fla's GatedDeltaNet), dt_bias Mamba's."""
        with torch.no_grad():
            self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1.0, 16.0).log())
            mamba_dt_bias_(self.dt_bias)

    def gates(self, x):
        g = -self.A_log.float().exp() * F.softplus(self.a_proj(x).float() + self.dt_bias.float())
        return g, self.b_proj(x).sigmoid()

    def output_gate(self, x):
        return F.silu(self.z_proj(x)).unflatten(-1, (self.Hv, self.dv))

    @staticmethod
    def hf_to_ours(sd: dict, cfg) -> dict:
        """Qwen3-Next → ours: ``in_proj_qkvz`` / ``in_proj_ba`` ungrouped, ``norm`` → ``o_norm``, ``out_proj`` →
        ``o_proj``; conv1d, A_log, dt_bias as they are."""
        Hk, Hv, dk, dv, _ = GatedDeltaNet.dims(cfg)
        r = Hv // Hk
        rename = {"norm.weight": "o_norm.weight", "out_proj.weight": "o_proj.weight"}
        out = {rename.get(k, k): v for k, v in sd.items() if k not in ("in_proj_qkvz.weight", "in_proj_ba.weight")}
        if "in_proj_qkvz.weight" in sd:
            q, k, v, z = sd["in_proj_qkvz.weight"].unflatten(0, (Hk, -1)).split([dk, dk, r * dv, r * dv], dim=1)
            out["qkv_proj.weight"] = torch.cat([t.flatten(0, 1) for t in (q, k, v)])
            out["z_proj.weight"] = z.flatten(0, 1)
        if "in_proj_ba.weight" in sd:
            b, a = sd["in_proj_ba.weight"].unflatten(0, (Hk, 2 * r)).split([r, r], dim=1)
            out["b_proj.weight"], out["a_proj.weight"] = b.flatten(0, 1), a.flatten(0, 1)
        return out

    @staticmethod
    def ours_to_hf(sd: dict, cfg) -> dict:
        Hk, Hv, dk, dv, _ = GatedDeltaNet.dims(cfg)
        fused = ("qkv_proj.weight", "z_proj.weight", "b_proj.weight", "a_proj.weight")
        rename = {"o_norm.weight": "norm.weight", "o_proj.weight": "out_proj.weight"}
        out = {rename.get(k, k): v for k, v in sd.items() if k not in fused}
        if "qkv_proj.weight" in sd:
            q, k, v = sd["qkv_proj.weight"].split([Hk * dk, Hk * dk, Hv * dv])
            parts = (q, k, v, sd["z_proj.weight"])
            out["in_proj_qkvz.weight"] = torch.cat([t.unflatten(0, (Hk, -1)) for t in parts], dim=1).flatten(0, 1)
        if "b_proj.weight" in sd:
            parts = (sd["b_proj.weight"], sd["a_proj.weight"])
            out["in_proj_ba.weight"] = torch.cat([t.unflatten(0, (Hk, -1)) for t in parts], dim=1).flatten(0, 1)
        return out
