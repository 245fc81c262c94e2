"""Pictures, widgets and a small balancing experiment for lesson 04 (Mixture of Experts, GLM-4.5).

Nothing here routes, balances or permutes on its own: the routers, ``expert_load``, ``max_violation``
and ``update_bias`` are ``glmkit.moe``'s, the parameter counts ``glmkit.course.counting``', the permutation
``glmkit.ops.moe_align``'s. This module only draws what they return and runs the toy experiment that
makes load balancing visible on a CPU in a second.

    param_breakdown(cfg)              (component, total, active) rows that add up to param_counts(cfg)
    plot_param_breakdown(cfg)         total vs active parameters per component, as bars
    plot_router(scores, idx, w)       tokens × experts heatmap of router scores, chosen experts boxed
    RouterExplorer()                  ipywidgets: router kind, selection bias, scaling, groups → picture
    ClusterTask, balance_run(...)     a one-layer MoE (glmkit.moe.MoE) trained on a synthetic regression,
                                      recording per-step expert loads, MaxVio, loss and the router bias
    plot_load_heatmap(loads)          experts × steps heatmap of load / mean load (1 = balanced)
    plot_layer_loads(steps, shares)   the same for every MoE layer of a model (glmkit.train.History)
    plot_load(history)                a training run's MaxVio per step
    plot_max_violation(runs)          MaxVio against step for several runs
    BalanceExplorer()                 ipywidgets: router, γ, aux-loss α, init skew → heatmap and curves
    count_tensor_ops(fn)              the torch calls that return a tensor (≈ GPU kernel launches), by name
    alignment_cells(...)              what each position of moe_align's output holds (slot, expert, pad)
    plot_alignment(...)               the permutation: slots in router order → sorted, padded blocks
    parse_bench(text)                 the meta lines and the "Ratios vs targets" table of a benchmark
                                      result file (benchmarks/results/moe_h200.md)
    plot_speedups(rows)               measured speed-ups as bars, the targets marked
    plot_loss_vs_compute(runs)        loss against training FLOPs (≈ 6 · active params · tokens)

Widgets are redrawn as PNGs inside ``ipywidgets.Image`` (the way lessons 02 and 03 do it), carry CSS
classes (``moe-router-explorer``, ``moe-balance-explorer``) and can be driven from Python: set a
control's ``.value`` and read ``.last``. Without ipywidgets their constructors raise ImportError; the
lesson then draws the same picture statically.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import math
import re
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from glmkit import moe
from glmkit.course.counting import param_counts

B = 1_000_000_000

# One colour per expert (tab20 has 20; more experts cycle).
_EXPERT_CMAP = "tab20"
PAD_COLOR = "#ffffff"
TAIL_COLOR = "#e4e4e4"


def expert_color(e: int):
    import matplotlib

    return matplotlib.colormaps[_EXPERT_CMAP](int(e) % 20)


@contextlib.contextmanager
def single_thread():
    """Run torch on one CPU thread inside the block (restored after). Tiny models step ~10× faster on
    one thread than on two: measured 0.5 s vs 6 s for ``balance_run``'s 300 steps on a 2-core machine,
    where thread hand-offs cost more than the matmuls they split."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _new_ax(ax, figsize):
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=figsize)
    return ax


def _png(fig, dpi: int = 72) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------
# 1. Capacity vs compute: where GLM-4.5's parameters are
# ----------------------------------------------------------------------------------------------------


def param_breakdown(cfg) -> list[tuple[str, int, int]]:
    """(component, total, active per token) for ``cfg``, in the convention of ``param_counts``:

    the totals add up to ``param_counts(cfg).total`` and the actives to ``param_counts(cfg).active``
    (which leaves out the embedding table and the LM head, as the published "A32B" does: both rows
    are listed with active 0). Attention includes each layer's two RMSNorms; "router" includes the
    selection bias (a buffer, stored in the checkpoint).
    """
    c = param_counts(cfg)
    H, I = cfg.hidden_size, cfg.moe_intermediate_size
    expert = 3 * H * I
    L_moe = c.n_moe_layers
    router = L_moe * (cfg.n_routed_experts * H + cfg.n_routed_experts)
    shared = L_moe * cfg.n_shared_experts * expert
    routed_total = L_moe * cfg.n_routed_experts * expert
    routed_active = L_moe * cfg.num_experts_per_tok * expert
    attn = (c.n_dense_layers + L_moe) * c.attention
    dense = c.n_dense_layers * c.dense_ffn
    return [
        ("embedding", c.embedding, 0),
        ("attention + norms", attn + c.final_norm, attn + c.final_norm),
        (f"dense FFN (first {c.n_dense_layers} layers)", dense, dense),
        ("router (+ bias)", router, router),
        ("shared expert", shared, shared),
        ("routed experts", routed_total, routed_active),
        ("LM head", c.lm_head, 0),
    ]


