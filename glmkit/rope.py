"""Rotary position embeddings (RoPE) as the GLM family uses them: full, 2D and partial, in both pairings.

Lineage (shared/reference/glm-lineage.md §1.6, §2.2, §3, §4.2, §9):
* GLM-2021: no rotation at all — two learned embeddings (position and block position) are added to
  the token embedding.
* ChatGLM-6B: "2D RoPE". Each head [D] is cut into two halves; the first half is rotated by the
  position, the second by the block position, each with *half-split* pairs inside its D/2 dims
  (``apply_rope_2d``).
* GLM-130B: ordinary 1D RoPE over the whole head, half-split.
* ChatGLM2/3 and GLM-4 (HF ``glm``, ``glm4``): *partial* RoPE — only the first rotary_dim = D/2 dims are
  rotated (θ_i = θ^(-2i/rotary_dim), i < rotary_dim/2), the other half passes through unchanged — with
  **interleaved** pairs (x[2i], x[2i+1]).
* GLM-4.5/4.6/4.7 (HF ``glm4_moe``): the same partial RoPE over the first D/2 dims but with **half-split**
  pairs (x[i], x[i + rotary_dim/2]), θ = 1e6.

Both pairings rotate the same 2-D planes by the same angles pos·θ_i; they differ only in *which two
coordinates* form plane i. So they are equally good position encodings but not interchangeable: a
checkpoint trained with one and run with the other is silently wrong.

Checked against transformers 5.23.0 (read from the wheel's source, functions re-run on random inputs
against ``apply_rope_reference`` in fp32: bit-identical, difference 0):
* ``models/glm/modeling_glm.py`` and ``models/glm4/modeling_glm4.py``: ``apply_rotary_pos_emb`` cuts cos/sin
  to their first rotary_dim/2 entries, ``repeat_interleave(2)``, and uses ``rotate_half`` =
  ``stack((-x[..., 1::2], x[..., 0::2]), -1).flatten(-2)`` on ``q[..., :rotary_dim]`` → pairing="interleaved".
* ``models/glm4_moe/modeling_glm4_moe.py`` (from ``modular_glm4_moe.py``: ``from ..gpt_neox.modeling_gpt_neox
  import apply_rotary_pos_emb``): cos/sin = ``cat(freqs, freqs)``, ``rotate_half`` = ``cat(-x2, x1)`` over the
  two halves of ``q[..., :rotary_dim]`` → pairing="half".
* In all three the frequencies are ``1 / θ^(arange(0, rotary_dim, 2) / rotary_dim)`` in fp32 with
  rotary_dim = int(head_dim · partial_rotary_factor), the same as ``rope_cos_sin`` below.

Convention here. ``rope_cos_sin`` returns cos and sin with one entry per *frequency*,
``[..., T, rotary_dim/2]`` (HF stores each twice, ``[..., T, rotary_dim]``); the pairing is chosen
when applying. For plane i with angle a = pos·θ_i and coordinates (x1, x2):

    interleaved: x1 = x[2i],  x2 = x[2i+1]          half: x1 = x[i],  x2 = x[i + rotary_dim/2]
    x1' = x1·cos a - x2·sin a,    x2' = x2·cos a + x1·sin a

Entry points:
* ``rope_cos_sin(positions, rotary_dim, theta)``; ``apply_rope_reference(x, cos, sin, rotary_dim, pairing)``;
  ``apply_rope_2d`` (ChatGLM-6B).
* ``apply_rope(x, ...)`` and ``apply_rope_qk(q, k, ..., inplace=False)`` — dispatch through
  ``glmkit.backend.resolve``: the Triton kernel (``glmkit.kernels.rope``; forward and backward, the
  backward being the inverse rotation) when it says "triton", the reference otherwise.

Shapes: x, q ``[B, H, T, D]``, k ``[B, H_kv, T, D]``; cos/sin ``[T, R/2]`` (shared by the batch) or
``[B, T, R/2]`` (per-sample positions), R = rotary_dim even and ≤ D. Outputs keep x's shape and dtype.
The references compute in fp32 and round once.
"""

from __future__ import annotations

import torch

from glmkit import backend

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PAIRINGS = ("interleaved", "half")


