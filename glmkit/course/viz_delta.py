"""Lesson 07's toys, pictures and explorers: associative recall with a memory of fixed size, forgetting, the chunk
schedule of the chunkwise delta rule, and the memory of a hybrid stack against a KV cache.

Nothing here defines a recurrence: the memories are ``glmkit.ops.delta_rule``'s references (or the learner's own
functions, passed in), the state sizes come from each mixer's ``state_bytes``.

    RecallTask                      keys and values written one per token, queries with their right answers; a read
                                    is decoded to the nearest stored value, or to "nothing" when it is closer to 0
    variable_store(n, updates)      n variables, each assigned ``updates`` times in random order: recall the latest
    distinct_pairs(n)               n different keys written once each: recall every one (capacity)
    context_switch()                facts, document 1, a boundary token, document 2 (what forgetting is for)
    memory_state(kind, task)        H [K, V] after the writes: "linear" attention or the "delta" rule
    softmax_reads(task)             softmax attention over all the writes (a KV cache) for the task's queries
    RecallExplorer()                ipywidgets: variables, updates, key size, β, seeds → recall of both memories
    plot_chunk_schedule(T, C)       the recurrent schedule (T steps) against the chunked one (T / C steps)
    layer_pattern(n, every)         mixer names with one full-attention layer in every ``every`` (0: none)
    stack_state_bytes(cfg, types)   the decoding state of a stack of layers, from each mixer's ``state_bytes``
    plot_memory(cfg, stacks)        state bytes against context length, log-log
    MemoryExplorer(cfg)             ipywidgets: full-attention share, context length, batch → memory per stack
                                    (default: the ``glm-5.3-flash`` preset's KDA and DSA layers)

How it differs from before: lessons 03 and 04 keep their helpers in ``viz_blocks`` and ``viz_moe``; this is the same
for lesson 07, so that its cells say what is computed and this file says how it is drawn.
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from glmkit.ops.delta_rule import delta_rule_reference, linear_attention_reference

NOTHING = -1  # the answer "no value stored for this key" (the read is closer to 0 than to any value)
COLORS = {"linear attention": "tab:red", "DeltaNet": "tab:blue", "softmax attention": "tab:green"}


# ----------------------------------------------------------------------------------------------------
# Associative recall
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RecallTask:
    """Writes (``keys`` [T, K] unit vectors, ``values`` [T, V] drawn from ``book`` [M, V] unit vectors), queries
    [n, K] and their answers [n] (an index into ``book``, or ``NOTHING``)."""

    keys: torch.Tensor
    values: torch.Tensor
    queries: torch.Tensor
    answers: torch.Tensor
    book: torch.Tensor

    def decode(self, reads: torch.Tensor) -> torch.Tensor:
        """[n, V] reads → [n] the nearest value of the book (Euclidean), or NOTHING when 0 is nearer."""
        candidates = torch.cat([torch.zeros(1, self.book.shape[1]), self.book])
        return torch.cdist(reads.float(), candidates).argmin(-1) - 1

    def accuracy(self, reads: torch.Tensor) -> float:
        """Share of queries whose read decodes to the right answer."""
        return float((self.decode(reads) == self.answers).float().mean())

    def state_accuracy(self, H: torch.Tensor) -> float:
        """Accuracy of a memory H [K, V] read with the queries (read = Hᵀ q)."""
        return self.accuracy(self.queries @ H.float())


def _unit(n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=gen), dim=-1)


def variable_store(n_vars: int, updates: int, key_dim: int = 32, n_values: int = 64, seed: int = 0) -> RecallTask:
    """``n_vars`` variables (one random key each), every one assigned ``updates`` times, the n_vars · updates writes
    in random order; query every variable: the answer is its latest value ("x = 3 … x = 5 … x?" → 5)."""
    gen = torch.Generator().manual_seed(seed)
    keys, book = _unit(n_vars, key_dim, gen), _unit(n_values, key_dim, gen)
    order = torch.arange(n_vars).repeat(updates)[torch.randperm(n_vars * updates, generator=gen)]
    labels = torch.randint(0, n_values, (len(order),), generator=gen)
    latest = torch.empty(n_vars, dtype=torch.long)
    for t, var in enumerate(order.tolist()):  # a later write of a variable replaces its answer
        latest[var] = labels[t]
    return RecallTask(keys[order], book[labels], keys, latest, book)


def distinct_pairs(n: int, key_dim: int = 32, n_values: int = 64, seed: int = 0) -> RecallTask:
    """``n`` different random keys, each written once with a random value; query all of them. A memory of K × V
    numbers cannot keep more than about K such pairs apart; a KV cache keeps all."""
    gen = torch.Generator().manual_seed(seed)
    keys, book = _unit(n, key_dim, gen), _unit(n_values, key_dim, gen)
    labels = torch.randint(0, n_values, (n,), generator=gen)
    return RecallTask(keys, book[labels], keys, labels, book)


@dataclasses.dataclass
class ContextSwitch:
    """Facts (keys in the first half of the channels), document 1 and, after a boundary token that writes nothing
    (β = 0), document 2 (keys in the second half). ``groups``: name → RecallTask of the same writes with that
    group's queries: the facts should survive, document 2 should be recalled, document 1 should be gone."""

    keys: torch.Tensor
    values: torch.Tensor
    beta: torch.Tensor  # [T]: 1, and 0 at the boundary
    boundary: int
    fact_channels: slice
    doc_channels: slice
    groups: dict[str, RecallTask]


