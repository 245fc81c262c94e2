"""Pictures and widgets for the lessons: the GLM mask, the Part A / Part B table, the blank-infilling
explorer, the attention kernel's block grid, and training curves.

Nothing here computes the objective: every function draws what ``glmkit.data.blank_infilling`` built, so what a
learner sees is exactly what the model trains on.

    plot_mask(sep_or_mask, T)          heatmap of the GLM mask, Part A / Part B boundary drawn
    show_example(example, tokenizer)   HTML table: tokens, targets, position row, block-position row
    BlankInfillingExplorer(tokenizer)  ipywidgets: type a text, pick a mode / spans / seed, see the table
                                       and the mask update (works without a frontend: set values in Python)
    block_grid(sep, T, bm, bn)         which (query block, key block) tiles a flash kernel skips, masks, or
    plot_block_grid(...)               runs unmasked, and the picture of it
    plot_loss(history)                 training loss curve (raw and smoothed)
"""

from __future__ import annotations

import html
import io
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

# Colours shared by the table and the heatmaps (Part A blue, Part B orange, padding grey).
PART_A = "#4C78A8"
PART_B = "#F58518"
PAD = "#BBBBBB"
_PART_A_BG = "#dbe6f2"
_PART_B_BG = "#fde3cc"
_PAD_BG = "#eeeeee"


# ----------------------------------------------------------------------------------------------------
# Reading an example: a GLMBatch (one row of it), or anything with the same four fields.


def _as_list(x) -> list:
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return list(x)


def example_fields(example: Any, index: int = 0) -> dict:
    """``input_ids, targets, position, block_position`` (lists) and ``sep`` (int) of one sample.

    ``example``: a ``GLMBatch`` (``index`` picks the sample) or any object/dict with ``input_ids``,
    ``targets``, ``position_ids`` ([2, L] or [B, 2, L]) and ``sep``.
    """
    get = (lambda k: example[k]) if isinstance(example, dict) else (lambda k: getattr(example, k))
    try:
        ids, tgt, pos, sep = (get(k) for k in ("input_ids", "targets", "position_ids", "sep"))
    except (KeyError, AttributeError) as e:
        raise TypeError(f"example must have input_ids, targets, position_ids and sep (a GLMBatch); missing {e}") from e
    ids_t = torch.as_tensor(ids)
    if ids_t.dim() == 2:  # batched: pick one sample
        ids, tgt, pos = ids_t[index], torch.as_tensor(tgt)[index], torch.as_tensor(pos)[index]
        sep = torch.as_tensor(sep).reshape(-1)[index]
    pos = torch.as_tensor(pos)
    if pos.dim() != 2 or pos.shape[0] != 2:
        raise ValueError(f"position_ids must be [2, L] for one sample, got {tuple(pos.shape)}")
    return dict(
        input_ids=_as_list(ids),
        targets=_as_list(tgt),
        position=_as_list(pos[0]),
        block_position=_as_list(pos[1]),
        sep=int(torch.as_tensor(sep).reshape(-1)[0]),
    )


def _length_without_padding(ids: list[int], pad_id: int | None, sep: int) -> int:
    n = len(ids)
    if pad_id is None:
        return n
    while n > sep and ids[n - 1] == pad_id:
        n -= 1
    return n


def _tok_str(tokenizer, i: int) -> str:
    if i is None or i < 0:
        return ""
    if tokenizer is None:
        return str(i)
    if hasattr(tokenizer, "token_strings"):
        return tokenizer.token_strings([i])[0]
    return tokenizer.decode([i])


# ----------------------------------------------------------------------------------------------------
# The Part A / Part B table