def plot_param_breakdown(cfg, ax=None, log: bool = False):
    """Horizontal bars: each component's total parameters (light) and the part one token uses (dark),
    in billions. Embedding and LM head are hatched: outside the published 'active' figure.
    ``cfg`` is a DecoderConfig or a preset name; the title names the preset it equals, if any."""
    from glmkit.models.presets import PRESETS, get_config

    title = cfg if isinstance(cfg, str) else next((n for n, p in PRESETS.items() if p == cfg), "model")
    cfg = get_config(cfg)
    ax = _new_ax(ax, (7, 3.2))
    rows = param_breakdown(cfg)
    names = [r[0] for r in rows]
    tot = np.array([r[1] for r in rows], dtype=float) / B
    act = np.array([r[2] for r in rows], dtype=float) / B
    y = np.arange(len(rows))[::-1]
    bars_t = ax.barh(y, tot, color="#c6dbef", edgecolor="#6b8fb8", label="total (stored)")
    bars_a = ax.barh(y, act, height=0.5, color="#2b6cb0", label="active per token")
    for b, (_, _, a) in zip(bars_t, rows):
        if a == 0:
            b.set_hatch("//")
    for yi, t, a in zip(y, tot, act):
        ax.text(t, yi, f" {t:.1f}B" + (f" ({a:.1f}B active)" if 0 < a < t else ""), va="center", fontsize=8)
    ax.set_yticks(y, names, fontsize=8)
    c = param_counts(cfg)
    ax.set_xlabel("parameters (billions)" + (", log scale" if log else ""))
    if log:
        ax.set_xscale("log")
    ax.set_xlim(right=tot.max() * (3 if log else 1.45))
    ax.set_title(f"{title}: {c.total / B:.0f}B stored, {c.active / B:.1f}B active per token", fontsize=10)
    ax.legend(handles=[bars_t, bars_a], fontsize=8, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    return ax


# ----------------------------------------------------------------------------------------------------
# 2. Routers on real tensors
# ----------------------------------------------------------------------------------------------------


def plot_router(
    scores,
    topk_idx,
    topk_weight=None,
    ax=None,
    title: str = "",
    vmax: float | None = None,
    cmap: str = "Blues",
    annotate: bool = True,
):
    """Heatmap of router scores [N tokens, E experts]; each token's chosen experts boxed in red, with
    their routing weight written inside. ``ax.images[0]`` holds exactly ``scores``; the boxes are
    Rectangles with gid "chosen" (N·k of them)."""
    from matplotlib.patches import Rectangle

    s = np.asarray(torch.as_tensor(scores).detach().float().cpu())
    idx = np.asarray(torch.as_tensor(topk_idx).cpu())
    w = None if topk_weight is None else np.asarray(torch.as_tensor(topk_weight).detach().float().cpu())
    if s.ndim != 2 or idx.ndim != 2 or idx.shape[0] != s.shape[0]:
        raise ValueError(f"scores must be [N, E] and topk_idx [N, k]; got {s.shape} and {idx.shape}")
    N, E = s.shape
    ax = _new_ax(ax, (0.45 * E + 1.5, 0.35 * N + 1.2))
    im = ax.imshow(
        s,
        cmap=cmap,
        vmin=0,
        vmax=vmax if vmax is not None else max(float(s.max()), 1e-6),
        aspect="auto",
        interpolation="nearest",
    )
    for t in range(N):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            ax.add_patch(Rectangle((e - 0.5, t - 0.5), 1, 1, fill=False, edgecolor="#d62728", lw=2, gid="chosen"))
            if annotate and w is not None:
                ax.text(
                    e,
                    t,
                    f"{w[t, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=6.5,
                    color="white" if s[t, e] > 0.6 * (vmax or s.max()) else "black",
                )
    ax.set_xticks(range(E))
    ax.set_yticks(range(N))
    ax.tick_params(labelsize=7)
    ax.set_xlabel("expert")
    ax.set_ylabel("token")
    if title:
        ax.set_title(title, fontsize=9)
    ax.figure.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    return ax


GROUP_CHOICES = {"1 / 1 (GLM-4.5)": (1, 1), "2 / 1": (2, 1), "4 / 2": (4, 2), "8 / 4 (DeepSeek-V3's ratio)": (8, 4)}


class RouterExplorer:
    """Route a fixed handful of tokens with a ``glmkit.moe`` router and watch the choices move.

    Controls: router kind (softmax top-k, the classic; sigmoid, GLM-4.5), the selection bias of one
    expert, ``routed_scaling_factor``, and n_group / topk_group. Drive from Python by setting
    ``.kind.value``, ``.bias.value``, ``.scale.value``, ``.groups.value``; ``.last`` holds the routing
    (``topk_idx``, ``topk_weight``, ``scores``, ``load``). CSS class ``moe-router-explorer``.
    """

    def __init__(
        self,
        n_tokens: int = 10,
        n_experts: int = 16,
        top_k: int = 4,
        hidden: int = 32,
        biased_expert: int = 5,
        seed: int = 0,
    ):
        import ipywidgets as W

        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n_tokens, hidden, generator=g)
        self.w_r = torch.randn(n_experts, hidden, generator=g) * hidden**-0.5
        self.top_k, self.biased_expert = top_k, biased_expert
        self.E = n_experts
        self.kind = W.ToggleButtons(
            options=["sigmoid (GLM-4.5)", "softmax (classic)"], value="sigmoid (GLM-4.5)", description="router"
        )
        self.bias = W.FloatSlider(
            value=0.0, min=-1.0, max=1.0, step=0.05, description=f"bias e{biased_expert}", continuous_update=False
        )
        self.scale = W.FloatSlider(
            value=2.5, min=0.5, max=3.0, step=0.1, description="scaling", continuous_update=False
        )
        self.groups = W.Dropdown(
            options=list(GROUP_CHOICES), value="1 / 1 (GLM-4.5)", description="groups", layout=W.Layout(width="330px")
        )
        self.status = W.HTML()
        self.image = W.Image(format="png", layout=W.Layout(width="820px"))
        self.image.add_class("moe-router-image")
        self.widget = W.VBox([self.kind, W.HBox([self.bias, self.scale, self.groups]), self.status, self.image])
        self.widget.add_class("moe-router-explorer")
        self.last: dict = {}
        self.updates = 0
        for w in (self.kind, self.bias, self.scale, self.groups):
            w.observe(lambda _c: self.update(), names="value")
        self.update()

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def route(self) -> dict:
        logits = self.x @ self.w_r.T  # [N, E]
        sigmoid = self.kind.value.startswith("sigmoid")
        n_group, topk_group = GROUP_CHOICES[self.groups.value]
        if sigmoid:
            b = torch.zeros(self.E)
            b[self.biased_expert] = self.bias.value
            idx, w, s = moe.sigmoid_topk_route(logits, b, self.top_k, n_group, topk_group, True, self.scale.value)
            choice = s + b
        else:
            s = logits.softmax(-1)
            w, idx = s.topk(self.top_k, dim=-1)
            w = w / w.sum(-1, keepdim=True)
            choice = s
        return {
            "topk_idx": idx,
            "topk_weight": w,
            "scores": s,
            "choice": choice,
            "sigmoid": sigmoid,
            "groups": (n_group, topk_group),
            "load": moe.expert_load(idx, self.E),
        }

    def update(self) -> None:
        from matplotlib.figure import Figure

        r = self.route()
        fig = Figure(figsize=(11.5, 3.6), layout="constrained")
        ax0, ax1 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 1.3]})
        name = "sigmoid scores s (weights come from s)" if r["sigmoid"] else "softmax probabilities p"
        plot_router(
            r["scores"],
            r["topk_idx"],
            r["topk_weight"],
            ax=ax0,
            vmax=1.0 if r["sigmoid"] else None,
            title=f"{name}; boxed: the {self.top_k} chosen experts, with their weights",
        )
        G, TG = r["groups"]
        if r["sigmoid"] and G > 1:
            for gi in range(1, G):
                ax0.axvline(gi * self.E / G - 0.5, color="k", lw=1.2, ls="--")
        load = r["load"].numpy()
        ax1.bar(range(self.E), load, color=[expert_color(e) for e in range(self.E)])
        ax1.set(xlabel="expert", ylabel="tokens routed", title="load in this batch")
        ax1.tick_params(labelsize=7)
        self.image.value = _png(fig)
        wsum = r["topk_weight"].sum(-1)
        self.status.value = (
            f"{'sigmoid' if r['sigmoid'] else 'softmax'} router, k = {self.top_k} of {self.E}"
            + (f", groups {G}/{TG}, bias of e{self.biased_expert} = {self.bias.value:+.2f}" if r["sigmoid"] else "")
            + f" · weights per token sum to {float(wsum.min()):.2f}"
            + (" (= routed_scaling_factor)" if r["sigmoid"] else " (renormalised top-k)")
            + f" · e{self.biased_expert} chosen by {int(load[self.biased_expert])} of {self.x.shape[0]} tokens"
        )
        self.last = r
        self.updates += 1


