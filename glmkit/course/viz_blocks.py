"""Lesson 03's depth experiments and their explorer: where the norm goes, and what DeepNorm's α and β each do.

Nothing here defines a block: the stacks are ``glmkit.course.lineage.ToyStack`` (post-LN, DeepNorm, pre-LN,
sandwich), with DeepNorm's α and β set separately, because they do different things:

* α weights the residual path inside the post-LN block, ``LN(α·x + G(x))``;
* β scales the value, output and FFN weights at initialisation (G starts small).

DeepNet's decoder-only rule is α = (2N)^¼, β = (8N)^-¼; GLM-130B's released code sets α = √(2N)
(``lineage.deepnet_constants``, ``lineage.glm130b_alpha``). Post-LN is α = β = 1.

    depth_profile(scheme, N, alpha, beta)   per layer: gradient norm of its weights, RMS of its output stream
    model_update(scheme, N, alpha, beta)    ‖logits after one Adam step − before‖ / ‖before‖ (DeepNet's "update")
    ALPHA_RULES                             the α choices of the explorer, by name
    DeepNormExplorer(depth)                 ipywidgets: depth, the α rule (or a custom α) and β's init on/off;
                                            CSS class "deepnorm-explorer", picture "deepnorm-image"

How it differs from before: lesson 03 carried these helpers and a 60-line widget class in its cells, and its
explorer tied β to α (so "α = 1" still had β's small initialisation and was not post-LN).
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch

from glmkit.course.lineage import ToyStack, deepnet_constants, glm130b_alpha

COLORS = {"post-LN": "tab:red", "DeepNorm": "tab:blue", "pre-LN": "tab:green", "sandwich": "tab:purple"}
ALPHA_RULES = {
    "DeepNet: α = (2N)^¼": lambda n: deepnet_constants(n)[0],
    "GLM-130B: α = √(2N)": glm130b_alpha,
    "α = 1": lambda n: 1.0,
    "custom": None,
}


def _tokens(vocab: int, B: int = 2, T: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, T + 1), generator=g)


def depth_profile(scheme: str, n_layers: int, alpha: float | None = None, beta: float | None = None, d: int = 32):
    """(gradient norm of each layer's weights, RMS of each layer's output) for one loss on random tokens; numpy
    arrays of length ``n_layers``. ``alpha``/``beta`` None: the scheme's defaults (``ToyStack``)."""
    model = ToyStack(scheme, n_layers, d=d, alpha=alpha, beta=beta, seed=0)
    rms: list[float] = []
    hooks = [
        layer.register_forward_hook(lambda m, i, o: rms.append(float(o.detach().pow(2).mean().sqrt())))
        for layer in model.layers
    ]
    x = _tokens(model.vocab)
    model.loss(x[:, :-1], x[:, 1:]).backward()
    for h in hooks:
        h.remove()
    grads = [
        math.sqrt(sum(float(p.grad.pow(2).sum()) for p in layer.parameters() if p.grad is not None))
        for layer in model.layers
    ]
    return np.array(grads), np.array(rms)


def model_update(
    scheme: str, n_layers: int, alpha: float | None = None, beta: float | None = None, lr: float = 1e-3, d: int = 32
) -> float:
    """‖logits after one Adam step − before‖ / ‖before‖ on the same batch (DeepNet's measure of the model update)."""
    model = ToyStack(scheme, n_layers, d=d, alpha=alpha, beta=beta, seed=0)
    x = _tokens(model.vocab)
    with torch.no_grad():
        before = model(x[:, :-1])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.loss(x[:, :-1], x[:, 1:]).backward()
    opt.step()
    with torch.no_grad():
        after = model(x[:, :-1])
    return float((after - before).norm() / before.norm())


