"""glmkit.ops.attention and its kernels (glmkit.kernels.attention): the mask, the torch reference against a naive
loop, the dispatch of ``attention`` (backend choice, gradients on both paths, argument errors), the flash-attention
forward kernel and the backward kernels against the reference, and the autograd op that ties them together.

On CPU the kernels run under the Triton interpreter at small, odd shapes (16×16 tiles there) in fp32 and fp16; bf16
is left to the GPU because ``tl.dot`` on bf16 is wrong under triton 3.6's interpreter. ``-m gpu`` runs them natively
in fp32/fp16/bf16 up to T = 4K. Every kernel output is allocated NaN-poisoned (the ``poison`` fixture); inputs are
fresh random tensors per parametrization. (No fp64 gradcheck: the kernels take fp32/fp16/bf16.) The last section
checks value heads unlike the q·k head (MLA's), up to GLM's 256 on the GPU.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import glmkit
import glmkit.kernels  # noqa: F401  (sets TRITON_INTERPRET=1 on machines without CUDA)
from glmkit import backend
from glmkit.kernels.attention import SUPPORTED_HEAD_DIMS, attention_bwd, attention_fwd, bwd_flops, visible_pairs
from glmkit.ops import attention as A
from glmkit.ops.attention import AttentionFunction, attention, attention_mask, attention_reference
from glmkit.testing import REL_TOL, assert_close

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()) % 100_000)


def _qkv(B, H, H_kv, T, D, dtype=torch.float32, device="cpu", requires_grad=False, key=()):
    g = _gen("qkv", B, H, H_kv, T, D, dtype, key)
    q, k, v = (torch.randn(B, h, T, D, generator=g).to(device, dtype) for h in (H, H_kv, H_kv))
    return tuple(t.requires_grad_(requires_grad) for t in (q, k, v))


def _inputs(B, H, H_kv, T, D, dtype, device=DEV, key=()):
    """q, k, v and an incoming gradient dO."""
    g = _gen("inputs", B, H, H_kv, T, D, dtype, key)
    return tuple(torch.randn(B, h, T, D, generator=g).to(device, dtype) for h in (H, H_kv, H_kv, H))


def _sep(B, T, mode, device=DEV, key=()):
    if mode is None:
        return None
    if mode == "random":
        return torch.randint(0, T + 1, (B,), generator=_gen("sep", B, T, key)).to(device)
    if mode == "mixed":  # causal, one Part-A token, bidirectional, then a middle split
        return torch.tensor([0, 1, T, T // 2][:B], device=device)
    if mode == "edges":  # Part A ending one before, at, one after a 16-tile edge, and one before a 32-tile edge
        return torch.tensor([15, 16, 17, 31][:B], device=device)
    value = {"zero": 0, "one": 1, "half": T // 2, "full": T}[mode]
    return torch.full((B,), value, dtype=torch.int64, device=device)


def _naive(q, k, v, sep, scale=None):
    """One query at a time, visibility spelled out as in the paper: j < sep or j <= i."""
    B, H, T, D = q.shape
    group = H // k.shape[1]
    scale = 1 / math.sqrt(D) if scale is None else scale
    out = torch.zeros(B, H, T, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                js = [j for j in range(T) if sep is None or j < int(sep[b]) or j <= i]
                kk = k[b, h // group, js].double()
                w = torch.softmax((kk @ q[b, h, i].double()) * scale, dim=0)
                out[b, h, i] = w @ v[b, h // group, js].double()
    return out


def _reference_grads(q, k, v, do, sep, scale=None):
    """dq, dk, dv of attention_reference by torch autograd, in fp32 (the reference computes in fp32)."""
    qr, kr, vr = (t.detach().float().requires_grad_() for t in (q, k, v))
    attention_reference(qr, kr, vr, sep, scale=scale).backward(do.float())
    return qr.grad, kr.grad, vr.grad


def _kernel_grads(q, k, v, do, sep, scale=None):
    o, lse = attention_fwd(q, k, v, sep, scale=scale, return_lse=True)
    return attention_bwd(do, q, k, v, o, lse, sep, scale=scale)


def _check_grads(label, ref, got, tol=None):
    for name, r, g in zip(("dq", "dk", "dv"), ref, got):
        assert_close(f"{label} {name}", r, g, tol)


def _paths(fn, *args, **kwargs):
    """Run fn and return (its result, the set of paths "attention" took)."""
    with backend.audit() as a:
        out = fn(*args, **kwargs)
    return out, a.paths("attention")


# ================================================================ the mask and the reference


def test_attention_mask_matches_brute_force():
    rng = np.random.default_rng(2)
    for T in (1, 2, 7, 19):
        seps = sorted({0, 1, T} | {int(s) for s in rng.integers(0, T + 1, size=3)})
        got = attention_mask(torch.tensor(seps), T)
        assert got.shape == (len(seps), T, T) and got.dtype == torch.bool
        for b, sep in enumerate(seps):
            for i in range(T):
                for j in range(T):
                    assert bool(got[b, i, j]) == (j < sep or j <= i), (T, sep, i, j)


def test_visible_pairs_counts_the_mask():
    for T, s in [(1, 0), (7, 3), (16, 16), (33, 0), (33, 1)]:
        assert visible_pairs(T, s) == int(attention_mask(torch.tensor([s]), T).sum())


def test_bwd_flops_convention():
    assert bwd_flops(100, 64, 0) == int(2.5 * 4 * 64 * visible_pairs(100, 0))
    assert bwd_flops(8, 16, 8, B=2, H=3) == int(2.5 * 4 * 16 * 64 * 6)


@pytest.mark.parametrize("B,H,H_kv,T,D", [(2, 2, 2, 7, 8), (3, 4, 2, 9, 16), (2, 4, 1, 5, 4), (1, 1, 1, 1, 8)])
def test_reference_matches_naive_loop(B, H, H_kv, T, D):
    q, k, v = _qkv(B, H, H_kv, T, D)
    sep = torch.randint(0, T + 1, (B,))
    sep[0] = 1 if T > 1 else 0
    assert_close("reference vs naive", _naive(q, k, v, sep), attention_reference(q, k, v, sep), 1e-6)
    assert_close("reference vs naive (no mask)", _naive(q, k, v, None), attention_reference(q, k, v, None), 1e-6)
    assert_close("scale", _naive(q, k, v, sep, 0.7), attention_reference(q, k, v, sep, scale=0.7), 1e-6)


def test_sep_zero_is_causal_and_sep_T_is_bidirectional():
    q, k, v = _qkv(2, 2, 2, 11, 8)
    causal = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    full = F.scaled_dot_product_attention(q, k, v)
    assert_close("sep=0 is GPT", causal, attention_reference(q, k, v, torch.zeros(2, dtype=torch.long)))
    assert_close("sep=T is BERT", full, attention_reference(q, k, v, torch.full((2,), 11)))


def test_reference_keeps_dtype_and_computes_in_fp32():
    q, k, v = _qkv(1, 2, 2, 6, 8, dtype=torch.bfloat16)
    sep = torch.tensor([3])
    o = attention_reference(q, k, v, sep)
    assert o.dtype == torch.bfloat16
    assert_close("bf16 reference", attention_reference(q.float(), k.float(), v.float(), sep), o)


def test_module_documents_the_mask():
    assert "j < sep" in A.__doc__ and "GPT" in A.__doc__ and "BERT" in A.__doc__


# ================================================================ attention(): dispatch and errors


@pytest.mark.parametrize("H,H_kv", [(4, 4), (4, 2), (4, 1)])
def test_torch_path_matches_reference(H, H_kv):
    q, k, v = _qkv(2, H, H_kv, 13, 16)
    sep = torch.tensor([0, 6])
    with glmkit.use_backend("torch"):
        o, paths = _paths(attention, q, k, v, sep)
        assert paths == {"torch"}
        assert_close("torch path", attention_reference(q, k, v, sep), o)
        assert_close("torch path, no mask", attention_reference(q, k, v, None), attention(q, k, v, None))
        assert_close("torch path, scale", attention_reference(q, k, v, sep, 0.3), attention(q, k, v, sep, 0.3))


def test_auto_backend_picks_the_device():
    q, k, v = _qkv(1, 2, 2, 4, 16, device=DEV)
    with glmkit.use_backend("auto"):
        _, paths = _paths(attention, q, k, v)
    assert paths == {"triton" if q.is_cuda else "torch"}


def test_triton_backend_runs_the_kernel(monkeypatch, poison):
    """Forced to "triton" on CPU: the kernel runs (interpreter) and matches the reference."""
    import glmkit.kernels.attention as kmod

    calls = []
    real = kmod.attention_fwd
    monkeypatch.setattr(kmod, "attention_fwd", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v = _qkv(2, 4, 2, 21, 16)
    sep = torch.tensor([5, 21])
    with glmkit.use_backend("triton"):
        o, paths = _paths(attention, q, k, v, sep)
    assert calls == [1] and paths == {"triton"}
    assert_close("triton via dispatch", attention_reference(q, k, v, sep), o)


def test_head_dims_the_kernel_lacks_fall_back_to_torch(monkeypatch):
    """D = 48 is not a kernel head dim: even forced to "triton", attention() runs SDPA (and says so)."""
    import glmkit.kernels.attention as kmod

    assert 48 not in SUPPORTED_HEAD_DIMS
    monkeypatch.setattr(kmod, "attention_fwd", lambda *a, **kw: pytest.fail("the kernel ran at D = 48"))
    q, k, v = _qkv(2, 2, 1, 9, 48)
    sep = torch.tensor([3, 9])
    with glmkit.use_backend("triton"):
        o, paths = _paths(attention, q, k, v, sep)
    assert paths == {"torch"}
    assert_close("D=48 fallback", attention_reference(q, k, v, sep), o)


def test_grad_on_triton_path_uses_the_kernels(monkeypatch):
    """Gradients needed on the triton path: the forward kernel runs inside the autograd op (asked for the lse the
    backward needs) and the backward kernels give the reference's gradients."""
    import glmkit.kernels.attention as kmod

    calls = []
    real = kmod.attention_fwd
    monkeypatch.setattr(
        kmod, "attention_fwd", lambda *a, **kw: calls.append(kw.get("return_lse", False)) or real(*a, **kw)
    )
    q, k, v = _qkv(1, 2, 1, 9, 16, requires_grad=True)
    sep = torch.tensor([4])
    with glmkit.use_backend("triton"):
        o, paths = _paths(attention, q, k, v, sep)
        assert paths == {"triton"} and "AttentionFunction" in type(o.grad_fn).__name__
        o.square().sum().backward()
        with torch.no_grad():
            _, paths = _paths(attention, q, k, v, sep)
            assert paths == {"triton"}
    assert calls == [True, False]  # the graph's forward with the lse; the no_grad call without
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    attention_reference(q2, k2, v2, sep).square().sum().backward()
    _check_grads("triton path", (q2.grad, k2.grad, v2.grad), (q.grad, k.grad, v.grad), 1e-5)


