"""Lesson 09's helpers for the capstone: the whole model on one page, read from its config; where its parameters
are; what mHC's Sinkhorn step does to the residual signal over depth; the two-process data-parallel run started
from a notebook; the committed H200 results of the capstone when they exist.

    model_parts(cfg)                    every layer's mixer, FFN and residual connection, each with the lesson that
                                        built it (``LESSONS``), read from ``layer_types``, ``mlp_layer_types``,
                                        ``hc_mult`` and the mixer options; the MTP layer last
    plot_model(cfg)                     that as one picture: a column per layer, a colour per lesson
    param_breakdown(model)              total and active parameters per part (embedding + head, KDA, MLA-DSA,
                                        indexers, mHC, FFNs, routed/shared experts, routers, norms, MTP layer),
                                        grouped by parameter name; works on the meta device
    depth_norms(kind, ...)              the residual signal's RMS over depth in a deep random stack, for the plain
                                        residual, hyper-connections without the Sinkhorn step ("hc") and mHC
                                        ("mhc", glmkit.mhc.HyperConnection itself); with the gain of the product
                                        of the stream-mixing matrices
    plot_depth_norms(results)           those curves, one band per kind over seeds
    SinkhornExplorer()                  ipywidgets: a random positive matrix, the Sinkhorn rounds and the logit
                                        scale → the matrix, its row and column sums and its largest singular value
    toy_indexer(L), kpool_query(...)    random inputs of a KPool indexer; for one query, the dense indexer's top-k
                                        tokens next to the pools and tail KPool selects (``glmkit.kpool``);
                                        ``plot_kpool_query`` draws it, ``kpool_overlap`` measures it over queries
    torchrun(config, nproc, workdir)    ``python -m torch.distributed.run --nproc_per_node N -m glmkit train`` on a
                                        run config (a dict), as a subprocess; ``final_losses(out_dir)`` reads the
                                        losses of a training folder's latest checkpoint
    plot_history(history), plot_expert_load(history)   a training run's loss / MTP loss, indexer recall, MoE
                                        imbalance, and its last expert-load snapshot
    h200_results()                      the committed capstone results (benchmarks/results/capstone_h200.json, .md
                                        and capstone_run_h200/: formats in benchmarks/README.md), or None when they
                                        are not in this checkout; ``train_rows``, ``against_anchors`` tabulate them

How it differs from the lessons before it: lessons 02-08 each look inside one part; this module looks at the model
those parts make. Nothing here re-implements a part: the diagram reads ``DecoderConfig``, the counts read the
``Decoder`` built on the meta device, the mHC stack runs ``glmkit.mhc``, the KPool views
run ``glmkit.kpool``.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from glmkit.mhc import HyperConnection, sinkhorn

REPO = Path(__file__).resolve().parents[2]

# The lesson that built each part of the model, and its colour in the pictures.
LESSONS = {
    "03": ("03 the GLM block: RMSNorm, SwiGLU, residual", "#9e9e9e"),
    "04": ("04 MoE: routed + shared experts", "#f28e2b"),
    "05": ("05 MLA: the latent KV cache", "#4e79a7"),
    "06": ("06 DSA: the lightning indexer", "#59a14f"),
    "07": ("07 KDA: the delta-rule state", "#b07aa1"),
    "08": ("08 MTP: the draft module", "#edc948"),
    "09": ("09 mHC, KPool, NoPE, clamped SwiGLU", "#e15759"),
}


# ----------------------------------------------------------------------------------------------------
# The model on one page
# ----------------------------------------------------------------------------------------------------


def _mixer_part(cfg, kind: str) -> dict:
    if kind == "kda":
        return {"label": "KDA", "lesson": "07", "detail": f"{cfg.opt('linear_num_heads')} heads"}
    if kind == "gdn":
        return {"label": "GDN", "lesson": "07", "detail": "Gated DeltaNet"}
    if kind in ("dsa", "mla"):
        nope = cfg.opt("qk_rope_head_dim") == 0
        label = "MLA" + ("-DSA" if kind == "dsa" else "")
        notes = ["NoPE"] if nope else []
        lesson = "06" if kind == "dsa" else "05"
        if kind == "dsa":
            kpool = cfg.opt("index_kpool")
            notes.append(f"top-{cfg.opt('index_topk')}" + (f", KPool {kpool}" if kpool else ""))
        return {"label": label, "lesson": lesson, "detail": ", ".join(notes), "nope": nope}
    return {"label": kind, "lesson": "03", "detail": ""}


def _ffn_part(cfg, kind: str) -> dict:
    clamp = f", clamp {cfg.swiglu_limit:g}" if cfg.swiglu_limit else ""
    if kind == "sparse":
        k, e, s = cfg.num_experts_per_tok, cfg.n_routed_experts, cfg.n_shared_experts
        return {"label": "MoE", "lesson": "04", "detail": f"{k} of {e}" + (f" + {s} shared" if s else "") + clamp}
    return {"label": "dense", "lesson": "03", "detail": f"SwiGLU {cfg.intermediate_size}{clamp}"}


def model_parts(cfg) -> list[dict]:
    """One dict per decoder layer, then one per MTP layer: ``{"layer", "mixer", "ffn", "residual"}``, each part a
    dict with ``label``, ``lesson`` (a key of ``LESSONS``) and ``detail``. The MTP layers use ``mtp_layer_type``
    and a sparse FFN when the model has experts; their ``layer`` is "MTP 0", "MTP 1", ..."""
    n = cfg.hc_mult
    residual = (
        {"label": f"mHC ×{n}", "lesson": "09", "detail": f"{n} streams"}
        if n > 1
        else {"label": "residual", "lesson": "03", "detail": "one stream"}
    )
    rows = []
    for i, (mixer, ffn) in enumerate(zip(cfg.layer_types, cfg.mlp_layer_types)):
        rows.append({"layer": i, "mixer": _mixer_part(cfg, mixer), "ffn": _ffn_part(cfg, ffn), "residual": residual})
    for j in range(cfg.num_nextn_predict_layers):
        ffn = "sparse" if cfg.n_routed_experts else "dense"
        rows.append(
            {
                "layer": f"MTP {j}",
                "mixer": _mixer_part(cfg, cfg.mtp_layer_type or cfg.layer_types[-1]),
                "ffn": _ffn_part(cfg, ffn),
                "residual": residual,
            }
        )
    return rows


def plot_model(cfg, ax=None, title: str = "", text: bool | None = None):
    """The model as a grid: a column per layer (then the MTP layers), rows mixer / FFN / residual, each cell
    coloured by the lesson that built the part; the embedding below and the LM head above. ``text``: write the
    labels in the cells (default: when there are at most 16 columns). Returns the axes."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    parts = model_parts(cfg)
    n = len(parts)
    text = n <= 16 if text is None else text
    if ax is None:
        _, ax = plt.subplots(figsize=(min(18, 2.2 + 0.95 * n), 3.4))
    rows = ("residual", "ffn", "mixer")
    used = set()
    for x, p in enumerate(parts):
        for y, row in enumerate(rows):
            part = p[row]
            colour = LESSONS[part["lesson"]][1]
            used.add(part["lesson"])
            hatch = "//" if row == "mixer" and (part.get("nope") or "KPool" in part["detail"]) else None
            ax.add_patch(Rectangle((x + 0.05, y + 0.05), 0.9, 0.9, color=colour, alpha=0.9, hatch=hatch, ec="white"))
            if text:
                label = part["label"] + ("\n" + part["detail"].replace(", ", "\n") if part["detail"] else "")
                ax.text(x + 0.5, y + 0.5, label, ha="center", va="center", fontsize=6.5)
        if isinstance(p["layer"], str):
            ax.add_patch(Rectangle((x, -0.02), 1, 3.04, fill=False, ec="k", ls="--", lw=1))
    if any(p["mixer"].get("nope") or "KPool" in p["mixer"]["detail"] for p in parts if p["mixer"]["lesson"] in "0506"):
        used.add("09")
    ax.text(n / 2, -0.35, f"embedding {cfg.vocab_size} × {cfg.hidden_size} (lesson 03)", ha="center", fontsize=8)
    ax.text(n / 2, 3.2, "final RMSNorm, LM head" + (" (tied)" if cfg.tie_word_embeddings else ""), ha="center",
            fontsize=8)  # fmt: skip
    ax.set_xlim(0, n)
    ax.set_ylim(-0.6, 3.5)
    ticks = [str(p["layer"]) for p in parts]
    step = 1 if n <= 24 else 4
    ax.set_xticks([x + 0.5 for x in range(0, n, step)] + ([n - 0.5] if (n - 1) % step else []))
    ax.set_xticklabels(ticks[::step] + ([ticks[-1]] if (n - 1) % step else []), fontsize=7)
    ax.set_yticks([0.5, 1.5, 2.5])
    ax.set_yticklabels(["residual", "FFN", "mixer"])
    ax.set_xlabel("layer (hatched: NoPE MLA with the KPool indexer, lesson 09)")
    for side in ("top", "right", "left", "bottom"):
        ax.spines[side].set_visible(False)
    handles = [Patch(color=LESSONS[k][1], label=LESSONS[k][0]) for k in sorted(used)]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False)
    ax.set_title(title)
    return ax


