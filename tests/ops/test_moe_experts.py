"""glmkit.ops.moe_experts (the routed experts: reference loop, sorted torch path, dispatch, autograd) and its kernels
(glmkit.kernels.moe_experts: grouped GEMMs gathering rows by token, SwiGLU epilogue, combine, weight gradient).

Everything is checked against plain-torch references written here (a loop over experts in fp64, independent of the
code under test): the grouped GEMM with and without the SwiGLU epilogue, the combine and the weight gradient, and
``moe_experts`` forward and backward (all four gradients) on every path, under uniform and skewed routing (experts with
no tokens, one expert in every token, everything on one expert). CPU: the Triton interpreter at small shapes
(N = 1..53 tokens, H = 13..48, I = 7..64, E = 4..12, k = 1..4) with NaN-poisoned allocations (the ``poison``
fixture); ``-m gpu``: natively, bf16 and larger shapes.
"""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F

import glmkit.kernels  # noqa: F401  (sets TRITON_INTERPRET=1 on machines without CUDA)
from glmkit import backend, use_backend
from glmkit.kernels.moe_align import moe_align
from glmkit.kernels.moe_experts import default_block_m, moe_combine, moe_gemm, moe_weight_grad
from glmkit.moe import Experts
from glmkit.ops import moe_experts as ops_moe
from glmkit.ops.moe_experts import MoEExpertsFunction, moe_experts, moe_experts_reference, moe_experts_sorted
from glmkit.testing import REL_TOL, assert_close

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
FP32 = 1e-5


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


# ---- plain-torch references, written here independently of the kernels and of glmkit.ops ----