def example_table_html(example: Any, tokenizer=None, index: int = 0, max_tokens: int = 160) -> str:
    """The HTML of ``show_example``: one column per token, rows = index, token, target, position, block
    position; Part A cells blue, Part B orange, padding grey."""
    f = example_fields(example, index)
    ids, tgt, sep = f["input_ids"], f["targets"], f["sep"]
    pad_id = getattr(tokenizer, "pad_id", None)
    n = _length_without_padding(ids, pad_id, sep)
    shown = min(len(ids), max_tokens)
    cell = "padding:1px 4px;text-align:center;font-family:monospace;border:1px solid #fff;white-space:pre"

    def bg(j):
        return _PART_A_BG if j < sep else (_PART_B_BG if j < n else _PAD_BG)

    rows = []
    spec = [
        ("", lambda j: str(j)),
        ("token", lambda j: html.escape(_tok_str(tokenizer, ids[j]))),
        ("target", lambda j: html.escape(_tok_str(tokenizer, tgt[j])) if tgt[j] >= 0 else "·"),
        ("position", lambda j: str(f["position"][j])),
        ("block position", lambda j: str(f["block_position"][j])),
    ]
    for name, fn in spec:
        head = f"<th style='{cell};text-align:right;background:#fff'>{name}</th>"
        tds = "".join(f"<td style='{cell};background:{bg(j)}'>{fn(j)}</td>" for j in range(shown))
        rows.append(f"<tr>{head}{tds}</tr>")
    more = f" (first {shown} of {len(ids)} tokens shown)" if shown < len(ids) else ""
    legend = (
        f"<div style='font-size:90%'><span style='background:{_PART_A_BG};padding:0 6px'>Part A</span> "
        f"(corrupted text, {sep} tokens, bidirectional) "
        f"<span style='background:{_PART_B_BG};padding:0 6px'>Part B</span> "
        f"(the spans, {n - sep} tokens, left to right)"
        + (f" <span style='background:{_PAD_BG};padding:0 6px'>padding</span>" if n < len(ids) else "")
        + f"; target · = no loss{more}</div>"
    )
    return (
        f"<div class='glm-example' style='overflow-x:auto'><table style='border-collapse:collapse'>"
        f"{''.join(rows)}</table>{legend}</div>"
    )


def show_example(example: Any, tokenizer=None, index: int = 0, max_tokens: int = 160):
    """Part A / Part B as a colour-coded table with both position rows (an IPython HTML object: it renders
    when it is the last thing in a cell; ``print`` it for plain text)."""
    from IPython.display import HTML

    return _TextAndHTML(
        example_table_html(example, tokenizer, index, max_tokens),
        example_table_text(example, tokenizer, index, max_tokens),
        HTML,
    )


class _TextAndHTML:
    """Shows as HTML in a notebook and as an aligned text table in a terminal or ``print``."""

    def __init__(self, html_str: str, text: str, _HTML):
        self.html, self.text = html_str, text

    def _repr_html_(self) -> str:
        return self.html

    def __repr__(self) -> str:
        return self.text

    __str__ = __repr__


def example_table_text(example: Any, tokenizer=None, index: int = 0, max_tokens: int = 160) -> str:
    """The table of ``show_example`` as aligned plain text ('|' marks the Part A / Part B boundary)."""
    f = example_fields(example, index)
    ids, tgt, sep = f["input_ids"], f["targets"], f["sep"]
    shown = min(len(ids), max_tokens)
    rows = [
        ("token", [_tok_str(tokenizer, ids[j]) for j in range(shown)]),
        ("target", [_tok_str(tokenizer, tgt[j]) if tgt[j] >= 0 else "·" for j in range(shown)]),
        ("position", [str(v) for v in f["position"][:shown]]),
        ("block pos", [str(v) for v in f["block_position"][:shown]]),
    ]
    w = [max(len(r[1][j]) for r in rows) for j in range(shown)]
    lines = []
    for name, vals in rows:
        cells = [v.rjust(w[j]) for j, v in enumerate(vals)]
        lines.append(f"{name:>9} " + " ".join(cells[:sep]) + " | " + " ".join(cells[sep:]))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# The mask


