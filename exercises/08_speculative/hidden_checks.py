"""Hidden checks of exercise 08 — instructor only: `release` never ships this file.

Their failure messages are what a learner sees: the property checked and a hint, never these inputs, their
expected values or this source.
"""

from __future__ import annotations

from glmkit.grading import Check, load_sibling

public = load_sibling(__file__, "checks.py")  # reuse the public input generators and comparisons


@Check(
    hidden=True,
    points=2,
    timeout=20,
    message=(
        "Other shapes of the greedy rule: one draft per row, a single row, a large vocabulary, rows where every "
        "draft is accepted (the next token is the bonus at position n) and rows where the first is rejected. "
        "Nothing may be hard-coded: B, n and V come from the tensors."
    ),
)
def greedy_shapes(ctx):
    public.compare_greedy(ctx, 4, 1, 7, prefixes=[0, 1, 1, 0])
    public.compare_greedy(ctx, 1, 5, 1000, prefixes=[5])
    public.compare_greedy(ctx, 3, 6, 31, prefixes=[0, 6, 2])


@Check(
    hidden=True,
    points=2,
    timeout=20,
    message=(
        "Edge cases of the residual: rows where q equals p (max(0, p − q) is all zeros: the residual is p itself, "
        "never 0/0), and a single distribution without leading dimensions."
    ),
)
def residual_edges(ctx):
    public.compare_residual(ctx, (5,), 13, same_rows=2)
    public.compare_residual(ctx, (), 29)


@Check(
    hidden=True,
    points=2,
    timeout=20,
    message=(
        "The rule when p gives a draft probability 0 (a top-k truncated distribution): such a draft is always "
        "rejected, whatever u is, even u = 0; use the strict comparison u · q(d) < p(d). Also: one draft per row, "
        "many rows."
    ),
)
def rejection_edges(ctx):
    public.compare_rejection(ctx, 200, 3, 12, zeros=5, zero_u=True)
    public.compare_rejection(ctx, 50, 1, 8)


@Check(
    hidden=True,
    points=2,
    timeout=30,
    message=(
        "Sampled rounds with one draft per row (rounds where it is accepted draw the bonus token from p at "
        "position n = 1), with more drafts, and with zeros in p (a draft p cannot produce is always rejected)."
    ),
)
def sample_edges(ctx):
    public.compare_sample(ctx, 80, 1, 5)
    public.compare_sample(ctx, 80, 4, 7)
    public.compare_sample(ctx, 80, 2, 10, zeros=3)


@Check(
    hidden=True,
    points=2,
    timeout=30,
    message=(
        "The rollback at other sizes: a round with no draft accepted in any row (only x is kept), every draft "
        "accepted, a single row, one draft (T = 2), key and value sizes that differ."
    ),
)
def rollback_edges(ctx):
    public.compare_rollback(ctx, 3, 5, 1, 6, 10, [0, 0, 0])
    public.compare_rollback(ctx, 2, 3, 3, 4, 5, [2, 2])
    public.compare_rollback(ctx, 1, 2, 2, 8, 3, [1])


@Check(
    hidden=True,
    points=2,
    timeout=90,
    message=(
        "The kernel at other sizes: one draft per row, every draft accepted, a vocabulary of one token and one "
        "just above a power of two, a single row. Every program finds its own row from its id."
    ),
)
def kernel_shapes(ctx):
    public.compare_greedy(ctx, 3, 1, 257, prefixes=[1, 0, 1], fn="greedy_accept_triton")
    public.compare_greedy(ctx, 1, 4, 1, prefixes=[4], fn="greedy_accept_triton")
    public.compare_greedy(ctx, 2, 2, 33, prefixes=[2, 2], fn="greedy_accept_triton", shift=-9.0)
