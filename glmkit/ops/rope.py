"""Rotary position embeddings as the GLM family uses them: partial RoPE in both pairings, the reference and the
dispatch to the fused kernel (``kernels/rope.py``). Facts: shared/reference/glm-lineage.md §1.6, §2.2, §3, §9.

Lineage: GLM-2021 had no rotation (two learned position tables); ChatGLM-6B rotated both halves of each head
("2D", ``glmkit.course.lineage``); GLM-130B rotated the whole head; ChatGLM2/3 and GLM-4 (HF ``glm``, ``glm4``)
rotate only the first rotary_dim = D/2 dims with **interleaved** pairs (x[2i], x[2i+1]); GLM-4.5 (``glm4_moe``)
the same dims with **half-split** pairs (x[i], x[i + R/2]), θ = 1e6; MLA (GLM-4.7-Flash, GLM-5) rotates a
separate 64-dim slice, interleaved. Both pairings rotate the same planes by the same angles pos·θ_i and differ
only in which two coordinates form plane i: equally good encodings, not interchangeable for a checkpoint.

Convention: ``rope_cos_sin`` returns one entry per frequency, ``[..., T, R/2]`` (HF stores each twice). For plane
i with angle a and coordinates (x1, x2): ``x1' = x1·cos a − x2·sin a``, ``x2' = x2·cos a + x1·sin a``.
Checked against transformers (tests/ops/test_rope.py): bit-identical in fp32.

Shapes: x, q ``[B, H, T, D]``, k ``[B, H_kv, T, D]``; cos/sin ``[T, R/2]`` or ``[B, T, R/2]``; R ≤ D even.
"""

from __future__ import annotations

import torch

from glmkit import backend

PAIRINGS = ("interleaved", "half")


def rope_cos_sin(positions: torch.Tensor, rotary_dim: int, theta: float = 10000.0):
    """positions [T] or [B, T] → (cos, sin) fp32 [..., T, rotary_dim/2], angle[t, i] = pos[t] · θ^(-2i/R),
    computed like HF (fp32 inverse frequencies, fp32 product) so positions line up with checkpoints."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, device=positions.device).float() / rotary_dim))
    angles = positions.float()[..., None] * inv_freq
    return angles.cos(), angles.sin()


def _check(x, cos, sin, rotary_dim: int, pairing: str, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"{name} must be a float [B, H, T, D] tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
    B, _, T, D = x.shape
    if not isinstance(rotary_dim, int) or rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > D:
        raise ValueError(f"rotary_dim must be a positive even int <= head dim D={D}, got {rotary_dim!r}")
    want = [(T, rotary_dim // 2), (B, T, rotary_dim // 2)]
    if not (
        isinstance(cos, torch.Tensor)
        and isinstance(sin, torch.Tensor)
        and cos.shape == sin.shape
        and tuple(cos.shape) in want
        and cos.device == x.device
    ):
        raise ValueError(
            f"cos/sin must be [T, R/2] = {want[0]} or [B, T, R/2] = {want[1]} on {x.device} (one entry "
            f"per frequency, not HF's doubled layout), got {tuple(getattr(cos, 'shape', ()))}"
        )


def rope_reference(x: torch.Tensor, cos, sin, rotary_dim: int, pairing: str = "interleaved") -> torch.Tensor:
    """Rotate the first rotary_dim dims of x [B, H, T, D] pairwise (``pairing`` "interleaved" or "half"); the
    other dims pass through. In fp32, rounded to x's dtype."""
    _check(x, cos, sin, rotary_dim, pairing)
    c, s = cos.float(), sin.float()
    if c.dim() == 3:
        c, s = c[:, None], s[:, None]  # [B, 1, T, R/2]: broadcast over heads
    xr = x[..., :rotary_dim].float()
    if pairing == "interleaved":
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        rot = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
    else:
        x1, x2 = xr.chunk(2, dim=-1)
        rot = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    return torch.cat((rot.to(x.dtype), x[..., rotary_dim:]), dim=-1)


class RopeFunction(torch.autograd.Function):
    """The kernel as one differentiable op on q and k together; the backward is the inverse rotation (a rotation
    is orthogonal: its transpose rotates by −angle)."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, rotary_dim, pairing, inplace):
        from glmkit.kernels.rope import rope_fwd

        qo, ko = rope_fwd(q, k, cos, sin, rotary_dim, pairing, inplace=inplace)
        if inplace:
            ctx.mark_dirty(*(t for t in (q, k) if t is not None))
        ctx.save_for_backward(cos, sin)
        ctx.rope = (rotary_dim, pairing)
        return qo, ko

    @staticmethod
    def backward(ctx, dq, dk):
        from glmkit.kernels.rope import rope_fwd

        cos, sin = ctx.saved_tensors
        first, second = (dq, dk) if dq is not None else (dk, None)  # rotate both back in one launch
        r1, r2 = rope_fwd(first, second, cos, sin, *ctx.rope, inverse=True)
        dq_in, dk_in = (r1, r2) if dq is not None else (None, r1)
        return dq_in, dk_in, None, None, None, None, None


def rope(q, k, cos, sin, rotary_dim: int, pairing: str = "interleaved", inplace: bool = False):
    """Partial RoPE on q [B, H, T, D] and k [B, H_kv, T, D] (or None) with one cos/sin, as the models call it:
    ``rope_reference``'s result for each, differentiable in q and k; one kernel launch for both where
    ``glmkit.backend`` resolves to "triton". ``inplace`` overwrites the rotary dims of q and k."""
    _check(q, cos, sin, rotary_dim, pairing, "q")
    if k is not None:
        _check(k, cos, sin, rotary_dim, pairing, "k")
        if k.shape[0] != q.shape[0] or k.shape[-1] != q.shape[-1]:
            raise ValueError(f"k must match q in batch and head dim: q {tuple(q.shape)}, k {tuple(k.shape)}")
    path = "triton" if backend.resolve(q) == "triton" else "torch"
    backend.record("rope", path)
    if path == "triton":
        return RopeFunction.apply(q, k, cos, sin, rotary_dim, pairing, inplace)
    out = []
    for t in (q, k):
        if t is not None and inplace:
            t[..., :rotary_dim] = rope_reference(t, cos, sin, rotary_dim, pairing)[..., :rotary_dim]
        out.append(t if t is None or inplace else rope_reference(t, cos, sin, rotary_dim, pairing))
    return out[0], out[1]
