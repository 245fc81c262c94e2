"""GLM's autoregressive blank infilling (Du et al. 2021, arXiv:2103.10360).

(Starter: the helper that builds lesson 01 completes this module; keep ``attention_mask``'s signature.)
"""

from __future__ import annotations

import torch


def attention_mask(sep: torch.Tensor, T: int) -> torch.Tensor:
    """The GLM mask: key j is visible to query i iff j < sep (Part A) or j <= i (causal Part B).

    sep: [B] int64, each sample's Part-A length (0 = plain causal, T = fully bidirectional).
    Returns [B, T, T] bool, True where query i (row) may attend key j (column).
    """
    if sep.dim() != 1 or sep.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"sep must be a 1-D integer tensor of Part-A lengths, got {sep.dtype} {tuple(sep.shape)}")
    i = torch.arange(T, device=sep.device)
    causal = i[None, :, None] >= i[None, None, :]          # [1, T(query), T(key)]
    in_part_a = i[None, None, :] < sep[:, None, None]       # [B, 1, T(key)]
    return causal | in_part_a
