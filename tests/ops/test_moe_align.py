"""glmkit.ops.moe_align and its kernel (glmkit.kernels.moe_align): the token permutation of the grouped MoE GEMMs.

The kernel against the argsort reference, and both against the contract itself (checked here without either):
every slot once, one expert per block, increasing slot ids within an expert, padding with the sentinel S, the
empty tail marked -1. Routings: uniform and skewed (experts with no tokens, one expert in every token, everything on
one expert). CPU: the Triton interpreter, with NaN/INT_MIN-poisoned allocations (the ``poison`` fixture);
``-m gpu``: natively at GLM-4.5 sizes.
"""

from __future__ import annotations

import zlib

import pytest
import torch

import glmkit.kernels  # noqa: F401  (sets TRITON_INTERPRET=1 on machines without CUDA)
from glmkit import backend, use_backend
from glmkit.kernels.moe_align import moe_align as moe_align_kernel
from glmkit.ops.moe_align import moe_align, moe_align_reference, padded_size

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
NAMES = ("sorted_token_ids", "expert_ids", "num_tokens_post_pad", "counts")


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()) % 100_000)


def routing(N: int, k: int, E: int, mode: str, g: torch.Generator) -> torch.Tensor:
    """topk_idx [N, k] int64 (distinct experts per token unless the mode says otherwise)."""
    if mode == "uniform":
        return torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(N)])
    if mode == "zipf":  # expert r drawn with weight 1/(r+1)^2: a few experts take most slots
        p = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** 2
        return torch.multinomial(p.expand(N, E), k, replacement=False, generator=g)
    if mode == "empty":  # only k experts (1, E-1, 2, 3, ...) are ever chosen: the rest get no tokens
        used = torch.tensor(([1, E - 1] + list(range(2, E - 1)))[:k])
        return torch.stack([used[torch.randperm(k, generator=g)] for _ in range(N)])
    if mode == "one":  # expert 0 in every token, the other picks among the rest
        rest = torch.stack([1 + torch.randperm(E - 1, generator=g)[: k - 1] for _ in range(N)])
        return torch.cat([torch.zeros(N, 1, dtype=torch.long), rest], 1)
    if mode == "all_one":  # every slot on the last expert (k copies per token)
        return torch.full((N, k), E - 1, dtype=torch.long)
    raise ValueError(mode)