def test_torch_path_stays_differentiable():
    q, k, v = _qkv(2, 4, 2, 11, 8, requires_grad=True)
    sep = torch.tensor([3, 11])
    with glmkit.use_backend("torch"):
        attention(q, k, v, sep).square().sum().backward()
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    attention_reference(q2, k2, v2, sep).square().sum().backward()
    for name, a, b in (("dq", q2.grad, q.grad), ("dk", k2.grad, k.grad), ("dv", v2.grad, v.grad)):
        assert_close(name, a, b, 1e-5)


def _bad(**over):
    q, k, v = _qkv(2, 4, 2, 6, 8)
    args = dict(q=q, k=k, v=v, sep=torch.tensor([1, 2]), scale=None)
    args.update(over)
    return args


BAD = [
    (dict(q=torch.randn(4, 6, 8)), ValueError, r"q must be a \[B, H, T, D\]"),
    (dict(q="not a tensor"), ValueError, r"q must be a \[B, H, T, D\] tensor"),
    (dict(k=torch.randn(2, 2, 6, 8, dtype=torch.float64)), TypeError, "k must be float32"),
    (dict(v=torch.randn(2, 2, 6, 8).half()), TypeError, "share one dtype"),
    (dict(k=torch.randn(2, 3, 6, 8), v=torch.randn(2, 3, 6, 8)), ValueError, "multiple"),
    (dict(k=torch.randn(2, 2, 5, 8), v=torch.randn(2, 2, 5, 8)), ValueError, "k and v must be"),
    (dict(v=torch.randn(2, 1, 6, 8)), ValueError, "k and v must be"),
    (dict(sep=torch.tensor([1.0, 2.0])), ValueError, "sep must be a"),
    (dict(sep=torch.tensor([1, 2, 3])), ValueError, r"sep must be a \[B\]"),
    (dict(sep=[1, 2]), ValueError, "sep must be"),
    (dict(scale=-1.0), ValueError, "scale"),
    (dict(scale=float("inf")), ValueError, "scale"),
]


