"""Public checks of exercise 04 (shipped to learners; the hidden ones stay with the instructor).

Each check is declared with its points, time limit (seconds) and the message a learner sees when it
fails. Inputs are random (fresh each run, reproducible with the run's seed); the expected answers are
computed here, in the grading process, by glmkit's references (``glmkit.moe.sigmoid_topk_route``,
``glmkit.moe.update_bias``, ``glmkit.ops.moe_align.moe_align_reference``) — never stored.
``ctx.call`` runs your function in a separate process (your kernels run there, under the Triton
interpreter on a CPU) and brings its result back as plain data.

What is compared is what the contracts fix, nothing more: the SET of experts of each token (any order
within a row) with the weights that belong to them; and for the permutation, the multiset of slots in
each expert's run (any order inside a run), the padding, expert_ids, num_tokens_post_pad and counts.
"""

from __future__ import annotations

import torch

from glmkit.grading import Check

GAP = 1e-4  # inputs are redrawn until no two candidates are this close (the answer is then unique)
W_TOL = 1e-5  # relative error of the weights: fp32, only the summation order may differ
B_TOL = 1e-6  # relative error of the updated bias: one fp32 rounding of b + γ·sign


# -- routing ------------------------------------------------------------------------------------------
def _eligible(choice: torch.Tensor, n_group: int, topk_group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(choice with the experts of dropped groups at -inf, per-row margin of the group selection)."""
    N, E = choice.shape
    if n_group == 1 or topk_group == n_group:
        return choice, torch.full((N,), float("inf"))
    groups = choice.view(N, n_group, E // n_group).topk(2, dim=-1).values.sum(-1)  # [N, G]
    ranked = groups.sort(dim=-1, descending=True)
    margin = ranked.values[:, topk_group - 1] - ranked.values[:, topk_group]
    keep = torch.zeros(N, n_group, dtype=torch.bool).scatter_(1, ranked.indices[:, :topk_group], True)
    return choice.masked_fill(~keep.repeat_interleave(E // n_group, 1), float("-inf")), margin


def route_logits(ctx, N, E, bias, top_k, n_group=1, topk_group=1, scale=2.0, offset=0.0) -> torch.Tensor:
    """Random logits [N, E] (≈ N(offset, scale²)) whose routing is unambiguous: no near-ties between the
    last chosen and the first rejected expert, or between the last kept and the first dropped group."""
    logits = offset + scale * torch.randn(N, E, generator=ctx.gen)
    for _ in range(50):
        choice, margin = _eligible(logits.sigmoid() + bias, n_group, topk_group)
        ranked = choice.sort(dim=-1, descending=True).values
        gap = ranked[:, top_k - 1] - ranked[:, top_k] if top_k < E else torch.full((N,), float("inf"))
        bad = (gap <= GAP) | (margin <= GAP)
        if not bad.any():
            return logits
        logits[bad] = offset + scale * torch.randn(int(bad.sum()), E, generator=ctx.gen)
    raise RuntimeError("could not draw unambiguous router logits")


def reference_route(logits, bias, top_k, n_group, topk_group, scale):
    from glmkit.moe import sigmoid_topk_route

    idx, w, _ = sigmoid_topk_route(logits, bias, top_k, n_group, topk_group, True, scale)
    return idx, w


def compare_route(ctx, logits, bias, top_k, n_group=1, topk_group=1, scale=1.0):
    N, E = logits.shape
    ctx.note_inputs(
        f"logits [{N}, {E}], bias {'= 0' if not bias.any() else f'(|b| up to {bias.abs().max():.2g})'}, "
        f"top_k={top_k}, n_group={n_group}, topk_group={topk_group}, "
        f"routed_scaling_factor={scale}"
    )
    want_idx, want_w = reference_route(logits, bias, top_k, n_group, topk_group, scale)
    got = ctx.expect_tuple(
        "sigmoid_route(...)", ctx.call("sigmoid_route", logits, bias, top_k, n_group, topk_group, scale), 2
    )
    got_idx, got_w = got
    for name, t, dtype in (("topk_idx", got_idx, torch.int64), ("topk_weight", got_w, torch.float32)):
        if not isinstance(t, torch.Tensor):
            ctx.fail(f"{name} should be a torch tensor", f"got {t!r}"[:200])
        if t.dtype != dtype or tuple(t.shape) != (N, top_k):
            ctx.fail(
                f"{name} should be [N, top_k] {str(dtype)[6:]}",
                f"expected [{N}, {top_k}] {str(dtype)[6:]}, got {list(t.shape)} {str(t.dtype)[6:]}",
            )
    got_sorted, got_order = got_idx.sort(dim=-1)
    want_sorted, want_order = want_idx.sort(dim=-1)
    ctx.expect_tensor("the experts chosen for each token (topk_idx, each row sorted)", got_sorted, want_sorted)
    ctx.expect_tensor(
        "topk_weight (each row in the order of its sorted experts)",
        got_w.gather(1, got_order),
        want_w.gather(1, want_order),
        tol=W_TOL,
    )


# -- balancing ----------------------------------------------------------------------------------------
def compare_bias(ctx, bias, load, gamma):
    from glmkit.moe import update_bias

    ctx.note_inputs(
        f"bias [{bias.numel()}] (|b| up to {bias.abs().max():.2g}), load = {load.tolist()} "
        f"({str(load.dtype)[6:]}, mean {load.float().mean():.4g}), gamma = {gamma}"
    )
    want = update_bias(bias.clone(), load, gamma)
    ctx.expect_tensor("balance_bias(bias, load, gamma)", ctx.call("balance_bias", bias, load, gamma), want, tol=B_TOL)


def random_counts(ctx, E, S, *, avoid_mean=True) -> torch.Tensor:
    """Slots per expert (float32 counts, as glmkit.moe.expert_load returns) of S slots drawn with a skew;
    with avoid_mean no expert sits exactly at the mean."""
    p = torch.rand(E, generator=ctx.gen) + 0.2
    while True:
        counts = torch.bincount(torch.multinomial(p, S, replacement=True, generator=ctx.gen), minlength=E).float()
        if not avoid_mean or not (counts == counts.mean()).any():
            return counts


# -- the permutation ----------------------------------------------------------------------------------
def routing(ctx, N, k, E, mode="uniform", experts=None) -> torch.Tensor:
    """topk_idx [N, k] int64, k distinct experts per token, drawn from ``experts`` (default: all E).
    mode "uniform": equally likely; "zipf": expert r of the list with weight 1/(r+1)²."""
    pool = torch.arange(E) if experts is None else torch.as_tensor(experts)
    p = torch.ones(len(pool)) if mode == "uniform" else 1.0 / torch.arange(1, len(pool) + 1).double() ** 2
    return pool[torch.multinomial(p.expand(N, -1), k, replacement=False, generator=ctx.gen)]


def _runs(want_experts: torch.Tensor, block_m: int) -> list[tuple[int, int]]:
    """[start, end) of each expert's run and of the empty tail, from the reference's layout."""
    runs, start = [], 0
    blocks = want_experts.tolist()
    for b in range(1, len(blocks) + 1):
        if b == len(blocks) or blocks[b] != blocks[b - 1]:
            runs.append((start * block_m, b * block_m))
            start = b
    return runs


def _canonical(ids: torch.Tensor, runs) -> torch.Tensor:
    """Each run sorted: two layouts that differ only in the order of slots inside a run become equal."""
    out = ids.clone()
    for a, b in runs:
        out[a:b] = ids[a:b].sort().values
    return out


def compare_align(ctx, topk_idx, E, block_m, *, counts_only=False):
    """moe_align against moe_align_reference, into output buffers pre-filled with garbage (the int32
    minimum): every position must be written, and the result cannot depend on what memory held.
    counts_only: compare only the 4th output (the count kernel's work)."""
    from glmkit.ops.moe_align import moe_align_reference
    from glmkit.testing import poisoned

    N, k = topk_idx.shape
    S = N * k
    want = moe_align_reference(topk_idx, E, block_m)
    ids_text = str(topk_idx.tolist())
    ctx.note_inputs(
        f"topk_idx [{N}, {k}] {str(topk_idx.dtype)[6:]} = "
        f"{ids_text if len(ids_text) <= 240 else ids_text[:240] + ' ...'}, num_experts={E}, "
        f"block_m={block_m}; slots per expert = {want[3].tolist()}, S = {S}, S_pad = {want[0].numel()}"
    )
    got = ctx.call(
        "moe_align",
        topk_idx,
        E,
        block_m,
        out=poisoned(want[0].shape, torch.int32),
        out_expert_ids=poisoned(want[1].shape, torch.int32),
    )
    sorted_ids, expert_ids, ntpp, counts = ctx.expect_tuple("moe_align(...)", got, 4)
    ctx.expect_tensor("counts (4th output)", counts, want[3])
    if counts_only:
        return
    for name, t, w in (("sorted_token_ids", sorted_ids, want[0]), ("expert_ids", expert_ids, want[1])):
        if isinstance(t, torch.Tensor) and t.dtype == torch.int32 and t.shape == w.shape:
            garbage = (t == torch.iinfo(torch.int32).min).nonzero().flatten().tolist()
            if garbage:
                ctx.fail(
                    f"{name} has positions that were never written",
                    f"{len(garbage)} of {t.numel()} positions still hold the garbage the check filled the "
                    f"buffer with (-2147483648), first at {garbage[:8]}; num_tokens_post_pad = "
                    f"{int(want[2])}, S_pad = {want[0].numel()}",
                )
    ctx.expect_tensor("num_tokens_post_pad (3rd output)", ntpp, want[2])
    ctx.expect_tensor("expert_ids (2nd output)", expert_ids, want[1])
    runs = _runs(want[1], block_m)
    ctx.expect_tensor(
        "sorted_token_ids (1st output; each expert's run sorted, since the order inside a run is free)",
        _canonical(sorted_ids, runs)
        if isinstance(sorted_ids, torch.Tensor) and sorted_ids.shape == want[0].shape
        else sorted_ids,
        _canonical(want[0], runs),
    )


# -- public checks ------------------------------------------------------------------------------------
@Check(
    points=2,
    timeout=20,
    title="routing: sigmoid scores, top-k, weights",
    message=(
        "With a zero bias and no groups: s = sigmoid(logits) in float32, each token takes the top_k experts "
        "by s, and their weights are s / (sum of the chosen s + 1e-20) times routed_scaling_factor — so a "
        "token's weights sum to routed_scaling_factor. Return the weights aligned with the indices "
        "(topk_weight[t, j] is the weight of expert topk_idx[t, j]), top_k taken from the argument."
    ),
)
def route_top_k(ctx):
    for N, E, k, scale in ((6, 8, 2, 1.0), (10, 16, 4, 2.5)):
        bias = torch.zeros(E)
        compare_route(ctx, route_logits(ctx, N, E, bias, k), bias, k, scale=scale)


@Check(
    points=3,
    timeout=20,
    title="routing: the bias selects, it does not weigh",
    message=(
        "The bias b (e_score_correction_bias) is added to the scores ONLY to choose the experts: pick the "
        "top_k of s + b, then weight the chosen experts by their plain sigmoid scores s. Weighting by s + b "
        "is the classic mistake (the bias would then change the model's output, not just the load); "
        "choosing by s alone ignores the balancing."
    ),
)
def bias_selects_only(ctx):
    for N, E, k, scale in ((12, 16, 4, 1.0), (12, 8, 2, 2.5)):
        for _ in range(20):  # a bias strong enough to change some token's experts
            bias = 0.3 * torch.randn(E, generator=ctx.gen)
            logits = route_logits(ctx, N, E, bias, k)
            if not torch.equal(
                reference_route(logits, bias, k, 1, 1, 1.0)[0].sort(-1).values,
                reference_route(logits, torch.zeros(E), k, 1, 1, 1.0)[0].sort(-1).values,
            ):
                break
        compare_route(ctx, logits, bias, k, scale=scale)


@Check(
    points=3,
    timeout=20,
    title="routing: group-limited (n_group > 1)",
    message=(
        "Group-limited routing: split the E experts into n_group groups of E / n_group consecutive experts; a "
        "group's score is the SUM of its two largest (biased) scores; keep the topk_group best groups and choose "
        "the top_k experts among those groups only — the experts of the other groups must never be chosen."
    ),
)
def group_limited(ctx):
    for N, E, k, G, TG in ((24, 16, 4, 4, 2), (16, 32, 6, 8, 3)):
        bias = torch.zeros(E)
        compare_route(ctx, route_logits(ctx, N, E, bias, k, G, TG), bias, k, G, TG, scale=2.5)


@Check(
    points=2,
    timeout=20,
    title="balancing: one bias update step",
    message=(
        "balance_bias adds γ · sign(mean(load) − load_i) to every b_i: +γ for an expert below the mean load "
        "(it should be picked more), −γ above it. Use the gamma you are given; return the updated bias "
        "(float32, shape [E])."
    ),
)
def bias_step(ctx):
    for E, S, gamma in ((8, 40, 1e-3), (16, 200, 0.01)):
        compare_bias(ctx, 0.01 * torch.randn(E, generator=ctx.gen), random_counts(ctx, E, S), gamma)


@Check(
    points=1,
    timeout=20,
    title="balancing: experts at the mean keep their bias",
    message=(
        "An expert whose load equals the mean gets sign(0) = 0: its bias does not move. With equal loads "
        "nothing moves at all (a balanced router is left alone). Comparing load < mean and giving everyone "
        "else −γ gets this wrong."
    ),
)
def balanced_experts_unchanged(ctx):
    E = 8
    compare_bias(ctx, 0.01 * torch.randn(E, generator=ctx.gen), torch.full((E,), 5.0), 1e-3)
    counts = torch.tensor([4.0, 4.0, 2.0, 6.0, 4.0, 3.0, 5.0, 4.0])  # mean 4: four experts at the mean
    compare_bias(ctx, 0.01 * torch.randn(E, generator=ctx.gen), counts[torch.randperm(E, generator=ctx.gen)], 1e-3)


@Check(
    points=2,
    timeout=40,
    title="permutation: counts per expert",
    message=(
        "counts[e] is the number of slots routed to expert e. count_kernel: program p loads the expert ids "
        "of slots p*BLOCK .. p*BLOCK+BLOCK-1 (masked past S) and adds 1 to COUNTS[e] with tl.atomic_add — "
        "plain loads and stores lose the additions when two slots of a block, or two programs, hit the same "
        "expert. Launch enough programs to cover all S = N*k slots."
    ),
)
def align_counts(ctx):
    for N, k, E, bm in ((ctx.rng.randint(13, 30), 2, 8, 16), (ctx.rng.randint(40, 90), 2, 6, 4)):
        compare_align(ctx, routing(ctx, N, k, E), E, bm, counts_only=True)


@Check(
    points=3,
    timeout=40,
    title="permutation: uniform routing, ragged runs",
    message=(
        "Each expert's run starts at the sum of the PADDED sizes of the experts before it (counts rounded up "
        "to a multiple of block_m); its slots follow in order, then sentinels S = N*k up to the padded size. "
        "expert_ids has one entry per block of block_m rows; num_tokens_post_pad is the sum of the padded sizes. "
        "Here the counts are not multiples of block_m and E is not a power of two (mask the counts you load)."
    ),
)
def align_uniform_ragged(ctx):
    for N, k, E, bm in ((ctx.rng.randrange(11, 40, 2), 2, 8, 16), (ctx.rng.randrange(25, 60, 2), 3, 6, 4)):
        compare_align(ctx, routing(ctx, N, k, E), E, bm)


@Check(
    points=3,
    timeout=40,
    title="permutation: empty experts, one expert takes all",
    message=(
        "An expert with no slots has padded size 0: no rows, no blocks (its run is empty, the next expert "
        "starts where it would have); expert 0 or the last expert may be empty too. When the router "
        "collapses and every token goes to one expert, that expert's run holds every slot."
    ),
)
def align_empty_and_collapsed(ctx):
    E = 8
    used = sorted(ctx.rng.sample(range(1, E - 1), 3))  # experts 0 and E-1 get nothing
    compare_align(ctx, routing(ctx, ctx.rng.randint(9, 30), 2, E, experts=used), E, 16)
    N = ctx.rng.randrange(33, 61, 2)
    compare_align(ctx, torch.full((N, 1), ctx.rng.randrange(E)), E, 16)  # collapse: k = 1, one expert
    compare_align(ctx, routing(ctx, ctx.rng.randint(10, 30), 2, E, mode="zipf"), E, 4)


@Check(
    points=2,
    timeout=40,
    title="permutation: padding and the empty tail",
    message=(
        "The checks fill the output buffers with garbage first, so every position must be written: the "
        "sentinels that pad each expert's last block, and — by one program only — everything after "
        "num_tokens_post_pad: the sentinel S in sorted_token_ids and -1 in expert_ids, up to the buffers' fixed "
        "length S_pad. Here few experts are used, so that tail is long."
    ),
)
def align_padding_and_tail(ctx):
    E = 16
    for _ in range(2):
        used = sorted(ctx.rng.sample(range(E), 3))
        compare_align(ctx, routing(ctx, ctx.rng.randint(5, 12), 1, E, experts=used), E, 16)


# -- the routed experts on the blocks ------------------------------------------------------------------
def compare_grouped(ctx, N, H, I, E, k, block_m, mode="uniform", experts=None):
    from glmkit.ops.moe_align import moe_align_reference
    from glmkit.ops.moe_experts import moe_experts_reference

    topk_idx = routing(ctx, N, k, E, mode, experts)
    w = torch.rand(N, k, generator=ctx.gen) + 0.1
    x = torch.randn(N, H, generator=ctx.gen)
    w_gate_up = torch.randn(E, 2 * I, H, generator=ctx.gen) / H**0.5
    w_down = torch.randn(E, H, I, generator=ctx.gen) / I**0.5
    sorted_ids, expert_ids, _, counts = moe_align_reference(topk_idx, E, block_m)
    ctx.note_inputs(
        f"x [{N}, {H}], k={k}, E={E}, I={I}, block_m={block_m}; slots per expert {counts.tolist()}, "
        f"{int((expert_ids >= 0).sum())} used blocks of {expert_ids.numel()}"
    )
    want = moe_experts_reference(x, topk_idx, w, w_gate_up, w_down).float()
    got = ctx.call("grouped_experts", x, w, w_gate_up, w_down, sorted_ids, expert_ids, block_m)
    ctx.expect_tensor("grouped_experts(...)", got, want, tol=W_TOL * 10)


@Check(
    points=3,
    timeout=40,
    title="experts on blocks: forward",
    message=(
        "For each block with expert e >= 0: take its rows of sorted_token_ids, drop the sentinel S, map slot s to "
        "token s // k and weight topk_weight.flatten()[s]; gate, up = the two halves of x[token] @ w_gate_up[e].T "
        "(gate first); out = (silu(gate) * up) @ w_down[e].T; add weight * out to y[token] (index_add_, not "
        "assignment: a token has k slots)."
    ),
)
def grouped_forward(ctx):
    compare_grouped(ctx, 12, 16, 8, 4, 2, 4)
    compare_grouped(ctx, 9, 12, 6, 6, 3, 8)


@Check(
    points=2,
    timeout=40,
    title="experts on blocks: padding, idle experts",
    message=(
        "Padding rows (the sentinel S) carry no slot, blocks with expert -1 are skipped, an expert nobody picked "
        "has no block at all, and one expert may own several blocks."
    ),
)
def grouped_padding_and_idle(ctx):
    compare_grouped(ctx, 10, 8, 4, 8, 2, 4, mode="zipf", experts=[1, 4, 6])  # 5 experts idle
    compare_grouped(ctx, 3, 8, 4, 8, 1, 8)