def _group(name: str, layer_types: list[str]) -> str:
    if name.startswith("mtp."):
        return "MTP layer"
    if name.startswith(("embed_tokens", "lm_head")):
        return "embedding + LM head"
    if "_hc." in name:
        return "mHC"
    if ".indexer." in name:
        return "DSA indexers (KPool)"
    if ".mixer." in name:
        kind = layer_types[int(name.split(".")[1])]
        return {"kda": "KDA mixers", "gdn": "GDN mixers"}.get(kind, "MLA / attention mixers")
    if ".mlp.experts." in name:
        return "routed experts"
    if ".mlp.shared_experts." in name:
        return "shared experts"
    if ".mlp.gate." in name:
        return "routers"
    if ".mlp." in name:
        return "dense FFNs"
    return "norms"


def param_breakdown(model) -> list[tuple[str, int, int]]:
    """(part, total, active per token) for every part of a ``Decoder`` (meta device is fine), in the order of
    first appearance. Active: everything but the routed experts a token is not sent to (k of E per layer); the
    MTP layer's active count is its own block's. A tied head counts once."""
    cfg = model.config
    seen: set[int] = set()
    totals: dict[str, list[int]] = {}
    share = cfg.num_experts_per_tok / cfg.n_routed_experts if cfg.n_routed_experts else 1.0
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        g = _group(name, cfg.layer_types)
        routed = ".mlp.experts." in name
        row = totals.setdefault(g, [0, 0])
        row[0] += p.numel()
        row[1] += round(p.numel() * share) if routed else p.numel()
    return [(g, t, a) for g, (t, a) in totals.items()]