@pytest.mark.parametrize("over, exc, match", BAD)
@pytest.mark.parametrize("fn", [attention_reference, attention], ids=["reference", "attention"])
def test_errors_name_the_argument(fn, over, exc, match):
    with pytest.raises(exc, match=match):
        fn(**_bad(**over))


@pytest.mark.parametrize("sep", [[1, 7], [-1, 2]])
def test_reference_checks_the_sep_range(sep):
    """Only the reference reads sep's values (a host sync the dispatched op avoids)."""
    with pytest.raises(ValueError, match=r"\[0, T\]"):
        attention_reference(**_bad(sep=torch.tensor(sep)))


# ================================================================ the forward kernel


# (B, H, H_kv, T, D, dtype, sep mode): lengths that are not tile multiples, GQA, Part-A length 0 / 1 / T / random
# (every backward case below runs the forward kernel too, with the lse)
FWD_CASES = [
    (2, 2, 2, 1, 16, torch.float32, "random"),
    (2, 2, 2, 7, 32, torch.float32, "random"),
    (2, 2, 2, 33, 16, torch.float32, "zero"),
    (2, 2, 2, 33, 16, torch.float32, "one"),
    (2, 2, 2, 33, 16, torch.float32, "full"),
    (3, 4, 2, 50, 32, torch.float32, "random"),
    (2, 4, 1, 50, 16, torch.float32, "random"),
    (2, 2, 2, 64, 64, torch.float32, "half"),
    (2, 2, 2, 33, 64, torch.float16, "one"),
    (2, 4, 1, 47, 64, torch.float16, "random"),
    (5, 2, 1, 20, 32, torch.float32, "random"),
]