def _mask_from(sep_or_mask, T: int | None) -> tuple[torch.Tensor, int | None]:
    """A [T, T] bool mask and its Part-A length (None if unknown) from an int sep or a mask."""
    from glmkit.ops.attention import attention_mask

    if isinstance(sep_or_mask, torch.Tensor) and sep_or_mask.dim() >= 2:
        m = sep_or_mask
        if m.dim() == 3:
            m = m[0]
        if m.dim() != 2 or m.shape[0] != m.shape[1] or m.dtype != torch.bool:
            raise ValueError(f"mask must be a square bool tensor [T, T], got {m.dtype} {tuple(m.shape)}")
        return m.cpu(), None
    sep = int(torch.as_tensor(sep_or_mask).reshape(-1)[0])
    if T is None:
        raise ValueError("T (the sequence length) is needed when plotting from sep")
    if not 0 <= sep <= T:
        raise ValueError(f"sep must be in [0, T={T}], got {sep}")
    return attention_mask(torch.tensor([sep]), T)[0], sep


def plot_mask(
    sep_or_mask,
    T: int | None = None,
    ax=None,
    labels: Sequence[str] | None = None,
    sep: int | None = None,
    title: str | None = None,
):
    """Heatmap of the GLM mask (rows = queries, columns = keys). Visible cells are coloured by kind:
    Part A → Part A (bidirectional), Part B → Part A, Part B → Part B (causal); masked cells white.
    The Part A / Part B boundary is drawn when sep is known.

    sep_or_mask: an int Part-A length (then T is required), a [B] sep tensor (the first sample), or a
    [T, T] / [B, T, T] bool mask (pass ``sep=`` to draw the boundary). labels: one tick label per token.
    Returns the matplotlib Axes.
    """
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    m, s = _mask_from(sep_or_mask, T)
    s = sep if sep is not None else s
    T = m.shape[0]
    kind = np.zeros((T, T))
    vis = m.numpy()
    if s is None:
        kind[vis] = 1
    else:
        q = np.arange(T)[:, None]
        k = np.arange(T)[None, :]
        kind[vis & (q < s) & (k < s)] = 1  # A -> A
        kind[vis & (q >= s) & (k < s)] = 2  # B -> A
        kind[vis & (q >= s) & (k >= s)] = 3  # B -> B (causal)
        kind[vis & (q < s) & (k >= s)] = 4  # A -> B: never visible in a GLM mask
    if ax is None:
        size = min(7.0, 2.5 + T * 0.12)
        _, ax = plt.subplots(figsize=(size, size))
    cmap = ListedColormap(["#ffffff", PART_A, "#9ecae9", PART_B, "#d62728"])
    ax.imshow(kind, cmap=cmap, vmin=0, vmax=4, interpolation="nearest")
    if s is not None and 0 < s < T:
        for f in (ax.axhline, ax.axvline):
            f(s - 0.5, color="black", lw=1.5)
    if labels is not None and len(labels) == T:
        # every token up to 32; beyond that only the bracketed specials ([MASK], [START], ...) stay readable
        ticks = [i for i, lab in enumerate(labels) if T <= 32 or (lab.startswith("[") and lab.endswith("]"))]
        size = 9 if T <= 20 else 7
        ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=90, fontsize=size)
        ax.set_yticks(ticks, [labels[i] for i in ticks], fontsize=size)
    ax.set_xlabel("key j (attended to)")
    ax.set_ylabel("query i (attending)")
    if title is None:
        title = "GLM mask" + (f": Part A = first {s} tokens" if s is not None else "")
    ax.set_title(title, fontsize=10)
    return ax


