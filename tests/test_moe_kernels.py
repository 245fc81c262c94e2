"""The MoE kernels (glmkit.kernels.moe_align, glmkit.kernels.moe_gemm) against plain-torch references.

CPU: the Triton interpreter at small shapes (N = 1..40 tokens, H = 32/48, I = 16..64, E = 4..8, k = 1..3):
the permutation against its argsort reference under uniform and skewed routing (experts with no tokens,
one expert in every token, everything on one expert), the grouped GEMM with and without the SwiGLU
epilogue, the combine and the weight gradient into NaN-poisoned buffers, and ``moe_experts`` forward and
backward (all four gradients) against autograd through a loop over experts written here (fp64), plus
glmkit.moe's ``experts_loop`` when that module is present. `-m gpu`: natively, bf16 and larger shapes.
"""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F

import glmkit.kernels  # noqa: F401  (sets TRITON_INTERPRET=1 on machines without CUDA)
from glmkit.kernels.moe_align import moe_align, moe_align_reference, padded_size
from glmkit.kernels.moe_gemm import (default_block_m, moe_combine, moe_experts, moe_gemm,
                                     moe_weight_grad)
from glmkit.testing import REL_TOL, assert_close, poisoned

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()) % 100_000)


def routing(N: int, k: int, E: int, mode: str, g: torch.Generator) -> torch.Tensor:
    """topk_idx [N, k] int64 (distinct experts per token unless the mode says otherwise)."""
    if mode == "uniform":
        return torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(N)])
    if mode == "zipf":      # expert r drawn with weight 1/(r+1)^2: a few experts take most slots
        p = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** 2
        return torch.multinomial(p.expand(N, E), k, replacement=False, generator=g)
    if mode == "empty":     # only k experts (1, E-1, 2, 3, ...) are ever chosen: the rest get no tokens
        used = torch.tensor(([1, E - 1] + list(range(2, E - 1)))[:k])
        return torch.stack([used[torch.randperm(k, generator=g)] for _ in range(N)])
    if mode == "one":       # expert 0 in every token, the other picks among the rest
        rest = torch.stack([1 + torch.randperm(E - 1, generator=g)[: k - 1] for _ in range(N)])
        return torch.cat([torch.zeros(N, 1, dtype=torch.long), rest], 1)
    if mode == "all_one":   # every slot on the last expert (k copies per token)
        return torch.full((N, k), E - 1, dtype=torch.long)
    raise ValueError(mode)


# ---- plain-torch references, written here independently of the kernels and of glmkit.moe ----

