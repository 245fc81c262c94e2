"""Lesson 06's measurements, pictures and explorer for DSA (DeepSeek Sparse Attention, GLM-5): what a DSA layer's
indexer selects next to what its dense attention looks at, a fixed "window + anchors" pattern to compare with, the
cost model of dense and sparse prefill, and the measured layer times of ``benchmarks/results/dsa_h200.md``.

    layer_view(model, input_ids, layer)   one DSA layer's index logits I, its top-k, and the dense attention p
                                          (the warm-up's KL target), read from a forward pass of the model
    window_anchor_idx(T, k, anchors)      the fixed pattern: the first ``anchors`` tokens + the most recent ones
    recall_per_query / mass_per_query     how much of the true top-k (or of p's mass) a selection holds, per query
    key_distances(idx)                    how far back each selected key lies
    prefill_flops(T, ...)                 dense MLA vs DSA (indexer + sparse MLA) prefill FLOPs, GLM-5's dims
    parse_layer_times(text)               the "layer" table of bench_dsa.py's result file
    plot_selection / plot_layer_times / plot_flops / plot_recall_curves   the lesson's figures
    SelectionExplorer(view)               a widget: move a query position and k, see the selected keys

How it differs from the other course modules: ``viz_moe`` draws routers (one choice per token among E experts);
here each query token chooses among all earlier *tokens*, so the pictures are [query × key] maps. Nothing here is a
second implementation of DSA: the logits, the top-k, the attention target and the recall come from
``glmkit.ops.lightning_indexer`` and ``glmkit.mixers.dsa``; ``layer_view`` only calls the layer's own pieces.
"""

from __future__ import annotations

import dataclasses
import io
import re

import torch

from glmkit.mixers.dsa import DSA
from glmkit.ops.lightning_indexer import attention_target, indexer_topk, lightning_indexer, visibility
from glmkit.ops.sparse_mla import selected_mask


def glm5_dims() -> dict[str, int]:
    """GLM-5's attention dims, read from the ``glm-5`` preset (glm-lineage.md §5.1-§5.3): 64 heads, q·k head
    192 + 64, v head 256; latent 512 + 64; indexer 32 heads × 128, top-2048."""
    from glmkit.models.presets import get_config

    c = get_config("glm-5")
    return dict(
        heads=c.num_attention_heads,
        qk_dim=c.opt("qk_nope_head_dim") + c.opt("qk_rope_head_dim"),
        v_dim=c.opt("v_head_dim"),
        latent=c.opt("kv_lora_rank"),
        rope=c.opt("qk_rope_head_dim"),
        index_heads=c.opt("index_n_heads"),
        index_dim=c.opt("index_head_dim"),
        topk=c.opt("index_topk"),
    )


# ----------------------------------------------------------------------------------------------------
# What one DSA layer sees


@dataclasses.dataclass
class LayerView:
    """One DSA layer on one batch, every tensor on the CPU in fp32.

    logits [B, T, T]   the index logits I (−inf where a key is not visible)
    p      [B, T, T]   the dense attention summed over heads, L1-normalised (the warm-up's target); 0 where invisible
    idx    [B, T, k]   the indexer's top-k (−1 = empty slot: a query with fewer than k visible keys)
    visible [1, T, T]  the causal rule
    topk               the layer's k
    """

    logits: torch.Tensor
    p: torch.Tensor
    idx: torch.Tensor
    visible: torch.Tensor
    topk: int

    @property
    def T(self) -> int:
        return self.logits.shape[1]