def rope_cos_sin(
    positions: torch.Tensor, rotary_dim: int, theta: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles: positions [T] or [B, T] (integer or float) →
    (cos, sin), each fp32 ``[..., T, rotary_dim // 2]`` with angle[t, i] = positions[t] · θ^(-2i/rotary_dim).
    Computed like HF (fp32 inverse frequencies, fp32 product) so positions line up with checkpoints."""
    if not isinstance(positions, torch.Tensor) or positions.dim() not in (1, 2):
        raise ValueError(f"positions must be a [T] or [B, T] tensor, got {getattr(positions, 'shape', type(positions))}")
    if not isinstance(rotary_dim, int) or rotary_dim <= 0 or rotary_dim % 2:
        raise ValueError(f"rotary_dim must be a positive even int, got {rotary_dim!r}")
    if not (isinstance(theta, (int, float)) and theta > 0):
        raise ValueError(f"theta must be a positive number, got {theta!r}")
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64, device=positions.device).float() / rotary_dim))
    angles = positions.float()[..., None] * inv_freq  # [..., T, R/2]
    return angles.cos(), angles.sin()


def _check_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int | None,
                pairing: str, name: str = "x") -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape [B, H, T, D] (4 dims), got {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
    for cname, c in (("cos", cos), ("sin", sin)):
        if not isinstance(c, torch.Tensor):
            raise TypeError(f"{cname} must be a torch.Tensor, got {type(c).__name__}")
        if not c.dtype.is_floating_point:
            raise TypeError(f"{cname} must be a floating tensor, got {c.dtype}")
        if c.device != x.device:
            raise ValueError(f"{cname} is on {c.device} but {name} is on {x.device}")
    if cos.shape != sin.shape:
        raise ValueError(f"cos and sin must have one shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    B, _, T, D = x.shape
    half = cos.shape[-1] if cos.dim() else 0
    R = 2 * half if rotary_dim is None else rotary_dim
    if not isinstance(R, int) or R <= 0 or R % 2 or R > D:
        raise ValueError(f"rotary_dim must be a positive even int <= head dim D={D}, got {R!r}")
    if cos.dim() not in (2, 3) or cos.shape[-2] != T or half != R // 2 or (cos.dim() == 3 and cos.shape[0] != B):
        raise ValueError(
            f"cos/sin must be [T, R/2] = [{T}, {R // 2}] or [B, T, R/2] = [{B}, {T}, {R // 2}] (one entry per "
            f"frequency, not HF's doubled [.., R] layout), got {tuple(cos.shape)}"
        )
    return R


def _rotate(xr: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pairing: str) -> torch.Tensor:
    """Rotate xr [B, H, T, R] (fp32) with cos/sin broadcastable to [B, H, T, R/2]."""
    if pairing == "interleaved":
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    x1, x2 = xr.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def apply_rope_reference(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int | None = None,
    pairing: str = "interleaved",
) -> torch.Tensor:
    """Rotate the first rotary_dim dims of x [B, H, T, D] (default rotary_dim = 2 · cos.shape[-1]); dims
    [rotary_dim, D) pass through. pairing "interleaved" (ChatGLM2/3, GLM-4) or "half" (GLM-4.5, GPT-NeoX).
    Returns a new tensor of x's shape and dtype."""
    R = _check_rope(x, cos, sin, rotary_dim, pairing)
    c, s = cos.float(), sin.float()
    if c.dim() == 3:
        c, s = c[:, None], s[:, None]  # [B, 1, T, R/2]: broadcast over heads
    rot = _rotate(x[..., :R].float(), c, s, pairing).to(x.dtype)
    return torch.cat((rot, x[..., R:]), dim=-1) if R < x.shape[-1] else rot


def apply_rope_2d(
    x: torch.Tensor, cos_pos: torch.Tensor, sin_pos: torch.Tensor, cos_block: torch.Tensor, sin_block: torch.Tensor
) -> torch.Tensor:
    """ChatGLM-6B's 2D RoPE: x [B, H, T, D]; the first D/2 dims are rotated (half-split, all D/2 of them)
    by the position, the last D/2 by the block position. cos/sin: [T or B, T, D/4] each, from
    ``rope_cos_sin(position_ids, D // 2)`` and ``rope_cos_sin(block_position_ids, D // 2)``."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[-1] % 4:
        raise ValueError(f"x must be [B, H, T, D] with D a multiple of 4, got {getattr(x, 'shape', type(x))}")
    h = x.shape[-1] // 2
    a = apply_rope_reference(x[..., :h], cos_pos, sin_pos, h, "half")
    b = apply_rope_reference(x[..., h:], cos_block, sin_block, h, "half")
    return torch.cat((a, b), dim=-1)


def rope_path(x: torch.Tensor) -> str:
    """Which implementation ``apply_rope``/``apply_rope_qk`` run for x: "triton" or "torch"."""
    return "triton" if backend.resolve(x) == "triton" else "torch"


def apply_rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int | None = None,
    pairing: str = "interleaved",
) -> torch.Tensor:
    """``apply_rope_reference`` as the model calls it, out of place and differentiable in x on both paths
    (the Triton kernel when the backend resolves to "triton")."""
    return apply_rope_qk(x, None, cos, sin, rotary_dim, pairing)[0]


def apply_rope_qk(
    q: torch.Tensor, k: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
    rotary_dim: int | None = None, pairing: str = "interleaved", inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Partial RoPE on q [B, H, T, D] and k [B, H_kv, T, D] (or k=None) with the same cos/sin.

    inplace=False returns new tensors; inplace=True overwrites the first rotary_dim dims of q and k and
    returns them (autograd works on non-leaf tensors, as for any in-place op). Differentiable in q and k;
    cos/sin get no gradient. Triton path: one kernel launch for q and k together, the backward applies
    the inverse rotation (sin → -sin).
    """
    R = _check_rope(q, cos, sin, rotary_dim, pairing, "q")
    if k is not None:
        if not isinstance(k, torch.Tensor) or k.dim() != 4 or k.dtype != q.dtype or k.shape[0] != q.shape[0] \
                or k.shape[2:] != q.shape[2:]:
            raise ValueError(f"k must be [B, H_kv, T, D] of q's dtype matching q {tuple(q.shape)} {q.dtype}, got "
                             f"{tuple(getattr(k, 'shape', ()))} {getattr(k, 'dtype', type(k))}")
        _check_rope(k, cos, sin, R, pairing, "k")
    path = rope_path(q)
    backend.record("rope", path)
    if path == "triton":
        from glmkit.kernels.rope import rope_triton

        return rope_triton(q, k, cos, sin, R, pairing, inplace)
    outs = []
    for t in (q, k):
        if t is None:
            outs.append(None)
        elif inplace:
            t[..., :R] = apply_rope_reference(t[..., :R], cos, sin, R, pairing)
            outs.append(t)
        else:
            outs.append(apply_rope_reference(t, cos, sin, R, pairing))
    return outs[0], outs[1]
