"""Pictures and a widget for lesson 02: what each GLM position scheme does to q·k over distance.

Nothing here defines a position scheme: every rotation is ``glmkit.ops.rope``'s (``rope_cos_sin``,
``apply_rope_reference``, ``apply_rope_2d``), so the curves are exactly what the models compute.

The schemes, in lineage order (shared/reference/glm-lineage.md §1.6, §2.2, §3, §9):

    "GLM-2021: learned 2D"            no rotation: the curve is flat because nothing turns. Positions are added
                                      to the token embedding, so they do reach q·k, but as whatever function of
                                      the two absolute positions the tables learn, not a built-in one of distance
    "ChatGLM-6B: 2D RoPE"             first D/2 dims rotated by the position, last D/2 by the block
                                      position (half-split pairs inside each half); in Part A the block
                                      position is 0, so only the first half turns with distance
    "GLM-130B: full RoPE"             all D dims, half-split
    "ChatGLM2/3, GLM-4: partial"      first D/2 dims, interleaved pairs (x[2i], x[2i+1]), θ = 1e4
    "GLM-4.5: partial, half-split"    first D/2 dims, half-split pairs (x[i], x[i + R/2]), θ = 1e6

    qk_curve(...)          q·k(Δ) / |q||k| for a query at position 0 and a key at position Δ
    dims_layout(...)       which plane (frequency index) each of the D dims belongs to (-1 = not rotated)
    plot_rope(...)         the three-panel picture; ``rope_png`` renders it to PNG bytes
    RopeExplorer()         ipywidgets: scheme, θ, rotary fraction, pairing → the picture (CSS class
                           "rope-explorer", the image "rope-image"); drive it from Python as well
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch

from glmkit.course.lineage import rope_2d
from glmkit.ops.rope import rope_cos_sin, rope_reference

# name -> (kind, theta, rotary fraction, pairing)
SCHEMES: dict[str, tuple[str, float, float, str]] = {
    "GLM-2021: learned 2D": ("learned", 1e4, 0.0, "half"),
    "ChatGLM-6B: 2D RoPE": ("rope2d", 1e4, 1.0, "half"),
    "GLM-130B: full RoPE": ("rope", 1e4, 1.0, "half"),
    "ChatGLM2/3, GLM-4: partial, interleaved": ("rope", 1e4, 0.5, "interleaved"),
    "GLM-4.5: partial, half-split": ("rope", 1e6, 0.5, "half"),
}
_COLORS = {"interleaved": "#4C78A8", "half": "#F58518"}


def rotary_dim_for(head_dim: int, fraction: float) -> int:
    """int(head_dim · fraction) rounded down to an even number (HF's rule plus RoPE's need for pairs)."""
    r = int(head_dim * fraction)
    return r - (r % 2)


def _check(kind: str, head_dim: int, fraction: float, pairing: str, theta: float) -> None:
    if kind not in ("learned", "rope2d", "rope"):
        raise ValueError(f"kind must be 'learned', 'rope2d' or 'rope', got {kind!r}")
    if not isinstance(head_dim, int) or head_dim < 4 or head_dim % 4:
        raise ValueError(f"head_dim must be an int >= 4 divisible by 4, got {head_dim!r}")
    if not 0.0 <= float(fraction) <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
    if pairing not in ("interleaved", "half"):
        raise ValueError(f"pairing must be 'interleaved' or 'half', got {pairing!r}")
    if not theta > 1:
        raise ValueError(f"theta must be > 1, got {theta!r}")


def _rotate_at(
    x: torch.Tensor, positions: torch.Tensor, kind: str, theta: float, fraction: float, pairing: str
) -> torch.Tensor:
    """x [N, D] (one vector per row) placed at ``positions`` [T]: returns [N, T, D] rotated copies."""
    N, D = x.shape
    T = positions.shape[0]
    xs = x[:, None, None, :].expand(N, 1, T, D).contiguous()  # [B=N, H=1, T, D]
    if kind == "learned":
        out = xs
    elif kind == "rope2d":
        cos_p, sin_p = rope_cos_sin(positions, D // 2, theta)
        cos_b, sin_b = rope_cos_sin(torch.zeros_like(positions), D // 2, theta)  # block position 0 (Part A)
        out = rope_2d(xs, cos_p, sin_p, cos_b, sin_b)
    else:
        R = rotary_dim_for(D, fraction)
        if R == 0:
            out = xs
        else:
            cos, sin = rope_cos_sin(positions, R, theta)
            out = rope_reference(xs, cos, sin, R, pairing)
    return out[:, 0]


def qk_curve(
    q: torch.Tensor,
    k: torch.Tensor | None = None,
    *,
    kind: str = "rope",
    theta: float = 1e4,
    fraction: float = 0.5,
    pairing: str = "interleaved",
    max_dist: int = 256,
) -> np.ndarray:
    """q·k / (|q| |k|) with the query at position 0 and the key at position Δ = 0..max_dist.

    q, k: [D] or [N, D] (k defaults to q: "how similar is a token to itself Δ positions away"); with N
    rows the curve is averaged over them. Returns float64 [max_dist + 1]. Relative positions only: for
    RoPE the same curve comes out for any query position (the lesson checks this).
    """
    q = q.float().reshape(-1, q.shape[-1])
    k = q if k is None else k.float().reshape(-1, k.shape[-1])
    _check(kind, q.shape[-1], fraction, pairing, theta)
    if not isinstance(max_dist, int) or max_dist < 1:
        raise ValueError(f"max_dist must be a positive int, got {max_dist!r}")
    pos = torch.arange(max_dist + 1)
    qr = _rotate_at(q, pos[:1], kind, theta, fraction, pairing)[:, 0]  # [N, D] at position 0
    kr = _rotate_at(k, pos, kind, theta, fraction, pairing)  # [N, T, D]
    dots = torch.einsum("nd,ntd->nt", qr.double(), kr.double())
    norms = q.double().norm(dim=-1)[:, None] * k.double().norm(dim=-1)[:, None]
    return (dots / norms).mean(0).numpy()


def dims_layout(head_dim: int, kind: str, fraction: float, pairing: str) -> np.ndarray:
    """[D] ints: the plane (frequency index i, θ_i = θ^(-2i/R)) each dim is rotated in, -1 = passes
    through. For "rope2d" the second half's planes are numbered from R/2 on (they turn with the block
    position)."""
    _check(kind, head_dim, fraction, pairing, 10.0)
    out = np.full(head_dim, -1)
    if kind == "learned":
        return out
    if kind == "rope2d":
        h = head_dim // 2
        for base in (0, h):
            for i in range(h // 2):
                out[base + i] = out[base + i + h // 2] = i + (base // 2)
        return out
    R = rotary_dim_for(head_dim, fraction)
    for i in range(R // 2):
        if pairing == "interleaved":
            out[2 * i] = out[2 * i + 1] = i
        else:
            out[i] = out[i + R // 2] = i
    return out


def _example_vectors(head_dim: int, n: int = 64, seed: int = 0) -> torch.Tensor:
    """A fixed set of query/key vectors with uneven energy across dims, like trained heads have."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(-torch.arange(head_dim, dtype=torch.float32) / (head_dim / 3))  # energy decays with dim
    return torch.randn(n, head_dim, generator=g) * scale[torch.randperm(head_dim, generator=g)]