def gemm_reference(a, w, topk_idx, top_k, swiglu=False):
    """out[s] = a[s // top_k] @ w[e(s)]ᵀ (then silu(gate)·up) by a loop over experts, in fp64."""
    flat = topk_idx.reshape(-1)
    S = flat.numel()
    rows = a.double()[torch.arange(S) // top_k]
    n = w.shape[1] // 2 if swiglu else w.shape[1]
    out = torch.zeros(S, n, dtype=torch.float64)
    for e in range(w.shape[0]):
        s = (flat == e).nonzero(as_tuple=True)[0]
        if s.numel():
            h = rows[s] @ w[e].double().T
            if swiglu:
                gate, up = h.chunk(2, -1)
                h = F.silu(gate) * up
            out[s] = h
    return out


def experts_reference(x, topk_idx, topk_weight, w_gate_up, w_down):
    """y[t] = Σ_j w[t, j] · down_e(silu(gate_e x_t) · up_e x_t): a loop over experts, differentiable."""
    y = torch.zeros_like(x)
    for e in range(w_gate_up.shape[0]):
        t, j = (topk_idx == e).nonzero(as_tuple=True)
        if t.numel() == 0:
            continue
        gate, up = (x[t] @ w_gate_up[e].T).chunk(2, -1)
        z = (F.silu(gate) * up) @ w_down[e].T
        y = y.index_add(0, t, z * topk_weight[t, j, None])
    return y


def _weights(E, H, I, dtype, g, device=DEV):
    w_gate_up = (torch.randn(E, 2 * I, H, generator=g) / H**0.5).to(device, dtype)
    w_down = (torch.randn(E, H, I, generator=g) / I**0.5).to(device, dtype)
    return w_gate_up, w_down


# ---- moe_align ----

ALIGN_CASES = [  # N, k, E, block_m, mode
    (7, 2, 4, 16, "uniform"), (40, 2, 8, 16, "uniform"), (33, 3, 5, 16, "zipf"), (40, 2, 8, 16, "zipf"),
    (40, 2, 8, 16, "empty"), (23, 2, 6, 16, "one"), (40, 2, 8, 16, "all_one"), (1, 1, 4, 16, "uniform"),
    (100, 2, 8, 32, "zipf"), (29, 2, 7, 4, "uniform"), (31, 2, 4, 1, "zipf"), (90, 2, 64, 16, "uniform"),
]


@pytest.mark.parametrize("N,k,E,bm,mode", ALIGN_CASES)
def test_align_matches_reference(N, k, E, bm, mode):
    idx = routing(N, k, E, mode, _gen("align", N, k, E, bm, mode)).to(DEV)
    buf = poisoned((padded_size(N * k, E, bm),), torch.int32, DEV)
    got = moe_align(idx.int() if N % 2 else idx, E, bm, out=buf)
    assert got[0].data_ptr() == buf.data_ptr()
    want = moe_align_reference(idx, E, bm)
    for name, a, b in zip(("sorted_token_ids", "expert_ids", "num_tokens_post_pad", "counts"), got, want):
        assert a.dtype == torch.int32, name
        assert torch.equal(a.cpu(), b.cpu()), f"{name}: kernel {a.tolist()} vs reference {b.tolist()}"
    # the contract itself, independent of the reference
    sorted_ids, expert_ids, ntpp, counts = (t.cpu() for t in got)
    flat, S = idx.reshape(-1).cpu(), N * k
    assert torch.equal(counts, torch.bincount(flat, minlength=E).int())
    real = sorted_ids[sorted_ids < S]
    assert torch.equal(real.sort().values, torch.arange(S, dtype=torch.int32))      # each slot once
    total = int(ntpp)
    assert total % bm == 0 and (sorted_ids[total:] == S).all() and (expert_ids[total // bm:] == -1).all()
    blocks = sorted_ids[:total].view(-1, bm)
    for b, e in enumerate(expert_ids[: total // bm].tolist()):
        ids = blocks[b][blocks[b] < S].long()
        assert ids.numel() and (flat[ids] == e).all()                            # one expert per block
        assert (ids[1:] > ids[:-1]).all()                                         # increasing slot ids


def test_align_docstring_example():
    idx = torch.tensor([[2, 0], [1, 2], [0, 0], [2, 1]], device=DEV)
    sorted_ids, expert_ids, ntpp, counts = moe_align(idx, 3, 4)
    assert sorted_ids.tolist()[:12] == [1, 4, 5, 8, 2, 7, 8, 8, 0, 3, 6, 8]
    assert expert_ids.tolist()[:3] == [0, 1, 2] and set(expert_ids.tolist()[3:]) <= {-1}
    assert int(ntpp) == 12 and counts.tolist() == [3, 2, 3]


def test_align_rejects_bad_input():
    idx = torch.tensor([[0, 1], [2, 3]], device=DEV)
    with pytest.raises(ValueError, match="topk_idx values"):
        moe_align(idx, 3, 16)
    with pytest.raises(ValueError, match="block_m"):
        moe_align(idx, 4, 24)
    with pytest.raises(TypeError, match="integer"):
        moe_align(idx.float(), 4, 16)
    with pytest.raises(ValueError, match="2-D"):
        moe_align(idx.reshape(-1), 4, 16)
    with pytest.raises(ValueError, match="out"):
        moe_align(idx, 4, 16, out=torch.empty(3, dtype=torch.int32, device=DEV))


# ---- the grouped GEMM, combine and weight gradient ----

GEMM_CASES = [  # N, k, E, H, I, mode, dtype
    (7, 2, 4, 32, 16, "uniform", torch.float32), (37, 2, 6, 48, 40, "zipf", torch.float32),
    (21, 2, 8, 32, 64, "empty", torch.float16), (40, 2, 8, 48, 24, "one", torch.float16),
    (13, 1, 4, 32, 16, "all_one", torch.float32),
]


@pytest.mark.parametrize("N,k,E,H,I,mode,dtype", GEMM_CASES)
def test_grouped_gemm_forward(N, k, E, H, I, mode, dtype):
    g = _gen("gemm", N, k, E, H, I, mode, dtype)
    idx = routing(N, k, E, mode, g).to(DEV)
    x = torch.randn(N, H, generator=g).to(DEV, dtype)
    w_gate_up, w_down = _weights(E, H, I, dtype, g)
    bm = 16
    align = moe_align(idx, E, bm)
    S = N * k
    # GEMM 1 with the SwiGLU epilogue, gathering x by token; also keep the pre-activation
    act, pre = poisoned((S, I), dtype, DEV), poisoned((S, 2 * I), dtype, DEV)
    a = moe_gemm(x, w_gate_up, *align[:3], top_k=k, block_m=bm, swiglu=True, out=act, pre_out=pre)
    assert a.data_ptr() == act.data_ptr()
    assert_close("pre-activation", gemm_reference(x, w_gate_up, idx.cpu(), k), pre)
    assert_close("swiglu epilogue", gemm_reference(x, w_gate_up, idx.cpu(), k, swiglu=True), a)
    # the same GEMM without the epilogue, and GEMM 2 reading the intermediate by slot, weighted
    plain = moe_gemm(x, w_gate_up, *align[:3], top_k=k, block_m=bm, out=poisoned((S, 2 * I), dtype, DEV))
    assert_close("plain gather-GEMM", gemm_reference(x, w_gate_up, idx.cpu(), k), plain)
    w = torch.rand(N, k, generator=g).to(DEV)
    z = moe_gemm(a, w_down, *align[:3], top_k=1, block_m=bm, topk_weight=w, out=poisoned((S, H), dtype, DEV))
    assert_close("down GEMM · weight", gemm_reference(a, w_down, idx.cpu(), 1) * w.reshape(-1, 1).double().cpu(), z)
    # the weighted combine
    y = moe_combine(z, k, None, out=poisoned((N, H), dtype, DEV))
    assert_close("combine", z.double().cpu().view(N, k, H).sum(1), y)
    y2 = moe_combine(z, k, w)
    assert_close("weighted combine", (z.double().cpu().view(N, k, H) * w.double().cpu()[..., None]).sum(1), y2)


@pytest.mark.parametrize("mode,dtype", [("zipf", torch.float32), ("empty", torch.float16)])
def test_weight_grad(mode, dtype):
    N, k, E, M, Nn = 19, 2, 6, 48, 40
    g = _gen("wgrad", mode, dtype)
    idx = routing(N, k, E, mode, g).to(DEV)
    left = torch.randn(N, M, generator=g).to(DEV, dtype)           # read by token (left_div = k)
    right = torch.randn(N * k, Nn, generator=g).to(DEV, dtype)     # read by slot
    w = torch.rand(N, k, generator=g).to(DEV)
    sorted_ids, _, _, counts = moe_align(idx, E, 16)
    out = poisoned((E, M, Nn), dtype, DEV)
    dW = moe_weight_grad(left, right, sorted_ids, counts, block_m=16, left_div=k, right_div=1,
                         topk_weight=w, out=out)
    assert dW.data_ptr() == out.data_ptr()
    flat = idx.reshape(-1).cpu()
    L = left.double().cpu()[torch.arange(N * k) // k] * w.double().cpu().reshape(-1, 1)
    want = torch.stack([L[flat == e].T @ right.double().cpu()[flat == e] for e in range(E)])
    assert_close("expert weight gradient", want, dW)
    assert (dW[counts == 0] == 0).all()


def test_gemm_rejects_bad_input():
    idx = torch.tensor([[0, 1], [2, 3]], device=DEV)
    align = moe_align(idx, 4, 16)
    x = torch.randn(2, 32, device=DEV)
    w = torch.randn(4, 64, 32, device=DEV)
    with pytest.raises(ValueError, match="K"):
        moe_gemm(x, w.transpose(1, 2), *align[:3], top_k=2, block_m=16)
    with pytest.raises(TypeError, match="dtype"):
        moe_gemm(x.half(), w, *align[:3], top_k=2, block_m=16)
    with pytest.raises(ValueError, match="block_m"):
        moe_gemm(x, w, *align[:3], top_k=2, block_m=32)
    with pytest.raises(ValueError, match="out"):
        moe_gemm(x, w, *align[:3], top_k=2, block_m=16, swiglu=True, out=torch.empty(4, 64, device=DEV))


# ---- moe_experts: forward and backward through autograd ----

def _check_experts(N, k, E, H, I, mode, dtype, block_m=None, device=DEV, key=()):
    g = _gen("experts", N, k, E, H, I, mode, dtype, block_m, key)
    idx = routing(N, k, E, mode, g).to(device)
    x = torch.randn(N, H, generator=g).to(device, dtype).requires_grad_()
    w = torch.softmax(torch.randn(N, k, generator=g), -1).to(device).requires_grad_()
    w_gate_up, w_down = (t.requires_grad_() for t in _weights(E, H, I, dtype, g, device))
    y = moe_experts(x, idx, w, w_gate_up, w_down, block_m=block_m)
    assert y.shape == (N, H) and y.dtype == dtype
    dy = torch.randn(N, H, generator=g).to(device, dtype)
    grads = torch.autograd.grad(y, (x, w, w_gate_up, w_down), dy)
    leaves = [t.detach().double().cpu().requires_grad_() for t in (x, w, w_gate_up, w_down)]
    y_ref = experts_reference(leaves[0], idx.cpu(), *leaves[1:])
    ref_grads = torch.autograd.grad(y_ref, leaves, dy.double().cpu())
    assert_close("moe_experts forward", y_ref, y)
    with torch.no_grad():               # the inference path: no pre-activation kept, no autograd
        assert_close("moe_experts forward, no_grad", y_ref, moe_experts(x, idx, w, w_gate_up, w_down, block_m=block_m))
    for name, want, got in zip(("dx", "d topk_weight", "d w_gate_up", "d w_down"), ref_grads, grads):
        assert got.shape == want.shape and got.dtype == (torch.float32 if name == "d topk_weight" else dtype)
        assert_close(f"moe_experts {name}", want, got, tol=REL_TOL[dtype])   # d topk_weight is fp32,
    return idx                                                                # computed from `dtype` values


EXPERT_CASES = [  # N, k, E, H, I, mode, dtype
    (7, 2, 4, 32, 16, "uniform", torch.float32), (37, 2, 6, 48, 40, "zipf", torch.float32),
    (40, 2, 8, 32, 64, "empty", torch.float32), (23, 2, 8, 48, 32, "one", torch.float16),
    (33, 3, 5, 32, 24, "uniform", torch.float16), (16, 2, 4, 32, 16, "all_one", torch.float32),
]


@pytest.mark.parametrize("N,k,E,H,I,mode,dtype", EXPERT_CASES)
def test_moe_experts_forward_backward(N, k, E, H, I, mode, dtype):
    _check_experts(N, k, E, H, I, mode, dtype)


def test_moe_experts_decode_batch():
    """A decode step: 3 tokens over 8 experts with 16-row blocks (mostly padding)."""
    assert default_block_m(6, 8, "cuda") == 16
    _check_experts(3, 2, 8, 32, 16, "uniform", torch.float32, block_m=16)


def test_moe_experts_larger_block_and_no_weight_grad():
    """block_m = 32, and only x requiring grad (the other backward kernels are skipped)."""
    g = _gen("partial")
    N, k, E, H, I = 25, 2, 4, 32, 16
    idx = routing(N, k, E, "zipf", g).to(DEV)
    x = torch.randn(N, H, generator=g).to(DEV).requires_grad_()
    w = torch.rand(N, k, generator=g).to(DEV)
    wgu, wd = _weights(E, H, I, torch.float32, g)
    y = moe_experts(x, idx, w, wgu, wd, block_m=32)
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    xr = x.detach().double().cpu().requires_grad_()
    yr = experts_reference(xr, idx.cpu(), w.double().cpu(), wgu.double().cpu(), wd.double().cpu())
    (dxr,) = torch.autograd.grad(yr, xr, torch.ones_like(yr))
    assert_close("forward", yr, y)
    assert_close("dx", dxr, dx)


def test_moe_experts_rejects_bad_input():
    x = torch.randn(4, 32, device=DEV)
    idx = torch.tensor([[0, 1]] * 4, device=DEV)
    w = torch.rand(4, 2, device=DEV)
    wgu, wd = torch.randn(4, 32, 32, device=DEV), torch.randn(4, 32, 16, device=DEV)
    with pytest.raises(ValueError, match="w_down"):
        moe_experts(x, idx, w, wgu, wd.transpose(1, 2))
    with pytest.raises(ValueError, match="w_gate_up"):
        moe_experts(x, idx, w, wgu[:, :, :16], wd)
    with pytest.raises(TypeError, match="dtype"):
        moe_experts(x.half(), idx, w, wgu, wd)
    with pytest.raises(ValueError, match="topk_idx values"):
        moe_experts(x, idx + 3, w, wgu, wd)
    with pytest.raises(ValueError, match="\\[N, k\\]"):
        moe_experts(x, idx, w[:, :1], wgu, wd)
    with pytest.raises(ValueError, match="block_m"):
        moe_experts(x, idx, w, wgu, wd, block_m=8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_glmkit_moe(dtype):
    """Agreement with glmkit.moe (the other half of lesson 04): its reference loop, and its Experts module
    running on these kernels through ``impl=experts_triton``, forward and backward."""
    moe = pytest.importorskip("glmkit.moe")
    from glmkit.kernels.moe_gemm import experts_triton

    g = _gen("glmkit.moe", dtype)
    N, k, E, H, I = 21, 2, 6, 32, 24
    idx = routing(N, k, E, "zipf", g).to(DEV)
    x = torch.randn(N, H, generator=g).to(DEV, dtype)
    w = torch.softmax(torch.randn(N, k, generator=g), -1).to(DEV)
    loop = moe.Experts(E, H, I, impl="loop").to(DEV, dtype)
    fast = moe.Experts(E, H, I, impl=experts_triton).to(DEV, dtype)
    fast.load_state_dict(loop.state_dict())
    y_loop, y_fast = loop(x, idx, w), fast(x, idx, w)
    assert_close("Experts(impl=experts_triton) vs experts_loop", y_loop.double(), y_fast, tol=REL_TOL[dtype])
    dy = torch.randn(N, H, generator=g).to(DEV, dtype)
    for m, y in ((loop, y_loop), (fast, y_fast)):
        y.backward(dy)
    for name in ("gate_up_proj", "down_proj"):
        want, got = getattr(loop, name).grad, getattr(fast, name).grad
        assert_close(f"d {name} vs experts_loop", want.double(), got, tol=2 * REL_TOL[dtype])


# ---- GPU: natively, bf16 and larger shapes ----

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("mode", ["uniform", "zipf", "empty", "all_one"])
def test_gpu_moe_experts(dtype, mode):
    _check_experts(512, 4, 16, 256, 192, mode, dtype, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("N", [1, 5, 16])
def test_gpu_decode(N):
    _check_experts(N, 8, 64, 512, 256, "uniform", torch.bfloat16, device="cuda", key="decode")


@pytest.mark.gpu
@pytest.mark.parametrize("bm", [16, 64, 128])
def test_gpu_align_large(bm):
    g = _gen("gpu-align", bm)
    idx = routing(8192, 8, 128, "zipf", g).cuda()
    for a, b in zip(moe_align(idx, 128, bm), moe_align_reference(idx, 128, bm)):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_grouped_gemm_bf16_large():
    g = _gen("gpu-gemm")
    N, k, E, H, I = 2048, 8, 64, 1024, 512
    idx = routing(N, k, E, "uniform", g).cuda()
    x = torch.randn(N, H, generator=g).cuda().bfloat16()
    wgu, _ = _weights(E, H, I, torch.bfloat16, g, "cuda")
    bm = default_block_m(N * k, E, "cuda")
    align = moe_align(idx, E, bm)
    out = poisoned((N * k, I), torch.bfloat16, "cuda")
    a = moe_gemm(x, wgu, *align[:3], top_k=k, block_m=bm, swiglu=True, out=out)
    assert_close("bf16 swiglu gather-GEMM", gemm_reference(x.cpu(), wgu.cpu(), idx.cpu(), k, swiglu=True), a)