def mask_png(sep_or_mask, T: int | None = None, labels=None, sep: int | None = None, dpi: int = 90) -> bytes:
    """``plot_mask`` rendered to PNG bytes (for widgets.Image; no display needed)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.8, 5.8), dpi=dpi)
    ax = fig.add_subplot(1, 1, 1)
    plot_mask(sep_or_mask, T, ax=ax, labels=labels, sep=sep)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------
# Block grid of the flash kernel


def block_grid(sep: int, T: int, block_m: int, block_n: int) -> np.ndarray:
    """Status of each (query block, key block) tile under the GLM mask for one sample:
    0 = fully masked (the kernel skips it), 1 = partly masked (mask applied inside), 2 = fully visible.

    Derived from ``glmkit.ops.attention.attention_mask`` itself, so it is a check on any skipping rule.
    Returns int array [cdiv(T, block_m), cdiv(T, block_n)]; the ragged last blocks count only real rows
    and columns.
    """
    from glmkit.ops.attention import attention_mask

    m = attention_mask(torch.tensor([int(sep)]), T)[0]
    nm, nn = -(-T // block_m), -(-T // block_n)
    out = np.zeros((nm, nn), dtype=np.int64)
    for a in range(nm):
        for b in range(nn):
            tile = m[a * block_m : (a + 1) * block_m, b * block_n : (b + 1) * block_n]
            out[a, b] = 2 if bool(tile.all()) else (1 if bool(tile.any()) else 0)
    return out


def plot_block_grid(sep: int, T: int, block_m: int, block_n: int, ax=None, show_mask: bool = True):
    """The flash kernel's tiles over the mask: skipped tiles shaded grey, masked tiles hatched, full tiles
    clear; the mask drawn underneath. Returns the Axes."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    grid = block_grid(sep, T, block_m, block_n)
    if ax is None:
        _, ax = plt.subplots(figsize=(5.5, 5.5))
    if show_mask:
        plot_mask(int(sep), T, ax=ax, title="")
    style = {
        0: dict(facecolor="#555555", alpha=0.55, hatch=None),
        1: dict(facecolor="none", alpha=1.0, hatch="//"),
        2: dict(facecolor="none", alpha=1.0, hatch=None),
    }
    for a in range(grid.shape[0]):
        for b in range(grid.shape[1]):
            x0, y0 = b * block_n - 0.5, a * block_m - 0.5
            w = min(block_n, T - b * block_n)
            h = min(block_m, T - a * block_m)
            st = style[int(grid[a, b])]
            ax.add_patch(Rectangle((x0, y0), w, h, edgecolor="black", lw=0.8, **st))
    ax.set_xlim(-0.5, T - 0.5)
    ax.set_ylim(T - 0.5, -0.5)
    n_skip, n_part, n_full = (int((grid == v).sum()) for v in (0, 1, 2))
    ax.set_title(
        f"T={T}, sep={sep}, tiles {block_m}×{block_n}: {n_skip} skipped (grey), "
        f"{n_part} masked (hatched), {n_full} full",
        fontsize=9,
    )
    return ax


# ----------------------------------------------------------------------------------------------------
# Training curves


def _loss_series(history) -> tuple[np.ndarray, np.ndarray]:
    if hasattr(history, "losses") and not isinstance(history, (list, tuple, dict)):  # glmkit.train.History
        steps = getattr(history, "steps", None) or range(1, len(history.losses) + 1)
        return np.asarray(list(steps), dtype=float), np.asarray(history.losses, dtype=float)
    if hasattr(history, "history") and not isinstance(history, (list, tuple, dict)):
        history = history.history
    if isinstance(history, dict):
        if "loss" not in history:
            raise ValueError(f"history dict needs a 'loss' key, has {sorted(history)}")
        loss = np.asarray(history["loss"], dtype=float)
        step = np.asarray(history.get("step", np.arange(1, len(loss) + 1)), dtype=float)
        return step, loss
    history = list(history)
    if history and isinstance(history[0], dict):
        loss = np.asarray([h["loss"] for h in history], dtype=float)
        step = np.asarray([h.get("step", i + 1) for i, h in enumerate(history)], dtype=float)
        return step, loss
    if history and isinstance(history[0], (tuple, list)):
        step, loss = zip(*history)
        return np.asarray(step, dtype=float), np.asarray(loss, dtype=float)
    loss = np.asarray(history, dtype=float)
    return np.arange(1, len(loss) + 1, dtype=float), loss


def smooth(values, beta: float = 0.9) -> np.ndarray:
    """Bias-corrected exponential moving average (the curve a noisy loss is read by)."""
    out, avg = [], 0.0
    for i, v in enumerate(np.asarray(values, dtype=float)):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** (i + 1)))
    return np.asarray(out)


