"""Lesson 05's tables, pictures and explorer for Multi-head Latent Attention (GLM-4.7-Flash, GLM-5): what the
inference cache costs on the real configs, what one decode step has to read, and how the split-K decode kernel
cuts the keys of a ragged batch.

    MODELS                           the configs compared: GLM-4-9B, GLM-4.5 with its MHA and MQA what-ifs,
                                     GLM-4.7-Flash, GLM-5 (glmkit presets; the what-ifs change num_key_value_heads)
    model_config(name)               the DecoderConfig behind one of them
    cache_bytes_per_token(cfg)       one token's cache in every layer: the sum of each layer mixer's ``state_bytes``
    cache_table()                    per model: kind, layers, cached values and bytes per token and layer, per token
                                     in all layers, one sequence at 128K
    weights_read(cfg, batch)         the parameter bytes one decode step reads (all but the routed experts, the LM
                                     head, and the experts a batch of tokens is expected to visit)
    decode_bytes(cfg, context, batch)  bytes per generated token: the step's weights shared by the batch, and the
                                     sequence's own cache
    plot_cache_vs_context(...)       cache GiB against context length, one line per model
    plot_decode_bytes(...)           bytes per generated token (weights and cache) as stacked bars
    split_chunks(lengths, chunk, n)  which keys each (row, split) program of the split-K decode kernel reads
    plot_splits(...)                 that as a picture
    CacheExplorer()                  ipywidgets: model, context length, batch, cache dtype → memory and bytes read

How it differs from the lessons before it: lessons 02–04 count parameters (``glmkit.course.counting``); this one
counts the *state* a model keeps while it generates, which MLA is built to shrink. Nothing here computes a cache
size of its own: every figure is ``MIXERS[layer_type].state_bytes`` of the layer's mixer (``glmkit.mixers.attention``,
``mla``, ``dsa``), and the parameter counts come from ``Decoder`` built on the meta device.

The explorer redraws a PNG inside an ``ipywidgets.Image`` (as lessons 02–04 do), carries the CSS class
``mla-cache-explorer`` and can be driven from Python: set ``.model.value``, ``.context.value``, ``.batch.value``,
``.dtype.value`` and read ``.last``.
"""

from __future__ import annotations

import dataclasses
import functools
import io
from collections.abc import Sequence

import numpy as np
import torch

GiB, MiB, KiB = 2**30, 2**20, 2**10
H200_BYTES = 141e9  # one H200's HBM3e (NVIDIA's figure: 141 GB)


@dataclasses.dataclass(frozen=True)
class Model:
    name: str  # as the lesson shows it
    preset: str  # glmkit.models.presets name
    kind: str  # the attention, in words
    kv_heads: int | None = None  # a what-if: num_key_value_heads changed
    what_if: bool = False


MODELS: tuple[Model, ...] = (
    Model("GLM-4-9B", "glm-4-9b", "GQA, 2 KV heads of 128"),
    Model("GLM-4.5", "glm-4.5", "GQA, 8 KV heads of 128"),
    Model("GLM-4.5 as MHA", "glm-4.5", "MHA, 96 KV heads (what-if)", kv_heads=96, what_if=True),
    Model("GLM-4.5 as MQA", "glm-4.5", "MQA, 1 KV head (what-if)", kv_heads=1, what_if=True),
    Model("GLM-4.7-Flash", "glm-4.7-flash", "MLA, latent 512 + RoPE key 64"),
    Model("GLM-5", "glm-5", "MLA 512 + 64, plus DSA's index key 128"),
)
_BY_NAME = {m.name: m for m in MODELS}
CONTEXTS = (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072, 202752)  # the explorer's choices
DTYPES = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}


def _model(name: str) -> Model:
    if name not in _BY_NAME:
        raise KeyError(f"unknown model {name!r}; choose one of {list(_BY_NAME)}")
    return _BY_NAME[name]