# ----------------------------------------------------------------------------------------------------
# mHC over depth
# ----------------------------------------------------------------------------------------------------

KINDS = ("residual", "hc", "mhc")
KIND_LABELS = {
    "residual": "plain residual (one stream)",
    "hc": "hyper-connections, mixing I + tanh(·), no Sinkhorn",
    "mhc": "mHC: Sinkhorn-normalised mixing (glmkit.mhc)",
}


class UnconstrainedHC(HyperConnection):
    """Hyper-connections as Zhu et al. 2024 build the stream mixing (identity plus a learned, token-dependent
    ``tanh`` term), from the same logits as ``HyperConnection``: what mHC looks like without the Sinkhorn step.
    For the depth experiment only."""

    def weights(self, streams):
        pre, post, _ = super().weights(streams)
        n = self.hc_mult
        z = streams.flatten(-2).float()
        z = z * torch.rsqrt(z.square().mean(dim=-1, keepdim=True) + self.norm_eps)
        a_comb = torch.nn.functional.linear(z, self.fn[2 * n :].float()) * self.scale[2] + self.base[2 * n :]
        comb = torch.eye(n) + torch.tanh(a_comb).unflatten(-1, (n, n))
        return pre, post, comb


def depth_norms(
    kind: str,
    depth: int = 48,
    seed: int = 0,
    hidden: int = 64,
    streams: int = 4,
    tokens: int = 32,
    logit_std: float = 0.3,
    branch_gain: float = 0.5,
) -> dict:
    """Run ``depth`` random branches (RMSNorm → two random linear maps with a ReLU, output scaled by
    ``branch_gain``) on random tokens with the ``kind`` connection (``KINDS``) and return ``{"rms": [depth + 1]``
    (the residual signal's RMS after each layer: one stream, or the mean over the streams, relative to the input),
    ``"stream_rms"`` (the RMS over all streams), ``"gain"`` (the largest absolute row sum of the product of the
    mixing matrices so far, averaged over tokens; 1 for the plain residual)}. The connection's weights ``fn`` are
    drawn so that its logits have standard deviation ``logit_std`` (the inputs are RMS-normalised, so
    ``fn ~ N(0, logit_std / sqrt(N·d))``; 0.3 is about glm5_next's initialisation at d = 64, N = 4, larger values
    stand in for trained, more decisive mixing). The same seed gives the same branches and weights for every kind."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g)
    base = x.square().mean().sqrt()
    n = streams if kind != "residual" else 1
    X = x.unsqueeze(-2).expand(tokens, n, hidden).clone()
    prod = torch.eye(n).expand(tokens, n, n).clone()
    rms, stream_rms, gain = [1.0], [1.0], [1.0]
    cls = UnconstrainedHC if kind == "hc" else HyperConnection
    with torch.no_grad():
        for _ in range(depth):
            w1 = torch.randn(hidden, 2 * hidden, generator=g) / hidden**0.5
            w2 = torch.randn(2 * hidden, hidden, generator=g) / (2 * hidden) ** 0.5

            def branch(h, w1=w1, w2=w2):
                h = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + 1e-6)
                return branch_gain * torch.relu(h @ w1) @ w2

            hc = cls(hidden, streams) if kind != "residual" else None
            if hc is not None:
                hc.fn.copy_(torch.randn(hc.fn.shape, generator=g) * logit_std / (streams * hidden) ** 0.5)
                comb = hc.weights(X)[2]
                X = hc(X, branch)
                prod = prod @ comb
            else:
                X = X + branch(X[:, 0]).unsqueeze(1)
            rms.append(float(X.mean(1).square().mean().sqrt() / base))
            stream_rms.append(float(X.square().mean().sqrt() / base))
            gain.append(float(prod.abs().sum(-1).amax(-1).mean()))
    return {"rms": rms, "stream_rms": stream_rms, "gain": gain}


def plot_depth_norms(results: dict[str, list[dict]], key: str = "stream_rms", ax=None, log: bool = True):
    """``results[kind]`` = a list of ``depth_norms`` dicts (one per seed): the median over seeds as a line, the
    range as a band, one colour per kind. Returns the axes."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 3.6))
    for i, (kind, runs) in enumerate(results.items()):
        v = np.array([r[key] for r in runs])
        depth = np.arange(v.shape[1])
        ax.plot(depth, np.median(v, 0), color=f"C{i}", label=f"{KIND_LABELS.get(kind, kind)} ({len(runs)} seeds)")
        ax.fill_between(depth, v.min(0), v.max(0), color=f"C{i}", alpha=0.2)
    if log:
        ax.set_yscale("log")
    ax.set_xlim(0, None)
    ax.set_xlabel("layer")
    ax.legend(fontsize=8)
    return ax


