"""Lesson 08's numbers, pictures and explorers for multi-token prediction (MTP) and speculative decoding: what a
draft-and-verify round is worth (the speed-up model of perf-anchors §7, extended to n drafts), what a draft and a
verify cost on GLM-4.5 and GLM-5 (weight bytes, experts visited), the measured points (this machine's, and the
committed H200 results), and a round-by-round picture of drafted, accepted and rejected tokens.

    tokens_per_round(acceptance, n)        tokens one round commits on average: 1 + Σ_j Π_{i ≤ j} α_i
    speedup(acceptance, n, c, v, o)        that over the round's cost in plain decode steps, 1 + n·c + v + o
    acceptance_for(target, n, c, v)        the constant acceptance α a speed-up needs (None: out of reach)
    verify_cost(name, n)                   v of a memory-bound verify of n + 1 tokens on a published MoE config:
                                           the extra weight bytes of the experts the extra tokens visit
    draft_cost(name)                       c: the bytes one MTP draft reads (its block, eh_proj, the LM head) over
                                           those of one decode step of the main model
    time_forward(model, tokens, context)   seconds per cached forward of T new tokens (min over repeats)
    costs_from_stats(stats, step_s)        c, v, o measured from ``SpeculativeStats.times`` and a plain step's time
    gpu_points(name)                       the committed H200 run (benchmarks/results/speculative_h200.md) as rows,
                                           or None when it is not in this checkout
    plot_speedup_curves(...)               speed-up against acceptance for n = 1, 2, 3, with measured points
    plot_predicted_vs_measured(points)     the model's speed-up against the measured one
    trace_spans(tokens, trace, prompt_len) / trace_html(...)   every generated token by where it came from:
                                           an accepted draft, a rejected draft, or the main model's own pick
    SpeedupExplorer(), RoundStepper(...)   ipywidgets: acceptance × draft length → speed-up; stepping through
                                           the rounds of a real generation

How it differs from the lessons before it: lessons 04–07 count what one forward reads or stores; this one counts
how many tokens a forward can commit. Every cost here is derived from glmkit's own objects: the bytes from
``glmkit.course.viz_mla.weights_read`` (Decoder on the meta device), the measured times from
``glmkit.speculative.SpeculativeStats``, the traces from ``generate_speculative(trace=True)``.

The explorers redraw a PNG inside an ``ipywidgets.Image`` (as lessons 02–07 do), carry the CSS classes
``speedup-explorer`` and ``round-stepper``, and can be driven from Python: set the controls' ``.value`` and read
``.last``.
"""

from __future__ import annotations

import html
import io
import re
import time
from collections.abc import Callable, Sequence

import torch

TIMED = ("draft", "verify", "accept", "rollback", "other")  # SpeculativeStats.times without the prefill
KIND_COLOURS = {"prompt": "#777777", "main": "#0b5cad", "accepted": "#1a7f37", "rejected": "#cf222e"}


# ----------------------------------------------------------------------------------------------------
# The speed-up model
# ----------------------------------------------------------------------------------------------------


def _acceptances(acceptance, n: int) -> list[float]:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n (draft tokens) must be an int >= 0, got {n!r}")
    if isinstance(acceptance, (int, float)):
        alphas = [float(acceptance)] * n
    else:
        alphas = [float(a) for a in acceptance]
        if len(alphas) < n:
            raise ValueError(f"{len(alphas)} acceptance values for {n} draft positions")
    if any(not 0.0 <= a <= 1.0 for a in alphas[:n]):
        raise ValueError(f"acceptance values must lie in [0, 1], got {alphas[:n]}")
    return alphas[:n]


def tokens_per_round(acceptance, n: int) -> float:
    """Expected tokens one round commits: the main model's own token plus draft j when drafts 1..j are all accepted,
    1 + Σ_{j=1..n} α_1 ⋯ α_j. ``acceptance``: one α for every position, or α_i per position (as
    ``SpeculativeStats.acceptance`` reports: P(draft i accepted | drafts before it accepted))."""
    total, run = 1.0, 1.0
    for a in _acceptances(acceptance, n):
        run *= a
        total += run
    return total


