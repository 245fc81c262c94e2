"""The GLM flash-attention backward kernels (glmkit.kernels.glm_attention_bwd) and the autograd op that
glm_attention uses on the Triton path, against torch autograd through attention_reference.

On CPU the kernels run under the Triton interpreter at small shapes, 16×16 tiles unless a case says
otherwise (fp32 and fp16; bf16 is left to the GPU because tl.dot on bf16 is wrong under triton 3.6's
interpreter). `-m gpu` runs them natively in fp32/fp16/bf16 at larger shapes, autotuned and with fixed
tiles. Every kernel call writes into NaN-poisoned dq/dk/dv buffers; inputs and incoming gradients are
fresh random tensors per parametrization. (No fp64 gradcheck: the forward kernel takes fp32/fp16/bf16.)
"""

from __future__ import annotations

import zlib

import pytest
import torch

import glmkit
import glmkit.kernels  # noqa: F401  (sets TRITON_INTERPRET=1 on machines without CUDA)
from glmkit.attention import GLMAttentionFunction, attention_path, attention_reference, glm_attention
from glmkit.kernels.glm_attention import glm_attention_fwd
from glmkit.kernels.glm_attention_bwd import bwd_flops, glm_attention_bwd
from glmkit.testing import assert_close, poisoned

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


def _seed(*key) -> int:
    return zlib.crc32(repr(key).encode()) % 100_000


