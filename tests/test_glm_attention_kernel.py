"""The GLM flash-attention forward kernel (glmkit.kernels.glm_attention) against the torch reference.

On CPU the kernel runs under the Triton interpreter at small shapes (fp32 and fp16; bf16 is left to the
GPU because tl.dot on bf16 is wrong under triton 3.6's interpreter). `-m gpu` runs it natively on CUDA in
fp32/fp16/bf16 up to T = 4K. Every run writes into a NaN-poisoned `out`, and inputs are fresh random
tensors per parametrization.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

import glmkit.kernels  # noqa: F401  (sets TRITON_INTERPRET=1 on machines without CUDA)
from glmkit.attention import attention_reference
from glmkit.kernels.glm_attention import glm_attention_fwd, visible_pairs
from glmkit.blank_infilling import attention_mask
from glmkit.testing import assert_close, poisoned

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


def _inputs(B, H, H_kv, T, D, dtype, device=DEV, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v = (torch.randn(B, h, T, D, generator=g, dtype=torch.float32) for h in (H, H_kv, H_kv))
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)


def _sep(B, T, mode, seed=0, device=DEV):
    if mode == "random":
        g = torch.Generator(device="cpu").manual_seed(seed + 1)
        return torch.randint(0, T + 1, (B,), generator=g, dtype=torch.int64).to(device)
    value = {"zero": 0, "one": 1, "half": T // 2, "full": T}[mode]
    return torch.full((B,), value, dtype=torch.int64, device=device)


def _run(q, k, v, sep, **kw):
    B, H, T, D = q.shape
    out = poisoned((B, H, T, D), q.dtype, q.device)
    o = glm_attention_fwd(q, k, v, sep, out=out, **kw)
    assert o.data_ptr() == out.data_ptr()
    return o


# (B, H, H_kv, T, D, dtype, sep mode, block_m, block_n): lengths that are not block multiples, GQA,
# BLOCK_M != BLOCK_N, Part-A length 0 / 1 / T / random per sample.
CASES = [
    (2, 2, 2, 1, 16, torch.float32, "random", 16, 16),
    (2, 2, 2, 7, 32, torch.float32, "random", 16, 16),
    (2, 2, 2, 33, 16, torch.float32, "zero", 16, 16),
    (2, 2, 2, 33, 16, torch.float32, "one", 16, 16),
    (2, 2, 2, 33, 16, torch.float32, "full", 16, 16),
    (3, 2, 2, 50, 32, torch.float32, "random", 16, 16),
    (3, 4, 2, 50, 32, torch.float32, "random", 32, 16),
    (2, 4, 1, 50, 16, torch.float32, "random", 16, 32),
    (2, 2, 2, 64, 64, torch.float32, "half", 16, 16),
    (4, 2, 1, 45, 64, torch.float32, "random", 32, 32),
    (2, 4, 2, 50, 32, torch.float16, "random", 16, 16),
    (2, 2, 2, 33, 64, torch.float16, "one", 32, 16),
    (2, 4, 1, 47, 64, torch.float16, "random", 16, 32),
    (5, 2, 1, 20, 32, torch.float32, "random", 16, 16),
]


@pytest.mark.parametrize("B,H,H_kv,T,D,dtype,mode,bm,bn", CASES)
def test_matches_reference(B, H, H_kv, T, D, dtype, mode, bm, bn):
    seed = zlib.crc32(repr((B, H, H_kv, T, D, dtype, mode, bm, bn)).encode()) % 10_000
    q, k, v = _inputs(B, H, H_kv, T, D, dtype, seed=seed)
    sep = _sep(B, T, mode, seed=seed)
    o = _run(q, k, v, sep, block_m=bm, block_n=bn)
    assert_close(f"glm attention T={T} D={D} {dtype} sep={sep.tolist()}", attention_reference(q, k, v, sep), o)


def test_default_blocks_and_no_mask():
    """Default tiles; sep=None means no mask (bidirectional), as in the reference."""
    q, k, v = _inputs(2, 2, 1, 40, 32, torch.float32, seed=11)
    assert_close("no mask", attention_reference(q, k, v, None), _run(q, k, v, None))
    sep = _sep(2, 40, "random", seed=11)
    assert_close("default blocks", attention_reference(q, k, v, sep), _run(q, k, v, sep))


def test_custom_scale_and_lse():
    B, H, T, D = 2, 2, 37, 32
    q, k, v = _inputs(B, H, H, T, D, torch.float32, seed=5)
    sep = torch.tensor([0, 20], device=DEV)
    scale = 0.3
    o, lse = glm_attention_fwd(q, k, v, sep, scale=scale, out=poisoned((B, H, T, D), device=DEV), return_lse=True,
                               lse=poisoned((B, H, T), device=DEV), block_m=16, block_n=16)
    assert_close("scaled", attention_reference(q, k, v, sep, scale=scale), o)
    scores = torch.einsum("bhid,bhjd->bhij", q.double(), k.double()) * scale
    scores = scores.masked_fill(~attention_mask(sep, T)[:, None], float("-inf"))
    assert_close("lse", torch.logsumexp(scores, dim=-1), lse)


def test_noncontiguous_inputs():
    """q/k/v as the model makes them: [B, T, H, D] projections viewed as [B, H, T, D]."""
    B, T, H, D = 2, 29, 4, 32
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(B, T, 3, H, D, generator=g).to(DEV)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    sep = _sep(B, T, "random", seed=3)
    assert_close("strided", attention_reference(q, k, v, sep), _run(q, k, v, sep, block_m=16, block_n=16))


@pytest.mark.filterwarnings("ignore:All-NaN slice")  # later query blocks do read the NaN keys
def test_fully_masked_blocks_are_skipped():
    """Put NaN in keys/values that query block 0 must never visit: its rows stay finite and correct.

    With BLOCK_M = BLOCK_N = 16 and sep = 20, rows 0..15 see keys [0, 20); the kernel visits key blocks
    [0, 16) unmasked and [16, 32) masked, and must never load a key >= 32. A kernel that only masked
    (without skipping) would multiply p = 0 by NaN and poison those rows.
    """
    B, H, T, D = 1, 2, 64, 16
    q, k, v = _inputs(B, H, H, T, D, torch.float32, seed=9)
    sep = torch.tensor([20], device=DEV)
    ref = attention_reference(q, k, v, sep)
    k[:, :, 32:] = float("nan")
    v[:, :, 32:] = float("nan")
    o = _run(q, k, v, sep, block_m=16, block_n=16)
    assert_close("rows 0..15 with NaN beyond their visible blocks", ref[:, :, :16], o[:, :, :16])
    assert_close("rows 16..19 (still Part A)", ref[:, :, 16:20], o[:, :, 16:20])


def test_visible_pairs_counts_the_mask():
    for T, s in [(1, 0), (7, 3), (16, 16), (33, 0), (33, 1)]:
        assert visible_pairs(T, s) == int(attention_mask(torch.tensor([s]), T).sum())


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(D=48), ValueError, "head dim"),
        (dict(H_kv=3), ValueError, "multiple"),
        (dict(sep=[-1, 2]), ValueError, r"\[0, T\]"),
        (dict(sep=[0, 99]), ValueError, r"\[0, T\]"),
        (dict(sep_dtype=torch.float32), TypeError, "sep"),
        (dict(block_m=24), ValueError, "block_m"),
        (dict(out_shape=(2, 4, 8, 16)), ValueError, "out"),
    ],
)
def test_errors(kwargs, exc, match):
    D, H_kv = kwargs.get("D", 16), kwargs.get("H_kv", 2)
    q, k, v = _inputs(2, 4, H_kv, 9, D, torch.float32)
    sep = torch.tensor(kwargs.get("sep", [3, 4]), dtype=kwargs.get("sep_dtype", torch.int64), device=DEV)
    out = torch.empty(kwargs["out_shape"], device=DEV) if "out_shape" in kwargs else None
    with pytest.raises(exc, match=match):
        glm_attention_fwd(q, k, v, sep, out=out, block_m=kwargs.get("block_m"))


# ---------------------------------------------------------------- GPU: native, autotuned, bigger shapes

GPU_TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("T,B,H,H_kv", [(1000, 3, 4, 2), (4096, 2, 4, 4), (777, 2, 8, 1)])
def test_gpu_matches_reference(dtype, D, T, B, H, H_kv):
    seed = (T * 7 + D) % 1000
    q, k, v = _inputs(B, H, H_kv, T, D, dtype, device="cuda", seed=seed)
    sep = _sep(B, T, "random", seed=seed, device="cuda")
    sep[0] = T // 2
    o = _run(q, k, v, sep)
    torch.cuda.synchronize()
    assert_close(f"gpu {dtype} T={T} D={D}", attention_reference(q, k, v, sep), o, GPU_TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("mode", ["zero", "one", "full"])
def test_gpu_sep_extremes_and_fixed_blocks(dtype, mode):
    B, H, T, D = 2, 4, 1537, 128
    q, k, v = _inputs(B, H, H, T, D, dtype, device="cuda", seed=len(mode))
    sep = _sep(B, T, mode, device="cuda")
    ref = attention_reference(q, k, v, sep)
    assert_close(f"autotuned {mode}", ref, _run(q, k, v, sep), GPU_TOL[dtype])
    for bm, bn, w, s in [(128, 64, 8, 3), (128, 128, 8, 3), (64, 32, 4, 2)]:
        o = _run(q, k, v, sep, block_m=bm, block_n=bn, num_warps=w, num_stages=s)
        assert_close(f"blocks {bm}x{bn} {mode}", ref, o, GPU_TOL[dtype])


@pytest.mark.gpu
def test_gpu_lse():
    B, H, T, D = 2, 4, 2048, 64
    q, k, v = _inputs(B, H, 2, T, D, torch.float32, device="cuda", seed=4)
    sep = torch.tensor([0, 1000], device="cuda")
    _, lse = glm_attention_fwd(q, k, v, sep, return_lse=True)
    scale = 1 / math.sqrt(D)
    scores = torch.einsum("bhid,bhjd->bhij", q, k.repeat_interleave(2, 1)) * scale
    scores = scores.masked_fill(~attention_mask(sep, T)[:, None], float("-inf"))
    assert_close("gpu lse", torch.logsumexp(scores, dim=-1), lse, 1e-5)