def plot_loss(history, ax=None, label: str = "train loss", beta: float = 0.9, log: bool = False):
    """Loss against step: raw (faint) and smoothed. history: a list of floats, of (step, loss) pairs, of
    dicts with 'loss' (and 'step'), a dict {'step': [...], 'loss': [...]}, or a glmkit.train.History."""
    import matplotlib.pyplot as plt

    step, loss = _loss_series(history)
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(step, loss, color=PART_A, alpha=0.3, lw=1)
    if len(loss):
        ax.plot(step, smooth(loss, beta), color=PART_A, lw=2, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    return ax


# ----------------------------------------------------------------------------------------------------
# The explorer


MODES = {
    "[MASK] random spans": "mask",
    "[sMASK] sentences": "sentence",
    "[gMASK] suffix": "gmask",
    "manual spans": "manual",
}

DEFAULT_TEXT = "The cat sat on the mat. It was warm there!"


def parse_spans(text: str) -> list[tuple[int, int]]:
    """ "2:3, 4:6" -> [(2, 3), (4, 6)]: half-open token ranges, like Python slices. Raises ValueError."""
    spans = []
    for part in text.replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        if ":" not in part:
            raise ValueError(f"span {part!r} must look like start:end (e.g. 2:3)")
        a, b = part.split(":", 1)
        try:
            s, e = int(a), int(b)
        except ValueError:
            raise ValueError(f"span {part!r}: start and end must be integers") from None
        if not 0 <= s < e:
            raise ValueError(f"span {part!r}: need 0 <= start < end")
        spans.append((s, e))
    return spans


def _build_for_explorer(tokenizer, text: str, mode: str, seed: int, spans: list[tuple[int, int]] | None):
    """One example for the explorer, built by glmkit.blank_infilling (never re-implemented here).
    Returns (example, spans_used)."""
    from glmkit.data import blank_infilling as bi

    ids = tokenizer.encode(text)
    rng = np.random.default_rng(seed)
    if mode == "manual":
        spans = sorted(spans or [])
        if not spans:
            raise ValueError("type at least one span, e.g. 2:3, 4:6")
        if spans[-1][1] > len(ids):
            raise ValueError(f"span {spans[-1][0]}:{spans[-1][1]} runs past the text ({len(ids)} tokens)")
        order = rng.permutation(len(spans)).tolist()  # the seed shuffles Part B, as in training
        ex = bi.build_example(
            ids, spans, order, mask_id=tokenizer.mask_id, sop_id=tokenizer.sop_id, eop_id=tokenizer.eop_id
        )
    else:
        mode_name = {"mask": "mask", "sentence": "smask", "gmask": "gmask"}[mode]
        ex = bi.corrupt(ids, bi.BlankInfillingConfig(), rng, tokenizer, mode=mode_name)
    return ex, ex.spans


class BlankInfillingExplorer:
    """An ipywidgets explorer of GLM's blank infilling: type a text, choose a mode ([MASK] random spans,
    [sMASK] sentences, [gMASK] suffix, or manual spans "2:3, 4:6"), move the seed, and see Part A / Part B
    with both position rows and the mask heatmap, updated on every change.

    Works without a frontend: set ``explorer.text.value``, ``.mode.value``, ``.seed.value`` or
    ``.spans.value`` from Python and read ``explorer.example`` (the current one-sample GLMBatch),
    ``explorer.mask`` ([T, T] bool), ``explorer.sep``, ``explorer.spans_used`` and ``explorer.error``.
    Displaying it shows ``explorer.widget`` (a VBox with CSS class "glm-explorer"); the mask picture is
    an ``ipywidgets.Image`` (``explorer.image``) whose PNG changes with the mask.
    """

    def __init__(
        self,
        tokenizer=None,
        text: str = DEFAULT_TEXT,
        mode: str = "[MASK] random spans",
        seed: int = 0,
        spans: str = "1:2, 5:6",
        max_tokens: int = 200,
    ):
        import ipywidgets as W

        # None: word tokens, fitted on the text as typed (no [UNK]): spans like "1:2" then blank whole words
        self.fit_words = tokenizer is None
        if mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.example = None
        self.mask: torch.Tensor | None = None
        self.sep: int | None = None
        self.spans_used: list[tuple[int, int]] = []
        self.error: str | None = None
        self.updates = 0

        self.text = W.Textarea(
            value=text, description="text", layout=W.Layout(width="98%", height="64px"), continuous_update=False
        )
        self.mode = W.Dropdown(options=list(MODES), value=mode, description="mode")
        self.seed = W.IntSlider(value=seed, min=0, max=99, description="seed", continuous_update=False)
        self.spans = W.Text(
            value=spans,
            description="spans",
            placeholder="start:end, ... e.g. 2:3, 4:6",
            continuous_update=False,
            layout=W.Layout(width="360px"),
        )
        self.status = W.HTML()
        self.table = W.HTML(layout=W.Layout(width="98%", overflow="auto"))
        self.image = W.Image(format="png", layout=W.Layout(width="520px"))
        self.image.add_class("glm-mask-image")
        controls = W.HBox([self.mode, self.seed, self.spans])
        self.widget = W.VBox([self.text, controls, self.status, self.table, self.image])
        self.widget.add_class("glm-explorer")
        for w in (self.text, self.mode, self.seed, self.spans):
            w.observe(self._on_change, names="value")
        self.update()

    # display as the widget
    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def _on_change(self, _change) -> None:
        self.update()

    def update(self) -> None:
        """Rebuild the example from the controls and redraw (called on every change)."""
        mode = MODES[self.mode.value]
        self.spans.disabled = mode != "manual"
        try:
            text = self.text.value
            if not text.strip():
                raise ValueError("type some text first")
            spans = parse_spans(self.spans.value) if mode == "manual" else None
            if self.fit_words:
                from glmkit.data.tokenizer import WordTokenizer

                self.tokenizer = WordTokenizer.fit(text)
            example, used = _build_for_explorer(self.tokenizer, text, mode, int(self.seed.value), spans)
        except (ValueError, TypeError) as e:
            self.error = str(e)
            self.status.value = f"<span style='color:#cf222e'>⚠ {html.escape(str(e))}</span>"
            return
        f = example_fields(example)
        T = len(f["input_ids"])
        from glmkit.ops.attention import attention_mask

        self.example, self.spans_used, self.error = example, list(used), None
        self.sep = f["sep"]
        self.mask = attention_mask(torch.tensor([self.sep]), T)[0]
        n_text = len(self.tokenizer.encode(self.text.value))
        spans_txt = ", ".join(f"{s}:{e}" for s, e in self.spans_used)
        covered = sum(e - s for s, e in self.spans_used)
        self.status.value = (
            f"{n_text} tokens, {len(self.spans_used)} span(s) [{html.escape(spans_txt)}] "
            f"covering {covered} ({covered / max(n_text, 1):.0%}); Part A = {self.sep} tokens, "
            f"Part B = {T - self.sep}"
        )
        self.table.value = example_table_html(example, self.tokenizer, max_tokens=self.max_tokens)
        labels = self.tokenizer.token_strings(f["input_ids"]) if hasattr(self.tokenizer, "token_strings") else None
        self.image.value = mask_png(self.mask, sep=self.sep, labels=labels)
        self.updates += 1


class LivePlot:
    """A ``train`` callback that redraws the loss curve in place in a notebook output, at most once every
    ``min_interval_s`` (a PNG in one IPython display handle: works in any Jupyter frontend, no backend setting).
    ``train(model, data, cfg, callback=viz.LivePlot())``."""

    def __init__(self, title: str = "training loss", min_interval_s: float = 2.0):
        from IPython.display import display

        self.title, self.min_interval_s = title, min_interval_s
        self.handle = display(self._png(None), display_id=True)
        self._last = time.perf_counter()

    def _png(self, history):
        from IPython.display import Image
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6.4, 3.2), dpi=90, layout="constrained")
        ax = fig.add_subplot()
        if history is not None and history.losses:
            plot_loss(history, ax=ax)
        ax.set_title(self.title)
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return Image(data=buf.getvalue(), format="png")

    def __call__(self, step, metrics, history) -> None:
        now = time.perf_counter()
        if now - self._last >= self.min_interval_s:
            self._last = now
            self.handle.update(self._png(history))

    def finish(self, history) -> None:
        self.handle.update(self._png(history))