# ----------------------------------------------------------------------------------------------------
# 3. The balancing problem: a one-layer MoE on a synthetic task
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ClusterTask:
    """Synthetic regression with structure an MoE can split: token x = μ + c_z + 0.5·noise for a cluster
    z (uniform over ``n_clusters``), target y = tanh(A_z x). Every cluster is equally common, so a good
    router spreads the load evenly; μ (a mean shared by all tokens, as real hidden states have) is the
    direction a skewed router init exploits."""

    hidden: int = 32
    n_clusters: int = 16
    seed: int = 0

    def __post_init__(self):
        g = torch.Generator().manual_seed(self.seed)
        H = self.hidden
        self.centers = torch.randn(self.n_clusters, H, generator=g)  # c_z [C, H]
        mu = torch.randn(H, generator=g)
        self.mu = mu / mu.norm() * H**0.25  # the shared mean μ [H]
        self.maps = torch.randn(self.n_clusters, H, H, generator=g) / math.sqrt(H)  # A_z [C, H, H]

    def batch(self, step: int, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x [n, H], y [n, H]), a function of ``step`` (reproducible)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        z = torch.randint(0, self.n_clusters, (n_tokens,), generator=g)
        x = self.mu + self.centers[z] + 0.5 * torch.randn(n_tokens, self.hidden, generator=g)
        y = torch.tanh(torch.einsum("nij,nj->ni", self.maps[z], x))
        return x, y


@dataclasses.dataclass
class BalanceRun:
    """Per-step records of ``balance_run``: loads [steps, E] (slots per expert), maxvio [steps], loss
    [steps] (task MSE, without any aux loss), bias [steps, E] (the router's selection bias after the
    step; zeros for the softmax router), and the settings."""

    loads: np.ndarray
    maxvio: np.ndarray
    loss: np.ndarray
    bias: np.ndarray
    settings: dict

    @property
    def label(self) -> str:
        s = self.settings
        parts = [s["router"]]
        if s["gamma"]:
            parts.append(f"bias update γ={s['gamma']:g}")
        if s["aux_alpha"]:
            parts.append(f"aux loss α={s['aux_alpha']:g}")
        if not s["gamma"] and not s["aux_alpha"]:
            parts.append("no balancing")
        return ", ".join(parts)