def gemm_reference(a, w, topk_idx, top_k, swiglu=False):
    """out[s] = a[s // top_k] @ w[e(s)]ᵀ (then silu(gate)·up) by a loop over experts, in fp64."""
    flat = topk_idx.reshape(-1).cpu()
    S = flat.numel()
    rows = a.double().cpu()[torch.arange(S) // top_k]
    n = w.shape[1] // 2 if swiglu else w.shape[1]
    out = torch.zeros(S, n, dtype=torch.float64)
    for e in range(w.shape[0]):
        s = (flat == e).nonzero(as_tuple=True)[0]
        if s.numel():
            h = rows[s] @ w[e].double().cpu().T
            if swiglu:
                gate, up = h.chunk(2, -1)
                h = F.silu(gate) * up
            out[s] = h
    return out


def experts_reference(x, topk_idx, topk_weight, w_gate_up, w_down, limit=None, round_to=None):
    """y[t] = Σ_j w[t, j] · down_e(silu(gate_e x_t) · up_e x_t): a loop over experts, differentiable. ``limit`` L:
    glm5_next's clamped SwiGLU, silu(min(gate, L)) · clamp(up, -L, L)."""
    y = torch.zeros_like(x)
    for e in range(w_gate_up.shape[0]):
        t, j = (topk_idx == e).nonzero(as_tuple=True)
        if t.numel() == 0:
            continue
        gate, up = (x[t] @ w_gate_up[e].T).chunk(2, -1)
        if round_to is not None:  # h as stored in round_to (the clamp's kink sits on the rounded value, as in torch)
            gate, up = gate.to(round_to).to(x.dtype), up.to(round_to).to(x.dtype)
        if limit is not None:
            gate, up = torch.clamp(gate, max=limit), torch.clamp(up, -limit, limit)
        z = (F.silu(gate) * up) @ w_down[e].T
        y = y.index_add(0, t, z * topk_weight[t, j, None])
    return y


def clear_limit(x, topk_idx, w_gate_up, dtype, delta=4e-6):
    """A clamp limit L near 0.5 whose kink no routed pre-activation h comes within ``delta`` of, after rounding h to
    ``dtype``: the clamp's gradient jumps at L, so an h that fp32 accumulation order (a few 1e-7) could move across
    it would make any two correct implementations disagree by a whole element's gradient."""
    xd, wd = x.detach().double().cpu(), w_gate_up.detach().double().cpu()
    hs = []
    for e in range(wd.shape[0]):
        t = (topk_idx.cpu() == e).any(1).nonzero(as_tuple=True)[0]
        hs.append(xd[t] @ wd[e].T)
    gate, up = torch.cat(hs).chunk(2, -1)

    def kept(h, lim, both):
        r = h.to(dtype).double()
        return (r <= lim) & (r >= -lim) if both else r <= lim

    for lim in [0.5 + 0.005 * j for j in range(60)]:  # 1 %-steps: a new rounding threshold each, even in bf16
        halves = ((gate, False), (up, True))
        if all(torch.equal(kept(h - delta, lim, both), kept(h + delta, lim, both)) for h, both in halves):
            return lim
    raise AssertionError("no clamp limit in [0.5, 0.8) is clear of the pre-activations")


def _weights(E, H, I, dtype, g, device=DEV):
    w_gate_up = (torch.randn(E, 2 * I, H, generator=g) / H**0.5).to(device, dtype)
    w_down = (torch.randn(E, H, I, generator=g) / I**0.5).to(device, dtype)
    return w_gate_up, w_down


# ================================================================ the kernels' pieces

GEMM_CASES = [  # N, k, E, H, I, mode, dtype
    (7, 2, 4, 32, 16, "uniform", torch.float32),
    (37, 2, 6, 48, 40, "zipf", torch.float32),
    (21, 2, 8, 32, 64, "empty", torch.float16),
    (40, 2, 8, 48, 24, "one", torch.float16),
    (13, 1, 4, 32, 16, "all_one", torch.float32),
]


@pytest.mark.parametrize("N,k,E,H,I,mode,dtype", GEMM_CASES)
def test_grouped_gemm_and_combine(N, k, E, H, I, mode, dtype, poison):
    g = _gen("gemm", N, k, E, H, I, mode, dtype)
    idx = routing(N, k, E, mode, g).to(DEV)
    x = torch.randn(N, H, generator=g).to(DEV, dtype)
    w_gate_up, w_down = _weights(E, H, I, dtype, g)
    bm = 16
    align = moe_align(idx, E, bm)
    S = N * k
    # GEMM 1 with the SwiGLU epilogue, gathering x by token; also keep the pre-activation
    pre = torch.empty((S, 2 * I), dtype=dtype, device=DEV)  # poisoned: every element must be written
    a = moe_gemm(x, w_gate_up, *align[:3], top_k=k, block_m=bm, swiglu=True, pre_out=pre)
    assert a.shape == (S, I) and a.dtype == dtype
    assert_close("pre-activation", gemm_reference(x, w_gate_up, idx, k), pre)
    assert_close("swiglu epilogue", gemm_reference(x, w_gate_up, idx, k, swiglu=True), a)
    # the same GEMM without the epilogue, and GEMM 2 reading the intermediate by slot, weighted
    plain = moe_gemm(x, w_gate_up, *align[:3], top_k=k, block_m=bm)
    assert_close("plain gather-GEMM", gemm_reference(x, w_gate_up, idx, k), plain)
    w = torch.rand(N, k, generator=g).to(DEV)
    z = moe_gemm(a, w_down, *align[:3], top_k=1, block_m=bm, topk_weight=w)
    assert_close("down GEMM · weight", gemm_reference(a, w_down, idx, 1) * w.reshape(-1, 1).double().cpu(), z)
    # the combine, without and with weights
    y = moe_combine(z, k)
    assert y.shape == (N, H) and y.dtype == dtype
    assert_close("combine", z.double().cpu().view(N, k, H).sum(1), y)
    y2 = moe_combine(z, k, w)
    assert_close("weighted combine", (z.double().cpu().view(N, k, H) * w.double().cpu()[..., None]).sum(1), y2)


@pytest.mark.parametrize("mode,dtype", [("zipf", torch.float32), ("empty", torch.float16)])
def test_weight_grad(mode, dtype, poison):
    N, k, E, M, Nn = 19, 2, 6, 48, 40
    g = _gen("wgrad", mode, dtype)
    idx = routing(N, k, E, mode, g).to(DEV)
    left = torch.randn(N, M, generator=g).to(DEV, dtype)  # read by token (left_div = k)
    right = torch.randn(N * k, Nn, generator=g).to(DEV, dtype)  # read by slot
    w = torch.rand(N, k, generator=g).to(DEV)
    sorted_ids, _, _, counts = moe_align(idx, E, 16)
    dW = moe_weight_grad(left, right, sorted_ids, counts, block_m=16, left_div=k, right_div=1, topk_weight=w)
    assert dW.shape == (E, M, Nn) and dW.dtype == dtype
    flat = idx.reshape(-1).cpu()
    L = left.double().cpu()[torch.arange(N * k) // k] * w.double().cpu().reshape(-1, 1)
    want = torch.stack([L[flat == e].T @ right.double().cpu()[flat == e] for e in range(E)])
    assert_close("expert weight gradient", want, dW)
    assert (counts == 0).any() or mode != "empty"
    assert (dW[counts == 0] == 0).all()  # written as zeros, not left poisoned


def test_default_block_m():
    """16 under the interpreter and for decode-sized batches, growing with the slots per expert on the GPU."""
    assert default_block_m(10_000, 8, "cpu") == 16
    assert default_block_m(6, 8, "cuda") == 16  # a decode step: 3 tokens, k = 2, 8 experts
    sizes = [default_block_m(s, 4, "cuda") for s in (4, 64, 200, 600, 4096, 10**6)]
    assert sizes == sorted(sizes) and sizes[0] == 16 and sizes[-1] == 128 and len(set(sizes)) > 2
    assert all(b & (b - 1) == 0 for b in sizes)  # powers of two (moe_align's block)


# ================================================================ moe_experts on the kernels (impl="triton")


def _check_experts(N, k, E, H, I, mode, dtype, device=DEV, key=(), clamped=False):
    g = _gen("experts", N, k, E, H, I, mode, dtype, key)
    idx = routing(N, k, E, mode, g).to(device)
    x = torch.randn(N, H, generator=g).to(device, dtype).requires_grad_()
    w = torch.softmax(torch.randn(N, k, generator=g), -1).to(device).requires_grad_()
    w_gate_up, w_down = (t.requires_grad_() for t in _weights(E, H, I, dtype, g, device))
    limit = clear_limit(x, idx, w_gate_up, dtype) if clamped else None
    if clamped:  # the clamp must bite on both halves: pre-activations have std ~1
        h = (x.detach().float() @ w_gate_up.detach().float().flatten(0, 1).T).abs()
        assert 0.1 < (h > limit).float().mean() < 0.9
    with backend.audit() as a:
        y = moe_experts(x, idx, w, w_gate_up, w_down, impl="triton", swiglu_limit=limit)
    assert a.paths("moe_experts") == {"triton"} and "MoEExpertsFunction" in type(y.grad_fn).__name__
    assert y.shape == (N, H) and y.dtype == dtype
    dy = torch.randn(N, H, generator=g).to(device, dtype)
    grads = torch.autograd.grad(y, (x, w, w_gate_up, w_down), dy)
    leaves = [t.detach().double().cpu().requires_grad_() for t in (x, w, w_gate_up, w_down)]
    y_ref = experts_reference(leaves[0], idx.cpu(), *leaves[1:], limit=limit, round_to=dtype if clamped else None)
    ref_grads = torch.autograd.grad(y_ref, leaves, dy.double().cpu())
    assert_close("moe_experts forward", y_ref, y)
    with torch.no_grad():  # the inference path: no pre-activation kept, no autograd
        y_ng = moe_experts(x, idx, w, w_gate_up, w_down, impl="triton", swiglu_limit=limit)
    assert y_ng.grad_fn is None
    assert_close("moe_experts forward, no_grad", y_ref, y_ng)
    for name, want, got in zip(("dx", "d topk_weight", "d w_gate_up", "d w_down"), ref_grads, grads):
        assert got.shape == want.shape and got.dtype == (torch.float32 if name == "d topk_weight" else dtype)
        assert_close(f"moe_experts {name}", want, got, tol=REL_TOL[dtype])  # d topk_weight is fp32,
    return idx  # computed from `dtype` values


EXPERT_CASES = [  # N, k, E, H, I, mode, dtype
    (7, 2, 4, 32, 16, "uniform", torch.float32),
    (37, 2, 6, 48, 40, "zipf", torch.float32),
    (40, 2, 8, 32, 64, "empty", torch.float32),
    (23, 2, 8, 48, 32, "one", torch.float16),
    (33, 3, 5, 32, 24, "uniform", torch.float16),
    (16, 2, 4, 32, 16, "all_one", torch.float32),
]


@pytest.mark.parametrize("N,k,E,H,I,mode,dtype", EXPERT_CASES)
def test_triton_forward_backward(N, k, E, H, I, mode, dtype, poison):
    _check_experts(N, k, E, H, I, mode, dtype)


@pytest.mark.parametrize("N,k,E,H,I,mode,dtype", [EXPERT_CASES[1], EXPERT_CASES[4]])
def test_triton_clamped_swiglu(N, k, E, H, I, mode, dtype, poison):
    """glm5_next's clamped SwiGLU in the kernels' epilogues: forward and all four gradients against the loop written
    here with the clamp (a limit near 0.5, from ``clear_limit``: a third to a half of the pre-activations clamped)."""
    _check_experts(N, k, E, H, I, mode, dtype, key="clamp", clamped=True)


def test_triton_decode_batch(poison):
    """A decode step: 3 tokens over 8 experts with 16-row blocks (mostly padding)."""
    _check_experts(3, 2, 8, 32, 16, "uniform", torch.float32)


def test_autograd_op_larger_block_and_only_dx(monkeypatch, poison):
    """The op with block_m = 32, and only x requiring grad: the weight-gradient kernel never runs."""
    import glmkit.kernels.moe_experts as kmod

    monkeypatch.setattr(kmod, "moe_weight_grad", lambda *a, **kw: pytest.fail("weight gradient computed"))
    g = _gen("partial")
    N, k, E, H, I = 25, 2, 4, 32, 16
    idx = routing(N, k, E, "zipf", g).to(DEV)
    x = torch.randn(N, H, generator=g).to(DEV).requires_grad_()
    w = torch.rand(N, k, generator=g).to(DEV)
    wgu, wd = _weights(E, H, I, torch.float32, g)
    y = MoEExpertsFunction.apply(x, idx, w, wgu, wd, 32)
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    xr = x.detach().double().cpu().requires_grad_()
    yr = experts_reference(xr, idx.cpu(), w.double().cpu(), wgu.double().cpu(), wd.double().cpu())
    (dxr,) = torch.autograd.grad(yr, xr, torch.ones_like(yr))
    assert_close("forward", yr, y)
    assert_close("dx", dxr, dx)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_experts_module_on_the_kernels_matches_the_loop(dtype):
    """glmkit.moe.Experts with impl="triton" against impl="loop" (the reference), forward and weight gradients."""
    g = _gen("glmkit.moe", dtype)
    N, k, E, H, I = 21, 2, 6, 32, 24
    idx = routing(N, k, E, "zipf", g).to(DEV)
    x = torch.randn(N, H, generator=g).to(DEV, dtype)
    w = torch.softmax(torch.randn(N, k, generator=g), -1).to(DEV)
    loop = Experts(E, H, I, impl="loop").to(DEV, dtype)
    fast = Experts(E, H, I, impl="triton").to(DEV, dtype)
    fast.load_state_dict(loop.state_dict())
    y_loop, y_fast = loop(x, idx, w), fast(x, idx, w)
    assert_close("Experts(impl='triton') vs the loop", y_loop.double(), y_fast, tol=REL_TOL[dtype])
    dy = torch.randn(N, H, generator=g).to(DEV, dtype)
    for y in (y_loop, y_fast):
        y.backward(dy)
    for name in ("gate_up_proj", "down_proj"):
        want, got = getattr(loop, name).grad, getattr(fast, name).grad
        assert_close(f"d {name} vs the loop", want.double(), got, tol=2 * REL_TOL[dtype])
    assert "impl='triton'" in repr(fast) and "n_experts=6" in repr(fast)


# ================================================================ the torch paths: loop (reference) and sorted


def _routing(mode: str, N: int, E: int, k: int):
    """topk_idx [N, k] (distinct experts per row) and random positive weights, from the global (seeded) RNG."""
    if mode == "uniform":
        idx = torch.rand(N, E).topk(k, -1).indices
    elif mode == "zipf":  # heavy skew, and experts E-3.. never chosen
        p = 1.0 / torch.arange(1, E + 1).float() ** 1.5
        p[-3:] = 0
        idx = torch.multinomial(p.expand(N, -1), k, replacement=False)
    elif mode == "one_expert_all":  # expert 5 in every token, the rest from a few experts
        rest = torch.stack([torch.randperm(4)[: k - 1] for _ in range(N)]) if k > 1 else torch.empty(N, 0)
        idx = torch.cat([torch.full((N, 1), 5), rest.long()], 1)[:, torch.randperm(k)]
    else:
        raise ValueError(mode)
    return idx, torch.rand(N, k) + 0.1


def _grads(impl, x, idx, w, experts):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    for p in experts.parameters():
        p.grad = None
    y = moe_experts(x, idx, w, experts.gate_up_proj, experts.down_proj, impl=impl)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()  # a non-uniform upstream grad
    return y.detach(), x.grad, w.grad, experts.gate_up_proj.grad.clone(), experts.down_proj.grad.clone()


@pytest.mark.parametrize("grouped_mm", [True, False], ids=["grouped_mm", "segments"])
@pytest.mark.parametrize("mode", ["uniform", "zipf", "one_expert_all"])
@pytest.mark.parametrize("N,k,H,I", [(37, 3, 32, 16), (1, 2, 32, 16), (53, 4, 20, 12), (29, 1, 13, 7)])
def test_sorted_matches_loop(mode, N, k, H, I, grouped_mm, monkeypatch):
    """Values and all four gradients; through torch._grouped_mm where it runs (16-byte rows: H=13/I=7 are not),
    and through a matmul per expert segment (forced)."""
    E = 12
    experts = Experts(E, H, I, init_std=0.2)
    x = torch.randn(N, H)
    idx, w = _routing(mode, N, E, k)
    ref = _grads("loop", x, idx, w, experts)
    want = experts_reference(x.double(), idx, w.double(), experts.gate_up_proj.double(), experts.down_proj.double())
    assert_close("loop vs the fp64 loop written here", want, ref[0], FP32)
    if grouped_mm:
        if not ops_moe._grouped_mm_ok(x, experts.gate_up_proj, experts.down_proj):
            pytest.skip("torch._grouped_mm does not run here (torch < 2.9, or rows not 16-byte multiples)")
        calls = []
        real = torch._grouped_mm
        monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    else:
        monkeypatch.setattr(ops_moe, "_grouped_mm_ok", lambda *a: False)
    out = _grads("sorted", x, idx, w, experts)
    if grouped_mm:
        assert len(calls) == 2  # gate_up and down, all experts at once
    for name, r, o in zip(["y", "dx", "dw", "dgate_up", "ddown"], ref, out):
        assert_close(f"{name} ({mode}, {'grouped_mm' if grouped_mm else 'segments'})", r, o, FP32)
    if mode == "one_expert_all":  # experts that got no token get zero grads
        unused = torch.ones(E, dtype=torch.bool)
        unused[idx.unique()] = False
        assert unused.any() and (ref[3][unused] == 0).all() and (out[3][unused] == 0).all()


def test_grouped_mm_needs_16_byte_rows():
    e = Experts(8, 32, 16)
    assert ops_moe._grouped_mm_ok(torch.randn(10, 32), e.gate_up_proj, e.down_proj) == hasattr(torch, "_grouped_mm")
    e13 = Experts(8, 13, 16)
    assert not ops_moe._grouped_mm_ok(torch.randn(10, 13), e13.gate_up_proj, e13.down_proj)
    assert not ops_moe._grouped_mm_ok(torch.randn(10, 32).double(), e.gate_up_proj, e.down_proj)  # dtypes differ


def test_bf16_close_to_fp32():
    experts = Experts(8, 32, 16, init_std=0.2)
    x = torch.randn(41, 32)
    idx, w = _routing("zipf", 41, 8, 2)
    ref = moe_experts_reference(x, idx, w, experts.gate_up_proj, experts.down_proj)
    wgu, wd = experts.gate_up_proj.detach().bfloat16(), experts.down_proj.detach().bfloat16()
    for fn in (moe_experts_reference, moe_experts_sorted):
        out = fn(x.bfloat16(), idx, w, wgu, wd)
        assert out.dtype == torch.bfloat16
        assert_close(fn.__name__, ref, out)


def test_gate_is_the_first_half_of_gate_up():
    """One expert's SwiGLU from the stacked weight (gate rows first, then up) equals the per-expert formula."""
    E, I, H = 3, 5, 4
    gates, ups, downs = torch.randn(E, I, H), torch.randn(E, I, H), torch.randn(E, H, I)
    x = torch.randn(1, H)
    for impl in ("loop", "sorted", "triton"):
        y = moe_experts(x, torch.tensor([[1]]), torch.ones(1, 1), torch.cat((gates, ups), 1), downs, impl=impl)
        torch.testing.assert_close(y, (F.silu(x @ gates[1].T) * (x @ ups[1].T)) @ downs[1].T)


def test_dispatch():
    """ "auto" runs the sorted torch path on CPU tensors and the kernels on CUDA ones; the backend overrides it."""
    e = Experts(4, 32, 16)
    x, (idx, w) = torch.randn(5, 32, device=DEV), _routing("uniform", 5, 4, 2)
    idx, w, e = idx.to(DEV), w.to(DEV), e.to(DEV)
    want = moe_experts_reference(x, idx, w, e.gate_up_proj, e.down_proj)
    for name, path in (("auto", "triton" if CUDA else "torch"), ("torch", "torch"), ("triton", "triton")):
        with use_backend(name), backend.audit() as a:
            y = e(x, idx, w)
        assert a.paths("moe_experts") == {path}, name
        assert_close(f"backend {name}", want, y, FP32)


def test_empty_batches():
    e = Experts(4, 8, 6)
    empty, idx, w = torch.zeros(0, 8), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2)
    for impl in ("loop", "sorted", "triton"):
        y = moe_experts(empty, idx, w, e.gate_up_proj, e.down_proj, impl=impl)
        assert y.shape == (0, 8), impl


def test_bad_arguments_are_named():
    x = torch.randn(4, 32)
    idx = torch.tensor([[0, 1]] * 4)
    w = torch.rand(4, 2)
    wgu, wd = torch.randn(4, 32, 32), torch.randn(4, 32, 16)
    with pytest.raises(ValueError, match="w_down"):
        moe_experts(x, idx, w, wgu, wd.transpose(1, 2))
    with pytest.raises(ValueError, match="w_gate_up"):
        moe_experts(x, idx, w, wgu[:, :, :16], wd)
    with pytest.raises(ValueError, match="w_gate_up"):
        moe_experts(x, idx, w, wgu[:, :31], wd)  # 2I must be even
    with pytest.raises(ValueError, match="topk_weight"):
        moe_experts(x, idx, w[:, :1], wgu, wd)
    with pytest.raises(ValueError, match="topk_idx must be an integer"):
        moe_experts(x, idx.float(), w, wgu, wd)
    with pytest.raises(ValueError, match=r"x must be a float \[N, H\]"):
        moe_experts(x.view(1, 4, 32), idx, w, wgu, wd)
    with pytest.raises(ValueError, match="impl"):
        Experts(4, 32, 16, impl="nope")(x, idx, w)


@pytest.mark.parametrize("impl", ["loop", "sorted", "triton"])
def test_mixed_dtypes_are_named(impl):
    x = torch.randn(4, 32)
    idx, w = torch.tensor([[0, 1]] * 4), torch.rand(4, 2)
    wgu, wd = torch.randn(4, 32, 32), torch.randn(4, 32, 16)
    with pytest.raises(TypeError, match="dtype"):
        moe_experts(x.half(), idx, w, wgu, wd, impl=impl)


# ================================================================ GPU: natively, bf16 and larger shapes


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("mode", ["uniform", "zipf", "empty", "all_one"])
def test_gpu_moe_experts(dtype, mode, poison):
    _check_experts(512, 4, 16, 256, 192, mode, dtype, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_moe_experts_clamped(dtype, poison):
    _check_experts(512, 4, 16, 256, 192, "zipf", dtype, device="cuda", key="clamp", clamped=True)


@pytest.mark.gpu
@pytest.mark.parametrize("N", [1, 5, 16])
def test_gpu_decode(N, poison):
    _check_experts(N, 8, 64, 512, 256, "uniform", torch.bfloat16, device="cuda", key="decode")


@pytest.mark.gpu
def test_gpu_grouped_gemm_bf16_large(poison):
    g = _gen("gpu-gemm")
    N, k, E, H, I = 2048, 8, 64, 1024, 512
    idx = routing(N, k, E, "uniform", g).cuda()
    x = torch.randn(N, H, generator=g).cuda().bfloat16()
    wgu, _ = _weights(E, H, I, torch.bfloat16, g, "cuda")
    bm = default_block_m(N * k, E, "cuda")
    align = moe_align(idx, E, bm)
    a = moe_gemm(x, wgu, *align[:3], top_k=k, block_m=bm, swiglu=True)
    assert_close("bf16 swiglu gather-GEMM", gemm_reference(x, wgu, idx, k, swiglu=True), a)