class SinkhornExplorer:
    """ipywidgets: a random N × N matrix of logits times a scale, its row softmax, then ``rounds`` of Sinkhorn
    (``glmkit.mhc.sinkhorn``) → the matrix as a heat map with its row and column sums, and its largest singular
    value. ``.last``: {"matrix", "row_sums", "col_sums", "sigma_max"}. CSS class ``sinkhorn-explorer``."""

    def __init__(self, n: int = 4, rounds: int = 1, scale: float = 2.0, seed: int = 0):
        import ipywidgets as W

        slider = dict(continuous_update=False, style={"description_width": "initial"})
        self.rounds = W.IntSlider(value=rounds, min=0, max=20, description="Sinkhorn rounds", **slider)
        self.scale = W.FloatSlider(value=scale, min=0.0, max=6.0, step=0.25, description="logit scale", **slider)
        self.n = W.IntSlider(value=n, min=2, max=8, description="streams N", **slider)
        self.seed = W.IntSlider(value=seed, min=0, max=20, description="seed", **slider)
        self.status = W.HTML()
        self.image = W.Image(format="png", layout=W.Layout(width="420px"))
        controls = [self.rounds, self.scale, self.n, self.seed]
        self.widget = W.VBox([W.HBox(controls[:2]), W.HBox(controls[2:]), self.status, self.image])
        self.widget.add_class("sinkhorn-explorer")
        self.last: dict = {}
        for w in controls:
            w.observe(lambda _change: self.update(), names="value")
        self.update()

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def matrix(self) -> torch.Tensor:
        n = int(self.n.value)
        g = torch.Generator().manual_seed(int(self.seed.value))
        m = torch.softmax(self.scale.value * torch.randn(n, n, generator=g, dtype=torch.float64), dim=-1)
        return sinkhorn(m, int(self.rounds.value)) if self.rounds.value > 0 else m

    def update(self) -> None:
        from matplotlib.figure import Figure

        m = self.matrix()
        rows, cols = m.sum(-1), m.sum(-2)
        sigma = float(torch.linalg.matrix_norm(m, ord=2))
        fig = Figure(figsize=(4.2, 3.4), layout="constrained")
        ax = fig.add_subplot()
        im = ax.imshow(m.numpy(), vmin=0, vmax=1, cmap="viridis")
        fig.colorbar(im, ax=ax, shrink=0.8)
        n = m.shape[0]
        ax.set_xticks(range(n), [f"{c:.2f}" for c in cols.tolist()], fontsize=7)
        ax.set_yticks(range(n), [f"{r:.2f}" for r in rows.tolist()], fontsize=7)
        ax.set_xlabel("column sums")
        ax.set_ylabel("row sums")
        ax.set_title(f"{int(self.rounds.value)} Sinkhorn rounds: largest singular value {sigma:.3f}", fontsize=9)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=72)
        self.image.value = buf.getvalue()
        worst = float(max((rows - 1).abs().max(), (cols - 1).abs().max()))
        self.last = {"matrix": m, "row_sums": rows, "col_sums": cols, "sigma_max": sigma}
        self.status.value = (
            f"rows and columns sum to 1 within <b>{worst:.1e}</b>; largest singular value <b>{sigma:.3f}</b> "
            f"({'≤ 1: mixing cannot amplify' if sigma <= 1 + 1e-6 else '> 1: mixing can amplify'})"
        )