def speedup(acceptance, n: int, draft_cost: float, verify_cost: float = 0.0, overhead: float = 0.0) -> float:
    """Tokens per second of speculative decoding over plain decoding: ``tokens_per_round`` over the round's cost in
    plain decode steps, 1 + n · c + v + o (c: one draft, v: the verify forward's extra cost over a one-token step,
    o: the round's bookkeeping). n = 1 is perf-anchors §7's (1 + α) / (1 + c + v). Measured v may be negative: a
    plain step carries per-token costs (its loop's checks) that the verify forward does not."""
    if not draft_cost >= 0:
        raise ValueError(f"draft_cost must be >= 0, got {draft_cost!r}")
    cost = 1.0 + n * draft_cost + verify_cost + overhead
    if not cost > 0:
        raise ValueError(f"a round must cost something: 1 + n·c + v + o = {cost!r}")
    return tokens_per_round(acceptance, n) / cost


def acceptance_for(target: float, n: int, draft_cost: float, verify_cost: float = 0.0) -> float | None:
    """The constant acceptance α (the same at every draft position) at which ``speedup`` reaches ``target``; None
    when even α = 1 does not (the speed-up rises with α, so bisection finds it)."""
    if speedup(1.0, n, draft_cost, verify_cost) < target:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if speedup(mid, n, draft_cost, verify_cost) < target else (lo, mid)
    return hi


# ----------------------------------------------------------------------------------------------------
# What a draft and a verify read on the published MoE configs (memory-bound decoding)
# ----------------------------------------------------------------------------------------------------


def verify_cost(name: str, n: int) -> float:
    """v for a verify of n + 1 tokens of one sequence on ``name`` (a model of ``glmkit.course.viz_mla.MODELS``),
    when a step costs its weight bytes: the n + 1 tokens visit more routed experts than one token does, exactly as
    a batch of n + 1 sequences would (uniform routing; ``viz_mla.weights_read``). 0 for a dense model."""
    from glmkit.course.viz_mla import weights_read

    return weights_read(name, n + 1) / weights_read(name, 1) - 1.0


def draft_cost(name: str) -> float:
    """c for ``name``: the weight bytes one MTP draft reads — its block (the routed experts one token visits), its
    norms and eh_proj, and the LM head it shares with the main model, read again — over the bytes of one main decode
    step (``viz_mla.weights_read(name, 1)``, LM head included). Built on the meta device: nothing is allocated."""
    from glmkit.course.viz_mla import model_config, weights_read
    from glmkit.models.decoder import Decoder

    cfg = model_config(name)
    with torch.device("meta"):
        model = Decoder(cfg)
    mtp = model.mtp_module(1)
    shared = {id(model.embed_tokens.weight), id(model.lm_head.weight)}
    # the block, norms and eh_proj, plus its own head copy when untied; a draft reads one embedding row (negligible)
    own = sum(p.numel() for p in mtp.parameters() if id(p) not in shared and p is not mtp.embed_tokens.weight)
    unvisited = 0
    if cfg.n_routed_experts:
        expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
        unvisited = (cfg.n_routed_experts - cfg.num_experts_per_tok) * expert
    head = model.lm_head.weight.numel() if cfg.mtp_tied else 0
    return 2.0 * (own - unvisited + head) / weights_read(name, 1)


# ----------------------------------------------------------------------------------------------------
# Measured costs
# ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def time_forward(model, tokens: Sequence[int], context: int = 64, repeats: int = 5, seed: int = 0) -> list[float]:
    """Seconds of one cached forward of T new tokens after a prompt of ``context`` tokens, for each T in ``tokens``
    (the minimum over ``repeats``: on a shared machine the minimum is the least disturbed run). A verify of n drafts
    is such a forward with T = n + 1; plain decoding is T = 1."""
    g = torch.Generator().manual_seed(seed)
    vocab, dev = model.config.vocab_size, model.device
    prompt = torch.randint(0, vocab, (1, context), generator=g).to(dev)
    out = []
    for T in tokens:
        new = torch.randint(0, vocab, (1, T), generator=g).to(dev)
        best = float("inf")
        for _ in range(repeats):
            cache = model.new_cache(1, context + T)
            model(prompt, cache=cache)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t = time.perf_counter()
            model(new, cache=cache)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            best = min(best, time.perf_counter() - t)
        out.append(best)
    return out


