"""The lesson-00 primer kernels against their torch references: odd sizes (ragged last block), several
block sizes, poisoned outputs, fp32/fp16/bf16. Under the Triton interpreter on CPU; natively with -m gpu."""

from __future__ import annotations

import pytest
import torch

from glmkit.kernels import primer
from glmkit.testing import REL_TOL, assert_close, poisoned

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _dev():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("n", [1, 7, 63, 1000, 1025, 3001])
@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_add_matches_torch(n, dtype):
    x = torch.randn(n, dtype=dtype, device=_dev())
    b = torch.randn(n, dtype=dtype, device=_dev())
    a = float(torch.randn(()).item())
    out = poisoned((n,), dtype, _dev())
    y = primer.scale_add(x, b, a, out=out)
    assert y is out  # wrote into the buffer it was given
    assert_close("scale_add", primer.scale_add_reference(x.float(), b.float(), a).to(dtype), y, tol=REL_TOL[dtype])


@pytest.mark.parametrize("block", [16, 64, 128])
def test_scale_add_block_sizes_and_nd_shapes(block):
    x = torch.randn(5, 13, 3, device=_dev())
    b = torch.randn(5, 13, 3, device=_dev())
    y = primer.scale_add(x, b, 0.5, out=poisoned(x.shape, device=_dev()), block=block)
    assert y.shape == x.shape
    assert_close("scale_add", primer.scale_add_reference(x, b, 0.5), y)


def test_scale_add_empty_and_default_out():
    x = torch.empty(0, device=_dev())
    assert primer.scale_add(x, x.clone(), 2.0).numel() == 0
    x = torch.randn(9, device=_dev())
    assert_close("scale_add", 3 * x + 1, primer.scale_add(x, torch.ones_like(x), 3))


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (7, 37), (4, 128), (2, 200)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_row_softmax_matches_torch(shape, dtype):
    x = (3 * torch.randn(shape, device=_dev())).to(dtype)
    y = primer.row_softmax(x, out=poisoned(shape, dtype, _dev()))
    assert_close("row_softmax", primer.row_softmax_reference(x), y, tol=REL_TOL[dtype])
    assert torch.allclose(y.float().sum(-1), torch.ones(shape[0], device=_dev()), atol=1e-2)


def test_row_softmax_large_values_do_not_overflow():
    x = torch.tensor([[1000.0, 1001.0, 999.0]], device=_dev())
    assert_close("row_softmax", torch.softmax(x, -1), primer.row_softmax(x))


def test_bad_inputs_name_the_problem():
    x = torch.randn(8)
    with pytest.raises(ValueError, match="same shape"):
        primer.scale_add(x, torch.randn(9), 1.0)
    with pytest.raises(TypeError, match="floating-point"):
        primer.scale_add(torch.arange(8), torch.arange(8), 1.0)
    with pytest.raises(ValueError, match="power of two"):
        primer.scale_add(x, x, 1.0, block=100)
    with pytest.raises(ValueError, match="out must match"):
        primer.scale_add(x, x, 1.0, out=torch.empty(8, dtype=torch.float64))
    with pytest.raises(TypeError, match="Python number"):
        primer.scale_add(x, x, torch.tensor(1.0))
    with pytest.raises(ValueError, match="2-D"):
        primer.row_softmax(torch.randn(2, 3, 4))


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 1025, 1 << 20])
def test_scale_add_native_on_gpu(n):
    x = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    y = primer.scale_add(x, b, 1.5, out=poisoned((n,), torch.bfloat16, "cuda"))
    assert_close("scale_add", primer.scale_add_reference(x.float(), b.float(), 1.5).bfloat16(), y)


@pytest.mark.gpu
def test_row_softmax_native_on_gpu():
    x = torch.randn(257, 1000, device="cuda")
    assert_close(
        "row_softmax", primer.row_softmax_reference(x), primer.row_softmax(x, out=poisoned(x.shape, device="cuda"))
    )