@functools.cache
def model_config(name: str):
    """The ``DecoderConfig`` of ``MODELS``' entry ``name`` (a preset; the what-ifs with their KV heads changed)."""
    from glmkit.models.presets import get_config

    m = _model(name)
    return get_config(m.preset) if m.kv_heads is None else get_config(m.preset, num_key_value_heads=m.kv_heads)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def layer_bytes_per_token(cfg, dtype: torch.dtype = torch.bfloat16) -> list[int]:
    """Per layer: the bytes one token adds to that layer's cache (its mixer's ``state_bytes`` at one position)."""
    from glmkit.mixers import MIXERS

    return [MIXERS[t].state_bytes(cfg, 1, dtype=dtype) for t in cfg.layer_types]


def cache_bytes_per_token(cfg, dtype: torch.dtype = torch.bfloat16) -> int:
    """The bytes one token costs in every layer's cache together."""
    return sum(layer_bytes_per_token(cfg, dtype))


def cache_bytes(cfg, context: int, batch: int = 1, dtype: torch.dtype = torch.bfloat16) -> int:
    """The whole model's cache for ``batch`` sequences of ``context`` tokens: Σ over layers of ``state_bytes``."""
    from glmkit.mixers import MIXERS

    return sum(MIXERS[t].state_bytes(cfg, context, batch_size=batch, dtype=dtype) for t in cfg.layer_types)


def cache_table(context: int = 131072) -> list[list]:
    """Rows [model, attention, layers, values per token and layer, bytes per token and layer (bf16), KiB per token
    (all layers), GiB for one sequence of ``context`` tokens]."""
    rows = []
    for m in MODELS:
        cfg = model_config(m.name)
        per_layer = layer_bytes_per_token(cfg)
        if len(set(per_layer)) != 1:
            raise ValueError(f"{m.name}: layers of different cache sizes; the table assumes one")
        rows.append(
            [
                m.name,
                m.kind,
                cfg.num_hidden_layers,
                per_layer[0] // 2,
                per_layer[0],
                sum(per_layer) / KiB,
                cache_bytes(cfg, context) / GiB,
            ]
        )
    return rows


# ----------------------------------------------------------------------------------------------------
# What a decode step reads
# ----------------------------------------------------------------------------------------------------


@functools.cache
def _param_split(name: str) -> tuple[int, int, int]:
    """(parameters read by every token apart from the routed experts, incl. the LM head; parameters of one routed
    expert; MoE layers) of ``MODELS``' entry, from ``Decoder`` on the meta device (no memory, no time)."""
    from glmkit.models.decoder import Decoder

    cfg = model_config(name)
    with torch.device("meta"):
        model = Decoder(cfg)
    n_moe = cfg.mlp_layer_types.count("sparse")
    expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size if n_moe else 0
    head = 0 if cfg.tie_word_embeddings else model.lm_head.weight.numel()
    shared = model.num_active_parameters() - n_moe * cfg.num_experts_per_tok * expert + head
    return shared, expert, n_moe


def expected_experts(n_experts: int, top_k: int, tokens: int) -> float:
    """How many distinct experts ``tokens`` tokens visit when each picks ``top_k`` of ``n_experts`` uniformly at
    random: E · (1 − (1 − k/E)^tokens). One token: k; a large batch: all E."""
    if n_experts == 0:
        return 0.0
    return n_experts * (1.0 - (1.0 - top_k / n_experts) ** tokens)


def weights_read(name: str, batch: int = 1, itemsize: int = 2) -> float:
    """Parameter bytes one decode step of ``batch`` sequences reads once: every weight a token passes through
    except the routed experts (attention, norms, dense FFNs, router, shared experts, LM head), plus, in every MoE
    layer, the experts the batch is expected to visit (uniform routing; the embedding rows are negligible)."""
    cfg = model_config(name)
    shared, expert, n_moe = _param_split(name)
    visited = expected_experts(cfg.n_routed_experts if n_moe else 0, cfg.num_experts_per_tok, batch)
    return itemsize * (shared + n_moe * visited * expert)


