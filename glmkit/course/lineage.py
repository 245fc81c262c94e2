"""The GLM generations no checkpoint loader needs, kept small for lessons 02–03: LayerNorm and GeLU/GeGLU (GLM-2021,
ChatGLM-6B, GLM-130B), ChatGLM-6B's 2D RoPE, GLM-130B's embedding-gradient shrink, and a toy stack for the four ways
to place a norm (post-LN, DeepNorm, pre-LN, sandwich).

DeepNorm's constants, and whose they are (the toy stack takes any α and β):
* DeepNet (Wang et al. 2022, arXiv:2203.00555, Table 1), decoder-only with N layers: α = (2N)^¼ on the residual,
  β = (8N)^-¼ on the initialisation of the value, output and FFN weights (``deepnet_constants``).
* GLM-130B (arXiv:2210.02414; THUDM/GLM-130B's SwissArmyTransformer model, ``alpha = (2 * num_layers) ** 0.5``):
  α = √(2N), N = 70 (``glm130b_alpha``). GLM-130B also shrinks the embedding's gradient by 0.1
  (``shrink_embedding_gradient``, the paper's "embedding layer gradient shrink").

Why here and not in the decoder: every published GLM from ChatGLM2 on is pre-norm (GLM-4-0414 sandwich) RMSNorm +
SwiGLU + 1D partial RoPE, which is what ``glmkit.models.decoder`` implements; the earlier choices matter for the
story (why they were dropped) but no checkpoint the library loads uses them, so the library does not carry them.
GLM-2021 itself is ``glmkit.models.glm2021`` (lesson 01 trains it).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from glmkit.ops.attention import attention_reference
from glmkit.ops.rope import rope_reference
from glmkit.ops.swiglu import swiglu_reference


def layer_norm_reference(x, weight, bias, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm of the last dim (GLM-2021, ChatGLM-6B, GLM-130B): (x − mean) / sqrt(var + eps) · weight + bias,
    biased variance as ``nn.LayerNorm``, in fp32, rounded to x's dtype."""
    xf = x.float()
    y = (xf - xf.mean(-1, keepdim=True)) * torch.rsqrt(xf.var(-1, unbiased=False, keepdim=True) + eps)
    return (y * (1 if weight is None else weight.float()) + (0 if bias is None else bias.float())).to(x.dtype)


def gelu_reference(x: torch.Tensor) -> torch.Tensor:
    """GeLU in its tanh approximation (GLM-2021, ChatGLM-6B), fp32 inside."""
    return F.gelu(x.float(), approximate="tanh").to(x.dtype)


def geglu_reference(h: torch.Tensor) -> torch.Tensor:
    """GLM-130B's GeGLU on a fused [..., 2I] tensor: ``x1 · gelu(x2)``, the activation on the *second* half."""
    a, b = h.float().chunk(2, dim=-1)
    return (a * F.gelu(b, approximate="tanh")).to(h.dtype)


def rope_2d(x, cos_pos, sin_pos, cos_block, sin_block) -> torch.Tensor:
    """ChatGLM-6B's 2D RoPE: x [B, H, T, D]; the first D/2 dims are rotated (half-split, all of them) by the
    position, the last D/2 by the block position. cos/sin [T or B, T, D/4] from ``rope_cos_sin(·, D // 2)``."""
    h = x.shape[-1] // 2
    return torch.cat(
        (
            rope_reference(x[..., :h], cos_pos, sin_pos, h, "half"),
            rope_reference(x[..., h:], cos_block, sin_block, h, "half"),
        ),
        dim=-1,
    )


SCHEMES = ("post-LN", "DeepNorm", "pre-LN", "sandwich")


def deepnet_constants(n_layers: int) -> tuple[float, float]:
    """DeepNet's (α, β) for a decoder-only stack of ``n_layers`` layers: ((2N)^¼, (8N)^-¼) (arXiv:2203.00555)."""
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
        raise ValueError(f"n_layers must be a positive int, got {n_layers!r}")
    return (2 * n_layers) ** 0.25, (8 * n_layers) ** -0.25


def glm130b_alpha(n_layers: int) -> float:
    """GLM-130B's residual weight: √(2N) (its released model code; N = 70 gives 11.83)."""
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
        raise ValueError(f"n_layers must be a positive int, got {n_layers!r}")
    return math.sqrt(2 * n_layers)