def costs_from_stats(stats, step_s: float) -> dict[str, float]:
    """c, v and o of the speed-up model, measured: per round, the draft time over n plain steps (``c``), the verify
    time over one plain step minus one (``v``), the accept, rollback and other time over one plain step (``o``);
    ``stats``: ``SpeculativeStats`` of a run with ``timing=True``; ``step_s``: seconds per token of plain decoding."""
    if not stats.rounds or not stats.times:
        raise ValueError("costs_from_stats needs SpeculativeStats of a run with timing=True")
    if not step_s > 0:
        raise ValueError(f"step_s must be > 0, got {step_s!r}")
    per = {k: stats.times.get(k, 0.0) / stats.rounds / step_s for k in TIMED}
    return {
        "c": per["draft"] / stats.draft_tokens,
        "v": per["verify"] - 1.0,
        "o": per["accept"] + per["rollback"] + per["other"],
    }


# ----------------------------------------------------------------------------------------------------
# The committed GPU run
# ----------------------------------------------------------------------------------------------------


def _rows(table: str) -> list[dict[str, str]]:
    lines = [ln for ln in table.splitlines() if ln.strip().startswith("|")]
    head = [c.strip() for c in lines[0].strip().strip("|").split("|")]
    return [dict(zip(head, (c.strip() for c in ln.strip().strip("|").split("|")))) for ln in lines[2:]]


def _number(text: str) -> float | None:
    m = re.search(r"-?\d+(\.\d+)?", text or "")
    return float(m.group()) if m else None


def gpu_points(name: str = "speculative_h200.md") -> list[dict] | None:
    """The eager decoding rows of ``benchmarks/results/<name>`` (written by benchmarks/bench_speculative.py), one
    dict per draft length n: ``acceptance`` (per position), ``tokens_per_forward``, ``speedup`` (vs generate()),
    ``speedup_lean`` (vs the lean plain loop), and from the "where the time goes" table ``c``, ``v``, ``o`` in
    lean plain steps (None where that table is missing). None when the file is not in this checkout."""
    from glmkit.course.tables import _results_path, read_benchmark

    if not _results_path(name).exists():
        return None
    bench = read_benchmark(name)
    decode = _rows(bench.tables("Decoding (eager)")[0])
    lean = next(r for r in decode if r["mode"] == "lean")
    lean_ms = float(lean["ms/token"])
    where: dict[int, dict[str, str]] = {}
    try:
        for r in _rows(bench.tables("Where the time goes")[0]):
            where[int(r["draft tokens"])] = r
    except (KeyError, IndexError):
        pass
    points = []
    for r in decode:
        if not r["mode"].startswith("n="):
            continue
        n = int(r["draft tokens"])
        p = {
            "n": n,
            "acceptance": [float(a) for a in r["acceptance per draft position"].split(",")],
            "tokens_per_forward": float(r["tokens per main forward"]),
            "speedup": float(r["vs generate()"]),
            "speedup_lean": float(r["vs lean loop"]),
            "c": None,
            "v": None,
            "o": None,
        }
        w = where.get(n)
        if w is not None:
            round_ms = float(w["ms per round"])
            share = {k: _number(w.get(k, "")) / 100 for k in ("prefill", *TIMED)}
            per_round = {k: round_ms * share[k] / lean_ms for k in TIMED}  # in lean plain steps
            p["c"] = per_round["draft"] / n
            p["v"] = per_round["verify"] - 1.0
            p["o"] = per_round["accept"] + per_round["rollback"] + per_round["other"]
        points.append(p)
    return points


# ----------------------------------------------------------------------------------------------------
# Pictures
# ----------------------------------------------------------------------------------------------------


def _axes(ax, figsize=(7, 4)):
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=figsize)
    return ax