@torch.no_grad()
def layer_view(model: torch.nn.Module, input_ids: torch.Tensor, layer: int = 0) -> LayerView:
    """Run ``model`` on ``input_ids`` [B, T] (in eval mode, in its current stage: the layers before ``layer`` attend
    densely in the "warmup" stage, to their top-k in "sparse") and read DSA layer ``layer`` (a "full" one: it has an
    indexer): the layer's input is caught by a hook, then its own projections give the indexer's q, k, w and MLA's
    absorbed query and latent rows, exactly as ``DSA._indexer_loss`` uses them."""
    mixer = model.layers[layer].mixer
    if not isinstance(mixer, DSA) or not mixer.full:
        raise ValueError(f"layer {layer} is not a DSA layer with its own indexer ({type(mixer).__name__})")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T], got {getattr(input_ids, 'shape', input_ids)}")
    seen = {}

    def hook(_module, args):
        seen["x"], seen["step"] = args[0], args[1]

    handle = mixer.register_forward_pre_hook(hook)
    was_training = model.training
    try:
        model.eval()
        model(input_ids.to(next(model.parameters()).device))
    finally:
        handle.remove()
        model.train(was_training)
    x, step = seen["x"], seen["step"]
    q_nope, q_rot, c_q = mixer.query(x, step)
    c_kv, k_rot = mixer.latent_kv(x, step)
    q_i, k_i, w_i = mixer.indexer(x, c_q, step)[:3]  # (GLM-5.3's KPool variant returns its gates fourth)
    w_uk, _ = mixer.absorbed_weights()
    q_lat = torch.einsum("bhtn,hnr->bthr", q_nope, w_uk)  # MQA mode: W_UK folded into the query
    q_abs = torch.cat((q_lat, q_rot.transpose(1, 2)), dim=-1).float()
    kv = torch.cat((c_kv, k_rot), dim=-1).float()
    T = x.shape[1]
    vis = visibility(T, T, 0, None, x.device)
    p = attention_target(q_abs, kv, mixer.scale, visible=vis)
    logits = lightning_indexer(q_i.float(), k_i.float(), w_i.float())
    idx = indexer_topk(q_i.float(), k_i.float(), w_i.float(), mixer.topk)
    return LayerView(logits.cpu(), p.cpu(), idx.long().cpu(), vis.cpu(), mixer.topk)


def window_anchor_idx(T: int, k: int, anchors: int = 4) -> torch.Tensor:
    """The fixed pattern a popular description gives DSA: each query keeps the first ``anchors`` tokens and the
    ``k − anchors`` most recent ones (itself included), k keys in all; fewer when it sees fewer. [T, k] int64, −1 in
    unused slots. The same budget k as the indexer, so the two compare at equal cost."""
    if not (isinstance(T, int) and isinstance(k, int) and isinstance(anchors, int)) or T < 1 or k < 1:
        raise ValueError(f"T and k must be positive ints, anchors an int, got T={T!r}, k={k!r}, anchors={anchors!r}")
    if not 0 <= anchors <= k:
        raise ValueError(f"anchors must be in [0, k] = [0, {k}], got {anchors}")
    out = torch.full((T, k), -1, dtype=torch.long)
    for t in range(T):
        keys = sorted(set(range(min(anchors, t + 1))) | set(range(max(0, t - (k - anchors) + 1), t + 1)))
        out[t, : len(keys)] = torch.tensor(keys)
    return out


def _rows(p: torch.Tensor, visible: torch.Tensor, idx: torch.Tensor):
    """p [B, T, L] or [T, L], idx of the same leading shape: the [N, L] rows and selection masks."""
    if p.dim() == 2:
        p, idx = p[None], idx[None]
    vis = visible.expand_as(p) if visible is not None else p > 0
    sel = selected_mask(idx, p.shape[-1])
    return p.reshape(-1, p.shape[-1]), vis.reshape(-1, p.shape[-1]), sel.reshape(-1, p.shape[-1])


def recall_per_query(p: torch.Tensor, visible: torch.Tensor, idx: torch.Tensor, k: int) -> torch.Tensor:
    """[B·T] share of each query's true top-k keys (the k largest p among its visible keys) that ``idx`` selects;
    NaN for queries that see k keys or fewer (every key is selected there, nothing to choose). The per-query form of
    ``glmkit.mixers.dsa.topk_recall``, whose mean over the choosing queries it equals."""
    p, vis, sel = _rows(p, visible, idx)
    true_top = p.masked_fill(~vis, -1.0).topk(min(k, p.shape[-1]), dim=-1).indices
    hit = sel.gather(-1, true_top).float().mean(-1)
    return torch.where(vis.sum(-1) > k, hit, torch.full_like(hit, float("nan")))


def mass_per_query(p: torch.Tensor, visible: torch.Tensor, idx: torch.Tensor, k: int) -> torch.Tensor:
    """[B·T] the share of each query's dense attention mass p that falls on the selected keys (1 = nothing of what
    dense attention reads is lost); NaN where the query sees k keys or fewer."""
    p, vis, sel = _rows(p, visible, idx)
    mass = (p * sel).sum(-1) / p.sum(-1).clamp_min(1e-30)
    return torch.where(vis.sum(-1) > k, mass, torch.full_like(mass, float("nan")))


def key_distances(idx: torch.Tensor, min_query: int = 0) -> torch.Tensor:
    """Distances t − s of every selected key s of every query t ≥ ``min_query`` (idx [T, k] or [B, T, k]; −1 slots
    skipped), as one flat int64 tensor."""
    if idx.dim() == 2:
        idx = idx[None]
    t = torch.arange(idx.shape[1])[None, :, None].expand_as(idx)
    keep = (idx >= 0) & (t >= min_query)
    return (t - idx)[keep].long()