def context_switch(
    n_facts: int = 8, n_doc1: int = 16, n_doc2: int = 12, key_dim: int = 32, n_values: int = 64, seed: int = 0
) -> ContextSwitch:
    gen = torch.Generator().manual_seed(seed)
    half = key_dim // 2

    def keys(n, first_half):
        x, z = torch.randn(n, half, generator=gen), torch.zeros(n, key_dim - half)
        return F.normalize(torch.cat([x, z] if first_half else [z, x], 1), dim=-1)

    facts, doc1, doc2 = keys(n_facts, True), keys(n_doc1, False), keys(n_doc2, False)
    book = _unit(n_values, key_dim, gen)
    lf, l1, l2 = (torch.randint(0, n_values, (n,), generator=gen) for n in (n_facts, n_doc1, n_doc2))
    ks = torch.cat([facts, doc1, torch.zeros(1, key_dim), doc2])
    vs = book[torch.cat([lf, l1, l1[:1], l2])]
    beta = torch.ones(len(ks))
    boundary = n_facts + n_doc1
    beta[boundary] = 0.0
    groups = {
        "facts (should stay)": RecallTask(ks, vs, facts, lf, book),
        "document 2 (should be right)": RecallTask(ks, vs, doc2, l2, book),
        "document 1 (should be gone)": RecallTask(ks, vs, doc1, torch.full((n_doc1,), NOTHING), book),
    }
    return ContextSwitch(ks, vs, beta, boundary, slice(0, half), slice(half, key_dim), groups)


def _one_head(x: torch.Tensor) -> torch.Tensor:
    return x[None, :, None]  # [T, D] → [1, T, 1, D]: one sequence, one head


def memory_state(kind: str, task: RecallTask, beta: float = 1.0, fn: Callable | None = None) -> torch.Tensor:
    """H [K, V] after all the writes of ``task`` with scale 1: ``kind`` "linear" (H += k vᵀ) or "delta" (the delta
    rule with step size ``beta``), computed by glmkit's references, or by ``fn`` when given (a learner's version
    with the same signature as the reference)."""
    k, v = _one_head(task.keys), _one_head(task.values)
    if kind == "linear":
        ref = fn or linear_attention_reference
        _, H = ref(k, k, v, scale=1.0, output_final_state=True)
    elif kind == "delta":
        ref = fn or delta_rule_reference
        _, H = ref(k, k, v, torch.full((1, k.shape[1], 1), float(beta)), scale=1.0, output_final_state=True)
    else:
        raise ValueError(f"kind must be 'linear' or 'delta', got {kind!r}")
    return H[0, 0]