def plot_speedup_curves(
    draft_cost: float,
    verify_cost: Callable[[int], float] | float = 0.0,
    ns: Sequence[int] = (1, 2, 3),
    points: Sequence[dict] = (),
    anchors: Sequence[dict] = (),
    ax=None,
    title: str | None = None,
):
    """Speed-up against a constant acceptance α for each draft length n (``verify_cost``: a number, or a function
    of n). ``points``: measured runs, dicts with ``alpha``, ``speedup``, ``label`` (and ``n`` for the colour);
    ``anchors``: published figures, the same keys, drawn as open markers. The dotted line is 1× (no gain)."""
    ax = _axes(ax)
    alphas = [i / 100 for i in range(101)]
    for i, n in enumerate(ns):
        v = verify_cost(n) if callable(verify_cost) else verify_cost
        ax.plot(alphas, [speedup(a, n, draft_cost, v) for a in alphas], color=f"C{i}", label=f"model, n = {n}")
    colour = {n: f"C{i}" for i, n in enumerate(ns)}
    for p in points:
        ax.plot(p["alpha"], p["speedup"], "o", color=colour.get(p.get("n"), "k"), ms=7)
        ax.annotate(p["label"], (p["alpha"], p["speedup"]), textcoords="offset points", xytext=(5, -12), fontsize=8)
    for p in anchors:
        ax.plot(p["alpha"], p["speedup"], "s", mfc="none", color="k", ms=8)
        ax.annotate(p["label"], (p["alpha"], p["speedup"]), textcoords="offset points", xytext=(-10, 7), fontsize=8)
    ax.axhline(1.0, color="k", ls=":", lw=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, max(4.2, *(p["speedup"] * 1.1 for p in (*points, *anchors))))
    ax.set_xlabel("acceptance α of every draft position")
    ax.set_ylabel("tokens/s, speculative ÷ plain")
    ax.set_title(title or f"the speed-up model: draft cost c = {draft_cost:.2f} plain steps")
    ax.legend(fontsize=8, loc="upper left")
    return ax


def plot_predicted_vs_measured(points: Sequence[dict], ax=None, title: str = "the model against the measurements"):
    """One marker per measured run (dicts with ``predicted``, ``measured``, ``label``, optional ``colour``): on the
    diagonal the speed-up model explains the measurement."""
    ax = _axes(ax, figsize=(4.5, 4.5))
    top = max([2.0, *(max(p["predicted"], p["measured"]) * 1.15 for p in points)])
    ax.plot([0, top], [0, top], color="k", lw=1, ls="--", label="predicted = measured")
    for i, p in enumerate(points):
        colour = p.get("colour", "C0")
        ax.plot(p["predicted"], p["measured"], "o", color=colour, ms=7)
        offset = (8, 10 - 11 * (i % 4))  # labels of nearby points stacked one line apart
        xy = (p["predicted"], p["measured"])
        ax.annotate(p["label"], xy, textcoords="offset points", xytext=offset, fontsize=8, color=colour)
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_aspect("equal")
    ax.set_xlabel("predicted speed-up (measured α, c, v, o)")
    ax.set_ylabel("measured speed-up")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left")
    return ax


def _png(fig, dpi: int = 72) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------
# Drafted, accepted and rejected tokens
# ----------------------------------------------------------------------------------------------------


def trace_spans(tokens: Sequence[int], trace, n_generated: int | None = None, row: int = 0) -> list[tuple]:
    """Where every generated token of one row came from, in order: (round, kind, token) with kind "main" (the main
    model's own choice: the prefill's token, a correction after a rejection, or the bonus token after n
    accepted drafts), "accepted" (a draft the main model agreed with) or "rejected" (a draft it did not: shown, not
    part of the text). ``tokens``: the row's generated ids (``out.tokens[row]``); ``trace``: its
    ``SpeculativeStats.trace`` (batch 1, or ``row`` of a batch); round -1 is the prefill."""
    n_generated = len(tokens) if n_generated is None else n_generated
    if not trace:
        return [(-1, "main", int(t)) for t in tokens[:n_generated]]
    start0 = trace[0].start
    spans = [(-1, "main", int(tokens[0]))] if n_generated else []
    done = 1
    for r, rnd in enumerate(trace):
        if done >= n_generated:
            break
        if rnd.start - start0 + 1 != done:
            raise ValueError(f"round {r} starts at column {rnd.start}: the trace does not match these tokens")
        drafts = rnd.drafts[row]
        for d in drafts[: rnd.kept]:
            if done < n_generated:
                spans.append((r, "accepted", int(d)))
                done += 1
        for d in drafts[rnd.kept :]:
            spans.append((r, "rejected", int(d)))
        if done < n_generated:
            spans.append((r, "main", int(tokens[done])))
            done += 1
    return spans


