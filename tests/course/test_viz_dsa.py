"""glmkit.course.viz_dsa (lesson 06): ``layer_view`` reads exactly what a DSA layer trains on (its recall and its
warm-up loss match the layer's own ``aux_stats`` and ``aux_loss``), the fixed window + anchors pattern keeps the keys
it says, recall and attention mass are counted per query, the cost model reproduces perf-anchors.md §3's ratios, the
benchmark table is parsed as bench_dsa.py writes it, the figures show the data they are given, and the explorer
redraws when a slider moves."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pytest
import torch

from glmkit.course import viz_dsa as vd
from glmkit.mixers.dsa import set_dsa_stage, topk_recall
from glmkit.models.decoder import Decoder
from glmkit.models.presets import get_config
from glmkit.ops.lightning_indexer import indexer_kl_loss

V = 264


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _model(topk=8, layers=2, seed=0):
    base = get_config("cpu-dsa")
    cfg = get_config(base, num_hidden_layers=layers, extra={**base.extra, "index_topk": topk})
    torch.manual_seed(seed)
    model = Decoder(cfg)
    with torch.no_grad():  # peaked attention, so that the true top-k is well defined
        for layer in model.layers:
            layer.mixer.q_b_proj.weight.mul_(6.0)
            layer.mixer.kv_b_proj.weight.mul_(6.0)
    return model


# ---- what a layer sees ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer", [0, 1])
def test_layer_view_is_what_the_layer_trains_on(layer):
    """In the dense warm-up a training forward computes the indexer's KL and the recall from the same pieces:
    layer_view's p, logits and selection must reproduce both numbers of that layer."""
    model = _model(topk=8)
    x = torch.randint(0, V, (2, 29), generator=torch.Generator().manual_seed(1))
    set_dsa_stage(model, "warmup")  # dense attention in every layer: the same layer inputs in both forwards
    view = vd.layer_view(model, x, layer)
    assert model.training  # layer_view restores the mode it found
    model(x)  # a training forward (grad enabled): the layer sets aux_loss and aux_stats
    mixer = model.layers[layer].mixer
    assert view.logits.shape == view.p.shape == (2, 29, 29) and view.idx.shape == (2, 29, 8)
    assert math.isclose(float(indexer_kl_loss(view.logits, view.p)), float(mixer.aux_loss.detach()), rel_tol=1e-5)
    assert float(topk_recall(view.p, view.visible, view.idx, 8)) == float(mixer.aux_stats["dsa_recall"])
    torch.testing.assert_close(view.p.sum(-1), torch.ones(2, 29))  # L1-normalised rows
    assert (view.p[:, ~view.visible[0]] == 0).all() and (view.logits[:, ~view.visible[0]] == float("-inf")).all()


def test_layer_view_with_t_at_most_k_selects_every_causal_key():
    model = _model(topk=16).eval()
    view = vd.layer_view(model, torch.randint(0, V, (1, 12)), 0)
    chosen = view.idx[0].sort(-1).values[:, -12:]  # 16 slots, 12 tokens: the last 12 sorted entries
    for t in range(12):
        assert chosen[t].tolist() == [-1] * (11 - t) + list(range(t + 1)), t
    assert not model.training


def test_layer_view_refuses_a_layer_without_an_indexer():
    mla = Decoder(get_config("cpu-mla", num_hidden_layers=1))
    with pytest.raises(ValueError, match="not a DSA layer"):
        vd.layer_view(mla, torch.randint(0, V, (1, 5)), 0)


# ---- fixed patterns, recall, mass, distances -------------------------------------------------------------------
def test_window_anchor_pattern():
    idx = vd.window_anchor_idx(10, 4, anchors=1)
    assert idx.shape == (10, 4) and idx.dtype == torch.int64
    assert sorted(idx[9].tolist()) == [0, 7, 8, 9]  # anchor 0 + the 3 most recent
    assert sorted(idx[2].tolist()) == [-1, 0, 1, 2]  # sees 3 keys: all of them, one empty slot
    assert sorted(vd.window_anchor_idx(10, 4, anchors=0)[9].tolist()) == [6, 7, 8, 9]
    assert sorted(vd.window_anchor_idx(10, 4, anchors=4)[9].tolist()) == [0, 1, 2, 3]  # anchors only
    for bad in (dict(T=0, k=2), dict(T=5, k=2, anchors=3), dict(T=5, k=0)):
        with pytest.raises(ValueError):
            vd.window_anchor_idx(**bad)


def test_recall_and_mass_per_query():
    p = torch.tensor([[[1.0, 0, 0, 0], [0.5, 0.5, 0, 0], [0.6, 0.1, 0.3, 0], [0.1, 0.2, 0.3, 0.4]]])
    vis = torch.ones(4, 4, dtype=torch.bool).tril()[None]
    idx = torch.tensor([[[0, -1], [0, 1], [0, 1], [3, 0]]])
    r = vd.recall_per_query(p, vis, idx, 2)
    m = vd.mass_per_query(p, vis, idx, 2)
    assert r[:2].isnan().all() and m[:2].isnan().all()  # queries 0 and 1 see <= k keys: nothing to choose
    assert r[2:].tolist() == [0.5, 0.5]  # true top-2: {0, 2} and {3, 2}
    assert torch.allclose(m[2:], torch.tensor([0.7, 0.5]))
    assert float(torch.nanmean(r)) == float(topk_recall(p, vis, idx, 2))  # the library's mean over choosing rows