def softmax_reads(task: RecallTask, sharpness: float = 16.0) -> torch.Tensor:
    """Softmax attention over every write (the KV cache): reads [n, V] = softmax(sharpness · Q Kᵀ) V. With
    repeated keys it averages the values of a variable (no notion of "latest" without positions)."""
    return torch.softmax(sharpness * task.queries @ task.keys.T, dim=-1) @ task.values


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def recall_runs(
    make_task: Callable[[int], RecallTask],
    seeds: Sequence[int],
    beta: float = 1.0,
    memories: Sequence[str] = ("linear attention", "DeltaNet"),
) -> dict[str, list[float]]:
    """{memory: [accuracy per seed]} on ``make_task(seed)``, for ``memories`` among linear attention, DeltaNet (step
    size ``beta``) and softmax attention (over all the writes)."""
    out: dict[str, list[float]] = {name: [] for name in memories}
    for s in seeds:
        task = make_task(s)
        for name in memories:
            if name == "linear attention":
                out[name].append(task.state_accuracy(memory_state("linear", task)))
            elif name == "DeltaNet":
                out[name].append(task.state_accuracy(memory_state("delta", task, beta)))
            elif name == "softmax attention":
                out[name].append(task.accuracy(softmax_reads(task)))
            else:
                raise ValueError(f"unknown memory {name!r}; choose among {list(COLORS)}")
    return out


def _png(fig, dpi: int = 80) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


class RecallExplorer:
    """ipywidgets: the variable-store task with sliders for the number of variables, the updates per variable, the
    key size K, DeltaNet's β and the number of seeds; bars of recall (mean ± std over seeds) for linear attention
    and DeltaNet. Without a frontend: set the sliders' ``.value`` and read ``.result``
    ({memory: (mean, std)})."""

    def __init__(self, n_vars: int = 8, updates: int = 4, key_dim: int = 32, beta: float = 1.0, seeds: int = 5):
        import ipywidgets as W

        slider = dict(continuous_update=False, style={"description_width": "initial"})
        self.n_vars = W.IntSlider(value=n_vars, min=1, max=64, description="variables", **slider)
        self.updates = W.IntSlider(value=updates, min=1, max=16, description="updates per variable", **slider)
        self.key_dim = W.Dropdown(options=[8, 16, 32, 64, 128], value=key_dim, description="key size K")
        self.beta = W.FloatSlider(value=beta, min=0.05, max=1.0, step=0.05, description="β (DeltaNet)", **slider)
        self.seeds = W.IntSlider(value=seeds, min=1, max=20, description="seeds", **slider)
        self.status = W.HTML()
        self.image = W.Image(format="png", layout=W.Layout(width="640px"))
        controls = [self.n_vars, self.updates, self.key_dim, self.beta, self.seeds]
        self.widget = W.VBox([W.HBox(controls[:3]), W.HBox(controls[3:]), self.status, self.image])
        self.widget.add_class("recall-explorer")
        self.result: dict[str, tuple[float, float]] = {}
        for w in controls:
            w.observe(lambda _change: self.update(), names="value")
        self.update()

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def update(self) -> None:
        from matplotlib.figure import Figure

        n, u, K = int(self.n_vars.value), int(self.updates.value), int(self.key_dim.value)
        runs = recall_runs(lambda s: variable_store(n, u, K, seed=s), range(int(self.seeds.value)), self.beta.value)
        self.result = {name: mean_std(acc) for name, acc in runs.items()}
        fig = Figure(figsize=(7.2, 2.2), layout="constrained")
        ax = fig.add_subplot()
        names = list(self.result)
        ax.barh(names, [self.result[m][0] for m in names], xerr=[self.result[m][1] for m in names],
                color=[COLORS[m] for m in names], capsize=4)  # fmt: skip
        ax.set_xlim(0, 1.05)
        ax.set_xlabel("share of variables recalled with their latest value")
        ax.invert_yaxis()
        ax.set_title(f"{n} variables × {u} updates, K = {K}, β = {self.beta.value:.2f}, {self.seeds.value} seeds")
        self.image.value = _png(fig)
        self.status.value = (
            f"{n * u} writes into a {K}×{K} memory. Linear attention reads the <i>sum</i> of all the values a "
            "variable was given; DeltaNet replaces the old value (with β = 1 exactly, along the variable's key)."
        )


# ----------------------------------------------------------------------------------------------------
# The chunk schedule
# ----------------------------------------------------------------------------------------------------