def decode_bytes(name: str, context: int, batch: int = 1, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Per generated token of one sequence in a decode step of ``batch`` sequences at ``context`` cached tokens:
    ``weights`` (the step's weight bytes / batch), ``cache`` (its own cache, read once), ``total`` and
    ``cache_share``. Decoding is memory-bound, so bytes are time: the step takes at least its bytes over the
    memory bandwidth."""
    w = weights_read(name, batch) / batch
    c = cache_bytes(model_config(name), context, 1, dtype)
    return {"weights": w, "cache": c, "total": w + c, "cache_share": c / (w + c)}


# ----------------------------------------------------------------------------------------------------
# Pictures
# ----------------------------------------------------------------------------------------------------


def _axes(ax, figsize=(7, 4)):
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=figsize)
    return ax


def _colour(name: str) -> str:
    return f"C{[m.name for m in MODELS].index(name)}"


def plot_cache_vs_context(
    names: Sequence[str] | None = None,
    batch: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    ax=None,
    mark: int | None = None,
    memory_line: bool = True,
):
    """The cache of ``batch`` sequences (GiB) against context length (thousands of tokens), one line per model,
    each up to its ``max_position_embeddings``; both axes from zero. ``mark``: a context to draw as a dotted line;
    ``memory_line``: one H200's memory as a dashed line when the lines reach it."""
    ax = _axes(ax)
    names = [m.name for m in MODELS] if names is None else list(names)
    top = 0.0
    for name in names:
        cfg = model_config(name)
        lengths = np.linspace(0, cfg.max_position_embeddings, 65).astype(int)
        gib = [cache_bytes(cfg, int(L), batch, dtype) / GiB for L in lengths]
        style = "--" if _model(name).what_if else "-"
        ax.plot(lengths / 1000, gib, style, color=_colour(name), lw=2, label=f"{name} ({_model(name).kind})")
        top = max(top, gib[-1])
    if memory_line and top > H200_BYTES / GiB:
        ax.axhline(H200_BYTES / GiB, color="k", ls="--", lw=1)
        ax.text(2, H200_BYTES / GiB, " one H200 (141 GB)", va="bottom", fontsize=8)
    if mark is not None:
        ax.axvline(mark / 1000, color="k", ls=":", lw=1)
    ax.set_xlim(0, None)
    ax.set_ylim(0, None)
    ax.set_xlabel("context length (thousands of tokens)")
    ax.set_ylabel(f"cache, GiB ({'one sequence' if batch == 1 else f'batch {batch}'})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return ax


def plot_decode_bytes(
    context: int, batch: int = 1, names: Sequence[str] | None = None, dtype=torch.bfloat16, ax=None, chosen=None
):
    """Bytes per generated token at ``context`` and ``batch``: the weights' share and the cache's, stacked, one bar
    per model (GiB, from zero); ``chosen`` is outlined."""
    ax = _axes(ax, figsize=(7, 3.2))
    names = [m.name for m in MODELS] if names is None else list(names)
    rows = [decode_bytes(n, context, batch, dtype) for n in names]
    y = np.arange(len(names))
    w = np.array([r["weights"] for r in rows]) / GiB
    c = np.array([r["cache"] for r in rows]) / GiB
    ax.barh(y, w, color="#9aa5b1", label="weights (the step's, shared by the batch)")
    bars = ax.barh(y, c, left=w, color=[_colour(n) for n in names], label="this sequence's cache")
    for i, n in enumerate(names):
        if n == chosen:
            bars[i].set_edgecolor("k")
            bars[i].set_linewidth(2)
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, None)
    ax.set_xlabel("GiB read per generated token")
    ax.set_title(f"context {context:,} tokens, batch {batch}", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    return ax


def split_chunks(lengths: Sequence[int], chunk: int, num_splits: int) -> np.ndarray:
    """[rows, splits, 2]: the key range [lo, hi) that program (row, split) of the split-K decode kernel reads:
    split s covers [s · chunk, (s + 1) · chunk) cut at the row's length; hi <= lo means it reads nothing."""
    out = np.zeros((len(lengths), num_splits, 2), dtype=np.int64)
    for b, n in enumerate(lengths):
        for s in range(num_splits):
            lo = s * chunk
            out[b, s] = (lo, max(lo, min(lo + chunk, int(n))))
    return out


def plot_splits(lengths: Sequence[int], chunk: int, num_splits: int, ax=None):
    """Rows of a ragged batch against key positions: each cached key coloured by the split that reads it, positions
    past a row's length white; the chunk boundaries as lines; the count of programs that read nothing in the title."""
    import matplotlib.colors as mcolors

    ax = _axes(ax, figsize=(8, 0.5 * len(lengths) + 1.2))
    L = chunk * num_splits
    ranges = split_chunks(lengths, chunk, num_splits)
    grid = np.full((len(lengths), L), -1.0)
    for b in range(len(lengths)):
        for s, (lo, hi) in enumerate(ranges[b]):
            grid[b, lo:hi] = s
    cmap = mcolors.ListedColormap(["#ffffff"] + [f"C{s % 10}" for s in range(num_splits)])
    ax.imshow(grid + 1, aspect="auto", cmap=cmap, vmin=-0.5, vmax=num_splits + 0.5, interpolation="nearest")
    for s in range(1, num_splits):
        ax.axvline(s * chunk - 0.5, color="k", lw=1)
    empty = int((ranges[..., 1] <= ranges[..., 0]).sum())
    labels = [f"row {b}: {n} key{'' if n == 1 else 's'}" for b, n in enumerate(lengths)]
    ax.set_yticks(range(len(lengths)), labels, fontsize=8)
    ax.set_xlabel("key position in the cache")
    ax.set_title(
        f"{num_splits} splits of {chunk} keys: colour = the program that reads the key; "
        f"{empty} of {ranges.shape[0] * num_splits} programs read nothing and exit",
        fontsize=9,
    )
    return ax


def _png(fig, dpi: int = 72) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def human_bytes(n: float) -> str:
    """1536 → '1.5 KiB' (binary units)."""
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= size:
            return f"{n / size:.{1 if n / size < 100 else 0}f} {unit}"
    return f"{n:.0f} B"


# ----------------------------------------------------------------------------------------------------
# The explorer
# ----------------------------------------------------------------------------------------------------


def _context_label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else f"{n / 1024:.0f}K"


class CacheExplorer:
    """Pick a model, a context length, a batch size and the cache's dtype; see the cache's memory and what a
    decode step reads per generated token (weights against cache), for that model and next to the others.

    ``.last`` holds the numbers shown: ``cache_per_token`` (bytes, all layers), ``cache_sequence``,
    ``cache_batch``, ``weights``, ``cache``, ``total``, ``cache_share``, ``fits`` (the batch's cache fits one H200
    beside nothing else). CSS class ``mla-cache-explorer``."""

    def __init__(self, model: str = "GLM-4.7-Flash", context: int = 32768, batch: int = 32, dtype: str = "bf16"):
        import ipywidgets as W

        _model(model)
        if context not in CONTEXTS:
            raise ValueError(f"context must be one of {CONTEXTS}, got {context}")
        style = dict(style={"description_width": "initial"})
        self.model = W.Dropdown(options=[m.name for m in MODELS], value=model, description="model", **style)
        self.context = W.SelectionSlider(
            options=[(_context_label(n), n) for n in CONTEXTS],
            value=context,
            description="context",
            continuous_update=False,
            **style,
        )
        self.batch = W.Dropdown(options=[1, 8, 32, 128, 512], value=batch, description="batch", **style)
        self.dtype = W.ToggleButtons(options=list(DTYPES), value=dtype, description="cache dtype", **style)
        self.status = W.HTML()
        self.image = W.Image(format="png", layout=W.Layout(width="900px"))
        self.image.add_class("mla-cache-image")
        controls = W.HBox([self.model, self.context, self.batch])
        self.widget = W.VBox([controls, self.dtype, self.status, self.image])
        self.widget.add_class("mla-cache-explorer")
        self.last: dict = {}
        self.updates = 0
        for w in (self.model, self.context, self.batch, self.dtype):
            w.observe(lambda _change: self.update(), names="value")
        self.update()

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def numbers(self) -> dict:
        name, L, B = self.model.value, int(self.context.value), int(self.batch.value)
        dt = DTYPES[self.dtype.value]
        cfg = model_config(name)
        per_seq = cache_bytes(cfg, L, 1, dt)
        d = decode_bytes(name, L, B, dt)
        return {
            "model": name,
            "context": L,
            "batch": B,
            "cache_per_token": cache_bytes_per_token(cfg, dt),
            "cache_sequence": per_seq,
            "cache_batch": B * per_seq,
            "fits": B * per_seq <= H200_BYTES,
            "over_max_context": L > cfg.max_position_embeddings,
            **d,
        }

    def update(self) -> None:
        from matplotlib.figure import Figure

        r = self.numbers()
        dt = DTYPES[self.dtype.value]
        fig = Figure(figsize=(12.5, 3.8), layout="constrained")
        ax0, ax1 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.25, 1]})
        plot_decode_bytes(r["context"], r["batch"], dtype=dt, ax=ax0, chosen=r["model"])
        plot_cache_vs_context([r["model"]], batch=r["batch"], dtype=dt, ax=ax1, mark=r["context"])
        self.image.value = _png(fig)
        note = ""
        if r["over_max_context"]:
            note = (
                f" ⚠ {r['model']} takes at most {model_config(r['model']).max_position_embeddings:,} tokens; "
                "the figures extrapolate."
            )
        fit = "fits in" if r["fits"] else "does <b>not</b> fit in"
        self.status.value = (
            f"<b>{r['model']}</b>, {r['context']:,} tokens, batch {r['batch']}, {self.dtype.value} cache: "
            f"{human_bytes(r['cache_per_token'])} per token (all layers), <b>{human_bytes(r['cache_sequence'])}</b> "
            f"per sequence, {human_bytes(r['cache_batch'])} for the batch ({fit} one H200's 141 GB, before any "
            f"weights).<br>Per generated token a decode step reads {human_bytes(r['weights'])} of weights (its share) "
            f"and {human_bytes(r['cache'])} of cache: <b>the cache is {r['cache_share']:.0%} of the bytes</b>.{note}"
        )
        self.last = r
        self.updates += 1


def arithmetic_intensity(heads: int, latent: int = 512, rope: int = 64, queries: int = 1, itemsize: int = 2) -> float:
    """FLOPs per byte of the absorbed decode over one cached row [c_KV | k_rot]: every head of every query takes
    a dot product with the row (latent + rope) and adds the row into its output (latent), 2 FLOPs per
    multiply-add, over the row's bytes."""
    return 2 * heads * queries * (latent + rope + latent) / ((latent + rope) * itemsize)


__all__ = [
    "MODELS",
    "CONTEXTS",
    "H200_BYTES",
    "model_config",
    "layer_bytes_per_token",
    "cache_bytes_per_token",
    "cache_bytes",
    "cache_table",
    "expected_experts",
    "weights_read",
    "decode_bytes",
    "arithmetic_intensity",
    "plot_cache_vs_context",
    "plot_decode_bytes",
    "split_chunks",
    "plot_splits",
    "human_bytes",
    "CacheExplorer",
]