def check_contract(idx, got, E: int, bm: int, valid=None) -> None:
    """The layout documented in kernels/moe_align.py, checked from topk_idx alone. ``valid``: the slots that count
    (default all; the kernel drops ids outside [0, E))."""
    sorted_ids, expert_ids, ntpp, counts = (t.cpu() for t in got)
    flat, S = idx.reshape(-1).cpu().long(), idx.numel()
    valid = torch.ones(S, dtype=torch.bool) if valid is None else valid.reshape(-1).cpu()
    assert all(t.dtype == torch.int32 for t in (sorted_ids, expert_ids, ntpp, counts))
    assert sorted_ids.shape == (padded_size(S, E, bm),) and expert_ids.shape == (sorted_ids.numel() // bm,)
    assert torch.equal(counts, torch.bincount(flat[valid], minlength=E).int())
    real = sorted_ids[sorted_ids < S]
    assert torch.equal(real.sort().values, valid.nonzero()[:, 0].int())  # each valid slot once, no other
    assert ((sorted_ids >= 0) & (sorted_ids <= S)).all()  # real slots or the sentinel S
    total = int(ntpp)
    assert total == int(((counts + bm - 1) // bm * bm).sum())
    assert (sorted_ids[total:] == S).all() and (expert_ids[total // bm :] == -1).all()
    blocks = sorted_ids[:total].view(-1, bm)
    for b, e in enumerate(expert_ids[: total // bm].tolist()):
        ids = blocks[b][blocks[b] < S].long()
        assert ids.numel() and (flat[ids] == e).all()  # one expert per block, no block of padding only
        assert (ids[1:] > ids[:-1]).all()  # increasing slot ids
        assert (blocks[b][ids.numel() :] == S).all()  # padding only at the end of a block
    assert expert_ids[: total // bm].diff().ge(0).all()  # experts in order


ALIGN_CASES = [  # N, k, E, block_m, mode
    (7, 2, 4, 16, "uniform"),
    (40, 2, 8, 16, "uniform"),
    (33, 3, 5, 16, "zipf"),
    (40, 2, 8, 16, "zipf"),
    (40, 2, 8, 16, "empty"),
    (23, 2, 6, 16, "one"),
    (40, 2, 8, 16, "all_one"),
    (1, 1, 4, 16, "uniform"),
    (100, 2, 8, 32, "zipf"),
    (29, 2, 7, 4, "uniform"),
    (31, 2, 4, 1, "zipf"),
    (90, 2, 64, 16, "uniform"),
]


@pytest.mark.parametrize("N,k,E,bm,mode", ALIGN_CASES)
def test_kernel_matches_reference_and_the_contract(N, k, E, bm, mode, poison):
    idx = routing(N, k, E, mode, _gen("align", N, k, E, bm, mode)).to(DEV)
    got = moe_align_kernel(idx.int() if N % 2 else idx, E, bm)  # int32 or int64 ids
    want = moe_align_reference(idx, E, bm)
    for name, a, b in zip(NAMES, got, want):
        assert a.dtype == torch.int32, name
        assert torch.equal(a.cpu(), b.cpu()), f"{name}: kernel {a.tolist()} vs reference {b.tolist()}"
    check_contract(idx, got, E, bm)


def test_docstring_example():
    """Slots s = token·k + j of [[2, 0], [1, 2], [0, 0], [2, 1]] over 3 experts in blocks of 4, by hand:
    expert 0 has slots 1, 4, 5; expert 1 has 2, 7; expert 2 has 0, 3, 6; the sentinel is 8."""
    idx = torch.tensor([[2, 0], [1, 2], [0, 0], [2, 1]], device=DEV)
    for name, fn in (("kernel", moe_align_kernel), ("reference", moe_align_reference)):
        sorted_ids, expert_ids, ntpp, counts = fn(idx, 3, 4)
        assert sorted_ids.tolist()[:12] == [1, 4, 5, 8, 2, 7, 8, 8, 0, 3, 6, 8], name
        assert expert_ids.tolist()[:3] == [0, 1, 2] and set(expert_ids.tolist()[3:]) <= {-1}, name
        assert int(ntpp) == 12 and counts.tolist() == [3, 2, 3], name


def test_padded_size_is_the_worst_case():
    """S_pad: room for every routing; met exactly when min(E, S) experts each get one slot past a block edge."""
    for S, E, bm in [(5, 8, 4), (14, 4, 16), (1, 1, 16), (256, 64, 16), (30, 7, 1)]:
        n = padded_size(S, E, bm)
        assert n % bm == 0 and n >= S
        assert n == -(-(S + min(E, S) * (bm - 1)) // bm) * bm
    # 5 slots on 5 different experts, blocks of 4: five blocks of one slot and three sentinels
    idx = torch.arange(5).view(5, 1)
    _, _, ntpp, _ = moe_align_reference(idx, 8, 4)
    assert int(ntpp) == padded_size(5, 8, 4) == 20


def test_kernel_drops_ids_outside_the_experts(poison):
    """No host sync in the kernel, so ids outside [0, E) are dropped, not checked; the reference refuses them."""
    idx = torch.tensor([[0, 5], [2, -1], [1, 2], [3, 4]], device=DEV)
    valid = (idx >= 0) & (idx < 4)
    check_contract(idx, moe_align_kernel(idx, 4, 4), 4, 4, valid)
    with pytest.raises(ValueError, match="topk_idx values"):
        moe_align_reference(idx, 4, 4)


def test_dispatch_both_backends():
    idx = routing(19, 2, 6, "zipf", _gen("dispatch")).to(DEV)
    res = {}
    for name in ("torch", "triton"):
        with use_backend(name), backend.audit() as a:
            res[name] = moe_align(idx, 6, 16)
        assert a.paths("moe_align") == {name}
    for n, a, b in zip(NAMES, res["torch"], res["triton"]):
        assert torch.equal(a, b), n


def test_empty_routing():
    idx = torch.zeros(0, 2, dtype=torch.long, device=DEV)
    for fn in (moe_align_kernel, moe_align_reference):
        sorted_ids, expert_ids, ntpp, counts = fn(idx, 4, 16)
        assert sorted_ids.numel() == 0 and expert_ids.numel() == 0 and int(ntpp) == 0
        assert torch.equal(counts.cpu(), torch.zeros(4, dtype=torch.int32))


def test_bad_arguments_are_named():
    idx = torch.tensor([[0, 1], [2, 3]], device=DEV)
    for fn in (moe_align, moe_align_reference):
        with pytest.raises(ValueError, match="block_m"):
            fn(idx, 4, 24)
        with pytest.raises(ValueError, match="block_m"):
            fn(idx, 4, 0)
        with pytest.raises(ValueError, match="integer"):
            fn(idx.float(), 4, 16)
        with pytest.raises(ValueError, match=r"\[N, k\]"):
            fn(idx.reshape(-1), 4, 16)
        with pytest.raises(ValueError, match="num_experts"):
            fn(idx, 0, 16)


@pytest.mark.gpu
@pytest.mark.parametrize("bm", [16, 64, 128])
def test_gpu_align_large(bm, poison):
    idx = routing(8192, 8, 128, "zipf", _gen("gpu-align", bm)).cuda()
    got = moe_align_kernel(idx, 128, bm)
    for name, a, b in zip(NAMES, got, moe_align_reference(idx, 128, bm)):
        assert torch.equal(a, b), name
    check_contract(idx, got, 128, bm)
