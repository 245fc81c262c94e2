"""Public checks of exercise 03 (shipped to learners; the hidden ones stay with the instructor).

Each check is declared with its points, time limit (seconds) and the message a learner sees when it
fails. Inputs are random (fresh each run, reproducible with the run's seed) and the row lengths are
deliberately not powers of two; the expected answers are computed here, in the grading process, by
glmkit's reference (``glmkit.ops.rmsnorm.rmsnorm_reference``) — never stored. ``ctx.call`` runs your
``rms_norm_fwd`` in a separate process (your kernel runs there, under the Triton interpreter on a CPU)
and brings its result back as plain data.
"""

from __future__ import annotations

import torch

from glmkit.grading import Check

# relative-error budgets (RMS of the difference / RMS of the reference), per output dtype: fp32 leaves
# room only for a different summation order; fp16/bf16 for one rounding of the output
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    from glmkit.ops.rmsnorm import rmsnorm_reference as rms_norm_reference

    return rms_norm_reference(x, weight, eps)


def randn(ctx, *shape, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    return (scale * torch.randn(*shape, generator=ctx.gen)).to(dtype)


def ragged_n(ctx, lo: int = 2, hi: int = 300) -> int:
    """A row length that is not a power of two (so the last lanes of the block are masked)."""
    while True:
        n = ctx.rng.randint(lo, hi)
        if n & (n - 1):
            return n


def compare(
    ctx,
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    out: torch.Tensor | None = None,
    what: str = "rms_norm_fwd(x, weight, eps)",
) -> None:
    rms = f"{x.float().pow(2).mean().sqrt():.3g}" if x.numel() else "-"
    ctx.note_inputs(
        f"x {list(x.shape)} {str(x.dtype)[6:]} (|x| RMS {rms}), "
        f"weight {list(weight.shape)} {str(weight.dtype)[6:]}, eps={eps:g}"
        + (", out=<NaN-filled buffer>" if out is not None else "")
    )
    want = reference(x, weight, eps)
    got = (
        ctx.call("rms_norm_fwd", x, weight, eps, out=out)
        if out is not None
        else ctx.call("rms_norm_fwd", x, weight, eps)
    )
    if (
        isinstance(got, torch.Tensor)
        and got.shape == want.shape
        and got.dtype == want.dtype
        and got.dtype.is_floating_point
        and not torch.isfinite(got).all()
    ):
        bad = (~torch.isfinite(got)).nonzero()
        first = [int(i) for i in bad[0]]
        ctx.fail(
            f"{what} left NaN/inf values in the output",
            f"{len(bad)} of {got.numel()} values are not finite, first at [row, col] = {first} "
            f"(N = {x.shape[1]}, BLOCK_N = {1 << (x.shape[1] - 1).bit_length()})",
        )
    if want.numel() == 0:  # no rows: only the type, dtype and shape can be wrong
        if not isinstance(got, torch.Tensor) or got.dtype != want.dtype or tuple(got.shape) != tuple(want.shape):
            ctx.fail(
                f"{what} should return an empty tensor of x's shape and dtype when x has no rows",
                f"expected {list(want.shape)} {str(want.dtype)[6:]}, got "
                + (f"{list(got.shape)} {str(got.dtype)[6:]}" if isinstance(got, torch.Tensor) else repr(got)[:100]),
            )
        return
    ctx.expect_tensor(what, got, want, tol=TOL[x.dtype])


@Check(
    points=2,
    timeout=40,
    title="rows of 16 or 64 (power of two)",
    message=(
        "One program normalises one row: row = tl.program_id(0); load x[row, :] with offsets "
        "row * stride_x + cols, compute rstd = 1 / sqrt(sum(x*x) / N + eps), and store x * rstd * w at "
        "row * stride_y + cols. Launch one program per row: grid = (M,)."
    ),
)
def power_of_two_rows(ctx):
    for n in (16, 64):
        m = ctx.rng.randint(1, 4)
        compare(ctx, randn(ctx, m, n), torch.ones(n), 1e-5)


@Check(
    points=3,
    timeout=40,
    title="ragged row lengths (masks)",
    message=(
        "When N is not a power of two, BLOCK_N = triton.next_power_of_2(N) and the lanes cols >= N are "
        "outside the row: load them with mask=cols < N and other=0.0 (so they add nothing to the sum of "
        "squares), store with the same mask, and divide the sum by N, not by BLOCK_N. The weight is loaded "
        "with the same mask."
    ),
)
def ragged_hidden_sizes(ctx):
    for _ in range(4):
        n, m = ragged_n(ctx), ctx.rng.randint(1, 6)
        compare(ctx, randn(ctx, m, n), randn(ctx, n, scale=0.5) + 1.0, 1e-5)


@Check(
    points=2,
    timeout=40,
    title="writes every element of out=",
    message=(
        "When out= is given, write the result into it and return it. The check fills out with NaN first: "
        "a NaN left in the result is an element your kernel never stored — a row never launched (the grid "
        "must be (M,)) or the lanes just below N masked off by mistake (the mask is cols < N)."
    ),
)
def poisoned_output(ctx):
    for _ in range(2):
        n, m = ragged_n(ctx), ctx.rng.randint(2, 7)
        x = randn(ctx, m, n)
        compare(ctx, x, randn(ctx, n), 1e-5, out=torch.full_like(x, float("nan")))


@Check(
    points=2,
    timeout=40,
    title="eps is used, inside the square root",
    message=(
        "eps is added to the MEAN of the squares, before the square root: rstd = 1 / sqrt(sum(x*x) / N + eps). "
        "Use the eps you are given (it is a kernel argument); with rows whose values are about 0.01 and eps "
        "= 0.01 a misplaced or hard-coded eps changes the result a lot."
    ),
)
def eps_is_used(ctx):
    for eps in (1e-2, 0.1):
        n, m = ragged_n(ctx), ctx.rng.randint(1, 4)
        compare(ctx, randn(ctx, m, n, scale=0.01), randn(ctx, n), eps)


@Check(
    points=3,
    timeout=60,
    title="fp16 and bf16 inputs",
    message=(
        "The output has x's dtype (allocate it like x), but the arithmetic is fp32: convert what you load "
        "with .to(tl.float32) and round once when storing, with .to(Y.dtype.element_ty). The weight may "
        "have a different dtype from x: read it as fp32 too."
    ),
)
def half_precision(ctx):
    for dtype, wdtype in (
        (torch.float16, torch.float16),
        (torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.float32),
    ):
        n, m = ragged_n(ctx), ctx.rng.randint(1, 4)
        compare(ctx, randn(ctx, m, n, dtype=dtype), (randn(ctx, n, scale=0.3) + 1.0).to(wdtype), 1e-5)