# ----------------------------------------------------------------------------------------------------
# KPool: what the pooled indexer selects
# ----------------------------------------------------------------------------------------------------


def toy_indexer(
    length: int, pool: int = 16, hidden: int = 64, heads: int = 4, dim: int = 32, smooth: int = 8, seed: int = 0
) -> dict:
    """Random inputs of a KPool indexer over ``length`` tokens (batch 1, float32): ``x`` [1, L, hidden] (the hidden
    states), ``q`` [1, L, heads, dim] (index queries), ``k`` [1, L, dim] (per-token index keys: the LayerNorm of a
    random projection of x, as the indexer's ``k_norm(wk(x))``), ``w`` [1, L, heads] (head weights, scaled by
    heads^-½ as the indexer's), ``gate_weight`` [dim, hidden] (``index_kpool_compress_gate``) and ``ape`` [pool, dim]
    (``index_kpool_compress_ape``). The gate and the offsets are drawn larger than at initialisation, so that the
    weights inside a pool are far from uniform. With ``smooth`` > 1 every x is the mean of ``smooth`` consecutive
    noise vectors (rescaled to unit variance): neighbouring tokens are alike; 1 = independent tokens."""
    if not all(isinstance(v, int) and v >= 1 for v in (length, pool, hidden, heads, dim, smooth)):
        raise ValueError("length, pool, hidden, heads, dim and smooth must be positive ints")
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, length + smooth - 1, hidden, generator=g)
    x = noise.unfold(1, smooth, 1).mean(-1) * smooth**0.5  # [1, L, hidden]
    wk = torch.randn(dim, hidden, generator=g) / hidden**0.5
    k = torch.nn.functional.layer_norm(x @ wk.T, (dim,), eps=1e-6)
    return {
        "x": x,
        "q": torch.randn(1, length, heads, dim, generator=g),
        "k": k,
        "w": torch.randn(1, length, heads, generator=g) * heads**-0.5,
        "gate_weight": torch.randn(dim, hidden, generator=g) / hidden**0.5,
        "ape": 0.5 * torch.randn(pool, dim, generator=g),
    }


def _gate(ind: dict) -> torch.Tensor:
    return torch.nn.functional.linear(ind["x"], ind["gate_weight"])  # the per-token gate scores [1, L, dim]