def plot_rope(
    kind: str = "rope",
    theta: float = 1e4,
    fraction: float = 0.5,
    pairing: str = "interleaved",
    head_dim: int = 64,
    max_dist: int = 256,
    title: str = "",
    fig=None,
):
    """Three panels: (1) a vector's first and slowest planes turning as its position grows, (2) which
    dims rotate in which plane, (3) q·k over relative distance — one vector (thin), the average over 64
    vectors (thick), and the same vector read with the other pairing (dashed)."""
    import matplotlib.pyplot as plt

    _check(kind, head_dim, fraction, pairing, theta)
    if fig is None:
        fig = plt.figure(figsize=(13, 4.4))
    ax1, ax2, ax3 = (fig.add_subplot(1, 3, i + 1) for i in range(3))
    color = _COLORS[pairing]
    R = head_dim // 2 if kind == "rope2d" else (0 if kind == "learned" else rotary_dim_for(head_dim, fraction))

    # (1) planes turning: the angle of plane i at position p is p·θ^(-2i/R)
    circle = np.linspace(0, 2 * math.pi, 100)
    ax1.plot(np.cos(circle), np.sin(circle), color="#ccc", lw=1)
    if R:
        for i, c in ((0, color), (R // 2 - 1, "#54A24B")):
            freq = theta ** (-2 * i / R)
            for p in range(9):
                a = p * freq
                ax1.annotate(
                    "",
                    xy=(math.cos(a), math.sin(a)),
                    xytext=(0, 0),
                    arrowprops=dict(arrowstyle="->", color=c, alpha=0.25 + 0.75 * p / 8),
                )
            ax1.plot([], [], color=c, label=f"plane {i}: {freq:.2g} rad/token")
        ax1.legend(fontsize=9, loc="lower left")
    else:
        ax1.text(0, 0, "no rotation:\npositions are added\nto the embedding", ha="center", va="center", fontsize=11)
    ax1.set_aspect("equal")
    ax1.set_xlim(-1.15, 1.15)
    ax1.set_ylim(-1.15, 1.15)
    ax1.set_xticks([])
    ax1.set_yticks([])
    ax1.set_title("one vector at positions 0..8", fontsize=11)

    # (2) the dims: colour = plane index, grey = passes through
    lay = dims_layout(head_dim, kind, fraction, pairing)
    img = np.where(lay < 0, np.nan, lay).astype(float)[None, :]
    cmap = plt.get_cmap("viridis").with_extremes(bad="#dddddd")
    ax2.imshow(img, aspect="auto", cmap=cmap, interpolation="nearest")
    ax2.set_yticks([])
    ax2.set_xlabel("dim of the head (grey: not rotated)", fontsize=10)
    if kind == "rope2d":
        ax2.axvline(head_dim / 2 - 0.5, color="white", lw=2)
        ax2.set_title("2D: position | block position", fontsize=11)
    else:
        ax2.set_title(f"rotary_dim = {R} of {head_dim}, pairs: {pairing if R else '—'}", fontsize=11)

    # (3) q·k over relative distance
    xs = _example_vectors(head_dim)
    d = np.arange(max_dist + 1)
    one = qk_curve(xs[0], kind=kind, theta=theta, fraction=fraction, pairing=pairing, max_dist=max_dist)
    avg = qk_curve(xs, kind=kind, theta=theta, fraction=fraction, pairing=pairing, max_dist=max_dist)
    ax3.plot(d, one, color=color, lw=0.8, alpha=0.7, label="one vector")
    ax3.plot(d, avg, color="black", lw=2, label="average of 64")
    if kind == "rope" and R:
        other = "half" if pairing == "interleaved" else "interleaved"
        wrong = qk_curve(xs[0], kind=kind, theta=theta, fraction=fraction, pairing=other, max_dist=max_dist)
        ax3.plot(d, wrong, color=_COLORS[other], lw=0.8, ls="--", label=f"same vector, {other} pairs")
    ax3.axhline(0, color="#999", lw=0.5)
    ax3.set_ylim(-1.05, 1.05)
    ax3.set_xlabel("relative distance Δ (tokens)", fontsize=10)
    ax3.set_ylabel("q·k / |q||k|", fontsize=10)
    ax3.legend(fontsize=9, loc="lower right")
    ax3.set_title(f"q·k over distance, θ = {theta:.3g}", fontsize=11)
    if title:
        fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    return fig


def rope_png(dpi: int = 80, **kwargs) -> bytes:
    """``plot_rope(**kwargs)`` rendered to PNG bytes (for widgets.Image; no display needed)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 4.4), dpi=dpi)
    plot_rope(fig=fig, **kwargs)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


class RopeExplorer:
    """Pick a scheme (which sets θ, the rotary fraction and the pairing), then move any of them: the
    picture shows a vector turning, which dims rotate, and q·k over relative distance.

    Driven from Python as well: set ``.scheme.value``, ``.theta.value``, ``.fraction.value`` or
    ``.pairing.value`` and read ``.curve`` (the 64-vector average q·k over Δ), ``.kind``, ``.updates``.
    Displaying it shows ``.widget`` (a VBox with CSS class "rope-explorer"); the picture is an
    ``ipywidgets.Image`` (``.image``, class "rope-image") whose PNG changes with the settings.
    """

    def __init__(
        self, scheme: str = "ChatGLM2/3, GLM-4: partial, interleaved", head_dim: int = 64, max_dist: int = 256
    ):
        import ipywidgets as W

        if scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {list(SCHEMES)}, got {scheme!r}")
        self.head_dim, self.max_dist = head_dim, max_dist
        self.updates = 0
        self.curve: np.ndarray | None = None
        self._setting = False
        kind, theta, fraction, pairing = SCHEMES[scheme]
        self.kind = kind
        self.scheme = W.Dropdown(
            options=list(SCHEMES), value=scheme, description="scheme", layout=W.Layout(width="420px")
        )
        self.theta = W.FloatLogSlider(
            value=theta, base=10, min=2, max=7, step=0.25, description="θ", continuous_update=False
        )
        self.fraction = W.FloatSlider(
            value=fraction, min=0.0, max=1.0, step=0.125, description="rotary frac.", continuous_update=False
        )
        self.pairing = W.Dropdown(options=["interleaved", "half"], value=pairing, description="pairing")
        self.status = W.HTML()
        self.image = W.Image(format="png", layout=W.Layout(width="100%", max_width="1100px"))
        self.image.add_class("rope-image")
        self.widget = W.VBox(
            [W.HBox([self.scheme, self.pairing]), W.HBox([self.theta, self.fraction]), self.status, self.image]
        )
        self.widget.add_class("rope-explorer")
        self.scheme.observe(self._on_scheme, names="value")
        for w in (self.theta, self.fraction, self.pairing):
            w.observe(self._on_change, names="value")
        self.update()

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def _on_scheme(self, change) -> None:
        kind, theta, fraction, pairing = SCHEMES[change["new"]]
        self.kind = kind
        self._setting = True  # one redraw for the whole preset, not one per control
        try:
            self.theta.value, self.fraction.value, self.pairing.value = theta, fraction, pairing
        finally:
            self._setting = False
        self.update()

    def _on_change(self, _change) -> None:
        if not self._setting:
            self.update()

    def update(self) -> None:
        """Recompute the curve and redraw (called on every change)."""
        kind, theta, frac, pairing = self.kind, float(self.theta.value), float(self.fraction.value), self.pairing.value
        if kind == "learned":
            note = "learned positions: θ, fraction and pairing do not apply (nothing rotates)"
        elif kind == "rope2d":
            note = "2D RoPE rotates all dims (half by position, half by block position); fraction does not apply"
        else:
            note = ""
        self.curve = qk_curve(
            _example_vectors(self.head_dim),
            kind=kind,
            theta=theta,
            fraction=frac,
            pairing=pairing,
            max_dist=self.max_dist,
        )
        R = rotary_dim_for(self.head_dim, frac) if kind == "rope" else (self.head_dim if kind == "rope2d" else 0)
        self.status.value = (
            f"head dim {self.head_dim}, rotated dims {R}; average q·k at Δ = 16: "
            f"{self.curve[min(16, self.max_dist)]:+.2f}, at Δ = {self.max_dist}: "
            f"{self.curve[-1]:+.2f}" + (f" <i>({note})</i>" if note else "")
        )
        self.image.value = rope_png(
            kind=kind,
            theta=theta,
            fraction=frac,
            pairing=pairing,
            head_dim=self.head_dim,
            max_dist=self.max_dist,
            title=self.scheme.value,
        )
        self.updates += 1


__all__ = ["SCHEMES", "rotary_dim_for", "qk_curve", "dims_layout", "plot_rope", "rope_png", "RopeExplorer"]
