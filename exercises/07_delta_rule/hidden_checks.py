"""Hidden checks of exercise 07 — instructor only: `release` never ships this file.

Their failure messages are what a learner sees: the property checked and a hint, never these inputs, their
expected values or this source.
"""

from __future__ import annotations

from glmkit.grading import Check, load_sibling

public = load_sibling(__file__, "checks.py")  # reuse the public input generators and comparisons


@Check(
    hidden=True,
    points=2,
    timeout=40,
    message=(
        "Other shapes of the recurrence: a single token, one head, key and value sizes that differ and are not "
        "powers of two, a batch of several rows, strong decays, the default scale. Nothing may be hard-coded: B, T, "
        "H, K and V come from the tensors."
    ),
)
def recurrence_shapes(ctx):
    public.compare_recurrence(ctx, 3, 1, 1, 5, 3, "scalar", None)
    public.compare_recurrence(ctx, 1, 13, 4, 7, 10, "channel", None, decay=8.0)
    public.compare_recurrence(ctx, 2, 6, 1, 9, 4, "none", 1.0)


@Check(
    hidden=True,
    points=2,
    timeout=60,
    message=(
        "Strong decays (the cumulative G of a chunk reaches several hundred below zero): exp(G_r) / exp(G_j) "
        "overflows to inf / inf, and exp(G_r − G_j) overflows above the diagonal, where the answer is 0 — mask "
        "before you exponentiate (or make the masked entries −inf), never multiply an overflow by a zero mask."
    ),
)
def ut_strong_decay(ctx):
    public.compare_ut(ctx, [2, 2], 32, 16, 8, decay=25.0)


@Check(
    hidden=True,
    points=1,
    timeout=90,
    message=(
        "Edge cases of the UT transform: a chunk of one token (T = I), tokens with β = 0 (they write nothing, "
        "and the rows of W and U are 0), and the real chunk size C = 64."
    ),
)
def ut_edges(ctx):
    public.compare_ut(ctx, [3], 1, 8, 4)
    public.compare_ut(ctx, [2], 10, 16, 8, beta_zero=True)
    public.compare_ut(ctx, [], 64, 32, 16)


@Check(
    hidden=True,
    points=2,
    timeout=60,
    message=(
        "Other chunk sizes: one token per chunk, a chunk size that is not a power of two, a chunk longer than the "
        "whole sequence (one padded chunk), a single token, and DeltaNet's zero gate. The chunked result must equal "
        "the recurrence whatever the chunk size."
    ),
)
def chunked_chunk_sizes(ctx):
    public.compare_chunked(ctx, 1, 9, 2, 8, 8, 1, None)
    public.compare_chunked(ctx, 2, 23, 1, 16, 8, 5, 0.5)
    public.compare_chunked(ctx, 1, 10, 2, 16, 8, 64, None)
    public.compare_chunked(ctx, 2, 1, 3, 8, 4, 4, None)
    public.compare_chunked(ctx, 1, 19, 2, 16, 8, 8, None, gate="none")


@Check(
    hidden=True,
    points=1,
    timeout=60,
    message=(
        "A longer sequence (several chunks of 64) with strong decays: the decays from the chunk's start, "
        "exp(G), and to its end, exp(G_last − G), stay in range only when they are formed from differences of G "
        "inside one chunk."
    ),
)
def chunked_long_strong(ctx):
    public.compare_chunked(ctx, 1, 200, 2, 16, 16, 64, None, decay=20.0)


@Check(
    hidden=True,
    points=2,
    timeout=90,
    message=(
        "The kernel at other sizes: one token, several batch rows and heads (every program finds its own (b, h) "
        "from its id), a value size that is not a power of two and larger than the key size, the default scale."
    ),
)
def kernel_shapes(ctx):
    public.compare_kernel(ctx, 3, 1, 3, 16, 40, "scalar", None)
    public.compare_kernel(ctx, 2, 2, 2, 24, 8, "channel", None)