def kpool_query(ind: dict, topk: int, t: int) -> dict:
    """One query t of ``toy_indexer``'s inputs, both ways: ``token_scores`` [t + 1] (the lightning indexer over every
    token up to t, lesson 06) and ``dense`` (its top-``topk`` tokens, sorted); ``pool_scores`` [P] (KPool's scores,
    NaN for the pools not complete by t), ``pools`` (the chosen pools), ``tail`` (the tokens after the last complete
    pool) and ``kpool`` (every token KPool selects, sorted), all from ``glmkit.kpool``; ``pool``, ``t``, ``topk``."""
    from glmkit.kpool import first_real, kpool_topk, pool_candidates, pool_keys, pool_layout, pool_logits
    from glmkit.ops.lightning_indexer import lightning_indexer_reference

    q, k, w, ape = ind["q"], ind["k"], ind["w"], ind["ape"]
    L, K = k.shape[1], ape.shape[0]
    if not 0 <= t < L:
        raise ValueError(f"t must be in [0, {L}), got {t}")
    gate = _gate(ind)
    qt, wt = q[:, t : t + 1], w[:, t : t + 1]
    token = lightning_indexer_reference(qt, k[:, : t + 1], wt, offset=t)[0, 0]
    dense = token.topk(min(topk, t + 1)).indices.sort().values
    tokens, complete, ends = pool_layout(first_real(None, 1, L, q.device), L, K)
    scores = pool_logits(qt, pool_keys(k, gate, ape, tokens), wt)[0, 0]
    cand = pool_candidates(ends, complete, t, 1)[0, 0]
    idx, chosen = kpool_topk(qt, k, gate, wt, ape, topk, offset=t)
    sel = idx[0, 0].long()
    n_tail = (t + 1) % K
    return {
        "token_scores": token,
        "dense": dense,
        "pool_scores": scores.masked_fill(~cand, float("nan")),
        "pools": chosen[0, 0].nonzero().flatten(),
        "tail": torch.arange(t + 1 - n_tail, t + 1),
        "kpool": sel[sel >= 0].sort().values,
        "pool": K,
        "t": t,
        "topk": topk,
    }


def plot_kpool_query(view: dict, axes=None):
    """``kpool_query``'s view as two panels over the key positions 0 … t: the per-token index scores with the dense
    top-k marked (top), KPool's pool scores as one bar per pool, the chosen pools coloured (bottom); the chosen pools
    and the tail are shaded in both. Returns the axes."""
    import matplotlib.pyplot as plt

    if axes is None:
        _, axes = plt.subplots(2, 1, figsize=(13, 5), sharex=True)
    t, K = view["t"], view["pool"]
    token = view["token_scores"].numpy()
    dense = view["dense"].numpy()
    pools = set(view["pools"].tolist())
    for ax in axes:
        for i, p in enumerate(sorted(pools)):
            ax.axvspan(p * K - 0.5, p * K + K - 0.5, color="C0", alpha=0.12, lw=0,
                       label="a pool KPool selects" if i == 0 else None)  # fmt: skip
        if len(view["tail"]):
            ax.axvspan(view["tail"][0] - 0.5, t + 0.5, color="C2", alpha=0.3, lw=0, label="the tail (always kept)")
    axes[0].plot(np.arange(t + 1), token, color="0.5", lw=0.8, label="index score of each token")
    axes[0].plot(dense, token[dense], "o", color="C3", ms=3.5, label=f"dense top-{view['topk']} (lesson 06)")
    axes[0].set(ylabel="I[t, s]", title=f"query t = {t}: the lightning indexer scores every token")
    axes[0].legend(fontsize=8, loc="upper left", ncols=4)
    scores = view["pool_scores"].numpy()
    ok = ~np.isnan(scores)
    starts = np.arange(len(scores)) * K - 0.5
    colours = ["C0" if p in pools else "0.75" for p in range(len(scores))]
    axes[1].bar(starts[ok], scores[ok], width=K, align="edge", color=np.array(colours)[ok], edgecolor="white", lw=0.5)
    n = len(pools)
    axes[1].set(xlabel="key position s", ylabel="I[t, pool]", xlim=(-0.5, t + 0.5),
                title=f"KPool scores one key per pool of {K} and keeps the best {n} pools ({n * K} tokens) and "
                f"the tail ({len(view['tail'])} tokens)")  # fmt: skip
    axes[1].legend(fontsize=8, loc="upper left")
    return axes