def _text(decode: Callable[[list[int]], str], t: int) -> str:
    s = decode([t])
    return html.escape(s).replace("\n", "↵<br>")


def trace_html(
    decode: Callable[[list[int]], str],
    prompt: Sequence[int],
    tokens: Sequence[int],
    trace,
    upto: int | None = None,
    highlight: int | None = None,
    show_rejected: bool = True,
) -> str:
    """The prompt (grey), then every generated token coloured by ``trace_spans``: accepted drafts green, the main
    model's own tokens blue, rejected drafts red and struck through (they never enter the text). ``upto``: only
    rounds <= upto; ``highlight``: a round drawn with a yellow background; ``decode``: token ids → text."""
    parts = [f"<span style='color:{KIND_COLOURS['prompt']}'>{html.escape(decode(list(prompt)))}</span>"]
    for r, kind, t in trace_spans(tokens, trace):
        if upto is not None and r > upto:
            break
        if kind == "rejected" and not show_rejected:
            continue
        style = f"color:{KIND_COLOURS[kind]}"
        if kind == "rejected":
            style += ";text-decoration:line-through;font-size:80%"
        if kind == "accepted":
            style += ";font-weight:bold"
        if highlight is not None and r == highlight:
            style += ";background:#fff3b0"
        parts.append(f"<span class='spec-{kind}' style='{style}'>{_text(decode, t)}</span>")
    legend = " · ".join(
        f"<span style='color:{KIND_COLOURS[k]}'>{w}</span>"
        for k, w in (
            ("prompt", "prompt"),
            ("main", "main model's own token"),
            ("accepted", "accepted draft"),
            ("rejected", "rejected draft (not in the text)"),
        )
    )
    return (
        "<div class='spec-trace' style='font-family:monospace;line-height:1.6;white-space:pre-wrap'>"
        + "".join(parts)
        + f"</div><div style='font-size:85%;margin-top:4px'>{legend}</div>"
    )


# ----------------------------------------------------------------------------------------------------
# Explorers
# ----------------------------------------------------------------------------------------------------


class SpeedupExplorer:
    """ipywidgets: the first draft's acceptance α₁, how much less each later draft is accepted (α_i = α₁ · ρ^{i−1}),
    the draft length n, the draft cost c and the verify cost v → the speed-up for n = 1..8 as bars, the chosen n
    highlighted. ``.last``: {"acceptance", "tokens_per_round", "speedup", "best_n"}. CSS class ``speedup-explorer``."""

    MAX_N = 8

    def __init__(self, alpha: float = 0.8, decay: float = 0.9, n: int = 3, c: float = 0.05, v: float = 0.0):
        import ipywidgets as W

        slider = dict(continuous_update=False, style={"description_width": "initial"})
        self.alpha = W.FloatSlider(value=alpha, min=0.0, max=1.0, step=0.01, description="α₁ (first draft)", **slider)
        self.decay = W.FloatSlider(value=decay, min=0.0, max=1.0, step=0.05, description="ρ (later drafts)", **slider)
        self.n = W.IntSlider(value=n, min=1, max=self.MAX_N, description="draft tokens n", **slider)
        self.c = W.FloatSlider(value=c, min=0.0, max=0.5, step=0.01, description="draft cost c", **slider)
        self.v = W.FloatSlider(value=v, min=0.0, max=1.0, step=0.05, description="verify cost v", **slider)
        self.status = W.HTML()
        self.image = W.Image(format="png", layout=W.Layout(width="640px"))
        controls = [self.alpha, self.decay, self.n, self.c, self.v]
        self.widget = W.VBox([W.HBox(controls[:3]), W.HBox(controls[3:]), self.status, self.image])
        self.widget.add_class("speedup-explorer")
        self.last: dict = {}
        for w in controls:
            w.observe(lambda _change: self.update(), names="value")
        self.update()

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def acceptance(self, n: int) -> list[float]:
        return [self.alpha.value * self.decay.value**i for i in range(n)]

    def update(self) -> None:
        from matplotlib.figure import Figure

        ns = list(range(1, self.MAX_N + 1))
        c, v, chosen = self.c.value, self.v.value, int(self.n.value)
        s = [speedup(self.acceptance(n), n, c, v) for n in ns]
        fig = Figure(figsize=(7.5, 3.0), layout="constrained")
        ax = fig.add_subplot()
        ax.bar(ns, s, color=["C1" if n == chosen else "C0" for n in ns])
        ax.axhline(1.0, color="k", ls=":", lw=1)
        ax.set_ylim(0, max(2.0, max(s) * 1.15))
        ax.set_xticks(ns)
        ax.set_xlabel("draft tokens n")
        ax.set_ylabel("speed-up")
        ax.set_title(f"α₁ = {self.alpha.value:.2f}, ρ = {self.decay.value:.2f}, c = {c:.2f}, v = {v:.2f}")
        for n, y in zip(ns, s):
            ax.text(n, y, f"{y:.2f}", ha="center", va="bottom", fontsize=8)
        self.image.value = _png(fig)
        acc = self.acceptance(chosen)
        e = tokens_per_round(acc, chosen)
        best = ns[max(range(len(s)), key=s.__getitem__)]
        self.last = {"acceptance": acc, "tokens_per_round": e, "speedup": s[chosen - 1], "best_n": best}
        self.status.value = (
            f"n = {chosen}: acceptance per position {', '.join(f'{a:.2f}' for a in acc)} → "
            f"<b>{e:.2f} tokens per round</b> for a round costing {1 + chosen * c + v:.2f} plain steps: "
            f"<b>{s[chosen - 1]:.2f}×</b>. Best draft length here: n = {best}."
        )