def test_key_distances():
    idx = torch.tensor([[0, -1], [0, 1], [2, 0]])
    assert vd.key_distances(idx).tolist() == [0, 1, 0, 0, 2]
    assert vd.key_distances(idx, min_query=2).tolist() == [0, 2]


# ---- cost -------------------------------------------------------------------------------------------------------
def test_prefill_flops_match_the_perf_anchors():
    """perf-anchors.md §3 (DeepSeek-V3.2, MQA-mode dims 128 × 1088 on both sides, indexer 64 × 128 at the bf16 rate,
    sums approximated by L/2 per query): 5.4× at 32K, 8.2× at 64K, 11.1× at 128K. The exact sums are within 4%."""
    ds = dict(heads=128, qk_dim=576, v_dim=512, latent=512, rope=64, index_heads=64, index_dim=128, topk=2048)
    for T, want in ((32768, 5.4), (65536, 8.2), (131072, 11.1)):
        f = vd.prefill_flops(T, ds)
        assert f["dsa"] == f["sparse"] + f["indexer"]
        assert abs(f["dense"] / f["dsa"] / want - 1) < 0.04, (T, f["dense"] / f["dsa"])
    small = vd.prefill_flops(1000)  # T <= k: every pair is kept; the sparse side differs only by its dims
    assert small["sparse"] / small["dense"] == pytest.approx((2 * 512 + 64) / (256 + 256))
    with pytest.raises(ValueError):
        vd.prefill_flops(0)


# ---- the committed benchmark --------------------------------------------------------------------------------------
TABLE = """# DSA (lightning indexer + top-k + sparse MLA) vs dense MLA prefill; sparse decode

- date: 2026-12-03 10:00 UTC

## DSA attention vs dense MLA prefill: H = 64, ...

| T | dense MLA ms | dense TFLOP/s | logits ms | indexer TFLOP/s | top-k ms | sparse attn ms | sparse TFLOP/s | DSA total ms | dense/DSA |
|---|---|---|---|---|---|---|---|---|---|
| 16K | 30.00 | 500 | 4.00 | 300 | 1.00 | 5.00 | 250 | 10.00 | 3.00 |
| 32K | 120.00 | 500 | 16.00 | 300 | 2.00 | 10.00 | 250 | 28.00 | 4.29 |
| 128K | n/a | n/a | n/a | n/a | n/a | n/a | n/a | n/a | n/a |

## Sparse decode
"""  # noqa: E501


def test_parse_layer_times():
    rows = vd.parse_layer_times(TABLE)
    assert [r["T"] for r in rows] == [16384, 32768, 131072]
    assert rows[1] == dict(T=32768, dense=120.0, logits=16.0, topk=2.0, sparse=10.0, dsa=28.0)
    assert rows[2]["dense"] is None and rows[2]["dsa"] is None
    assert vd.parse_layer_times("no table here") == []


def test_plot_layer_times_draws_the_measured_parts():
    ax = vd.plot_layer_times(vd.parse_layer_times(TABLE))
    heights = [round(b.get_height(), 6) for b in ax.patches]
    assert heights == [30.0, 120.0, 4.0, 16.0, 1.0, 2.0, 5.0, 10.0]  # dense, then logits, top-k, sparse (stacked)
    assert ax.get_ylim()[0] == 0
    assert [t.get_text() for t in ax.texts] == ["3.0×", "4.3×"]


def test_plot_selection_and_recall_curves_show_their_data():
    view = vd.layer_view(_model(topk=4).eval(), torch.randint(0, V, (1, 10)), 0)
    axes = vd.plot_selection(view)
    shown = axes[1].images[0].get_array()
    sel = torch.zeros(10, 10)
    for t in range(10):
        sel[t, view.idx[0, t][view.idx[0, t] >= 0]] = 1
    assert (torch.tensor(shown.filled(-1)) == torch.where(view.visible[0], sel, torch.tensor(-1.0))).all()
    ax = vd.plot_recall_curves({"warm-up": [[0.2, 0.5], [0.3, 0.7]]}, baselines={"window": 0.4})
    assert [list(line.get_ydata()) for line in ax.lines[:3]] == [[0.2, 0.5], [0.3, 0.7], [0.25, 0.6]]
    assert list(ax.lines[3].get_ydata()) == [0.4, 0.4] and ax.get_ylim()[0] == 0


# ---- the explorer ------------------------------------------------------------------------------------------------
def test_selection_explorer_redraws_and_counts():
    pytest.importorskip("ipywidgets")
    view = vd.layer_view(_model(topk=6).eval(), torch.randint(0, V, (1, 24)), 0)
    ex = vd.SelectionExplorer(view, anchors=2)
    assert ex.updates == 1 and ex.query.value == 23 and ex.k.value == 6 and ex.image.value[:4] == b"\x89PNG"
    ex.query.value = 3  # sees 4 keys <= k
    assert ex.updates == 2 and "every key is selected" in ex.status.value
    ex.query.value, ex.k.value = 20, 24  # k > keys: everything selected
    assert ex.numbers["indexer recall"] == 1.0 and ex.numbers["window mass"] == pytest.approx(1.0)
    ex.k.value = 5
    n = ex.numbers
    p = view.p[0, 20, :21]
    true_top = set(p.topk(5).indices.tolist())
    chosen = set(view.logits[0, 20, :21].topk(5).indices.tolist())
    assert n["indexer recall"] == len(true_top & chosen) / 5
    assert n["window recall"] == len(true_top & {0, 1, 18, 19, 20}) / 5
    assert n["far picks"] == len(chosen - {0, 1, 18, 19, 20})
    assert f"{n['indexer recall']:.0%} of the true top-5" in ex.status.value