class DeepNormExplorer:
    """Depth, the α rule and β's initialisation in; per-layer gradients and stream RMS out, with the output change
    after one Adam step for the DeepNorm stack as set and for plain post-LN.

    Plain Python underneath: set ``.depth.value``, ``.rule.value`` (a key of ``ALPHA_RULES``), ``.alpha.value``
    (used when the rule is "custom"), ``.use_beta.value`` and read ``.last`` (N, alpha, beta, update sizes).
    Displaying it shows ``.widget`` (CSS class "deepnorm-explorer"); the picture is ``.image``."""

    def __init__(self, depth: int = 16, rule: str = "DeepNet: α = (2N)^¼", use_beta: bool = True):
        import ipywidgets as W

        if rule not in ALPHA_RULES:
            raise ValueError(f"rule must be one of {list(ALPHA_RULES)}, got {rule!r}")
        self.depth = W.IntSlider(value=depth, min=2, max=48, step=2, description="depth N", continuous_update=False)
        self.rule = W.Dropdown(options=list(ALPHA_RULES), value=rule, description="α rule")
        self.alpha = W.FloatLogSlider(
            value=2.0,
            base=10,
            min=0,
            max=2,
            step=0.05,
            description="custom α",
            readout_format=".2f",
            continuous_update=False,
        )
        self.use_beta = W.Checkbox(value=use_beta, description="β init = (8N)^-¼ (off: β = 1)")
        self.status = W.HTML()
        self.image = W.Image(format="png", layout=W.Layout(width="100%", max_width="1000px"))
        self.image.add_class("deepnorm-image")
        self.widget = W.VBox(
            [W.HBox([self.depth, self.rule]), W.HBox([self.alpha, self.use_beta]), self.status, self.image]
        )
        self.widget.add_class("deepnorm-explorer")
        self.last: dict = {}
        self.updates = 0
        for w in (self.depth, self.rule, self.alpha, self.use_beta):
            w.observe(lambda _change: self.update(), names="value")
        self.update()

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def constants(self) -> tuple[float, float]:
        """(α, β) as the controls set them for the current depth."""
        n = int(self.depth.value)
        rule = ALPHA_RULES[self.rule.value]
        alpha = float(self.alpha.value) if rule is None else float(rule(n))
        beta = deepnet_constants(n)[1] if self.use_beta.value else 1.0
        return alpha, beta

    def update(self) -> None:
        """Recompute and redraw (called on every change)."""
        from matplotlib.figure import Figure

        n = int(self.depth.value)
        self.alpha.disabled = ALPHA_RULES[self.rule.value] is not None
        a, b = self.constants()
        curves = {f"DeepNorm α={a:.2f}, β={b:.2f}": depth_profile("DeepNorm", n, a, b)}
        curves.update({s: depth_profile(s, n) for s in ("post-LN", "pre-LN", "sandwich")})
        upd = {"DeepNorm": model_update("DeepNorm", n, a, b), "post-LN": model_update("post-LN", n)}
        fig = Figure(figsize=(11, 3.6), layout="constrained")
        ax0, ax1 = fig.subplots(1, 2)
        for name, (g, r) in curves.items():
            c = COLORS.get(name, "tab:blue")
            ax0.semilogy(range(1, n + 1), g, "o-", ms=3, color=c, label=name)
            ax1.plot(range(1, n + 1), r, "o-", ms=3, color=c, label=name)
        ax0.set(xlabel="layer", ylabel="‖∇ weights‖ (log)", title=f"gradients per layer, N = {n}")
        ax1.set(xlabel="layer", ylabel="RMS", title="the residual stream")
        ax1.set_ylim(bottom=0)
        for ax in (ax0, ax1):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=9)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=80)
        self.image.value = buf.getvalue()
        self.last = {"N": n, "alpha": a, "beta": b, "update": upd}
        self.status.value = (
            f"N = {n}: α = {a:.2f}, β = {b:.3f} · output change after one Adam step: "
            f"DeepNorm (as set) {upd['DeepNorm']:.3f}, post-LN {upd['post-LN']:.3f}"
        )
        self.updates += 1


__all__ = ["COLORS", "ALPHA_RULES", "depth_profile", "model_update", "DeepNormExplorer"]