class RoundStepper:
    """ipywidgets: a slider over the rounds of one generation (``generate_speculative(..., trace=True)``, batch
    1). Shows the text up to that round, the round in yellow, and what happened in it. ``.last``: {"round",
    "drafts", "accepted", "committed"}. CSS class ``round-stepper``."""

    def __init__(self, decode: Callable[[list[int]], str], prompt: Sequence[int], tokens: Sequence[int], trace):
        import ipywidgets as W

        if not trace:
            raise ValueError("RoundStepper needs a trace: generate_speculative(..., trace=True)")
        self.decode, self.prompt, self.tokens, self.trace = decode, list(prompt), list(tokens), trace
        self.spans = trace_spans(self.tokens, trace)
        last = max(r for r, _, _ in self.spans)
        self.round = W.IntSlider(
            value=0,
            min=0,
            max=last,
            description="round",
            continuous_update=False,
            style={"description_width": "initial"},
        )
        self.status = W.HTML()
        self.text = W.HTML()
        self.widget = W.VBox([self.round, self.status, self.text])
        self.widget.add_class("round-stepper")
        self.last: dict = {}
        self.round.observe(lambda _change: self.update(), names="value")
        self.update()

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def update(self) -> None:
        r = int(self.round.value)
        mine = [(kind, t) for rr, kind, t in self.spans if rr == r]
        drafts = self.trace[r].drafts[0]
        show = lambda ts: " ".join(repr(self.decode([t])) for t in ts)  # noqa: E731
        accepted = [t for k, t in mine if k == "accepted"]
        main = [t for k, t in mine if k == "main"]
        self.last = {"round": r, "drafts": drafts, "accepted": len(accepted), "committed": len(accepted) + len(main)}
        self.status.value = (
            f"round {r}: drafted {show(drafts)}; the main model accepted <b>{len(accepted)}</b> of {len(drafts)}"
            + (f" and added its own {show(main)}" if main else "")
            + f": <b>{len(accepted) + len(main)} tokens</b> from one verify forward."
        )
        self.text.value = trace_html(self.decode, self.prompt, self.tokens, self.trace, upto=r, highlight=r)


__all__ = [
    "tokens_per_round",
    "speedup",
    "acceptance_for",
    "verify_cost",
    "draft_cost",
    "time_forward",
    "costs_from_stats",
    "gpu_points",
    "plot_speedup_curves",
    "plot_predicted_vs_measured",
    "trace_spans",
    "trace_html",
    "SpeedupExplorer",
    "RoundStepper",
]
