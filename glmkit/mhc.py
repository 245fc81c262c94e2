"""The residual connection around each branch (mixer, FFN) of a decoder layer: the plain residual of every GLM up to
GLM-5.2, and the manifold-constrained hyper-connections (mHC) of GLM-5.3-Flash (HF ``glm5_next``, ``hc_mult`` = 4).

The plain residual (``Residual``): one stream x [B, T, d], and each branch F adds to it, ``x ← x + F(x)``.

Hyper-connections (Zhu et al. 2024) widen the residual stream into N = ``hc_mult`` parallel streams X [B, T, N, d].
A branch reads a learned mix of the streams, its output is written back into every stream with a learned gain, and
the streams are mixed among themselves. mHC (Xie et al. 2026; DeepSeek-V4, GLM-5.3-Flash) makes all three weights
functions of the token (one small linear map of the streams) and constrains the stream mixing to a doubly stochastic
matrix. Per branch (``HyperConnection``; names as glm5_next's ``attn_hc``/``ffn_hc``):

    z            = rmsnorm(flatten(X))                [B, T, N·d]  no gain, fp32
    a_pre, a_post, a_comb = z @ fnᵀ                   [N], [N], [N·N]      fn [(2 + N)·N, N·d]
    pre  = sigmoid(scale₀ · a_pre  + base_pre) + ε                how much each stream feeds the branch
    post = 2 · sigmoid(scale₁ · a_post + base_post)               how much of the output each stream receives
    comb = Sinkhorn(softmax_row(scale₂ · a_comb + base_comb) + ε)  N × N, rows and columns summing to 1
    X'_j = post_j · F(Σ_i pre_i X_i) + Σ_i comb_ij X_i

What the Sinkhorn step guarantees: a doubly stochastic ``comb`` makes each new stream a convex combination of the old
ones (columns sum to 1), so mixing never amplifies the residual signal (its operator norm is at most 1, in any
depth of product), and it preserves the streams' mean (rows sum to 1): ``mean_j X'_j = mean_i X_i + mean(post) · F``.
The decoder starts from N copies of the embedding (``expand_streams``) and ends with the mean of the streams
(``merge_streams``), then the final norm, as glm5_next does; the mean is exactly what a plain residual would carry
if every ``post_j`` were 1. With N = 1 the decoder keeps the plain ``Residual``: today's decoder exactly (glm5_next
always builds its mHC modules; a checkpoint of it with ``hc_mult`` = 1 is not what N = 1 means here).

Shapes: B batch, T tokens, N streams (``hc_mult``), d hidden size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

FN_INIT_STD = 0.02  # glm5_next's _init_weights: fn ~ N(0, 0.02), base = 0, scale = 1


def sinkhorn(m: torch.Tensor, iters: int, eps: float = 1e-6) -> torch.Tensor:
    """Sinkhorn-Knopp on positive matrices m [..., N, N], in glm5_next's order: divide by the column sums, then
    ``iters - 1`` rounds of row sums and column sums (the softmax that makes m normalised its rows already). Each
    division adds ``eps`` to the sums. The result approaches a doubly stochastic matrix (rows and columns sum to 1)."""
    m = m / (m.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        m = m / (m.sum(dim=-1, keepdim=True) + eps)
        m = m / (m.sum(dim=-2, keepdim=True) + eps)
    return m


def expand_streams(x: torch.Tensor, hc_mult: int) -> torch.Tensor:
    """The embedding [B, T, d] as ``hc_mult`` identical streams [B, T, N, d] (N = 1: x itself, the plain residual)."""
    return x if hc_mult == 1 else x.unsqueeze(-2).expand(*x.shape[:-1], hc_mult, x.shape[-1]).contiguous()


def merge_streams(x: torch.Tensor, hc_mult: int) -> torch.Tensor:
    """The streams [B, T, N, d] averaged into one [B, T, d] (glm5_next's ``hc_head``; N = 1: x itself)."""
    return x if hc_mult == 1 else x.mean(dim=-2)


class Residual(nn.Module):
    """``forward(x [B, T, d], branch) = x + branch(x)``: the plain residual, no parameters."""

    def forward(self, x: torch.Tensor, branch: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return x + branch(x)


class HyperConnection(nn.Module):
    """mHC around one branch (equations in the module docstring). Parameters as glm5_next's
    ``Glm5NextTextHyperConnection``: ``fn [(2 + N)·N, N·d]``, ``base [(2 + N)·N]``, ``scale [3]``.

    ``forward(streams [B, T, N, d], branch) -> [B, T, N, d]``: the branch gets [B, T, d] and returns [B, T, d].
    The weights are computed in fp32 (autocast off) whatever the streams' dtype; ``weights`` exposes them."""

    def __init__(
        self, hidden_size: int, hc_mult: int, sinkhorn_iters: int = 20, eps: float = 1e-6, norm_eps: float = 1e-5
    ):
        super().__init__()
        if isinstance(hc_mult, bool) or not isinstance(hc_mult, int) or hc_mult < 2:
            raise ValueError(
                f"hc_mult must be an int >= 2 for hyper-connections (1: the plain Residual), got {hc_mult!r}"
            )
        if isinstance(sinkhorn_iters, bool) or not isinstance(sinkhorn_iters, int) or sinkhorn_iters < 1:
            raise ValueError(f"sinkhorn_iters must be an int >= 1, got {sinkhorn_iters!r}")
        n = hc_mult
        self.hidden_size, self.hc_mult, self.sinkhorn_iters = hidden_size, n, sinkhorn_iters
        self.eps, self.norm_eps = float(eps), float(norm_eps)
        self.fn = nn.Parameter(torch.empty((2 + n) * n, n * hidden_size))
        self.base = nn.Parameter(torch.empty((2 + n) * n))
        self.scale = nn.Parameter(torch.empty(3))
        self.post_init()

    def post_init(self) -> None:
        """glm5_next's initialisation (the decoder's ``reset_parameters`` calls it after its generic pass)."""
        with torch.no_grad():
            self.fn.normal_(0.0, FN_INIT_STD)
            self.base.zero_()
            self.scale.fill_(1.0)

    def weights(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """streams [..., N, d] → (pre [..., N], post [..., N], comb [..., N, N]), fp32."""
        n = self.hc_mult
        if streams.shape[-2:] != (n, self.hidden_size):
            raise ValueError(f"streams must be [..., N={n}, d={self.hidden_size}], got {tuple(streams.shape)}")
        with torch.autocast(streams.device.type, enabled=False):
            z = streams.flatten(-2).float()
            z = z * torch.rsqrt(z.square().mean(dim=-1, keepdim=True) + self.norm_eps)
            a = F.linear(z, self.fn.float())  # [..., (2 + N)·N]
        a_pre, a_post, a_comb = a.split([n, n, n * n], dim=-1)
        b_pre, b_post, b_comb = self.base.float().split([n, n, n * n])
        s_pre, s_post, s_comb = self.scale.float().unbind(0)
        pre = torch.sigmoid(a_pre * s_pre + b_pre) + self.eps
        post = 2.0 * torch.sigmoid(a_post * s_post + b_post)
        comb = torch.softmax((a_comb * s_comb + b_comb).unflatten(-1, (n, n)), dim=-1) + self.eps
        return pre, post, sinkhorn(comb, self.sinkhorn_iters, self.eps)

    def forward(self, streams: torch.Tensor, branch: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        pre, post, comb = self.weights(streams)
        x = (pre.unsqueeze(-1) * streams).sum(dim=-2).to(streams.dtype)  # [B, T, d]: the branch's input
        h = branch(x)
        mixed = torch.matmul(comb.to(streams.dtype).transpose(-1, -2), streams)  # X'_j = Σ_i comb_ij X_i
        return post.to(h.dtype).unsqueeze(-1) * h.unsqueeze(-2) + mixed

    def extra_repr(self) -> str:
        return f"hidden={self.hidden_size}, hc_mult={self.hc_mult}, sinkhorn_iters={self.sinkhorn_iters}"


def residual(hidden_size: int, hc_mult: int = 1, sinkhorn_iters: int = 20, eps: float = 1e-6, norm_eps: float = 1e-5):
    """The connection a decoder branch gets: ``Residual()`` for one stream, ``HyperConnection`` for more."""
    if hc_mult == 1:
        return Residual()
    return HyperConnection(hidden_size, hc_mult, sinkhorn_iters, eps, norm_eps)
