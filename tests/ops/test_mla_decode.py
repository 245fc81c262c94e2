"""glmkit.ops.mla_decode and its kernel (glmkit.kernels.mla_decode): the absorbed reference against the naive path
(keys and values expanded per head), the kernel against the reference (split-K and single-split launches, ragged
batches, odd lengths and head counts, latent and rope dims that are not powers of two, several new tokens, explicit
masks, chunks and queries that see nothing), the dispatch and the argument errors.

On CPU the kernel runs under the Triton interpreter in fp32 and fp16 (bf16 ``tl.dot`` is wrong there) with a pretend
4-SM GPU, so the shapes below split; ``-m gpu`` runs GLM-4.7-Flash's and GLM-5's shapes natively. Outputs and the
split-K partial buffers are allocated NaN-poisoned (the ``poison`` fixture).
"""

from __future__ import annotations

import zlib

import pytest
import torch

import glmkit
import glmkit.kernels  # noqa: F401  (sets TRITON_INTERPRET=1 on machines without CUDA)
from glmkit import backend
from glmkit.kernels.mla_decode import decode_bytes, mla_decode_fwd, num_splits
from glmkit.ops.mla_decode import mla_decode, mla_decode_reference
from glmkit.testing import REL_TOL, assert_close

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()) % 100_000)


def _inputs(B, Tq, H, R, P, L, dtype=torch.float32, device=DEV, key=()):
    """q_lat, q_rope, and the cached latent rows as views of one [B, L, R + P] buffer (as MLAState keeps them)."""
    g = _gen("mla", B, Tq, H, R, P, L, dtype, key)
    q_lat = torch.randn(B, Tq, H, R, generator=g) / R**0.25
    q_rope = torch.randn(B, Tq, H, P, generator=g)
    latent = torch.randn(B, L, R + P, generator=g)
    q_lat, q_rope, latent = (t.to(device, dtype) for t in (q_lat, q_rope, latent))
    return q_lat, q_rope, latent[..., :R], latent[..., R:]


def _lengths(B, L, Tq, device=DEV, key=()):
    """Ragged: the first row full, the others random in [Tq, L]."""
    n = torch.randint(Tq, L + 1, (B,), generator=_gen("len", B, L, key))
    n[0] = L
    return n.to(device)


# ================================================================ the reference


def test_absorbed_equals_naive_expansion():
    """The point of absorption: scores and outputs with W_UK folded into the query and W_UV applied after the sum
    equal those of keys and values expanded for every head (k_h = W_UK[h] c, v_h = W_UV[h] c) — fp64."""
    g = _gen("absorb")
    B, Tq, H, R, P, nope, dv, L = 2, 3, 4, 24, 8, 12, 10, 17
    w_uk, w_uv = torch.randn(H, nope, R, generator=g), torch.randn(H, dv, R, generator=g)
    q_nope, q_rope = torch.randn(B, Tq, H, nope, generator=g), torch.randn(B, Tq, H, P, generator=g)
    c, kr = torch.randn(B, L, R, generator=g), torch.randn(B, L, P, generator=g)
    scale = 0.3
    q_lat = torch.einsum("bthn,hnr->bthr", q_nope, w_uk)
    o = torch.einsum("bthr,hvr->bthv", mla_decode_reference(q_lat, q_rope, c, kr, scale), w_uv)
    k = torch.cat((torch.einsum("hnr,blr->bhln", w_uk, c), kr[:, None].expand(B, H, L, P)), -1).double()
    v = torch.einsum("hvr,blr->bhlv", w_uv, c).double()
    q = torch.cat((q_nope, q_rope), -1).transpose(1, 2).double()  # [B, H, Tq, nope + P]
    s = torch.einsum("bhtd,bhld->bhtl", q, k) * scale
    causal = torch.arange(L)[None, :] <= torch.arange(L - Tq, L)[:, None]  # the Tq newest tokens
    naive = torch.einsum("bhtl,bhlv->bthv", s.masked_fill(~causal, float("-inf")).softmax(-1), v)
    assert_close("absorbed vs expanded", naive, o, 1e-5)