def balance_run(
    router: str = "sigmoid",
    gamma: float = 0.0,
    aux_alpha: float = 0.0,
    skew: float = 2.5,
    steps: int = 300,
    n_experts: int = 16,
    top_k: int = 2,
    hidden: int = 32,
    expert_size: int = 8,
    n_tokens: int = 256,
    lr: float = 3e-3,
    seed: int = 0,
    task: ClusterTask | None = None,
) -> BalanceRun:
    """Train one ``glmkit.moe.MoE`` layer (no shared expert) on ``ClusterTask`` with Adam and record the
    expert load of every step.

    router: "sigmoid" (GLM-4.5) or "softmax" (classic). gamma: the aux-loss-free bias step, applied with
    ``MoE.update_bias(gamma)`` after every optimizer step (0 = off; no effect on the softmax router).
    aux_alpha: weight of ``glmkit.moe.sequence_aux_loss`` added to the task loss (0 = off).
    skew: added to the router rows of experts 0 and 1 along the tokens' shared mean μ, so that at
    initialisation every token prefers those two (0 = an ordinary random init). Runs on one CPU thread
    (``single_thread``): ≈ 0.5 s for 300 steps on a CPU.
    """
    if router not in ("sigmoid", "softmax"):
        raise ValueError(f"router must be 'sigmoid' or 'softmax', got {router!r}")
    if gamma < 0 or aux_alpha < 0:
        raise ValueError(f"gamma and aux_alpha must be >= 0, got {gamma!r}, {aux_alpha!r}")
    if not 1 <= top_k <= n_experts:
        raise ValueError(f"top_k must be in [1, n_experts], got {top_k}")
    task = task or ClusterTask(hidden=hidden, seed=seed)
    if task.hidden != hidden:
        raise ValueError(f"task.hidden ({task.hidden}) must equal hidden ({hidden})")
    with single_thread():
        return _balance_run(
            router, gamma, aux_alpha, skew, steps, n_experts, top_k, hidden, expert_size, n_tokens, lr, seed, task
        )


def _balance_run(
    router, gamma, aux_alpha, skew, steps, n_experts, top_k, hidden, expert_size, n_tokens, lr, seed, task
) -> BalanceRun:
    torch.manual_seed(seed)
    layer = moe.MoE(
        hidden, n_experts, top_k, expert_size, n_shared_experts=0, router=router, aux_loss_alpha=aux_alpha, init_std=0.1
    )
    if skew:
        with torch.no_grad():
            layer.gate.weight[:2] += skew * task.mu / task.mu.norm()
    opt = torch.optim.Adam(layer.parameters(), lr=lr)
    loads, losses, biases = [], [], []
    for step in range(steps):
        x, y = task.batch(step, n_tokens)
        loss = F.mse_loss(layer(x), y)
        total = loss if layer.aux_loss is None else loss + layer.aux_loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        loads.append(layer.update_bias(gamma))  # the load of this step; b moves when γ > 0
        losses.append(float(loss.detach()))
        b = getattr(layer.gate, "e_score_correction_bias", None)
        biases.append(b.clone() if b is not None else torch.zeros(n_experts))
    L = torch.stack(loads).numpy()
    return BalanceRun(
        loads=L,
        maxvio=np.array([moe.max_violation(torch.from_numpy(l)) for l in L]),
        loss=np.array(losses),
        bias=torch.stack(biases).numpy(),
        settings=dict(
            router=router,
            gamma=gamma,
            aux_alpha=aux_alpha,
            skew=skew,
            steps=steps,
            n_experts=n_experts,
            top_k=top_k,
            n_tokens=n_tokens,
        ),
    )


def load_share(loads) -> np.ndarray:
    """loads [steps, E] → load / mean load per step (1 = the balanced share; E/k·... at collapse)."""
    L = np.asarray(loads, dtype=float)
    if L.ndim != 2:
        raise ValueError(f"loads must be [steps, E], got shape {L.shape}")
    mean = L.mean(axis=1, keepdims=True)
    return np.divide(L, mean, out=np.zeros_like(L), where=mean > 0)


def _step_extent(steps, n_rows: int, n_cols: int):
    """imshow extent putting column i at x = steps[i] (evenly spaced steps assumed)."""
    if steps is None:
        return None
    st = np.asarray(steps, dtype=float)
    if st.shape != (n_cols,):
        raise ValueError(f"steps must have one entry per column ({n_cols}), got {st.shape}")
    half = (st[1] - st[0]) / 2 if n_cols > 1 else 0.5
    return (st[0] - half, st[-1] + half, -0.5, n_rows - 0.5)


def plot_load_heatmap(loads, ax=None, title: str = "", vmax: float | None = None, colorbar: bool = True, steps=None):
    """Experts (rows) × steps (columns): each expert's load divided by the mean load of that step, so 1
    (white) is the balanced share, 0 (blue) an idle expert and red an overloaded one. ``ax.images[0]``
    holds exactly ``load_share(loads).T``. steps: the training step of each row of ``loads`` (default
    0, 1, 2, ...)."""
    from matplotlib.colors import TwoSlopeNorm

    share = load_share(loads)
    ax = _new_ax(ax, (7, 3))
    top = vmax if vmax is not None else max(2.0, float(share.max()))
    im = ax.imshow(
        share.T,
        aspect="auto",
        cmap="RdBu_r",
        norm=TwoSlopeNorm(vcenter=1.0, vmin=0.0, vmax=top),
        interpolation="nearest",
        origin="lower",
        extent=_step_extent(steps, share.shape[1], share.shape[0]),
    )
    ax.set_xlabel("training step")
    ax.set_ylabel("expert")
    if title:
        ax.set_title(title, fontsize=9)
    if colorbar:
        ax.figure.colorbar(im, ax=ax, fraction=0.04, pad=0.02, label="load / mean")
    return ax