# ----------------------------------------------------------------------------------------------------
# Cost: why long context is O(T²), and what k buys


def prefill_flops(T: int, dims: dict | None = None) -> dict[str, float]:
    """FLOPs of one attention layer's prefill over T tokens (B = 1, causal), attention core only (no projections):

    dense   MLA with expanded heads: Σ_t (t + 1) · 2 · H · (d_qk + d_v)        (q·k and p·v for every visible pair)
    sparse  DSA's sparse MLA in MQA mode: Σ_t min(k, t + 1) · 2 · H · (R + DR + R)  (score the latent + rope row,
            read the latent as the value)
    indexer Σ_t (t + 1) · 2 · H_I · D_I                                        (every visible pair is scored)

    ``dims`` (keys as ``glm5_dims()``) defaults to GLM-5's. The formulas of perf-anchors.md §3."""
    d = {**glm5_dims(), **(dims or {})}
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"T must be a positive int, got {T!r}")
    pairs = T * (T + 1) / 2  # Σ_t (t + 1)
    k = d["topk"]
    kept = pairs if T <= k else k * (k + 1) / 2 + (T - k) * k  # Σ_t min(k, t + 1)
    dense = pairs * 2 * d["heads"] * (d["qk_dim"] + d["v_dim"])
    sparse = kept * 2 * d["heads"] * (2 * d["latent"] + d["rope"])
    indexer = pairs * 2 * d["index_heads"] * d["index_dim"]
    return {"dense": dense, "sparse": sparse, "indexer": indexer, "dsa": sparse + indexer}


# ----------------------------------------------------------------------------------------------------
# The committed GPU measurement


def _tokens(label: str) -> int:
    label = label.strip()
    return int(label[:-1]) * 1024 if label.upper().endswith("K") else int(label)


def _num(cell: str) -> float | None:
    try:
        return float(cell.strip().rstrip("×x"))
    except ValueError:
        return None


def parse_layer_times(text: str) -> list[dict]:
    """The rows of the "T | dense MLA ms | ..." table of ``benchmarks/results/dsa_h200.md`` (written by
    ``benchmarks/bench_dsa.py``): dicts with T (tokens) and, in ms, dense, logits, topk, sparse, dsa (None where
    the run left a cell empty). Returns [] when the text holds no such table."""
    lines = [ln.strip() for ln in text.splitlines()]
    start = next((i for i, ln in enumerate(lines) if ln.startswith("| T |") and "dense MLA ms" in ln), None)
    if start is None:
        return []
    head = [c.strip() for c in lines[start].strip("|").split("|")]
    col = {name: head.index(name) for name in head}
    want = {
        "dense": "dense MLA ms",
        "logits": "logits ms",
        "topk": "top-k ms",
        "sparse": "sparse attn ms",
        "dsa": "DSA total ms",
    }
    missing = [h for h in want.values() if h not in col]
    if missing:
        raise ValueError(f"the layer table lacks the columns {missing}; it has {head}")
    rows = []
    for ln in lines[start + 2 :]:
        if not ln.startswith("|"):
            break
        cells = [c.strip() for c in ln.strip("|").split("|")]
        if not re.match(r"^\d+K?$", cells[0]):
            continue
        row = {"T": _tokens(cells[0])}
        row.update({key: _num(cells[col[h]]) for key, h in want.items()})
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------------
# Figures