def test_reference_masks_ragged_rows_and_explicit_masks():
    """lengths cut each row's keys; visible is applied on top; a query that sees nothing gets zeros."""
    q_lat, q_rope, c, kr = _inputs(3, 2, 2, 16, 8, 9, device="cpu", key="ref")
    lengths = torch.tensor([9, 5, 2])
    out = mla_decode_reference(q_lat, q_rope, c, kr, 0.5, lengths)
    for b, n in enumerate(lengths.tolist()):  # row b: the keys [0, n), the two queries at n - 2 and n - 1
        ref = mla_decode_reference(q_lat[b : b + 1], q_rope[b : b + 1], c[b : b + 1, :n], kr[b : b + 1, :n], 0.5)
        assert_close(f"row {b}", ref, out[b : b + 1], 1e-6)
    visible = torch.ones(3, 2, 9, dtype=torch.bool)
    visible[1, 0] = False  # this query sees nothing
    visible[2, :, 1] = False
    got = mla_decode_reference(q_lat, q_rope, c, kr, 0.5, lengths, visible)
    assert torch.equal(got[1, 0], torch.zeros_like(got[1, 0]))
    only = mla_decode_reference(q_lat[2:, :, :, :], q_rope[2:], c[2:, :1], kr[2:, :1], 0.5, visible=visible[2:, :, :1])
    assert_close("row 2 sees key 0 only", only, got[2:], 1e-6)


# ================================================================ the kernel

# (B, Tq, H, R, P, L, ragged, masked, dtype): split-K and one split (the interpreter pretends to have 4 SMs),
# odd lengths and head counts, R/P not powers of two, several new tokens, explicit masks
CASES = [
    (1, 1, 4, 32, 16, 100, False, False, torch.float32),
    (3, 1, 20, 48, 16, 77, True, False, torch.float32),
    (2, 3, 5, 32, 16, 50, True, True, torch.float32),
    (8, 1, 2, 16, 8, 33, True, False, torch.float32),
    (2, 1, 17, 64, 24, 203, True, True, torch.float16),
    (1, 2, 3, 40, 12, 9, False, False, torch.float16),
]


@pytest.mark.parametrize("B,Tq,H,R,P,L,ragged,masked,dtype", CASES)
def test_kernel_matches_reference(B, Tq, H, R, P, L, ragged, masked, dtype, poison):
    q_lat, q_rope, c, kr = _inputs(B, Tq, H, R, P, L, dtype, key="kernel")
    lengths = _lengths(B, L, Tq, key="kernel") if ragged else None
    visible = None
    if masked:
        visible = torch.rand(B, Tq, L, generator=_gen("vis", B, L)).to(DEV) > 0.3
        visible[..., 0] = True
    out = mla_decode_fwd(q_lat, q_rope, c, kr, 0.125, lengths, visible)
    assert out.shape == (B, Tq, H, R) and out.dtype == dtype
    ref = mla_decode_reference(q_lat, q_rope, c, kr, 0.125, lengths, visible)
    splits = num_splits(B * Tq, L, q_lat.device)[0]
    assert_close(f"B={B} Tq={Tq} H={H} R={R} P={P} L={L} splits={splits}", ref, out)


def test_the_cases_cover_both_launch_kinds():
    splits = [num_splits(B * Tq, L, torch.device(DEV))[0] for B, Tq, _, _, _, L, *_ in CASES]
    assert max(splits) > 2 and min(splits) == 1, splits


def test_chunks_past_a_short_row_and_empty_queries(poison):
    """A ragged batch where one row has 3 keys of 300: its later chunks hold nothing (weight 0 in the combine);
    a query whose mask hides every key gets zeros, not NaN."""
    B, Tq, H, R, P, L = 3, 1, 4, 32, 16, 300
    q_lat, q_rope, c, kr = _inputs(B, Tq, H, R, P, L, key="short")
    assert num_splits(B * Tq, L, q_lat.device)[0] > 1
    lengths = torch.tensor([L, 3, 129], device=DEV)
    ref = mla_decode_reference(q_lat, q_rope, c, kr, 0.2, lengths)
    assert_close("short rows", ref, mla_decode_fwd(q_lat, q_rope, c, kr, 0.2, lengths))
    visible = torch.ones(B, Tq, L, dtype=torch.bool, device=DEV)
    visible[1] = False
    out = mla_decode_fwd(q_lat, q_rope, c, kr, 0.2, lengths, visible)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert_close("others", mla_decode_reference(q_lat, q_rope, c, kr, 0.2, lengths, visible), out)


def test_keys_past_the_length_are_never_read(poison):
    """NaN in the cache beyond each row's length: the outputs stay finite and right."""
    q_lat, q_rope, c, kr = _inputs(2, 1, 4, 32, 16, 120, key="nan")
    lengths = torch.tensor([70, 33], device=DEV)
    ref = mla_decode_reference(q_lat, q_rope, c, kr, 0.2, lengths)
    for b, n in enumerate(lengths.tolist()):
        c[b, n:] = float("nan")
        kr[b, n:] = float("nan")
    assert_close("NaN beyond the lengths", ref, mla_decode_fwd(q_lat, q_rope, c, kr, 0.2, lengths))