def kpool_overlap(ind: dict, topk: int) -> dict:
    """How much of the dense indexer's choice KPool keeps, over the queries where both must choose (t + 1 ≥ topk +
    K: more complete pools than KPool selects): ``overlap``, the mean share of the dense top-``topk`` tokens (per-token
    keys, ``glmkit.ops.lightning_indexer.indexer_topk``) that KPool's selection (``glmkit.kpool.kpool_topk``, same
    queries and weights) holds; ``chance``, the mean share a random set of KPool's size would hold (its size / t + 1);
    ``queries``, how many queries were counted."""
    from glmkit.kpool import kpool_topk
    from glmkit.ops.lightning_indexer import indexer_topk
    from glmkit.ops.sparse_mla import selected_mask

    q, k, w, ape = ind["q"], ind["k"], ind["w"], ind["ape"]
    L, K = k.shape[1], ape.shape[0]
    dense = indexer_topk(q, k, w, topk)[0].long()  # [L, topk]
    idx, _ = kpool_topk(q, k, _gate(ind), w, ape, topk)
    sel = selected_mask(idx, L)[0]  # [L, L]
    hit = sel.gather(-1, dense.clamp_min(0)) & (dense >= 0)
    share = hit.sum(-1) / (dense >= 0).sum(-1)
    size = sel.sum(-1) / torch.arange(1, L + 1)
    rows = torch.arange(L) + 1 >= topk + K
    if not rows.any():
        raise ValueError(f"no query chooses: length {L} < topk + pool = {topk + K}")
    return {"overlap": float(share[rows].mean()), "chance": float(size[rows].mean()), "queries": int(rows.sum())}


# ----------------------------------------------------------------------------------------------------
# Two processes from a notebook
# ----------------------------------------------------------------------------------------------------


def torchrun(config: dict, nproc: int, workdir: str | os.PathLike, timeout: float = 600, threads: int = 1):
    """``python -m torch.distributed.run --standalone --nproc_per_node nproc -m glmkit train --quiet CONFIG`` with
    ``config`` written to ``workdir/<out_dir name>.json``, glmkit taken from this checkout, ``threads`` torch
    threads per process. Returns the ``subprocess.CompletedProcess`` (text output captured)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"{Path(config['out_dir']).name}.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += ["-m", "glmkit", "train", "--quiet", str(path)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=workdir)


def final_losses(out_dir: str | os.PathLike) -> list[float]:
    """The training losses recorded in a training folder's latest checkpoint (``glmkit.checkpoint`` layout)."""
    out_dir = Path(out_dir)
    ckpt = out_dir / (out_dir / "latest").read_text().strip()
    state = json.loads((ckpt / "trainer_state.json").read_text())
    return state["extra"]["history"]["losses"]


# ----------------------------------------------------------------------------------------------------
# A training run's curves
# ----------------------------------------------------------------------------------------------------


def plot_history(history, vocab_size: int | None = None, axes=None, title: str = ""):
    """Three panels from one ``glmkit.train.History``: the training loss (smoothed), the held-out loss and the MTP
    loss; the DSA indexer's recall (``stats["dsa_recall"]``); the MoE imbalance per step. ``vocab_size`` draws the
    uniform guess's loss, ln V. Returns the axes."""
    import matplotlib.pyplot as plt

    if axes is None:
        _, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    ax = axes[0]
    ax.plot(history.steps, history.smoothed(), label="train (smoothed)")
    if history.eval_losses:
        ax.plot(history.eval_steps, history.eval_losses, "o-", label="held-out")
    if "mtp" in history.aux:
        ax.plot(history.steps, history.smoothed(values=history.aux["mtp"]), label="MTP (token after next)")
    if vocab_size:
        ax.axhline(float(np.log(vocab_size)), color="k", ls=":", lw=1, label=f"uniform guess, ln {vocab_size}")
    ax.set(xlabel="step", ylabel="cross entropy (nats per token)", ylim=(0, None), title=f"{title}loss".strip())
    ax.legend(fontsize=8)
    rec = history.stats.get("dsa_recall", [])
    axes[1].plot(history.steps[: len(rec)], history.smoothed(values=rec) if rec else [], color="C2")
    axes[1].set(xlabel="step", ylabel="recall of the dense top-k", ylim=(0, 1.02), title="DSA indexer recall")
    axes[2].plot(history.steps[: len(history.max_violation)], history.max_violation, color="C3", lw=0.8)
    axes[2].set(xlabel="step", ylabel="max load / mean load − 1", ylim=(0, None), title="MoE imbalance (0 = balanced)")
    for a in axes:
        a.set_xlim(0, None)
    return axes


