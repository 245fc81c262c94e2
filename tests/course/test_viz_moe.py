"""glmkit.course.viz_moe: the pictures show exactly the data they are given (parameter counts that add up to
glmkit.course.counting, router scores and choices, expert loads, the moe_align permutation with its padding,
the committed benchmark's ratios), the toy balancing run records what glmkit.moe did, and the explorers
redraw when a control moves."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

import glmkit.kernels  # noqa: F401  (TRITON_INTERPRET=1 on machines without CUDA, before triton is used)
from glmkit import moe
from glmkit.course import viz_moe as vm
from glmkit.course.counting import GLM_4_5, GLM_4_5_AIR, param_counts
from glmkit.kernels.moe_align import moe_align
from glmkit.ops.moe_align import moe_align_reference
from glmkit.ops.moe_experts import moe_experts_reference, moe_experts_sorted

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "moe_h200.md"


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


# ---- 1. parameters ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [GLM_4_5, GLM_4_5_AIR], ids=["glm-4.5", "glm-4.5-air"])
def test_breakdown_adds_up_to_param_counts(cfg):
    rows = vm.param_breakdown(cfg)
    c = param_counts(cfg)
    assert sum(r[1] for r in rows) == c.total
    assert sum(r[2] for r in rows) == c.active
    by_name = {r[0]: r for r in rows}
    routed = by_name["routed experts"]
    assert routed[2] * cfg.n_routed_experts == routed[1] * cfg.num_experts_per_tok  # k of E experts active
    assert by_name["embedding"][2] == 0 and by_name["LM head"][2] == 0  # the published convention
    assert max(rows, key=lambda r: r[1])[0] == "routed experts"


def test_breakdown_plot_draws_the_counts():
    ax = vm.plot_param_breakdown(GLM_4_5)
    rows = vm.param_breakdown(GLM_4_5)
    widths = [p.get_width() for p in ax.patches]
    np.testing.assert_allclose(widths[: len(rows)], [r[1] / 1e9 for r in rows])  # totals
    np.testing.assert_allclose(widths[len(rows) : 2 * len(rows)], [r[2] / 1e9 for r in rows])  # actives
    assert ax.get_title().startswith("glm-4.5:") and ax.get_xlabel()
    assert vm.plot_param_breakdown("glm-4.5-air").get_title().startswith("glm-4.5-air:")


# ---- 2. routers ------------------------------------------------------------------------------------


def test_router_picture_holds_scores_and_boxes_the_choices():
    N, E, k = 7, 12, 3
    router = moe.SigmoidGroupRouter(16, E, k, routed_scaling_factor=2.5, init_std=0.5)
    with torch.no_grad():
        idx, w, s = router(torch.randn(N, 16))
    ax = vm.plot_router(s, idx, w)
    np.testing.assert_array_equal(np.asarray(ax.images[0].get_array()), s.numpy())
    boxes = [p for p in ax.patches if p.get_gid() == "chosen"]
    assert len(boxes) == N * k
    got = sorted((int(b.get_y() + 0.5), int(b.get_x() + 0.5)) for b in boxes)  # (token, expert)
    want = sorted((t, int(e)) for t in range(N) for e in idx[t])
    assert got == want
    with pytest.raises(ValueError, match="scores"):
        vm.plot_router(s[0], idx)


def test_router_explorer_bias_scaling_and_groups():
    ex = vm.RouterExplorer(n_tokens=12, n_experts=16, top_k=4, biased_expert=5)
    first = ex.image.value
    r = ex.last
    np.testing.assert_allclose(r["topk_weight"].sum(-1).numpy(), 2.5, rtol=1e-5)  # normalised, then × 2.5
    before = int(r["load"][5])
    ex.bias.value = 1.0  # s + b > every other score: e5 in every token
    assert int(ex.last["load"][5]) == 12 > before or before == 12
    assert ex.image.value != first
    # the bias selects but does not weigh: e5's weight is its unbiased s over the chosen s, × scale
    r = ex.last
    s, idx = r["scores"], r["topk_idx"]
    np.testing.assert_allclose(
        r["topk_weight"].numpy(), (s.gather(1, idx) / s.gather(1, idx).sum(-1, keepdim=True) * 2.5).numpy(), rtol=1e-5
    )
    ex.bias.value = 0.0
    ex.groups.value = "8 / 4 (DeepSeek-V3's ratio)"
    groups_used = ex.last["topk_idx"] // 2  # 16 experts in 8 groups of 2
    assert all(len(set(row.tolist())) <= 4 for row in groups_used)
    ex.kind.value = "softmax (classic)"
    np.testing.assert_allclose(ex.last["topk_weight"].sum(-1).numpy(), 1.0, rtol=1e-5)
    np.testing.assert_allclose(ex.last["scores"].sum(-1).numpy(), 1.0, rtol=1e-5)
    assert ex.updates == 5
    assert "moe-router-explorer" in ex.widget._dom_classes


# ---- 3. balancing --------------------------------------------------------------------------------


def test_balance_run_records_what_the_layer_did():
    steps, N, k, E, gamma = 12, 64, 2, 8, 0.02
    run = vm.balance_run("sigmoid", gamma=gamma, steps=steps, n_experts=E, top_k=k, n_tokens=N, skew=2.0)
    assert run.loads.shape == (steps, E) and run.bias.shape == (steps, E) and run.loss.shape == (steps,)
    np.testing.assert_array_equal(run.loads.sum(1), N * k)  # every slot counted once
    np.testing.assert_allclose(run.maxvio, run.loads.max(1) / run.loads.mean(1) - 1, rtol=1e-6)
    # the bias after step s moved by γ · sign(mean load − load) of step s, starting from zero
    prev = np.zeros(E)
    for s in range(steps):
        step = gamma * np.sign(run.loads[s].mean() - run.loads[s])
        np.testing.assert_allclose(run.bias[s], prev + step, atol=1e-6)
        prev = run.bias[s]
    soft = vm.balance_run("softmax", gamma=gamma, steps=3, n_experts=E, top_k=k, n_tokens=N)
    assert not soft.bias.any()  # no bias on the softmax router
    with pytest.raises(ValueError, match="router"):
        vm.balance_run("relu")


def test_bias_update_fixes_a_skewed_router():
    kw = dict(router="sigmoid", skew=2.5, steps=120, n_tokens=128)
    off, on = vm.balance_run(gamma=0.0, **kw), vm.balance_run(gamma=0.01, **kw)
    assert off.maxvio[0] == on.maxvio[0] > 3  # the same collapsed start
    assert on.maxvio[-20:].mean() < 1.0 < off.maxvio[-20:].mean()


def test_load_heatmap_shows_load_over_mean():
    loads = np.random.default_rng(0).integers(0, 50, size=(30, 6)).astype(float)
    loads[3] = 0  # a step with no load at all stays 0, not NaN
    ax = vm.plot_load_heatmap(loads, steps=np.arange(10, 310, 10))
    img = np.asarray(ax.images[0].get_array())
    want = vm.load_share(loads).T
    np.testing.assert_allclose(img, want)
    np.testing.assert_allclose(want[:, 5], loads[5] / loads[5].mean())
    assert not np.isnan(img).any()
    left, right, _, _ = ax.images[0].get_extent()
    assert left == 5 and right == 305
    with pytest.raises(ValueError, match="steps"):
        vm.plot_load_heatmap(loads, steps=[1, 2])


def test_layer_loads_heatmap_stacks_layers():
    rng = np.random.default_rng(1)
    raw = rng.random((5, 3, 4))
    shares = raw / raw.sum(-1, keepdims=True)  # History.expert_loads: rows sum to 1
    ax = vm.plot_layer_loads([2, 4, 6, 8, 10], shares.tolist())
    img = np.asarray(ax.images[0].get_array())
    assert img.shape == (12, 5)
    np.testing.assert_allclose(img[1 * 4 + 2], shares[:, 1, 2] * 4)  # layer 1, expert 2 over the snapshots
    assert [t.get_text() for t in ax.get_yticklabels()] == ["MoE layer 1", "MoE layer 2", "MoE layer 3"]


def test_max_violation_and_balance_figure():
    runs = [vm.balance_run(router=r, gamma=g, steps=5, n_tokens=32) for r, g in (("softmax", 0), ("sigmoid", 0.01))]
    fig = vm.plot_balance_runs(runs)
    heatmaps = [a for a in fig.axes if a.images]
    assert len(heatmaps) == 2
    mv_ax = [a for a in fig.axes if a.get_ylabel().startswith("MaxVio")][0]
    np.testing.assert_allclose(mv_ax.lines[1].get_ydata(), runs[1].maxvio)
    assert [t.get_text() for t in mv_ax.get_legend().get_texts()] == [r.label for r in runs]
    assert runs[1].label == "sigmoid, bias update γ=0.01" and runs[0].label == "softmax, no balancing"


def test_balance_explorer_reruns_on_change():
    ex = vm.BalanceExplorer(steps=8, n_tokens=32)
    first, run0 = ex.image.value, ex.last
    ex.gamma.value = 0.0
    assert ex.last is not run0 and ex.last.settings["gamma"] == 0.0
    assert ex.image.value != first
    ex.router.value = "softmax"
    assert ex.last.settings["router"] == "softmax" and ex.updates == 3
    assert "moe-balance-explorer" in ex.widget._dom_classes


def test_single_thread_restores():
    before = torch.get_num_threads()
    with vm.single_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


# ---- 4. the permutation and the benchmark ------------------------------------------------------


def test_count_tensor_ops_loop_grows_with_experts_sorted_does_not():
    def count(E, impl):
        ex = moe.Experts(E, 16, 8)
        x = torch.randn(64, 16)
        idx = (torch.arange(64)[:, None] + torch.tensor([0, E // 2])) % E  # every expert used, k = 2
        w = torch.rand(64, 2)
        with torch.no_grad():
            return vm.count_tensor_ops(impl, x, idx, w, ex.gate_up_proj, ex.down_proj)

    small, big = count(4, moe_experts_reference), count(32, moe_experts_reference)
    assert small["linear"] == 2 * 4 and big["linear"] == 2 * 32  # two projections per used expert
    assert big["where"] == 32  # one data-dependent lookup per expert
    assert sum(count(4, moe_experts_sorted).values()) == sum(count(32, moe_experts_sorted).values())
    c = vm.count_tensor_ops(lambda a: (a + 1).sum().item(), torch.ones(3))
    assert c["add"] == 1 and c["sum"] == 1 and "item" not in c  # .item() returns a number, not a tensor


@pytest.mark.parametrize("align", [moe_align, moe_align_reference], ids=["kernel", "reference"])
def test_alignment_picture_marks_padding(align):
    g = torch.Generator().manual_seed(int(torch.randint(0, 10_000, ())))
    N, k, E, bm = 7, 2, 5, 4
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(N)])
    sorted_ids, expert_ids, ntpp, counts = align(idx, E, bm)
    S, total = N * k, int(ntpp)
    cells = vm.alignment_cells(idx, sorted_ids, expert_ids, ntpp, bm)
    assert len(cells) == sorted_ids.numel()
    ids = sorted_ids.tolist()
    assert [p for p, c in enumerate(cells) if c["kind"] == "pad"] == [p for p in range(total) if ids[p] == S]
    assert all(c["kind"] == "tail" for c in cells[total:])
    assert sorted(c["slot"] for c in cells if c["kind"] == "slot") == list(range(S))
    for p, c in enumerate(cells):
        if c["kind"] == "slot":
            assert c["expert"] == int(idx.reshape(-1)[c["slot"]]) == int(expert_ids[p // bm])

    ax = vm.plot_alignment(idx, sorted_ids, expert_ids, ntpp, bm)
    kinds = [p.get_gid() for p in ax.patches]
    assert kinds.count("src") == S and kinds.count("slot") == S
    assert kinds.count("pad") == sum(c["kind"] == "pad" for c in cells) == total - S
    assert all(p.get_hatch() for p in ax.patches if p.get_gid() == "pad")
    bottom = [p for p in ax.patches if p.get_gid() in ("slot", "pad", "tail")]
    assert [int(p.get_x()) for p in bottom] == list(range(len(cells)))  # one cell per buffer position
    assert (
        sum(len(line.get_xdata()) == 2 and line.get_ydata()[0] > line.get_ydata()[1] for line in ax.lines) == S
    )  # one line per slot


def test_parse_committed_benchmark():
    b = vm.parse_bench(BENCH.read_text())
    assert "H200" in b["meta"]["GPU"] and b["meta"]["date"]
    rows = b["ratios"]
    table = BENCH.read_text().split("## Ratios vs targets")[1]
    assert len(rows) == sum(line.startswith("|") for line in table.splitlines()) - 2  # minus header, rule
    for r in rows:
        assert r["unit"] in ("×", "%") and r["op"] in ("≥", "≤")
        ok = r["measured"] >= r["target"] if r["op"] == "≥" else r["measured"] <= r["target"]
        assert ok == r["met"], r  # the file's "met" column agrees with its numbers
    assert any(r["unit"] == "%" for r in rows) and any(r["unit"] == "×" for r in rows)


def test_parse_bench_synthetic_and_errors():
    text = (
        "# x\n- date: 2030-01-01\n- GPU: Test\n\n## Ratios vs targets\n\n| ratio | measured | target | met |\n"
        "|---|---|---|---|\n| a vs b | 2.50× | ≥ 2.0× | yes |\n| skew | -3.5% | ≤ 15% | yes |\n"
        "| c | 0.9x | >= 1.0x | no |\n\nHow it was run: ...\n"
    )
    b = vm.parse_bench(text)
    assert b["meta"] == {"date": "2030-01-01", "GPU": "Test"}
    assert [(r["name"], r["measured"], r["unit"], r["target"], r["op"], r["met"]) for r in b["ratios"]] == [
        ("a vs b", 2.5, "×", 2.0, "≥", True),
        ("skew", -3.5, "%", 15.0, "≤", True),
        ("c", 0.9, "×", 1.0, "≥", False),
    ]
    with pytest.raises(ValueError, match="Ratios vs targets"):
        vm.parse_bench("# nothing here\n")


def test_speedup_bars_and_targets():
    rows = vm.parse_bench(BENCH.read_text())["ratios"]
    ax = vm.plot_speedups(rows, title="t")
    speed = [r for r in rows if r["unit"] == "×"]
    bars = [p for p in ax.patches if p.get_height() == pytest.approx(0.6)]
    np.testing.assert_allclose([b.get_width() for b in bars], [r["measured"] for r in speed])
    targets = ax.collections[0].get_offsets()
    np.testing.assert_allclose(np.asarray(targets)[:, 0], [r["target"] for r in speed])
    colors = [matplotlib.colors.to_hex(b.get_facecolor()) for b in bars]
    assert colors == ["#59a14f" if r["met"] else "#f28e2b" for r in speed]
    with pytest.raises(ValueError, match="speed-up"):
        vm.plot_speedups([r for r in rows if r["unit"] == "%"])


# ---- 5. compute --------------------------------------------------------------------------------


def test_loss_vs_compute():
    assert vm.training_flops(1000, [1, 2]).tolist() == [6000.0, 12000.0]
    runs = {
        "moe": (vm.training_flops(10, np.arange(1, 6) * 100), [5, 4, 3, 2.5, 2]),
        "dense": (vm.training_flops(12, np.arange(1, 6) * 100), [5, 4.5, 3.5, 3, 2.8]),
    }
    ax = vm.plot_loss_vs_compute(runs)
    assert ax.get_xscale() == "log"
    np.testing.assert_allclose(ax.lines[0].get_xdata(), runs["moe"][0])
    np.testing.assert_allclose(ax.lines[2].get_ydata(), runs["dense"][1])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["moe", "dense"]
    np.testing.assert_allclose(ax.lines[1].get_ydata(), vm.centered_mean(runs["moe"][1]))
    with pytest.raises(ValueError, match="differ"):
        vm.plot_loss_vs_compute({"x": ([1, 2], [1])})


def test_centered_mean_has_no_lag():
    v = np.arange(10, dtype=float)
    np.testing.assert_allclose(vm.centered_mean(v, 3)[1:-1], v[1:-1])  # a line is its own centred mean
    np.testing.assert_allclose(
        vm.centered_mean(v**2, 5)[[0, 1, 2, -2, -1]],
        [0, (0 + 1 + 4) / 3, (0 + 1 + 4 + 9 + 16) / 5, (64 + 49 + 81) / 3, 81],
    )  # shrinking ends
    np.testing.assert_allclose(vm.centered_mean(v, 1), v)
    with pytest.raises(ValueError, match="odd"):
        vm.centered_mean(v, 4)
