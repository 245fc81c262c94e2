"""glmkit.course.viz: the mask picture, the Part A/B table, the block grid, the loss plot (and its live version
for train()) and the explorer widget (driven from Python, no frontend)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch

from glmkit.course import viz
from glmkit.ops.attention import attention_mask


def _worked_example():
    """The paper's example (x1..x6, spans {x3}, {x5, x6}, s2 first) as a one-sample batch: ids 1..6 stand
    for x1..x6, 90 = [MASK], 91 = [START], 92 = [END]."""
    return dict(
        input_ids=torch.tensor([[1, 2, 90, 4, 90, 91, 5, 6, 91, 3]]),
        targets=torch.tensor([[-100] * 5 + [5, 6, 92, 3, 92]]),
        position_ids=torch.tensor([[[0, 1, 2, 3, 4, 4, 4, 4, 2, 2], [0, 0, 0, 0, 0, 1, 2, 3, 1, 2]]]),
        sep=torch.tensor([5]),
    )


def test_example_fields_reads_a_batch_row():
    f = viz.example_fields(_worked_example())
    assert f["sep"] == 5
    assert f["position"] == [0, 1, 2, 3, 4, 4, 4, 4, 2, 2]
    assert f["block_position"] == [0, 0, 0, 0, 0, 1, 2, 3, 1, 2]
    with pytest.raises(TypeError, match="input_ids"):
        viz.example_fields({"input_ids": [1]})


def test_table_shows_both_position_rows_and_parts():
    h = viz.example_table_html(_worked_example())
    for row in ("token", "target", "position", "block position", "Part A", "Part B"):
        assert row in h
    text = str(viz.show_example(_worked_example()))
    assert "|" in text and "block pos" in text
    assert viz.show_example(_worked_example())._repr_html_() == h


@pytest.mark.parametrize("sep, T", [(0, 5), (3, 7), (7, 7), (2, 33)])
def test_plot_mask_draws_the_glm_mask(sep, T):
    ax = viz.plot_mask(sep, T)
    img = ax.images[0].get_array()
    assert img.shape == (T, T)
    np.testing.assert_array_equal(img > 0, attention_mask(torch.tensor([sep]), T)[0].numpy())
    assert not (img == 4).any(), "Part A must never see Part B"
    matplotlib.pyplot.close("all")


def test_plot_mask_from_a_mask_and_errors():
    m = attention_mask(torch.tensor([2, 4]), 6)
    ax = viz.plot_mask(m, sep=2, labels=list("abcdef"))
    assert [t.get_text() for t in ax.get_xticklabels()] == list("abcdef")
    with pytest.raises(ValueError, match="T"):
        viz.plot_mask(3)
    with pytest.raises(ValueError, match="sep"):
        viz.plot_mask(9, 4)
    assert viz.mask_png(3, 6)[:4] == b"\x89PNG"
    matplotlib.pyplot.close("all")


@pytest.mark.parametrize("T, sep, bm, bn", [(37, 11, 8, 8), (64, 0, 16, 16), (64, 64, 16, 16), (50, 20, 16, 8)])
def test_block_grid_agrees_with_the_mask(T, sep, bm, bn):
    g = viz.block_grid(sep, T, bm, bn)
    m = attention_mask(torch.tensor([sep]), T)[0]
    assert g.shape == (-(-T // bm), -(-T // bn))
    for a in range(g.shape[0]):
        for b in range(g.shape[1]):
            tile = m[a * bm : (a + 1) * bm, b * bn : (b + 1) * bn]
            assert g[a, b] == (2 if tile.all() else 1 if tile.any() else 0)
    if sep == T:
        assert (g == 2).all()  # fully bidirectional: nothing to skip or mask
    if sep == 0:
        assert (g[np.triu_indices(g.shape[0], 1)] == 0).all()  # causal: everything above the diagonal skipped
    viz.plot_block_grid(sep, T, bm, bn)
    matplotlib.pyplot.close("all")


def test_parse_spans():
    assert viz.parse_spans("2:3, 4:6") == [(2, 3), (4, 6)]
    assert viz.parse_spans(" ") == []
    for bad in ("2-3", "a:b", "5:5", "-1:2"):
        with pytest.raises(ValueError):
            viz.parse_spans(bad)


@pytest.mark.parametrize(
    "history",
    [
        [3.0, 2.5, 2.0],
        [(10, 3.0), (20, 2.0)],
        [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}],
        {"step": [1, 2], "loss": [3.0, 2.0]},
    ],
)
def test_plot_loss_accepts_histories(history):
    ax = viz.plot_loss(history)
    assert len(ax.lines) == 2
    matplotlib.pyplot.close("all")


def test_smooth_is_bias_corrected():
    np.testing.assert_allclose(viz.smooth([2.0, 2.0, 2.0]), [2.0, 2.0, 2.0])
    # the EMA with bias correction, written out: a_t = b·a_{t-1} + (1-b)·x_t, reported as a_t / (1 - b^t)
    x, beta, avg, want = [3.0, 1.0, 4.0, 1.0, 5.0], 0.9, 0.0, []
    for t, v in enumerate(x, 1):
        avg = beta * avg + (1 - beta) * v
        want.append(avg / (1 - beta**t))
    np.testing.assert_allclose(viz.smooth(x, beta), want)


def test_plot_loss_draws_a_train_history():
    """What train() returns (glmkit.train.History) plots at its own steps (a resumed run need not start at 1)."""
    from glmkit.train import History

    h = History(steps=[11, 12, 13], losses=[5.0, 4.0, 3.5], eval_steps=[13], eval_losses=[3.7])
    ax = viz.plot_loss(h)
    raw, smoothed = ax.lines
    np.testing.assert_array_equal(raw.get_xdata(), [11, 12, 13])
    np.testing.assert_array_equal(raw.get_ydata(), [5.0, 4.0, 3.5])
    np.testing.assert_allclose(smoothed.get_ydata(), viz.smooth([5.0, 4.0, 3.5]))
    assert ax.get_xlabel() == "step"
    matplotlib.pyplot.close("all")


def test_live_plot_redraws_in_place_and_throttles(monkeypatch):
    """LivePlot (a train() callback) shows one PNG and updates that display handle: at most once per
    min_interval_s while training, always at finish()."""
    import IPython.display

    from glmkit.train import History

    shown, updates = [], []

    class Handle:
        def update(self, obj):
            updates.append(obj)

    monkeypatch.setattr(IPython.display, "display", lambda obj, display_id=None: shown.append(obj) or Handle())
    h = History(steps=[1, 2, 3], losses=[5.0, 4.0, 3.5])
    plot = viz.LivePlot(min_interval_s=100.0)
    assert len(shown) == 1 and shown[0].data[:4] == b"\x89PNG"
    assert plot(3, {"loss": 3.5}, h) is None and updates == []  # throttled: the first draw was just now
    plot.finish(h)
    assert len(updates) == 1 and updates[0].data[:4] == b"\x89PNG" and updates[0].data != shown[0].data
    plot.min_interval_s = 0.0
    plot(4, {"loss": 3.4}, h)
    assert len(updates) == 2


# ---- the explorer, driven from Python (no frontend) ------------------------------------------------

from glmkit.data.tokenizer import ByteTokenizer  # noqa: E402


def test_worked_example_from_glmkit_renders():
    from glmkit.data.blank_infilling import build_example

    ex = build_example([1, 2, 3, 4, 5, 6], [(2, 3), (4, 6)], [1, 0], mask_id=90, sop_id=91, eop_id=92)
    f = viz.example_fields(ex)
    assert f == viz.example_fields(_worked_example())
    assert "block position" in viz.example_table_html(ex)


def test_explorer_changing_a_span_changes_the_mask():
    e = viz.BlankInfillingExplorer(ByteTokenizer(), text="The cat sat on the mat. It was warm.")
    assert "glm-explorer" in e.widget._dom_classes
    assert e.spans.description == "spans"
    e.mode.value = "manual spans"
    e.spans.value = "4:7"
    m1, img1, sep1 = e.mask.clone(), e.image.value, e.sep
    e.spans.value = "4:7, 15:18"
    assert e.spans_used == [(4, 7), (15, 18)]
    assert e.sep == sep1 - 2 and not torch.equal(m1, e.mask) and e.image.value != img1
    np.testing.assert_array_equal(e.mask.numpy(), attention_mask(torch.tensor([e.sep]), e.mask.shape[0])[0].numpy())
    assert e.example.position_ids.shape == (2, e.mask.shape[0])


def test_explorer_defaults_to_word_tokens_so_spans_blank_whole_words():
    """Without a tokenizer the explorer fits word tokens on the typed text: "1:2, 5:6" blanks " cat" and " mat"
    (bytes would blank "h" and "a"), and a new word typed later is a token too, not [UNK]."""
    e = viz.BlankInfillingExplorer(text="The cat sat on the mat. It was warm there!", mode="manual spans")
    e.spans.value = "1:2, 5:6"
    assert e.error is None and e.spans_used == [(1, 2), (5, 6)]
    tok = e.tokenizer
    part_b = [tok.decode([t]) for t in e.example.input_ids[e.sep :].tolist() if t != tok.sop_id]
    assert sorted(part_b) == [" cat", " mat"]
    assert tok.decode(e.example.input_ids[: e.sep].tolist()) == "The[MASK] sat on the[MASK]. It was warm there!"
    e.text.value = "A zebra sat on the mat."
    assert e.error is None and " zebra" in e.tokenizer.decode(e.example.input_ids.tolist())
    assert e.tokenizer.unk_id not in e.example.input_ids.tolist()


@pytest.mark.parametrize("mode", list(viz.MODES))
def test_explorer_modes_and_seed(mode):
    e = viz.BlankInfillingExplorer(ByteTokenizer(), text="One sentence here. Another one there! A third; and more.")
    e.mode.value = mode
    assert e.error is None and e.spans_used
    if mode.startswith("[gMASK]"):
        assert len(e.spans_used) == 1 and e.spans_used[0][1] == len(e.text.value.encode())
    before = e.updates
    e.seed.value = 7
    assert e.updates == before + 1


def test_explorer_reports_bad_input_without_raising():
    e = viz.BlankInfillingExplorer(ByteTokenizer(), text="short text", mode="manual spans", spans="1:2")
    good = e.example
    for bad in ("1-2", "3:1", "1:500"):
        e.spans.value = bad
        assert e.error and e.example is good and "⚠" in e.status.value
    e.spans.value = "1:2"
    assert e.error is None
    e.text.value = "   "
    assert "text" in e.error