@pytest.mark.parametrize("B,H,H_kv,T,D,dtype,mode", FWD_CASES)
def test_forward_kernel_matches_reference(B, H, H_kv, T, D, dtype, mode, poison):
    q, k, v, _ = _inputs(B, H, H_kv, T, D, dtype, key="fwd")
    sep = _sep(B, T, mode, key="fwd")
    o = attention_fwd(q, k, v, sep)
    assert o.shape == q.shape and o.dtype == dtype
    assert_close(f"attention fwd T={T} D={D} {dtype} sep={sep.tolist()}", attention_reference(q, k, v, sep), o)


def test_forward_kernel_no_mask_scale_and_lse(poison):
    """sep=None means no mask (bidirectional), as in the reference; a custom scale; the log-sum-exp of each row's
    visible scaled scores, computed here in fp64."""
    B, H, H_kv, T, D = 2, 2, 1, 37, 32
    q, k, v, _ = _inputs(B, H, H_kv, T, D, torch.float32, key="lse")
    assert_close("no mask", attention_reference(q, k, v, None), attention_fwd(q, k, v, None))
    sep = torch.tensor([0, 20], device=DEV)
    o, lse = attention_fwd(q, k, v, sep, scale=0.3, return_lse=True)
    assert lse.shape == (B, H, T) and lse.dtype == torch.float32
    assert_close("scaled", attention_reference(q, k, v, sep, scale=0.3), o)
    scores = torch.einsum("bhid,bhjd->bhij", q.double(), k.double().repeat_interleave(H // H_kv, 1)) * 0.3
    scores = scores.masked_fill(~attention_mask(sep, T)[:, None], float("-inf"))
    assert_close("lse", torch.logsumexp(scores, dim=-1), lse)


def test_forward_kernel_noncontiguous_inputs(poison):
    """q/k/v as the model makes them: [B, T, H, D] projections viewed as [B, H, T, D]."""
    B, T, H, D = 2, 29, 4, 32
    qkv = torch.randn(B, T, 3, H, D, generator=_gen("strided")).to(DEV)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    sep = _sep(B, T, "random", key="strided")
    assert_close("strided", attention_reference(q, k, v, sep), attention_fwd(q, k, v, sep))


@pytest.mark.filterwarnings("ignore:All-NaN slice")  # later query blocks do read the NaN keys
def test_forward_kernel_skips_fully_masked_blocks(poison):
    """Put NaN in keys/values that the first query block must never visit: its rows stay finite and correct.

    sep = 20: rows 0..15 see keys [0, 20). With the interpreter's 16×16 tiles their block visits key blocks
    [0, 16) unmasked and [16, 32) masked, and must never load a key >= 32 (CUDA's fp32 tiles, 64×32: the block
    of rows 0..63 visits keys [0, 64)). A kernel that only masked, without skipping, would multiply p = 0 by NaN
    and poison those rows.
    """
    B, H, T, D = 1, 2, 128, 16
    first_unvisited = 64 if CUDA else 32
    q, k, v, _ = _inputs(B, H, H, T, D, torch.float32, key="skip")
    sep = torch.tensor([20], device=DEV)
    ref = attention_reference(q, k, v, sep)
    k[:, :, first_unvisited:] = float("nan")
    v[:, :, first_unvisited:] = float("nan")
    o = attention_fwd(q, k, v, sep)
    assert_close("rows 0..15 with NaN beyond their visible blocks", ref[:, :, :16], o[:, :, :16])
    assert_close("rows 16..19 (still Part A)", ref[:, :, 16:20], o[:, :, 16:20])


# ================================================================ the backward kernels


BWD_CASES = [  # B, H, H_kv, T, D, dtype, sep mode
    (2, 4, 2, 33, 16, torch.float32, "random"),
    (2, 2, 2, 50, 32, torch.float32, "zero"),
    (2, 2, 1, 50, 32, torch.float32, "one"),
    (1, 4, 1, 33, 64, torch.float32, "full"),
    (4, 2, 2, 7, 16, torch.float32, "mixed"),
    (3, 2, 1, 40, 16, torch.float32, "mixed"),
    (3, 2, 2, 45, 16, torch.float32, "mixed"),
    (4, 2, 1, 50, 16, torch.float32, "edges"),
    (4, 2, 2, 50, 16, torch.float32, "edges"),
    (2, 4, 4, 50, 64, torch.float32, "random"),
    (2, 4, 2, 47, 32, torch.float16, "random"),
    (2, 2, 1, 33, 64, torch.float16, "mixed"),
]


@pytest.mark.parametrize("B,H,H_kv,T,D,dtype,mode", BWD_CASES)
def test_backward_kernels_match_autograd_reference(B, H, H_kv, T, D, dtype, mode, poison):
    q, k, v, do = _inputs(B, H, H_kv, T, D, dtype, key="bwd")
    sep = _sep(B, T, mode, key="bwd")
    got = _kernel_grads(q, k, v, do, sep)
    for t, g in zip((q, k, v), got):
        assert g.shape == t.shape and g.dtype == dtype
    _check_grads(f"T={T} D={D} H={H}/{H_kv} {dtype} sep={sep.tolist()}", _reference_grads(q, k, v, do, sep), got)


def test_backward_kernels_no_mask_and_scale(poison):
    """sep=None is no mask (as in the reference); a custom softmax scale."""
    q, k, v, do = _inputs(2, 2, 1, 37, 32, torch.float32, key="nomask")
    _check_grads("no mask", _reference_grads(q, k, v, do, None), _kernel_grads(q, k, v, do, None))
    sep = _sep(2, 37, "random", key="nomask")
    _check_grads("scale 0.3", _reference_grads(q, k, v, do, sep, 0.3), _kernel_grads(q, k, v, do, sep, 0.3))


def test_backward_single_token(poison):
    """T = 1: the only key gets all the weight, so dq = dk = 0 exactly in math (rounding noise here) and
    dv = dO summed over the query heads of the group."""
    q, k, v, do = _inputs(3, 4, 2, 1, 16, torch.float32, key="T1")
    sep = torch.tensor([0, 1, 0], device=DEV)
    dq, dk, dv = _kernel_grads(q, k, v, do, sep)
    assert dq.abs().max() < 1e-5 and dk.abs().max() < 1e-5
    assert_close("dv at T=1", do.view(3, 2, 2, 1, 16).sum(2), dv)


def test_backward_skipped_blocks_are_never_read(poison):
    """Put NaN where a program must not look; the gradients it owns stay finite and correct.

    sep = 0 (causal), T = 64: key blocks [32, 64) are visible only to queries >= 32, so the dk/dv programs of
    those blocks (16 or 32 keys wide) must skip query rows < 32 (NaN q/dO there). With sep = 20, query rows 0..15
    see keys [0, 20): the dq program of their block (16 rows under the interpreter, 32 on CUDA) must never load
    keys >= 32 (NaN k/v there).
    """
    B, H, T, D = 1, 2, 64, 16
    q, k, v, do = _inputs(B, H, H, T, D, torch.float32, key="skip-bwd")
    for sep_val, what in ((0, "qdo"), (20, "kv")):
        sep = torch.tensor([sep_val], device=DEV)
        ref = _reference_grads(q, k, v, do, sep)
        o, lse = attention_fwd(q, k, v, sep, return_lse=True)
        q2, k2, v2, do2 = (t.clone() for t in (q, k, v, do))
        if what == "qdo":
            q2[:, :, :32] = float("nan")
            do2[:, :, :32] = float("nan")
        else:
            k2[:, :, 32:] = float("nan")
            v2[:, :, 32:] = float("nan")
        dq, dk, dv = attention_bwd(do2, q2, k2, v2, o, lse, sep)
        if what == "qdo":
            assert_close("dk of keys >= 32 with NaN queries before them", ref[1][:, :, 32:], dk[:, :, 32:])
            assert_close("dv of keys >= 32 with NaN queries before them", ref[2][:, :, 32:], dv[:, :, 32:])
        else:
            assert_close("dq of rows 0..15 with NaN keys beyond their blocks", ref[0][:, :, :16], dq[:, :, :16])


# ================================================================ the autograd op behind attention()


def test_attention_backward_runs_the_kernels(monkeypatch):
    """Forced to "triton" with gradients needed: forward and backward kernels run (once each) and the gradients
    match the reference's, for GQA with mixed sep and strided inputs as the model makes them."""
    import glmkit.kernels.attention as kmod

    calls = []
    real_f, real_b = kmod.attention_fwd, kmod.attention_bwd
    monkeypatch.setattr(kmod, "attention_fwd", lambda *a, **kw: calls.append("fwd") or real_f(*a, **kw))
    monkeypatch.setattr(kmod, "attention_bwd", lambda *a, **kw: calls.append("bwd") or real_b(*a, **kw))

    B, T, H, H_kv, D = 3, 29, 4, 2, 16
    g = _gen("autograd")
    qp = torch.randn(B, T, H, D, generator=g).to(DEV)
    kv = torch.randn(B, T, 2, H_kv, D, generator=g).to(DEV)
    leaves = (qp.requires_grad_(), kv.requires_grad_())
    q, k, v = qp.transpose(1, 2), kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    assert not q.is_contiguous() and not k.is_contiguous()
    sep = _sep(B, T, "mixed")
    with glmkit.use_backend("triton"):
        out, paths = _paths(attention, q, k, v, sep)
        assert paths == {"triton"} and "AttentionFunction" in type(out.grad_fn).__name__
        weight = torch.randn(out.shape, generator=g).to(DEV)
        (out * weight).sum().backward()
    assert calls == ["fwd", "bwd"]
    got = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    (attention_reference(q, k, v, sep) * weight).sum().backward()
    for name, ref, g_ in zip(("d(q proj)", "d(kv proj)"), (t.grad for t in leaves), got):
        assert_close(name, ref, g_)


def test_autograd_op_partial_grads_and_no_grad():
    """Only v requires grad: q/k get none. Under no_grad the plain forward kernel runs (no graph)."""
    q, k, v, do = _inputs(2, 2, 1, 21, 16, torch.float32, key="partial")
    sep = torch.tensor([5, 0], device=DEV)
    v.requires_grad_()
    with glmkit.use_backend("triton"):
        attention(q, k, v, sep).backward(do)
        with torch.no_grad():
            assert attention(q, k, v, sep).grad_fn is None
    assert q.grad is None and k.grad is None
    assert_close("dv only", _reference_grads(q, k, v, do, sep)[2], v.grad)
    # .sum() hands the backward an expanded dO (all strides 0)
    v.grad = None
    with glmkit.use_backend("triton"):
        attention(q, k, v, sep).sum().backward()
    assert_close("dv from .sum()", _reference_grads(q, k, v, torch.ones_like(do), sep)[2], v.grad)
    # the op directly, sep=None and a scale
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    AttentionFunction.apply(q2, k2, v2, None, 0.5).backward(do)
    _check_grads("op, no mask, scale 0.5", _reference_grads(q, k, v, do, None, 0.5), (q2.grad, k2.grad, v2.grad))


# ================================================================ GPU: native, autotuned, bigger shapes


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_gpu_dispatch_uses_kernel(dtype, monkeypatch, poison):
    import glmkit.kernels.attention as kmod

    calls = []
    real = kmod.attention_fwd
    monkeypatch.setattr(kmod, "attention_fwd", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v = _qkv(2, 8, 2, 1000, 128, dtype=dtype, device="cuda")
    sep = torch.tensor([500, 0], device="cuda")
    with glmkit.use_backend("auto"):
        o, paths = _paths(attention, q, k, v, sep)
    assert calls == [1] and paths == {"triton"}
    assert_close("gpu dispatch", attention_reference(q, k, v, sep), o, REL_TOL[dtype])
    with glmkit.use_backend("torch"):
        assert_close("gpu torch path", attention_reference(q, k, v, sep), attention(q, k, v, sep), REL_TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("T,B,H,H_kv", [(1000, 3, 4, 2), (4096, 2, 4, 4), (777, 2, 8, 1)])
def test_gpu_forward_matches_reference(dtype, D, T, B, H, H_kv, poison):
    q, k, v, _ = _inputs(B, H, H_kv, T, D, dtype, device="cuda", key="gpu-fwd")
    sep = _sep(B, T, "random", device="cuda", key="gpu-fwd")
    sep[0] = T // 2
    o = attention_fwd(q, k, v, sep)
    torch.cuda.synchronize()
    assert_close(f"gpu {dtype} T={T} D={D}", attention_reference(q, k, v, sep), o, REL_TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("mode", ["zero", "one", "full", "mixed"])
def test_gpu_sep_extremes(dtype, mode, poison):
    B, H, H_kv, T, D = 4, 4, 2, 1537, 128
    q, k, v, do = _inputs(B, H, H_kv, T, D, dtype, device="cuda", key=("extremes", mode))
    sep = _sep(B, T, mode, device="cuda")
    assert_close(
        f"autotuned fwd {mode}", attention_reference(q, k, v, sep), attention_fwd(q, k, v, sep), REL_TOL[dtype]
    )
    _check_grads(
        f"autotuned bwd {mode}", _reference_grads(q, k, v, do, sep), _kernel_grads(q, k, v, do, sep), REL_TOL[dtype]
    )


@pytest.mark.gpu
def test_gpu_lse(poison):
    B, H, T, D = 2, 4, 2048, 64
    q, k, v, _ = _inputs(B, H, 2, T, D, torch.float32, device="cuda", key="gpu-lse")
    sep = torch.tensor([0, 1000], device="cuda")
    _, lse = attention_fwd(q, k, v, sep, return_lse=True)
    scores = torch.einsum("bhid,bhjd->bhij", q, k.repeat_interleave(2, 1)) / math.sqrt(D)
    scores = scores.masked_fill(~attention_mask(sep, T)[:, None], float("-inf"))
    assert_close("gpu lse", torch.logsumexp(scores, dim=-1), lse, 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("T,B,H,H_kv", [(1000, 3, 4, 2), (2048, 2, 4, 4), (777, 2, 8, 1)])
def test_gpu_backward_matches_reference(dtype, D, T, B, H, H_kv, poison):
    q, k, v, do = _inputs(B, H, H_kv, T, D, dtype, device="cuda", key="gpu-bwd")
    sep = _sep(B, T, "random", device="cuda", key="gpu-bwd")
    sep[0] = T // 2
    got = _kernel_grads(q, k, v, do, sep)
    torch.cuda.synchronize()
    _check_grads(f"gpu {dtype} T={T} D={D} H={H}/{H_kv}", _reference_grads(q, k, v, do, sep), got, REL_TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_gpu_attention_trains_on_kernels(dtype):
    """attention() on CUDA with gradients: the autograd op (our kernels both ways), GQA, mixed sep."""
    B, H, H_kv, T, D = 2, 8, 2, 1000, 64
    q, k, v, do = _inputs(B, H, H_kv, T, D, dtype, device="cuda", key="gpu-train")
    sep = torch.tensor([400, 0], device="cuda")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with glmkit.use_backend("auto"):
        out, paths = _paths(attention, *leaves, sep)
        assert paths == {"triton"} and "AttentionFunction" in type(out.grad_fn).__name__
        out.backward(do)
    _check_grads(f"gpu autograd {dtype}", _reference_grads(q, k, v, do, sep), [t.grad for t in leaves], REL_TOL[dtype])


# ================================================================ q·k and v head dims that differ (MLA, lesson 05)


def _inputs_dv(B, H, H_kv, T, D, Dv, dtype, device=DEV, key=()):
    """q, k [.., D], v [.., Dv] and dO [B, H, T, Dv]: MLA's q·k head (nope + rope) and v head differ."""
    g = _gen("inputs_dv", B, H, H_kv, T, D, Dv, dtype, key)
    shapes = ((B, H, T, D), (B, H_kv, T, D), (B, H_kv, T, Dv), (B, H, T, Dv))
    return tuple(torch.randn(s, generator=g).to(device, dtype) for s in shapes)


# (B, H, H_kv, T, D, Dv, dtype, sep mode): v narrower and wider than q·k, odd lengths, MHA as MLA runs it (H_kv = H)
DV_CASES = [
    (2, 2, 2, 37, 32, 16, torch.float32, "random"),
    (2, 4, 2, 23, 16, 64, torch.float32, "mixed"),
    (1, 2, 2, 19, 64, 32, torch.float16, "zero"),
]


@pytest.mark.parametrize("B,H,H_kv,T,D,Dv,dtype,mode", DV_CASES)
def test_kernels_with_a_value_head_unlike_the_key_head(B, H, H_kv, T, D, Dv, dtype, mode, poison):
    q, k, v, do = _inputs_dv(B, H, H_kv, T, D, Dv, dtype, key="dv")
    sep = _sep(B, T, mode, key="dv")
    o = attention_fwd(q, k, v, sep)
    assert o.shape == (B, H, T, Dv) and o.dtype == dtype
    assert_close(f"fwd D={D} Dv={Dv}", attention_reference(q, k, v, sep), o)
    got = _kernel_grads(q, k, v, do, sep)
    assert [g.shape for g in got] == [q.shape, k.shape, v.shape]
    _check_grads(f"bwd D={D} Dv={Dv}", _reference_grads(q, k, v, do, sep), got)


def test_dispatch_with_a_value_head_unlike_the_key_head():
    """attention() takes Dv != D on both paths (the kernel where both dims are supported, SDPA otherwise), with
    gradients; a value head the kernel lacks (48) falls back to torch."""
    q, k, v, do = _inputs_dv(2, 4, 2, 21, 32, 16, torch.float32, key="dv-dispatch")
    sep = torch.tensor([0, 9], device=DEV)
    ref = _reference_grads(q, k, v, do, sep)
    for name in ("torch", "triton"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        with glmkit.use_backend(name):
            o, paths = _paths(attention, *leaves, sep)
            o.backward(do)
        assert paths == {name}
        assert_close(f"{name} path Dv=16", attention_reference(q, k, v, sep), o.detach())
        _check_grads(f"{name} path Dv=16", ref, [t.grad for t in leaves])
    v48 = torch.randn(2, 2, 21, 48)
    with glmkit.use_backend("triton"):
        o, paths = _paths(attention, q, k, v48, sep)
    assert paths == {"torch"} and o.shape == (2, 4, 21, 48)
    assert_close("Dv=48 fallback", attention_reference(q, k, v48, sep), o)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "D,Dv,dtype",
    [(256, 256, torch.bfloat16), (256, 256, torch.float32), (256, 128, torch.float32)],
    ids=["glm-mla-bf16", "glm-mla-fp32", "256-128-fp32"],
)
def test_gpu_mla_head_dims(D, Dv, dtype, poison):
    """GLM-4.7-Flash / GLM-5 MLA heads (q·k 192 + 64 = 256, v 256) and an unequal pair, causal, fwd and bwd, native
    (autotuned tiles in bf16, the fixed fp32 tiles). Few cases: each compiles the kernels anew."""
    B, H, T = 2, 4, 1031
    q, k, v, do = _inputs_dv(B, H, H, T, D, Dv, dtype, device="cuda", key="gpu-dv")
    sep = torch.tensor([0, 300], device="cuda")
    assert_close(f"gpu fwd {D}/{Dv}", attention_reference(q, k, v, sep), attention_fwd(q, k, v, sep), REL_TOL[dtype])
    got = _kernel_grads(q, k, v, do, sep)
    torch.cuda.synchronize()
    _check_grads(f"gpu bwd {D}/{Dv} {dtype}", _reference_grads(q, k, v, do, sep), got, REL_TOL[dtype])