def shrink_embedding_gradient(x: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    """GLM-130B's embedding-gradient shrink: the same value forward, ``alpha`` × the gradient backward
    (``x·α + x.detach()·(1 − α)``; GLM-130B used α = 0.1 on the word embedding's output)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    return x * alpha + x.detach() * (1.0 - alpha)


class HistoricBlock(nn.Module):
    """One layer normalised as ``scheme`` says (causal multi-head attention, a gated MLP):

    post-LN / DeepNorm   a = n1(x); h = α·a + Attn(a); m = n2(h); y = α·m + MLP(m)   (GLM-130B; α = 1: post-LN)
    pre-LN               h = x + Attn(n1(x)); y = h + MLP(n2(h))
    sandwich             h = x + n1b(Attn(n1(x))); y = h + n2b(MLP(n2(h)))           (GLM-4-0414)
    """

    def __init__(self, d: int, heads: int, scheme: str, alpha: float = 1.0):
        super().__init__()
        if scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
        norm = (lambda: nn.RMSNorm(d)) if scheme == "sandwich" else (lambda: nn.LayerNorm(d))
        self.scheme, self.heads, self.alpha = scheme, heads, alpha
        self.n1, self.n2 = norm(), norm()
        if scheme == "sandwich":
            self.n1b, self.n2b = norm(), norm()
        self.qkv, self.o = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.up, self.down = nn.Linear(d, 4 * d, bias=False), nn.Linear(2 * d, d, bias=False)
        self.act = geglu_reference if scheme in ("post-LN", "DeepNorm") else swiglu_reference

    def attn(self, x):
        q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.heads)
        out = attention_reference(q, k, v, torch.zeros(x.shape[0], dtype=torch.int64))
        return self.o(rearrange(out, "b h t d -> b t (h d)"))

    def mlp(self, x):
        return self.down(self.act(self.up(x)))

    def forward(self, x):
        if self.scheme in ("post-LN", "DeepNorm"):
            a = self.n1(x)
            m = self.n2(self.alpha * a + self.attn(a))
            return self.alpha * m + self.mlp(m)
        if self.scheme == "pre-LN":
            x = x + self.attn(self.n1(x))
            return x + self.mlp(self.n2(x))
        x = x + self.n1b(self.attn(self.n1(x)))
        return x + self.n2b(self.mlp(self.n2(x)))


class ToyStack(nn.Module):
    """A small causal LM of ``n_layers`` ``HistoricBlock``s with unit-scale weights (std d^-½), for the depth
    experiments of lesson 03. DeepNorm defaults to DeepNet's decoder-only constants (``deepnet_constants``:
    α = (2N)^¼ on the residual, the value, output and MLP weights × β = (8N)^-¼ at init); ``alpha`` and ``beta``
    override them one by one (GLM-130B's α is ``glm130b_alpha``). Post-LN is the same block with α = β = 1.
    ``embedding_grad_shrink`` < 1 applies GLM-130B's shrink to the embedding's output."""

    def __init__(
        self,
        scheme: str,
        n_layers: int,
        d: int = 32,
        heads: int = 4,
        vocab: int = 64,
        alpha: float | None = None,
        beta: float | None = None,
        seed: int = 0,
        embedding_grad_shrink: float = 1.0,
    ):
        super().__init__()
        a0, b0 = deepnet_constants(n_layers) if scheme == "DeepNorm" else (1.0, 1.0)
        alpha = a0 if alpha is None else float(alpha)
        beta = b0 if beta is None else float(beta)
        self.alpha, self.beta, self.embedding_grad_shrink = alpha, beta, embedding_grad_shrink
        g = torch.Generator().manual_seed(seed)
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(HistoricBlock(d, heads, scheme, alpha) for _ in range(n_layers))
        self.head = nn.Linear(d, vocab, bias=False)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if p.dim() == 2:
                    p.copy_(torch.randn(p.shape, generator=g) * d**-0.5)
                    if name.endswith(("o.weight", "up.weight", "down.weight")):
                        p.mul_(beta)
            for layer in self.layers:
                layer.qkv.weight[2 * d :].mul_(beta)  # the value rows
        self.vocab = vocab

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        if self.embedding_grad_shrink != 1.0:
            x = shrink_embedding_gradient(x, self.embedding_grad_shrink)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)

    def loss(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self(ids).flatten(0, 1).float(), targets.flatten())