def test_decode_bytes():
    # GLM-4.7-Flash, one token at 4K: 4096 latent rows of 576 bf16 values, plus 20 heads' q (512 + 64) and out (512)
    assert decode_bytes(1, 4096, 20, 512, 64) == 2 * (4096 * 576 + 20 * (2 * 512 + 64))


# ================================================================ dispatch and errors


def test_dispatch(monkeypatch):
    """auto: torch on CPU; triton: the kernel (interpreter); with a gradient needed: the differentiable reference."""
    import glmkit.kernels.mla_decode as kmod

    calls = []
    real = kmod.mla_decode_fwd
    monkeypatch.setattr(kmod, "mla_decode_fwd", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q_lat, q_rope, c, kr = _inputs(2, 1, 3, 32, 16, 21, device="cpu", key="dispatch")
    ref = mla_decode_reference(q_lat, q_rope, c, kr, 0.3)
    for name, path in (("torch", "torch"), ("triton", "triton")):
        with glmkit.use_backend(name), backend.audit() as a:
            out = mla_decode(q_lat, q_rope, c, kr, 0.3)
        assert a.paths("mla_decode") == {path}
        assert_close(name, ref, out)
    assert calls == [1]
    q_lat.requires_grad_()
    with glmkit.use_backend("triton"), backend.audit() as a:
        mla_decode(q_lat, q_rope, c, kr, 0.3).sum().backward()
    assert a.paths("mla_decode") == {"torch"} and q_lat.grad is not None


def _bad(**over):
    q_lat, q_rope, c, kr = _inputs(2, 1, 3, 16, 8, 5, device="cpu", key="bad")
    args = dict(q_lat=q_lat, q_rope=q_rope, c_kv=c, k_rot=kr, scale=0.5, lengths=None, visible=None)
    args.update(over)
    return args


BAD = [
    (dict(q_lat=torch.randn(2, 3, 16)), ValueError, "q_lat must be"),
    (dict(c_kv=torch.randn(2, 5, 16).double()), TypeError, "c_kv must be float32"),
    (dict(k_rot=torch.randn(2, 5, 8).half()), TypeError, "share one dtype"),
    (dict(c_kv=torch.randn(2, 5, 12)), ValueError, "shapes do not fit"),
    (dict(q_rope=torch.randn(2, 1, 3, 4)), ValueError, "share P"),
    (dict(scale=0.0), ValueError, "scale"),
    (dict(lengths=torch.tensor([1.0, 2.0])), ValueError, "lengths must be"),
    (dict(lengths=torch.tensor([1, 2, 3])), ValueError, r"lengths must be a \[B\]"),
    (dict(visible=torch.ones(2, 1, 4, dtype=torch.bool)), ValueError, r"visible must be a \[B, Tq, L\]"),
    (dict(visible=torch.ones(2, 1, 5)), ValueError, "bool"),
]


@pytest.mark.parametrize("over, exc, match", BAD)
def test_errors_name_the_argument(over, exc, match):
    with pytest.raises(exc, match=match):
        mla_decode(**_bad(**over))


# ================================================================ GPU: GLM's shapes, native


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "B,Tq,H,L,masked",
    [(4, 1, 20, 4099, False), (32, 2, 20, 1031, True), (3, 1, 64, 2053, False), (1, 1, 20, 33000, False)],
    ids=["flash-ragged", "flash-b32-2tok-mask", "glm5", "flash-32k"],
)
def test_gpu_glm_shapes(B, Tq, H, L, masked, dtype, poison):
    """GLM-4.7-Flash (20 heads) and GLM-5 (64 heads): latent 512 + rope 64, ragged lengths, split-K, a mask with
    two new tokens (fp16 is left to the interpreter: each dtype compiles the kernel anew)."""
    q_lat, q_rope, c, kr = _inputs(B, Tq, H, 512, 64, L, dtype, device="cuda", key="gpu")
    lengths = _lengths(B, L, Tq, device="cuda", key="gpu")
    visible = (torch.rand(B, Tq, L, device="cuda") > 0.2) if masked else None
    out = mla_decode_fwd(q_lat, q_rope, c, kr, 256**-0.5, lengths, visible)
    torch.cuda.synchronize()
    ref = mla_decode_reference(q_lat, q_rope, c, kr, 256**-0.5, lengths, visible)
    assert_close(f"gpu {dtype} B={B} H={H} L={L}", ref, out, REL_TOL[dtype])
