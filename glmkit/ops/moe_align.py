"""Token permutation for the grouped MoE GEMMs: sort the N·k routed slots by expert and pad each expert's run to
a multiple of the GEMM's row block (the contract of vLLM's ``moe_align_block_size``; the kernel, with a picture
of the layout, is ``kernels/moe_align.py``). The reference here is the same contract in plain torch: a stable
argsort where the kernel uses a histogram, a scan and a scatter.
"""

from __future__ import annotations

import torch

from glmkit import backend


def padded_size(num_slots: int, num_experts: int, block_m: int) -> int:
    """S_pad: the fixed length of ``sorted_token_ids`` — enough for any routing of ``num_slots`` slots over
    ``num_experts`` experts when each used expert pads its run up to a multiple of ``block_m``."""
    worst = num_slots + min(num_experts, num_slots) * (block_m - 1)
    return -(-worst // block_m) * block_m


def _check(topk_idx, num_experts, block_m) -> None:
    if not isinstance(topk_idx, torch.Tensor) or topk_idx.dim() != 2 or topk_idx.is_floating_point():
        raise ValueError(f"topk_idx must be an integer [N, k] tensor, got {getattr(topk_idx, 'shape', topk_idx)}")
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    if not isinstance(block_m, int) or block_m < 1 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two >= 1, got {block_m!r}")


def moe_align_reference(topk_idx: torch.Tensor, num_experts: int, block_m: int):
    """(sorted_token_ids [S_pad] int32, expert_ids [S_pad / block_m] int32 (-1 for the empty tail),
    num_tokens_post_pad [1] int32, counts [E] int32), as documented in ``kernels/moe_align.py``."""
    _check(topk_idx, num_experts, block_m)
    if topk_idx.numel() and (int(topk_idx.min()) < 0 or int(topk_idx.max()) >= num_experts):
        raise ValueError(f"topk_idx values must lie in [0, num_experts) = [0, {num_experts})")
    dev = topk_idx.device
    S, E = topk_idx.numel(), num_experts
    S_pad = padded_size(S, E, block_m)
    flat = topk_idx.reshape(-1).long()
    counts = torch.bincount(flat, minlength=E)
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    starts = ends - padded
    total = int(ends[-1])
    order = torch.argsort(flat, stable=True)  # slots grouped by expert, increasing slot id
    e_sorted = flat[order]
    first = torch.cumsum(counts, 0) - counts  # first index of each expert in ``order``
    rank = torch.arange(S, device=dev) - first[e_sorted]
    sorted_ids = torch.full((S_pad,), S, dtype=torch.int32, device=dev)
    sorted_ids[starts[e_sorted] + rank] = order.to(torch.int32)
    block_starts = torch.arange(S_pad // block_m, device=dev) * block_m
    expert_ids = torch.searchsorted(ends, block_starts, right=True).to(torch.int32)
    expert_ids[block_starts >= total] = -1
    ntpp = torch.tensor([total], dtype=torch.int32, device=dev)
    return sorted_ids, expert_ids, ntpp, counts.to(torch.int32)


def moe_align(topk_idx: torch.Tensor, num_experts: int, block_m: int):
    """``moe_align_reference``'s outputs, on the kernel where ``glmkit.backend`` resolves to "triton" (no host
    sync there: ids outside [0, E) are dropped instead of checked)."""
    _check(topk_idx, num_experts, block_m)
    path = "triton" if backend.resolve(topk_idx) == "triton" else "torch"
    backend.record("moe_align", path)
    if path == "triton":
        from glmkit.kernels.moe_align import moe_align as kernel

        return kernel(topk_idx, num_experts, block_m)
    return moe_align_reference(topk_idx, num_experts, block_m)