def plot_layer_loads(
    load_steps, expert_loads, ax=None, title: str = "", vmax: float | None = None, colorbar: bool = True
):
    """The load heatmap of a whole model: ``expert_loads[i][layer][e]`` is the share of a layer's routed
    slots that expert e got at step ``load_steps[i]`` (``glmkit.train.History``'s fields). Rows are
    (layer, expert) pairs, layer by layer with a line between layers; colour = share · E = load / mean.
    ``ax.images[0]`` holds exactly that [layers·E, snapshots] array."""
    from matplotlib.colors import TwoSlopeNorm

    shares = np.asarray(expert_loads, dtype=float)  # [snapshots, layers, E]
    if shares.ndim != 3:
        raise ValueError(f"expert_loads must be [snapshots][layers][E], got shape {shares.shape}")
    n, L, E = shares.shape
    rel = (shares * E).transpose(1, 2, 0).reshape(L * E, n)  # [layers·E, snapshots]
    ax = _new_ax(ax, (7, 3))
    top = vmax if vmax is not None else max(2.0, float(rel.max()))
    im = ax.imshow(
        rel,
        aspect="auto",
        cmap="RdBu_r",
        norm=TwoSlopeNorm(vcenter=1.0, vmin=0.0, vmax=top),
        interpolation="nearest",
        origin="lower",
        extent=_step_extent(load_steps, L * E, n),
    )
    for l in range(1, L):
        ax.axhline(l * E - 0.5, color="k", lw=1.2)
    ax.set_yticks([l * E + (E - 1) / 2 for l in range(L)], [f"MoE layer {l + 1}" for l in range(L)], fontsize=7)
    ax.set_xlabel("training step")
    ax.set_ylabel(f"{E} experts per layer")
    if title:
        ax.set_title(title, fontsize=9)
    if colorbar:
        ax.figure.colorbar(im, ax=ax, fraction=0.04, pad=0.02, label="load / mean")
    return ax


def plot_max_violation(runs: Mapping[str, Sequence[float]], ax=None, log: bool = True):
    """MaxVio (max load / mean − 1, 0 = balanced) against step, one line per run."""
    ax = _new_ax(ax, (6, 3))
    for name, mv in runs.items():
        mv = np.asarray(mv, dtype=float)
        ax.plot(np.arange(1, len(mv) + 1), mv, lw=1.5, label=name)
    ax.set_xlabel("training step")
    ax.set_ylabel("MaxVio = max load / mean − 1")
    if log:
        ax.set_yscale("symlog", linthresh=0.1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("how far the busiest expert is over its share", fontsize=9)
    return ax


def plot_load(history, ax=None, label: str | None = None, title: str = "expert-load imbalance (MoE)"):
    """A training run's ``History.max_violation`` per step, raw and smoothed, on ``ax`` (a new one if None). Call it
    on two histories with the same ``ax`` and a ``label`` each to compare runs (e.g. with and without the bias
    update)."""
    if not history.max_violation:
        raise ValueError("this History has no expert-load records: the model had no MoE layers")
    ax = _new_ax(ax, (6.4, 3.2))
    steps = history.steps[-len(history.max_violation) :]
    (line,) = ax.plot(steps, history.max_violation, alpha=0.25, lw=1)
    ax.plot(
        steps,
        history.smoothed(values=history.max_violation),
        color=line.get_color(),
        lw=2,
        label=label or "MaxVio (smoothed)",
    )
    ax.set(xlabel="step", ylabel="max load / mean load − 1", title=title)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    return ax


def plot_balance_runs(runs: Sequence[BalanceRun], fig=None):
    """One load heatmap per run (top row) and, below, MaxVio and the task loss of all runs."""
    import matplotlib.pyplot as plt

    n = len(runs)
    if fig is None:
        fig = plt.figure(figsize=(3.6 * max(n, 3), 6.2), layout="constrained")
    gs = fig.add_gridspec(2, n)
    top = max(2.0, max(float(load_share(r.loads).max()) for r in runs))
    for i, r in enumerate(runs):
        plot_load_heatmap(r.loads, ax=fig.add_subplot(gs[0, i]), title=r.label, vmax=top, colorbar=(i == n - 1))
    half = max(1, n // 2)
    ax_mv = fig.add_subplot(gs[1, :half])
    plot_max_violation({r.label: r.maxvio for r in runs}, ax=ax_mv)
    ax_l = fig.add_subplot(gs[1, half:])
    from glmkit.course.viz import smooth

    for r in runs:
        ax_l.plot(np.arange(1, len(r.loss) + 1), smooth(r.loss), lw=1.5, label=r.label)
    ax_l.set_yscale("log")
    ax_l.set(xlabel="training step", ylabel="task MSE (smoothed, log)", title="what the model learns")
    ax_l.title.set_fontsize(9)
    ax_l.grid(alpha=0.3)
    ax_l.legend(fontsize=7)
    return fig


class BalanceExplorer:
    """Train the toy MoE layer of ``balance_run`` with your settings (≈ 0.5 s per change) and see the
    per-expert load over steps, MaxVio and the loss next to a fixed reference run.

    Controls: router kind, γ (bias update rate), aux-loss α, skew of the router init. Drive from Python
    by setting ``.router.value``, ``.gamma.value``, ``.alpha.value``, ``.skew.value``; ``.last`` is the
    ``BalanceRun``. CSS class ``moe-balance-explorer``, picture ``moe-balance-image``.
    """

    def __init__(self, steps: int = 300, reference: BalanceRun | None = None, **run_kwargs):
        import ipywidgets as W

        self.steps, self.run_kwargs = steps, run_kwargs
        self.reference = reference
        self.router = W.ToggleButtons(options=["sigmoid", "softmax"], value="sigmoid", description="router")
        self.gamma = W.FloatSlider(
            value=0.01,
            min=0.0,
            max=0.05,
            step=0.001,
            readout_format=".3f",
            description="γ (bias)",
            continuous_update=False,
        )
        self.alpha = W.FloatSlider(
            value=0.0, min=0.0, max=0.05, step=0.005, readout_format=".3f", description="aux α", continuous_update=False
        )
        self.skew = W.FloatSlider(
            value=2.5, min=0.0, max=4.0, step=0.5, description="init skew", continuous_update=False
        )
        self.status = W.HTML()
        self.image = W.Image(format="png", layout=W.Layout(width="900px"))
        self.image.add_class("moe-balance-image")
        self.widget = W.VBox(
            [W.HBox([self.router, self.skew]), W.HBox([self.gamma, self.alpha]), self.status, self.image]
        )
        self.widget.add_class("moe-balance-explorer")
        self.last: BalanceRun | None = None
        self.updates = 0
        for w in (self.router, self.gamma, self.alpha, self.skew):
            w.observe(lambda _c: self.update(), names="value")
        self.update()

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def update(self) -> None:
        from matplotlib.figure import Figure

        run = balance_run(
            router=self.router.value,
            gamma=float(self.gamma.value),
            aux_alpha=float(self.alpha.value),
            skew=float(self.skew.value),
            steps=self.steps,
            **self.run_kwargs,
        )
        fig = Figure(figsize=(12.5, 3.2), layout="constrained")
        ax0, ax1, ax2 = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1.5, 1, 1]})
        plot_load_heatmap(run.loads, ax=ax0, title=f"your run: {run.label}")
        curves = {"your run": run.maxvio}
        if self.reference is not None:
            curves[f"reference: {self.reference.label}"] = self.reference.maxvio
        plot_max_violation(curves, ax=ax1)
        from glmkit.course.viz import smooth

        ax2.plot(smooth(run.loss), label="your run")
        if self.reference is not None:
            ax2.plot(smooth(self.reference.loss), ls="--", label="reference")
        ax2.set_yscale("log")
        ax2.set(xlabel="training step", ylabel="task MSE (smoothed)")
        ax2.set_title("task loss", fontsize=9)
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=7)
        self.image.value = _png(fig)
        idle = int((run.loads[-50:].sum(0) == 0).sum())
        note = (
            " (γ does nothing here: the softmax router has no bias)"
            if run.settings["router"] == "softmax" and run.settings["gamma"]
            else ""
        )
        self.status.value = (
            f"{run.label}{note} · MaxVio at the end {run.maxvio[-20:].mean():.2f} "
            f"(start {run.maxvio[0]:.2f}) · idle experts over the last 50 steps: {idle} · "
            f"final MSE {np.mean(run.loss[-20:]):.4f}"
        )
        self.last = run
        self.updates += 1