def plot_expert_load(history, moe_layers: list[int] | None = None, ax=None):
    """The last expert-load snapshot of a run as a heat map: one row per MoE layer (labelled with ``moe_layers``,
    the layers' indices), one column per expert, the share of the layer's routed slots. Returns the axes."""
    import matplotlib.pyplot as plt

    loads = np.array(history.expert_loads[-1])
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 0.5 + 0.55 * len(loads)))
    im = ax.imshow(loads, vmin=0, cmap="viridis", aspect="auto")
    ax.figure.colorbar(im, ax=ax, label="share of slots")
    labels = moe_layers if moe_layers is not None else list(range(len(loads)))
    ax.set_yticks(range(len(loads)), [str(i) for i in labels])
    ax.set(xlabel="expert", ylabel="layer", title=f"expert load at step {history.load_steps[-1]}")
    return ax


# ----------------------------------------------------------------------------------------------------
# The H200 run
# ----------------------------------------------------------------------------------------------------

RUN_DIRS = ("capstone_run_h200", "capstone_train_h200")  # benchmarks/README.md's name first


def _json(path: Path):
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def h200_results(root: str | os.PathLike | None = None) -> dict | None:
    """The committed capstone results (formats: benchmarks/README.md, "The capstone"), or None when none is in this
    checkout (``root``: the results folder, default benchmarks/results). Keys: ``bench`` (capstone_h200.json),
    ``md`` (the path of capstone_h200.md), ``run_dir`` (capstone_run_h200/), ``run`` (its run.json), ``history``
    (its history.json as a ``glmkit.train.History``), ``samples`` (samples.txt), ``files`` (the folder's file names);
    each None (``files``: []) when absent."""
    from glmkit.train import History

    root = Path(root) if root is not None else REPO / "benchmarks" / "results"
    js, md = root / "capstone_h200.json", root / "capstone_h200.md"
    run_dir = next((root / d for d in RUN_DIRS if (root / d).is_dir()), None)
    if not (js.is_file() or md.is_file() or run_dir is not None):
        return None
    out = {"bench": _json(js), "md": md if md.is_file() else None, "run_dir": run_dir, "run": None}
    out.update(history=None, samples=None, files=[])
    if run_dir is not None:
        out["files"] = sorted(p.name for p in run_dir.iterdir())
        out["run"] = _json(run_dir / "run.json")
        hist = _json(run_dir / "history.json")
        out["history"] = History.from_dict(hist) if hist is not None else None
        if (run_dir / "samples.txt").is_file():
            out["samples"] = (run_dir / "samples.txt").read_text(encoding="utf-8")
    return out


def train_rows(bench: dict) -> list[tuple]:
    """capstone_h200.json's training rows: (path, batch, T, ms per step, tokens/s, TFLOP/s, MFU %, peak GiB)."""
    path = {"triton": "our kernels", "torch": "torch path"}
    return [
        (path.get(r["backend"], r["backend"]), r["batch"], r["seq_len"], r["ms"], r["tokens_per_s"], r["tflops"],
         100 * r["mfu"], r["peak_mem_gib"])
        for r in bench.get("train", [])
    ]  # fmt: skip


def against_anchors(bench: dict) -> list[tuple[str, str, str]]:
    """(figure, measured on the H200, anchor or target) rows: the best MFU on our kernels against the issue's 30%
    (stretch 35%) and the anchors of perf-anchors §5/§8; the speed-up over the torch path at the torch path's batch
    against 2×; the best tokens/s. Figures the file lacks read "not measured"."""
    rows = bench.get("train", [])
    kern = [r for r in rows if r["backend"] == "triton"]
    torch_rows = [r for r in rows if r["backend"] == "torch"]
    best = max(kern, key=lambda r: r["mfu"]) if kern else None
    speedup = None
    for t in torch_rows:
        same = [r for r in kern if r["batch"] == t["batch"] and r["seq_len"] == t["seq_len"]]
        if same:
            speedup = same[0]["tokens_per_s"] / t["tokens_per_s"]
    nm = "not measured"
    return [
        ("MFU, our kernels (best batch)", f"{100 * best['mfu']:.1f}% at B = {best['batch']}" if best else nm,
         "target ≥ 30% (stretch 35%); small MoE on one node 20-30%; 124M dense GPT ≈ 40%"),
        ("speed-up over the torch path (same batch)", f"{speedup:.2f}×" if speedup else nm, "target ≥ 2×"),
        ("tokens/s, our kernels (best batch)", f"{best['tokens_per_s']:,.0f}" if best else nm,
         "124M dense GPT (llm.c): ≈ 463K per H100"),
        ("peak memory, our kernels (that batch)", f"{best['peak_mem_gib']:.1f} GiB" if best else nm,
         "141 GB on an H200"),
    ]  # fmt: skip
