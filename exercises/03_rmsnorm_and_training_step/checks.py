"""Public checks of exercise 03 (shipped to learners; the hidden ones stay with the instructor).

Part 1 (forward kernel) and part 2 (backward kernel) are compared with glmkit's reference and autograd through
it; part 3 (the optimizer step) with ``torch.optim.AdamW``, ``torch.nn.utils.clip_grad_norm_`` and
``glmkit.train.lr_at``, set up as ``glmkit.train`` sets them up.

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


# -- part 2: the backward ----------------------------------------------------------------------------
def reference_bwd(dy, x, weight, eps):
    from glmkit.ops.rmsnorm import rmsnorm_reference

    xr, wr = x.clone().requires_grad_(), weight.clone().requires_grad_()
    rmsnorm_reference(xr, wr, eps).backward(dy)
    return xr.grad, wr.grad.float()


def compare_bwd(ctx, M, N, dtype=torch.float32, eps=1e-5, scale=1.0):
    x = randn(ctx, M, N, dtype=dtype, scale=scale)
    w = randn(ctx, N, scale=0.5) + 1.0
    dy = randn(ctx, M, N, dtype=dtype)
    ctx.note_inputs(f"dy, x [{M}, {N}] {str(dtype)[6:]}, weight [{N}] float32, eps={eps:g}")
    want_dx, want_dw = reference_bwd(dy, x, w, eps)
    got = ctx.expect_tuple("rms_norm_bwd(dy, x, weight, eps)", ctx.call("rms_norm_bwd", dy, x, w, eps), 2)
    ctx.expect_tensor("dx (the first value)", got[0], want_dx, tol=TOL[dtype])
    ctx.expect_tensor("dw (the second value, float32)", got[1], want_dw, tol=1e-5 if dtype == torch.float32 else 3e-3)


@Check(
    points=3,
    timeout=60,
    title="backward: dx and dw, ragged rows",
    message=(
        "Recompute rstd from x in the kernel; with x̂ = x·rstd and g = dy·w, dx = rstd·(g − x̂·mean(g·x̂)) where "
        "the mean is over the N real lanes (masked lanes load 0). dw sums dy·x̂ over ALL rows: each program "
        "stores its row of dy·x̂ in the fp32 partial buffer and the launcher sums the buffer over rows."
    ),
)
def backward_ragged(ctx):
    for _ in range(3):
        compare_bwd(ctx, ctx.rng.randint(2, 7), ragged_n(ctx))


@Check(
    points=2,
    timeout=60,
    title="backward: fp16 and bf16",
    message=(
        "Load dy, x and w as fp32, compute in fp32, store dx in x's dtype (.to(DX.dtype.element_ty)) and the "
        "partial dw rows in fp32; return dw in float32."
    ),
)
def backward_half_precision(ctx):
    for dtype in (torch.float16, torch.bfloat16):
        compare_bwd(ctx, ctx.rng.randint(2, 5), ragged_n(ctx), dtype=dtype)


# -- part 3: the optimizer step ----------------------------------------------------------------------
def reference_lr(step, lr, warmup, total, min_lr_ratio):
    from glmkit.train import TrainConfig, lr_at

    return lr_at(TrainConfig(steps=total, lr=lr, warmup_steps=warmup, min_lr_ratio=min_lr_ratio), step)


def make_params(ctx, shapes):
    return [randn(ctx, *s, scale=0.5) for s in shapes]


def reference_adamw(params, grads, m, v, step, *, lr, warmup, total, min_lr_ratio, betas, eps, wd, max_norm):
    """What glmkit.train does for one update: lr_at, clip_grad_norm_, AdamW with decay on matrices only."""
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    for p, g in zip(ps, grads):
        p.grad = g.clone()
    groups = [
        {"params": [p for p in ps if p.dim() >= 2], "weight_decay": wd},
        {"params": [p for p in ps if p.dim() < 2], "weight_decay": 0.0},
    ]
    lr_t = reference_lr(step, lr, warmup, total, min_lr_ratio)
    opt = torch.optim.AdamW(groups, lr=lr_t, betas=betas, eps=eps, foreach=False)
    for p, mm, vv in zip(ps, m, v):
        opt.state[p] = {"step": torch.tensor(float(step)), "exp_avg": mm.clone(), "exp_avg_sq": vv.clone()}
    norm = float(torch.nn.utils.clip_grad_norm_(ps, max_norm))
    opt.step()
    return (
        [p.detach() for p in ps],
        [opt.state[p]["exp_avg"] for p in ps],
        [opt.state[p]["exp_avg_sq"] for p in ps],
        lr_t,
        norm,
    )


def compare_adamw(ctx, shapes, step, grad_scale=1.0, **hp):
    hp = dict(lr=3e-3, warmup=10, total=100, min_lr_ratio=0.1, betas=(0.9, 0.95), eps=1e-8, wd=0.1, max_norm=1.0) | hp
    params = make_params(ctx, shapes)
    grads = [randn(ctx, *s, scale=grad_scale) for s in shapes]
    first = step == 0
    m = [torch.zeros(s) if first else randn(ctx, *s, scale=0.1) for s in shapes]
    v = [torch.zeros(s) if first else randn(ctx, *s, scale=0.1).abs() ** 2 for s in shapes]
    gnorm = sum(float(g.pow(2).sum()) for g in grads) ** 0.5
    ctx.note_inputs(
        f"parameter shapes {shapes}, step {step}, gradient norm {gnorm:.3g}, "
        f"lr={hp['lr']}, warmup={hp['warmup']}, total={hp['total']}, weight_decay={hp['wd']}, "
        f"max_grad_norm={hp['max_norm']}"
    )
    want = reference_adamw(params, grads, m, v, step, **hp)
    got = ctx.call(
        "adamw_step",
        params,
        grads,
        m,
        v,
        step,
        lr=hp["lr"],
        warmup=hp["warmup"],
        total=hp["total"],
        min_lr_ratio=hp["min_lr_ratio"],
        betas=hp["betas"],
        eps=hp["eps"],
        weight_decay=hp["wd"],
        max_grad_norm=hp["max_norm"],
    )
    got = ctx.expect_tuple("adamw_step(...)", got, 5)
    if not isinstance(got[3], float) or abs(got[3] - want[3]) > 1e-9 * max(1.0, want[3]):
        ctx.fail("the learning rate of the step (4th value) is wrong", f"expected {want[3]!r}, got {got[3]!r}")
    if not isinstance(got[4], float) or abs(got[4] - want[4]) > 1e-4 * want[4]:
        ctx.fail("the gradient norm before clipping (5th value) is wrong", f"expected {want[4]:.6g}, got {got[4]!r}")
    for what, g_list, w_list in (
        ("parameter", got[0], want[0]),
        ("exp_avg", got[1], want[1]),
        ("exp_avg_sq", got[2], want[2]),
    ):
        if not isinstance(g_list, (list, tuple)) or len(g_list) != len(w_list):
            ctx.fail(f"the new {what}s should be a list of {len(w_list)} tensors", repr(g_list)[:200])
        for i, (g_, w_) in enumerate(zip(g_list, w_list)):
            ctx.expect_tensor(f"new {what} {i} (shape {list(w_.shape)})", g_, w_, tol=1e-5)


@Check(
    points=2,
    timeout=20,
    title="training step: the learning rate",
    message=(
        "Warm-up is lr·(step + 1)/warmup for step < warmup (step counts from 0, so the first update already "
        "moves); then a cosine from lr down to lr·min_lr_ratio over the remaining total − warmup updates."
    ),
)
def lr_schedule(ctx):
    for step in (0, 4, 9, 10, 37, 99, 150):
        want = reference_lr(step, 3e-3, 10, 100, 0.1)
        got = ctx.call("lr_at", step, 3e-3, 10, 100, 0.1)
        ctx.note_inputs(f"lr_at(step={step}, lr=3e-3, warmup=10, total=100, min_lr_ratio=0.1)")
        if not isinstance(got, float) or abs(got - want) > 1e-12:
            ctx.fail(f"lr_at(step={step}, ...) is wrong", f"expected {want!r}, got {got!r}")


@Check(
    points=2,
    timeout=20,
    title="training step: the first AdamW update",
    message=(
        "With m = v = 0 and t = 1 the bias corrections matter most: m̂ = m/(1 − β1^t), v̂ = v/(1 − β2^t). "
        "Decay is decoupled (p ← p·(1 − lr·wd), never added to the gradient) and only for matrices."
    ),
)
def adamw_first_update(ctx):
    compare_adamw(ctx, [(6, 5), (5,), (3, 4)], 0, grad_scale=0.05)


@Check(
    points=3,
    timeout=20,
    title="training step: clipping, decay, later steps",
    message=(
        "Clip by the GLOBAL norm of all gradients together (one factor max_norm/(norm + 1e-6) for every "
        "tensor, only when norm > max_norm), and return the norm measured before clipping. Biases and norm "
        "gains (1-D) get no weight decay; t = step + 1 in the bias corrections."
    ),
)
def adamw_clipping_and_decay(ctx):
    compare_adamw(ctx, [(8, 4), (8,), (4,), (4, 8)], 25, grad_scale=2.0)
    compare_adamw(ctx, [(5, 5), (5,)], 60, grad_scale=0.01, wd=0.3)