def plot_chunk_schedule(T: int = 16, C: int = 4, ax=None):
    """Top: the recurrence, T sequential steps, each reading and writing the whole state H. Bottom: the chunked form.
    The triangles (the C × C work inside a chunk: A, T = (I + A)⁻¹, W, U and the intra-chunk outputs) need no state,
    so they run for all chunks at once; then T / C sequential steps carry H from chunk to chunk, each a few matmuls
    (V' = U − W H_n, O = Q H_n + intra, H_n+1 = H_n + K'ᵀ V')."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, Polygon, Rectangle

    if ax is None:
        _, ax = plt.subplots(figsize=(12, 4.6))
    n = math.ceil(T / C)
    arrow = dict(arrowstyle="->", mutation_scale=10, color="k", lw=1)
    for t in range(T):  # the recurrence: one token, one state update, in order
        ax.add_patch(Rectangle((t + 0.05, 3.6), 0.9, 0.55, color="tab:red", alpha=0.25 + 0.6 * t / T))
        if t < T - 1:
            ax.add_patch(FancyArrowPatch((t + 0.95, 3.87), (t + 1.05, 3.87), **arrow))
    ax.text(-0.4, 3.87, f"recurrent: {T} sequential steps", ha="right", va="center", fontsize=10)
    for c in range(n + 1):  # the states at the chunk boundaries
        x = min(c * C, T)
        ax.add_patch(Rectangle((x - 0.3, 2.55), 0.6, 0.5, color="tab:orange"))
        ax.text(x, 2.8, f"H{c}", ha="center", va="center", fontsize=8)
    for c in range(n):
        x0, w = c * C, min(C, T - c * C)
        ax.add_patch(Rectangle((x0 + 0.35, 1.75), w - 0.7, 0.55, color="tab:blue", alpha=0.35))
        ax.text(x0 + w / 2, 2.02, "V′ = U − W·H, O", ha="center", va="center", fontsize=7)
        ax.add_patch(FancyArrowPatch((x0 + 0.2, 2.55), (x0 + 0.6, 2.3), **arrow))  # H_c is read by chunk c ...
        ax.add_patch(FancyArrowPatch((x0 + w - 0.6, 2.3), (min(x0 + w, T) - 0.2, 2.55), **arrow))  # ... → H_c+1
        ax.add_patch(Polygon([(x0 + 0.1, 0.2), (x0 + 0.1, 1.5), (x0 + w - 0.1, 0.2)], color="tab:blue", alpha=0.2))
        ax.text(x0 + 0.25, 0.45, "A, (I+A)⁻¹\nW, U", fontsize=7, va="bottom")
    ax.text(-0.4, 2.4, f"chunked, C = {C}: {n} sequential steps", ha="right", va="center", fontsize=10)
    ax.text(-0.4, 0.8, "all chunks at once (no H needed)", ha="right", va="center", fontsize=10, color="tab:blue")
    ax.set_xlim(-8.5, T + 0.6)
    ax.set_ylim(0, 4.4)
    ax.axis("off")
    ax.set_title(f"{T} tokens: the recurrence steps token by token, the chunked form chunk by chunk")
    return ax


# ----------------------------------------------------------------------------------------------------
# Memory: a recurrent state against a KV cache
# ----------------------------------------------------------------------------------------------------


def layer_pattern(n_layers: int, every: int, linear: str = "kda", full: str = "dsa") -> list[str]:
    """Mixer names of a stack: layer i is ``full`` when i % every == every − 1 (GLM-5.3-Flash and Qwen3-Next with
    every = 4: three linear layers, then one full), else ``linear``; every = 1: all full; every = 0: all linear."""
    if every == 0:
        return [linear] * n_layers
    return [full if i % every == every - 1 else linear for i in range(n_layers)]


def stack_state_bytes(cfg, layer_types: Sequence[str], seq_len: int, batch_size: int = 1, dtype=torch.bfloat16) -> int:
    """Bytes of the decoding state of a stack with these mixers after ``seq_len`` tokens: the sum of each mixer's
    ``state_bytes`` (grows with seq_len for attention and MLA, fixed for the delta-rule layers)."""
    from glmkit.mixers import MIXERS

    return sum(MIXERS[t].state_bytes(cfg, seq_len, batch_size=batch_size, dtype=dtype) for t in layer_types)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def plot_memory(cfg, stacks: Mapping[str, Sequence[str]], lengths=None, batch_size: int = 1, ax=None, mark=None):
    """Decoding-state bytes (bf16 caches, fp32 recurrent states) against context length, one line per stack
    (name → mixer names), log-log; ``mark``: a context length to draw as a vertical line."""
    import matplotlib.pyplot as plt

    lengths = np.unique(np.logspace(8, 20, 49, base=2).astype(int)) if lengths is None else np.asarray(lengths)
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 4))
    for i, (name, types) in enumerate(stacks.items()):
        gib = [stack_state_bytes(cfg, types, int(L), batch_size) / 2**30 for L in lengths]
        ax.plot(lengths, gib, label=name, lw=2, color=f"C{i}")
    if mark:
        ax.axvline(mark, color="k", ls=":", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(f"decoding state, GiB (batch {batch_size})")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    return ax


EVERY = {"all full attention": 1, "1 : 1": 2, "3 : 1 (GLM-5.3-Flash)": 4, "7 : 1": 8, "all linear (KDA)": 0}


class MemoryExplorer:
    """ipywidgets: pick the ratio of linear to full-attention layers, a context length and a batch size; see the
    decoding state of that stack against the all-attention stack over context length, and the numbers at the
    chosen length. Without a frontend: set ``.ratio``, ``.log2_len``, ``.batch`` values and read ``.result``."""

    def __init__(self, cfg=None, ratio: str = "3 : 1 (GLM-5.3-Flash)", log2_len: int = 17, batch: int = 1):
        import ipywidgets as W

        if cfg is None:
            from glmkit.models.presets import get_config

            cfg = get_config("glm-5.3-flash")
        self.cfg = cfg
        style = dict(continuous_update=False, style={"description_width": "initial"})
        self.ratio = W.Dropdown(options=list(EVERY), value=ratio, description="linear : full")
        self.log2_len = W.IntSlider(value=log2_len, min=10, max=20, description="context = 2^", **style)
        self.batch = W.Dropdown(options=[1, 8, 32, 128], value=batch, description="batch")
        self.status = W.HTML()
        self.image = W.Image(format="png", layout=W.Layout(width="680px"))
        self.widget = W.VBox([W.HBox([self.ratio, self.log2_len, self.batch]), self.status, self.image])
        self.widget.add_class("memory-explorer")
        self.result: dict[str, int] = {}
        for w in (self.ratio, self.log2_len, self.batch):
            w.observe(lambda _change: self.update(), names="value")
        self.update()

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def update(self) -> None:
        from matplotlib.figure import Figure

        n, L, B = self.cfg.num_hidden_layers, 2 ** int(self.log2_len.value), int(self.batch.value)
        chosen = layer_pattern(n, EVERY[self.ratio.value])
        stacks = {self.ratio.value: chosen, "all full attention (DSA)": layer_pattern(n, 1)}
        self.result = {name: stack_state_bytes(self.cfg, types, L, B) for name, types in stacks.items()}
        fig = Figure(figsize=(8, 3.6), layout="constrained")
        plot_memory(self.cfg, stacks, batch_size=B, ax=fig.add_subplot(), mark=L)
        self.image.value = _png(fig)
        mine, full = self.result[self.ratio.value], self.result["all full attention (DSA)"]
        n_lin = sum(t == "kda" for t in chosen)
        self.status.value = (
            f"{n_lin} linear + {n - n_lin} full layers, {L:,} tokens, batch {B}: <b>{human_bytes(mine)}</b> against "
            f"{human_bytes(full)} for all full attention ({full / mine:.1f}× less)."
        )


__all__ = [
    "NOTHING",
    "RecallTask",
    "variable_store",
    "distinct_pairs",
    "ContextSwitch",
    "context_switch",
    "memory_state",
    "softmax_reads",
    "mean_std",
    "recall_runs",
    "RecallExplorer",
    "plot_chunk_schedule",
    "layer_pattern",
    "stack_state_bytes",
    "human_bytes",
    "plot_memory",
    "EVERY",
    "MemoryExplorer",
]