# ----------------------------------------------------------------------------------------------------
# 4. The permutation behind the grouped GEMM (moe_align)
# ----------------------------------------------------------------------------------------------------


def count_tensor_ops(fn, *args, **kwargs) -> collections.Counter[str]:
    """Run ``fn(*args, **kwargs)`` under a ``torch.overrides.TorchFunctionMode`` and count, by name, the
    torch calls that returned a tensor (views included). On a GPU each such call is at least one kernel
    launch, so the total says how launch-bound a piece of code is. Counts only, without timing."""
    from torch.overrides import TorchFunctionMode

    counts: collections.Counter[str] = collections.Counter()

    class _Count(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) or (isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor)):
                counts[getattr(func, "__name__", str(func))] += 1
            return out

    with _Count():
        fn(*args, **kwargs)
    return counts


def alignment_cells(topk_idx, sorted_token_ids, expert_ids, num_tokens_post_pad, block_m: int) -> list[dict]:
    """One dict per position p of ``sorted_token_ids``: ``slot`` (the slot id, or None), ``token``
    (slot // k), ``expert`` (of the slot; of the block for padding; -1 in the empty tail), ``kind``
    ("slot", "pad": a sentinel inside an expert's last block, or "tail": past num_tokens_post_pad)."""
    idx = torch.as_tensor(topk_idx).cpu()
    k = idx.shape[1]
    flat = idx.reshape(-1).tolist()
    S = len(flat)
    ids = torch.as_tensor(sorted_token_ids).cpu().tolist()
    blocks = torch.as_tensor(expert_ids).cpu().tolist()
    ntpp = int(torch.as_tensor(num_tokens_post_pad).reshape(-1)[0])
    cells = []
    for p, s in enumerate(ids):
        block_e = blocks[p // block_m]
        if s < S:
            cells.append({"slot": s, "token": s // k, "expert": flat[s], "kind": "slot"})
        else:
            cells.append(
                {
                    "slot": None,
                    "token": None,
                    "expert": block_e if p < ntpp else -1,
                    "kind": "pad" if p < ntpp else "tail",
                }
            )
    return cells


def plot_alignment(topk_idx, sorted_token_ids, expert_ids, num_tokens_post_pad, block_m: int, ax=None):
    """The permutation as a picture. Top row: the N·k slots in the router's order (slot s = token·k + j,
    labelled t.j, coloured by expert). Bottom row: ``sorted_token_ids`` — each expert's slots together,
    padded with hatched "pad" cells to a multiple of block_m; grey cells are the empty tail of the
    fixed-size buffer. Lines join each slot to where it lands; under each block its expert id.

    Cells are Rectangles with gid "slot", "pad" or "tail" (bottom) and "src" (top)."""
    from matplotlib.patches import Rectangle

    idx = torch.as_tensor(topk_idx).cpu()
    k = idx.shape[1]
    flat = idx.reshape(-1).tolist()
    cells = alignment_cells(topk_idx, sorted_token_ids, expert_ids, num_tokens_post_pad, block_m)
    S, P = len(flat), len(cells)
    ax = _new_ax(ax, (max(8, 0.42 * P + 1), 3.2))
    y_top, y_bot = 2.2, 0.0
    x0_top = (P - S) / 2  # centre the shorter top row
    for s, e in enumerate(flat):
        ax.add_patch(
            Rectangle((x0_top + s, y_top), 1, 0.8, facecolor=expert_color(e), edgecolor="k", lw=0.6, gid="src")
        )
        ax.text(x0_top + s + 0.5, y_top + 0.4, f"t{s // k}.{s % k}", ha="center", va="center", fontsize=6)
    for p, c in enumerate(cells):
        if c["kind"] == "slot":
            ax.add_patch(
                Rectangle((p, y_bot), 1, 0.8, facecolor=expert_color(c["expert"]), edgecolor="k", lw=0.6, gid="slot")
            )
            ax.text(p + 0.5, y_bot + 0.4, str(c["slot"]), ha="center", va="center", fontsize=6.5)
            ax.plot(
                [x0_top + c["slot"] + 0.5, p + 0.5],
                [y_top, y_bot + 0.8],
                color=expert_color(c["expert"]),
                lw=0.9,
                alpha=0.9,
            )
        elif c["kind"] == "pad":
            ax.add_patch(
                Rectangle(
                    (p, y_bot),
                    1,
                    0.8,
                    facecolor=PAD_COLOR,
                    edgecolor=expert_color(c["expert"]),
                    hatch="///",
                    lw=0.8,
                    gid="pad",
                )
            )
            ax.text(p + 0.5, y_bot + 0.4, "pad", ha="center", va="center", fontsize=5.5, color="#555")
        else:
            ax.add_patch(Rectangle((p, y_bot), 1, 0.8, facecolor=TAIL_COLOR, edgecolor="#bbb", lw=0.6, gid="tail"))
    blocks = torch.as_tensor(expert_ids).cpu().tolist()
    for b, e in enumerate(blocks):
        ax.plot([b * block_m, b * block_m], [y_bot - 0.15, y_bot + 0.95], color="k", lw=1.8)
        ax.text(
            b * block_m + block_m / 2,
            y_bot - 0.35,
            f"block {b}: e{e}" if e >= 0 else f"block {b}: –",
            ha="center",
            va="center",
            fontsize=7,
        )
    ax.plot([P, P], [y_bot - 0.15, y_bot + 0.95], color="k", lw=1.8)
    ntpp = int(torch.as_tensor(num_tokens_post_pad).reshape(-1)[0])
    ax.annotate(
        f"num_tokens_post_pad = {ntpp}",
        xy=(ntpp, y_bot + 0.9),
        xytext=(ntpp, y_bot + 1.45),
        ha="center",
        fontsize=7,
        arrowprops=dict(arrowstyle="->", lw=0.8),
    )
    ax.text(-0.3, y_top + 0.4, "router order\n(slot = token·k + j)", ha="right", va="center", fontsize=7)
    ax.text(-0.3, y_bot + 0.4, "sorted_token_ids", ha="right", va="center", fontsize=7)
    ax.set_xlim(-0.5, P + 0.5)
    ax.set_ylim(y_bot - 0.7, y_top + 1.0)
    ax.axis("off")
    n_pad = sum(c["kind"] == "pad" for c in cells)
    ax.set_title(
        f"moe_align: {S} slots → {ntpp} rows in blocks of {block_m} ({n_pad} padding rows), buffer of {P}", fontsize=9
    )
    return ax


# ----------------------------------------------------------------------------------------------------
# 4b. The committed GPU benchmark
# ----------------------------------------------------------------------------------------------------

_NUM = re.compile(r"([+-]?\d+(?:\.\d+)?)")


def _value(text: str) -> tuple[float, str]:
    m = _NUM.search(text)
    if not m:
        raise ValueError(f"no number in {text!r}")
    unit = "%" if "%" in text else ("×" if re.search(r"\d\s*[×xX]", text) else "")
    return float(m.group(1)), unit


def parse_bench(text: str) -> dict:
    """Read a benchmark result file (``benchmarks/results/moe_h200.md``'s format): ``meta`` (the
    ``- key: value`` lines near the top, e.g. date, GPU) and ``ratios``, the rows of its "Ratios vs
    targets" table as dicts ``name, measured, unit ('×' or '%'), target, op ('≥' or '≤'), met (bool)``."""
    meta: dict[str, str] = {}
    for line in text.splitlines():
        m = re.match(r"^- ([A-Za-z][\w ]*?):\s*(.+)$", line.strip())
        if m and m.group(1) not in meta:
            meta[m.group(1)] = m.group(2).strip()
    start = re.search(r"^#+\s*Ratios vs targets\s*$", text, re.M)
    if not start:
        raise ValueError("no '## Ratios vs targets' section in the benchmark file")
    ratios, header = [], None
    for line in text[start.end() :].splitlines():
        line = line.strip()
        if line.startswith("#"):
            break
        if not line.startswith("|"):
            if ratios:
                break
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if set("".join(cells)) <= set("-: "):
            continue
        if header is None:
            header = [c.lower() for c in cells]
            continue
        row = dict(zip(header, cells))
        measured, unit = _value(row["measured"])
        target, _ = _value(row["target"])
        op = "≤" if ("≤" in row["target"] or "<=" in row["target"]) else "≥"
        ratios.append(
            {
                "name": row["ratio"],
                "measured": measured,
                "unit": unit,
                "target": target,
                "op": op,
                "met": row.get("met", "").lower().startswith("y"),
            }
        )
    if not ratios:
        raise ValueError("the 'Ratios vs targets' table has no rows")
    return {"meta": meta, "ratios": ratios}


def plot_speedups(rows: Sequence[dict], ax=None, title: str = ""):
    """The × rows of ``parse_bench(...)['ratios']`` as horizontal bars (green: target met, orange: not),
    each target a black tick on its bar's row; 1× (parity) dashed."""
    rows = [r for r in rows if r["unit"] == "×"]
    if not rows:
        raise ValueError("no speed-up (×) rows to plot")
    ax = _new_ax(ax, (7.5, 0.42 * len(rows) + 1.2))
    y = np.arange(len(rows))[::-1]
    vals = [r["measured"] for r in rows]
    colors = ["#59a14f" if r["met"] else "#f28e2b" for r in rows]
    ax.barh(y, vals, color=colors, height=0.6)
    ax.scatter([r["target"] for r in rows], y, marker="|", s=380, color="k", linewidths=2.2, zorder=3, label="target")
    for yi, r in zip(y, rows):  # the label right of the bar and of the target tick
        ax.text(max(r["measured"], r["target"]) * 1.01, yi, f" {r['measured']:.2f}×", va="center", fontsize=7.5)
    ax.axvline(1.0, color="#888", ls="--", lw=1)
    ax.set_yticks(y, [r["name"] for r in rows], fontsize=7.5)
    ax.set_xlabel("speed-up (× the baseline, same run)")
    ax.set_xlim(0, max(max(vals), max(r["target"] for r in rows)) * 1.18)
    from matplotlib.patches import Patch

    ax.legend(
        handles=[
            Patch(color="#59a14f", label="target met"),
            Patch(color="#f28e2b", label="target missed"),
            ax.collections[0],
        ],
        fontsize=7,
        loc="upper right",
    )
    ax.grid(axis="x", alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    return ax


# ----------------------------------------------------------------------------------------------------
# 5. Loss against compute
# ----------------------------------------------------------------------------------------------------


def training_flops(active_params: int, tokens) -> np.ndarray:
    """≈ 6 · N_active · D: forward (2 flops per parameter per token) + backward (4)."""
    return 6.0 * float(active_params) * np.asarray(tokens, dtype=float)


def centered_mean(values, window: int = 9) -> np.ndarray:
    """Moving average over ``window`` points centred on each point: no lag, unlike an exponential average,
    so a smoothed curve on a log axis stays on top of the raw one. Near the ends the window shrinks
    symmetrically (the first and last points are their own average)."""
    v = np.asarray(values, dtype=float)
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be a positive odd int, got {window!r}")
    i = np.arange(len(v))
    half = np.minimum(window // 2, np.minimum(i, len(v) - 1 - i))  # symmetric: never reach past an end
    c = np.concatenate([[0.0], np.cumsum(v)])
    return (c[i + half + 1] - c[i - half]) / (2 * half + 1)


def plot_loss_vs_compute(
    runs: Mapping[str, tuple[Sequence[float], Sequence[float]]], ax=None, window: int = 9, title: str = ""
):
    """runs: name → (training FLOPs per step, cumulative; loss per step). Raw loss faint, a centred moving
    average (``centered_mean``) bold, FLOPs on a log axis."""
    ax = _new_ax(ax, (6.5, 3.4))
    for i, (name, (flops, loss)) in enumerate(runs.items()):
        flops, loss = np.asarray(flops, dtype=float), np.asarray(loss, dtype=float)
        if flops.shape != loss.shape:
            raise ValueError(f"{name}: flops {flops.shape} and loss {loss.shape} differ in length")
        c = f"C{i}"
        ax.plot(flops, loss, color=c, alpha=0.25, lw=0.8)
        ax.plot(flops, centered_mean(loss, window), color=c, lw=2, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("training compute (FLOPs ≈ 6 · active params · tokens)")
    ax.set_ylabel(f"train loss (nats/token; bold: mean of {window} steps)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    return ax


__all__ = [
    "param_breakdown",
    "plot_param_breakdown",
    "plot_router",
    "RouterExplorer",
    "GROUP_CHOICES",
    "ClusterTask",
    "BalanceRun",
    "balance_run",
    "load_share",
    "plot_load_heatmap",
    "plot_layer_loads",
    "plot_max_violation",
    "plot_balance_runs",
    "BalanceExplorer",
    "count_tensor_ops",
    "alignment_cells",
    "plot_alignment",
    "parse_bench",
    "plot_speedups",
    "training_flops",
    "centered_mean",
    "plot_loss_vs_compute",
    "expert_color",
    "single_thread",
]
