"""glmkit.course.viz_positions: the q·k-over-distance curves agree with rotating vectors by hand through
glmkit.ops.rope, the dims layout matches each pairing, and the explorer redraws when a control moves."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch

from glmkit.course import viz_positions as vp
from glmkit.ops.rope import rope_cos_sin, rope_reference


@pytest.mark.parametrize("pairing", ["interleaved", "half"])
@pytest.mark.parametrize("fraction", [0.25, 0.5, 1.0])
def test_curve_is_q_dot_k_of_rotated_vectors(pairing, fraction):
    D, theta, dist = 32, 1e4, 40
    q, k = torch.randn(D), torch.randn(D)
    curve = vp.qk_curve(q, k, kind="rope", theta=theta, fraction=fraction, pairing=pairing, max_dist=dist)
    R = vp.rotary_dim_for(D, fraction)
    m = int(torch.randint(0, 500, ()))  # any query position: only Δ matters
    pos = torch.tensor([m, m + 7, m + dist])
    cos, sin = rope_cos_sin(pos, R, theta)
    rq = rope_reference(q[None, None, None].expand(1, 1, 3, D).contiguous(), cos, sin, R, pairing)[0, 0]
    rk = rope_reference(k[None, None, None].expand(1, 1, 3, D).contiguous(), cos, sin, R, pairing)[0, 0]
    norm = (q.norm() * k.norm()).item()
    assert curve.shape == (dist + 1,)
    np.testing.assert_allclose(curve[7], (rq[0] @ rk[1]).item() / norm, atol=1e-4)
    np.testing.assert_allclose(curve[dist], (rq[0] @ rk[2]).item() / norm, atol=1e-4)


def test_learned_is_flat_and_self_similarity_starts_at_one():
    x = torch.randn(8, 16)
    flat = vp.qk_curve(x, kind="learned", max_dist=20)
    np.testing.assert_allclose(flat, 1.0, atol=1e-6)
    for kind in ("rope2d", "rope"):
        c = vp.qk_curve(x, kind=kind, max_dist=20)
        assert abs(c[0] - 1) < 1e-6 and c.min() < 0.999


def test_pairings_differ_for_one_vector_and_layout_is_right():
    x = vp._example_vectors(64, n=1)
    a = vp.qk_curve(x, kind="rope", pairing="interleaved", max_dist=64)
    b = vp.qk_curve(x, kind="rope", pairing="half", max_dist=64)
    assert np.abs(a - b).max() > 1e-3
    lay = vp.dims_layout(16, "rope", 0.5, "interleaved")
    assert lay.tolist() == [0, 0, 1, 1, 2, 2, 3, 3] + [-1] * 8
    lay = vp.dims_layout(16, "rope", 0.5, "half")
    assert lay.tolist() == [0, 1, 2, 3, 0, 1, 2, 3] + [-1] * 8
    assert (vp.dims_layout(16, "rope2d", 1.0, "half") >= 0).all()
    assert (vp.dims_layout(16, "learned", 0.0, "half") == -1).all()
    with pytest.raises(ValueError, match="pairing"):
        vp.dims_layout(16, "rope", 0.5, "neox")


def test_explorer_redraws_on_every_control():
    e = vp.RopeExplorer(max_dist=64)
    assert "rope-explorer" in e.widget._dom_classes and "rope-image" in e.image._dom_classes
    png, n = e.image.value, e.updates
    assert png[:4] == b"\x89PNG"
    e.pairing.value = "half"
    assert e.updates == n + 1 and e.image.value != png
    png = e.image.value
    e.theta.value = 1e6
    assert e.image.value != png
    e.scheme.value = "GLM-2021: learned 2D"
    assert e.kind == "learned" and np.allclose(e.curve, 1.0)
    n = e.updates
    e.scheme.value = "GLM-4.5: partial, half-split"  # a preset sets three controls: one redraw
    assert e.updates == n + 1 and e.pairing.value == "half" and e.theta.value == pytest.approx(1e6)
    with pytest.raises(ValueError, match="scheme"):
        vp.RopeExplorer(scheme="nope")