def plot_selection(view: LayerView, sample: int = 0, queries: slice | None = None, axes=None, title: str = ""):
    """Two [query × key] maps side by side: the dense attention p (what every head reads, summed) and the keys the
    indexer selected (black), for ``sample`` of the batch. Returns the axes."""
    import matplotlib.pyplot as plt

    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(12, 5))
    p = view.p[sample]
    sel = selected_mask(view.idx[sample][None], view.T)[0].float()
    vis = view.visible[0]
    queries = queries or slice(0, view.T)
    shown_p = torch.where(vis, p, torch.full_like(p, float("nan")))[queries]
    shown_s = torch.where(vis, sel, torch.full_like(sel, float("nan")))[queries]
    top = float(torch.quantile(p[vis], 0.995))
    im = axes[0].imshow(shown_p, cmap="viridis", vmin=0, vmax=top, aspect="auto", interpolation="nearest")
    plt.colorbar(im, ax=axes[0], fraction=0.046, label="p (attention share)")
    axes[1].imshow(shown_s, cmap="Greys", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    r0 = queries.start or 0
    for ax, what in zip(axes, ("dense attention p (summed over heads)", f"keys the indexer selects (k = {view.topk})")):
        ax.set(xlabel="key position s", ylabel="query position t", title=f"{title}{what}")
        ax.set_yticks(ax.get_yticks()[1:-1], [str(int(v) + r0) for v in ax.get_yticks()[1:-1]])
    return axes


def plot_recall_curves(curves: dict[str, list[list[float]]], ax=None, baselines: dict[str, float] | None = None):
    """Recall of the true top-k over training steps: for each label, one curve per seed (thin) and their mean
    (thick); ``baselines`` draws horizontal lines (e.g. the fixed pattern's recall). Returns the axes."""
    import matplotlib.pyplot as plt
    import numpy as np

    if ax is None:
        _, ax = plt.subplots(figsize=(8, 3.5))
    for i, (label, runs) in enumerate(curves.items()):
        arr = np.asarray(runs, dtype=float)
        steps = np.arange(1, arr.shape[1] + 1)
        for r in arr:
            ax.plot(steps, r, color=f"C{i}", lw=0.7, alpha=0.5)
        ax.plot(steps, arr.mean(0), color=f"C{i}", lw=2, label=f"{label} (mean of {len(arr)} seeds)")
    for j, (label, v) in enumerate((baselines or {}).items()):
        ax.axhline(v, color=f"C{j + len(curves)}", ls="--", lw=1.2, label=label)
    ax.set_ylim(0, 1.02)
    ax.set_xlim(0, max((len(run) for runs in curves.values() for run in runs), default=1) + 0.5)
    ax.set(xlabel="training step", ylabel="recall of the true top-k")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return ax


def plot_flops(Ts, dims: dict | None = None, ax=None):
    """Per-layer prefill TFLOPs (dense MLA vs DSA = indexer + sparse MLA, GLM-5's dims by default) over context
    lengths ``Ts``; linear axes from zero. Returns the axes."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.5))
    f = [prefill_flops(int(T), dims) for T in Ts]
    x = [T / 1024 for T in Ts]
    ax.plot(x, [r["dense"] / 1e12 for r in f], "o-", label="dense MLA")
    ax.plot(x, [r["dsa"] / 1e12 for r in f], "s-", label="DSA: indexer + sparse MLA")
    ax.plot(x, [r["indexer"] / 1e12 for r in f], ":", color="C1", label="  of which the indexer")
    ax.set_xlim(0, max(x) * 1.03)
    ax.set_ylim(0, None)
    ax.set(xlabel="context length T (K tokens)", ylabel="TFLOPs per layer (prefill)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return ax


def plot_layer_times(rows: list[dict], ax=None, title: str = ""):
    """The measured layer time over T: dense MLA prefill against DSA, DSA split into index logits, top-k and sparse
    attention (stacked). Linear axes from zero. Returns the axes."""
    import matplotlib.pyplot as plt
    import numpy as np

    if ax is None:
        _, ax = plt.subplots(figsize=(8, 3.8))
    rows = [r for r in rows if r.get("dense") is not None or r.get("dsa") is not None]
    x = np.arange(len(rows))
    w = 0.38
    ax.bar(x - w / 2, [r["dense"] or 0 for r in rows], w, color="C0", label="dense MLA prefill")
    bottom = np.zeros(len(rows))
    for key, label, color in (
        ("logits", "index logits", "C1"),
        ("topk", "top-k", "C3"),
        ("sparse", "sparse MLA", "C2"),
    ):
        h = np.array([max(r.get(key) or 0.0, 0.0) for r in rows])
        ax.bar(x + w / 2, h, w, bottom=bottom, color=color, label=f"DSA: {label}")
        bottom += h
    for xi, r in zip(x, rows):
        if r.get("dense") and r.get("dsa"):
            ax.text(xi + w / 2, bottom[xi], f"{r['dense'] / r['dsa']:.1f}×", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, [f"{r['T'] // 1024}K" for r in rows])
    ax.set_ylim(0, None)
    ax.set(xlabel="context length T", ylabel="ms per layer (B = 1)", title=title)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return ax


# ----------------------------------------------------------------------------------------------------
# The explorer


def _png(fig, dpi: int = 72) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def query_panel(view: LayerView, t: int, k: int, sample: int = 0, anchors: int = 4, fig=None):
    """One query's row: the index logits I[t, :] with the indexer's top-k in colour, and the dense attention p[t, :]
    with its true top-k and the fixed window + anchors pattern marked. Returns (figure, numbers)."""
    from matplotlib.figure import Figure

    T = view.T
    if not 0 <= t < T or k < 1:
        raise ValueError(f"need 0 <= t < {T} and k >= 1, got t={t}, k={k}")
    logits, p = view.logits[sample, t, : t + 1], view.p[sample, t, : t + 1]
    kk = min(k, t + 1)
    chosen = logits.topk(kk).indices
    true_top = p.topk(kk).indices
    a = min(anchors, k)
    fixed = window_anchor_idx(T, k, a)[t]
    fixed = fixed[fixed >= 0]
    keys = torch.arange(t + 1)
    fig = fig or Figure(figsize=(12, 4.2), layout="constrained")
    ax0, ax1 = fig.subplots(2, 1, sharex=True)
    in_sel = torch.zeros(t + 1, dtype=torch.bool)
    in_sel[chosen] = True
    ax0.bar(keys, logits, color=["C1" if s else "0.75" for s in in_sel.tolist()], width=1.0)
    ax0.axhline(0, color="k", lw=0.6)
    ax0.set(ylabel="index logit I[t, s]", title=f"query t = {t}: the indexer's top-{kk} (orange) of {t + 1} keys")
    in_true = torch.zeros(t + 1, dtype=torch.bool)
    in_true[true_top] = True
    ax1.bar(keys, p, color=["C0" if s else "0.75" for s in in_true.tolist()], width=1.0)
    ax1.plot(fixed, torch.zeros(len(fixed)) - 0.03 * float(p.max()), "|", color="C3", ms=8, label="window + anchors")
    ax1.scatter(chosen, p[chosen], marker="v", color="C1", s=14, zorder=3, label="selected by the indexer")
    ax1.set(xlabel="key position s", ylabel="dense attention p[t, s]", title="the true top-k (blue)")
    ax1.legend(fontsize=8, loc="upper left")
    numbers = {
        "indexer recall": float(in_sel[true_top].float().mean()),
        "window recall": float(torch.isin(true_top, fixed).float().mean()),
        "indexer mass": float(p[chosen].sum() / p.sum()),
        "window mass": float(p[fixed].sum() / p.sum()),
        "far picks": int(((chosen >= a) & (chosen < t - (k - a) + 1)).sum()),  # outside window and anchors
    }
    return fig, numbers


class SelectionExplorer:
    """Move a query position t and the budget k; see which keys the indexer selects for that query, where the dense
    attention's mass is, and what the fixed window + anchors pattern would keep, with the recall of both.

    Drive from Python with ``.query.value`` and ``.k.value``; ``.numbers`` holds the last panel's figures. CSS class
    ``dsa-selection-explorer``, picture ``dsa-selection-image``."""

    def __init__(self, view: LayerView, sample: int = 0, anchors: int = 4):
        import ipywidgets as W

        self.view, self.sample, self.anchors = view, sample, anchors
        T = view.T
        self.query = W.IntSlider(value=T - 1, min=0, max=T - 1, description="query t", continuous_update=False)
        self.k = W.IntSlider(value=view.topk, min=1, max=T, description="k", continuous_update=False)
        self.status = W.HTML()
        self.image = W.Image(format="png", layout=W.Layout(width="900px"))
        self.image.add_class("dsa-selection-image")
        self.widget = W.VBox([W.HBox([self.query, self.k]), self.status, self.image])
        self.widget.add_class("dsa-selection-explorer")
        self.numbers: dict = {}
        self.updates = 0
        for w in (self.query, self.k):
            w.observe(lambda _c: self.update(), names="value")
        self.update()

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def update(self) -> None:
        t, k = int(self.query.value), int(self.k.value)
        fig, self.numbers = query_panel(self.view, t, k, self.sample, self.anchors)
        self.image.value = _png(fig)
        n = self.numbers
        if t + 1 <= k:
            text = f"query {t} sees {t + 1} ≤ k = {k} keys: every key is selected, DSA equals dense attention here."
        else:
            text = (
                f"query {t}, k = {k}: the indexer holds {n['indexer recall']:.0%} of the true top-{k} "
                f"({n['indexer mass']:.0%} of the attention mass); window + {min(self.anchors, k)} anchors holds "
                f"{n['window recall']:.0%} ({n['window mass']:.0%}). Indexer picks outside the window and the "
                f"anchors: {n['far picks']}."
            )
        self.status.value = f"<span class='dsa-selection-status'>{text}</span>"
        self.updates += 1


__all__ = [
    "glm5_dims",
    "LayerView",
    "layer_view",
    "window_anchor_idx",
    "recall_per_query",
    "mass_per_query",
    "key_distances",
    "prefill_flops",
    "parse_layer_times",
    "plot_selection",
    "plot_recall_curves",
    "plot_flops",
    "plot_layer_times",
    "query_panel",
    "SelectionExplorer",
]