def _inputs(B, H, H_kv, T, D, dtype, device=DEV, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v, do = (torch.randn(B, h, T, D, generator=g) for h in (H, H_kv, H_kv, H))
    return tuple(t.to(device, dtype) for t in (q, k, v, do))


def _sep(B, T, mode, seed=0, device=DEV):
    if mode is None:
        return None
    if mode == "random":
        g = torch.Generator(device="cpu").manual_seed(seed + 1)
        return torch.randint(0, T + 1, (B,), generator=g, dtype=torch.int64).to(device)
    if mode == "mixed":  # causal, one Part-A token, bidirectional, then a middle split
        return torch.tensor([0, 1, T, T // 2][:B], dtype=torch.int64, device=device)
    if mode == "edges":  # Part A ending one before, at, one after a 16-tile edge, and one before a 32-tile edge
        return torch.tensor([15, 16, 17, 31][:B], dtype=torch.int64, device=device)
    value = {"zero": 0, "one": 1, "half": T // 2, "full": T}[mode]
    return torch.full((B,), value, dtype=torch.int64, device=device)


def _reference_grads(q, k, v, do, sep, scale=None):
    """dq, dk, dv of attention_reference by torch autograd, in fp32 (the reference computes in fp32)."""
    qr, kr, vr = (t.detach().float().requires_grad_() for t in (q, k, v))
    attention_reference(qr, kr, vr, sep, scale=scale).backward(do.float())
    return qr.grad, kr.grad, vr.grad


def _kernel_grads(q, k, v, do, sep, scale=None, **kw):
    o, lse = glm_attention_fwd(q, k, v, sep, scale=scale, return_lse=True, **{n: kw[n] for n in ("block_m", "block_n") if n in kw})
    bufs = dict(dq=poisoned(q.shape, q.dtype, q.device), dk=poisoned(k.shape, k.dtype, k.device),
                dv=poisoned(v.shape, v.dtype, v.device))
    dq, dk, dv = glm_attention_bwd(do, q, k, v, o, lse, sep, scale=scale, **bufs, **kw)
    for name, got in zip(("dq", "dk", "dv"), (dq, dk, dv)):
        assert got is bufs[name], f"{name} was not written into the buffer passed as {name}="
    return dq, dk, dv


def _check(label, ref, got, tol=None):
    for name, r, g in zip(("dq", "dk", "dv"), ref, got):
        assert_close(f"{label} {name}", r, g, tol)


CASES = [  # B, H, H_kv, T, D, dtype, sep mode, block_m, block_n
    (2, 4, 2, 33, 16, torch.float32, "random", 16, 16),
    (2, 2, 2, 50, 32, torch.float32, "zero", 16, 16),
    (2, 2, 1, 50, 32, torch.float32, "one", 16, 16),
    (1, 4, 1, 33, 64, torch.float32, "full", 16, 16),
    (4, 2, 2, 7, 16, torch.float32, "mixed", 16, 16),
    (3, 2, 1, 40, 16, torch.float32, "mixed", 16, 32),
    (3, 2, 2, 45, 16, torch.float32, "mixed", 32, 16),
    (4, 2, 1, 50, 16, torch.float32, "edges", 16, 16),
    (4, 2, 2, 50, 16, torch.float32, "edges", 16, 32),
    (4, 2, 2, 50, 16, torch.float32, "edges", 32, 16),
    (2, 4, 4, 50, 64, torch.float32, "random", 16, 16),
    (2, 4, 2, 47, 32, torch.float16, "random", 16, 16),
    (2, 2, 1, 33, 64, torch.float16, "mixed", 16, 16),
]


@pytest.mark.parametrize("B,H,H_kv,T,D,dtype,mode,bm,bn", CASES)
def test_matches_autograd_reference(B, H, H_kv, T, D, dtype, mode, bm, bn):
    seed = _seed(B, H, H_kv, T, D, dtype, mode, bm, bn)
    q, k, v, do = _inputs(B, H, H_kv, T, D, dtype, seed=seed)
    sep = _sep(B, T, mode, seed=seed)
    got = _kernel_grads(q, k, v, do, sep, block_m=bm, block_n=bn)
    _check(f"T={T} D={D} H={H}/{H_kv} {dtype} sep={sep.tolist()} tiles {bm}x{bn}",
           _reference_grads(q, k, v, do, sep), got)


def test_no_mask_default_tiles_and_scale():
    """sep=None is no mask (as in the reference); default tiles; a custom softmax scale."""
    q, k, v, do = _inputs(2, 2, 1, 37, 32, torch.float32, seed=_seed("nomask"))
    _check("no mask", _reference_grads(q, k, v, do, None), _kernel_grads(q, k, v, do, None))
    sep = _sep(2, 37, "random", seed=3)
    _check("scale 0.3", _reference_grads(q, k, v, do, sep, scale=0.3), _kernel_grads(q, k, v, do, sep, scale=0.3))


def test_single_token():
    """T = 1: the only key gets all the weight, so dq = dk = 0 exactly in math (rounding noise here) and
    dv = dO summed over the query heads of the group."""
    q, k, v, do = _inputs(3, 4, 2, 1, 16, torch.float32, seed=_seed("T1"))
    sep = torch.tensor([0, 1, 0], device=DEV)
    dq, dk, dv = _kernel_grads(q, k, v, do, sep)
    assert dq.abs().max() < 1e-5 and dk.abs().max() < 1e-5
    assert_close("dv at T=1", do.view(3, 2, 2, 1, 16).sum(2), dv)


def test_skipped_blocks_are_never_read():
    """Put NaN where a program must not look; the gradients it owns stay finite and correct.

    sep = 0 (causal), T = 64, 16×16 tiles: key blocks [32, 64) are visible only to queries >= 32, so the
    dk/dv program of those blocks must skip query rows < 32 (NaN q/dO there). With sep = 20, query rows
    0..15 see keys [0, 20): the dq program of that block must never load keys >= 32 (NaN k/v there).
    """
    B, H, T, D = 1, 2, 64, 16
    q, k, v, do = _inputs(B, H, H, T, D, torch.float32, seed=_seed("skip"))
    for sep_val, what in ((0, "qdo"), (20, "kv")):
        sep = torch.tensor([sep_val], device=DEV)
        ref = _reference_grads(q, k, v, do, sep)
        o, lse = glm_attention_fwd(q, k, v, sep, return_lse=True, block_m=16, block_n=16)
        q2, k2, v2, do2 = (t.clone() for t in (q, k, v, do))
        if what == "qdo":
            q2[:, :, :32] = float("nan")
            do2[:, :, :32] = float("nan")
        else:
            k2[:, :, 32:] = float("nan")
            v2[:, :, 32:] = float("nan")
        dq, dk, dv = glm_attention_bwd(do2, q2, k2, v2, o, lse, sep, block_m=16, block_n=16)
        if what == "qdo":
            assert_close("dk of keys >= 32 with NaN queries before them", ref[1][:, :, 32:], dk[:, :, 32:])
            assert_close("dv of keys >= 32 with NaN queries before them", ref[2][:, :, 32:], dv[:, :, 32:])
        else:
            assert_close("dq of rows 0..15 with NaN keys beyond their blocks", ref[0][:, :, :16], dq[:, :, :16])


# ---------------------------------------------------------------- the autograd op behind glm_attention

def test_glm_attention_backward_runs_the_kernels(monkeypatch):
    """Forced to "triton" with gradients needed: forward and backward kernels run (once each) and the
    gradients match the reference's, for GQA with mixed sep and strided inputs as the model makes them."""
    import glmkit.kernels.glm_attention as fmod
    import glmkit.kernels.glm_attention_bwd as bmod

    calls = []
    real_f, real_b = fmod.glm_attention_fwd, bmod.glm_attention_bwd
    monkeypatch.setattr(fmod, "glm_attention_fwd", lambda *a, **kw: calls.append("fwd") or real_f(*a, **kw))
    monkeypatch.setattr(bmod, "glm_attention_bwd", lambda *a, **kw: calls.append("bwd") or real_b(*a, **kw))

    B, T, H, H_kv, D = 3, 29, 4, 2, 16
    g = torch.Generator().manual_seed(_seed("autograd"))
    qp = torch.randn(B, T, H, D, generator=g).to(DEV)
    kv = torch.randn(B, T, 2, H_kv, D, generator=g).to(DEV)
    leaves = (qp.requires_grad_(), kv.requires_grad_())
    q, k, v = qp.transpose(1, 2), kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    assert not q.is_contiguous() and not k.is_contiguous()
    sep = _sep(B, T, "mixed")
    with glmkit.use_backend("triton"):
        assert attention_path(q, k, v) == "triton"
        out = glm_attention(q, k, v, sep)
        assert out.grad_fn is not None and "GLMAttentionFunction" in type(out.grad_fn).__name__
        weight = torch.randn(out.shape, generator=g).to(DEV)
        (out * weight).sum().backward()
    assert calls == ["fwd", "bwd"]
    got = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    with glmkit.use_backend("torch"):
        (attention_reference(q, k, v, sep) * weight).sum().backward()
    for name, ref, g_ in zip(("d(q proj)", "d(kv proj)"), (t.grad for t in leaves), got):
        assert_close(name, ref, g_)


def test_autograd_op_partial_grads_and_no_grad():
    """Only v requires grad: q/k get none. Under no_grad the plain forward kernel runs (no graph)."""
    q, k, v, do = _inputs(2, 2, 1, 21, 16, torch.float32, seed=_seed("partial"))
    sep = torch.tensor([5, 0], device=DEV)
    v.requires_grad_()
    with glmkit.use_backend("triton"):
        glm_attention(q, k, v, sep).backward(do)
        with torch.no_grad():
            assert glm_attention(q, k, v, sep).grad_fn is None
    assert q.grad is None and k.grad is None
    assert_close("dv only", _reference_grads(q, k, v, do, sep)[2], v.grad)
    # .sum() hands the backward an expanded dO (all strides 0)
    v.grad = None
    with glmkit.use_backend("triton"):
        glm_attention(q, k, v, sep).sum().backward()
    assert_close("dv from .sum()", _reference_grads(q, k, v, torch.ones_like(do), sep)[2], v.grad)
    # the op directly, sep=None and a scale
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    GLMAttentionFunction.apply(q2, k2, v2, None, 0.5).backward(do)
    _check("op, no mask, scale 0.5", _reference_grads(q, k, v, do, None, scale=0.5), (q2.grad, k2.grad, v2.grad))


def test_bwd_flops_convention():
    from glmkit.kernels.glm_attention import visible_pairs

    assert bwd_flops(100, 64, 0) == int(2.5 * 4 * 64 * visible_pairs(100, 0))
    assert bwd_flops(8, 16, 8, B=2, H=3) == int(2.5 * 4 * 16 * 64 * 6)


@pytest.mark.parametrize(
    "over, exc, match",
    [
        (dict(D=48), ValueError, "head dim"),
        (dict(lse_shape=(2, 4, 8)), ValueError, "lse"),
        (dict(dq_dtype=torch.float16), ValueError, "dq must be"),
        (dict(do_dtype=torch.float16), TypeError, "share one dtype"),
        (dict(sep=[0, 10]), ValueError, r"\[0, T\]"),
        (dict(block_m=24), ValueError, "block_m"),
    ],
)
def test_errors(over, exc, match):
    D = over.get("D", 16)
    q, k, v, do = _inputs(2, 4, 2, 9, D, torch.float32)
    o = torch.zeros_like(q)
    lse = torch.zeros(over.get("lse_shape", (2, 4, 9)), device=DEV)
    sep = torch.tensor(over.get("sep", [3, 4]), device=DEV)
    dq = torch.empty(q.shape, dtype=over["dq_dtype"], device=DEV) if "dq_dtype" in over else None
    do = do.to(over.get("do_dtype", do.dtype))
    with pytest.raises(exc, match=match):
        glm_attention_bwd(do, q, k, v, o, lse, sep, dq=dq, block_m=over.get("block_m"))


# ---------------------------------------------------------------- GPU: native, autotuned, bigger shapes

GPU_TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("T,B,H,H_kv", [(1000, 3, 4, 2), (2048, 2, 4, 4), (777, 2, 8, 1)])
def test_gpu_matches_reference(dtype, D, T, B, H, H_kv):
    seed = _seed("gpu", dtype, D, T)
    q, k, v, do = _inputs(B, H, H_kv, T, D, dtype, device="cuda", seed=seed)
    sep = _sep(B, T, "random", seed=seed, device="cuda")
    sep[0] = T // 2
    got = _kernel_grads(q, k, v, do, sep)
    torch.cuda.synchronize()
    _check(f"gpu {dtype} T={T} D={D} H={H}/{H_kv}", _reference_grads(q, k, v, do, sep), got, GPU_TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("mode", ["zero", "one", "full", "mixed"])
def test_gpu_sep_extremes_and_fixed_tiles(dtype, mode):
    B, H, H_kv, T, D = 4, 4, 2, 1537, 128
    q, k, v, do = _inputs(B, H, H_kv, T, D, dtype, device="cuda", seed=len(mode))
    sep = _sep(B, T, mode, device="cuda")
    ref = _reference_grads(q, k, v, do, sep)
    _check(f"autotuned {mode}", ref, _kernel_grads(q, k, v, do, sep), GPU_TOL[dtype])
    for bm, bn, w, s in [(32, 128, 4, 3), (64, 64, 4, 2), (16, 32, 4, 2)]:
        got = _kernel_grads(q, k, v, do, sep, block_m=bm, block_n=bn, num_warps=w, num_stages=s)
        _check(f"tiles {bm}x{bn} w{w} s{s} {mode}", ref, got, GPU_TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_gpu_glm_attention_trains_on_kernels(dtype):
    """glm_attention on CUDA with gradients: the autograd op (our kernels both ways), GQA, mixed sep."""
    B, H, H_kv, T, D = 2, 8, 2, 1000, 64
    q, k, v, do = _inputs(B, H, H_kv, T, D, dtype, device="cuda", seed=21)
    sep = torch.tensor([400, 0], device="cuda")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with glmkit.use_backend("auto"):
        assert attention_path(*leaves) == "triton"
        out = glm_attention(*leaves, sep)
        assert "GLMAttentionFunction" in type(out.grad_fn).__name__
        out.backward(do)
    _check(f"gpu autograd {dtype}", _reference_grads(q, k, v, do, sep), [t.grad for t in leaves], GPU_TOL[dtype])
