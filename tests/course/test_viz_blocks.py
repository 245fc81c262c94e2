"""glmkit.course.viz_blocks: DeepNorm's α and β are separate controls of the explorer (β's initialisation off gives
β = 1, α = 1 with β off is plain post-LN), and the depth measurements behave as lesson 03 says: post-LN's update
grows with depth, DeepNet's α and β keep it small, and each of α and β alone already helps."""

from __future__ import annotations

import math

import pytest

from glmkit.course import viz_blocks as vb
from glmkit.course.lineage import deepnet_constants


def test_explorer_sets_alpha_and_beta_separately():
    pytest.importorskip("ipywidgets")
    e = vb.DeepNormExplorer(depth=4)
    assert e.constants() == pytest.approx(deepnet_constants(4)) and "deepnorm-explorer" in e.widget._dom_classes
    img = e.image.value
    e.use_beta.value = False
    assert e.constants() == pytest.approx((8**0.25, 1.0)) and e.image.value != img
    e.rule.value = "GLM-130B: α = √(2N)"
    assert e.last["alpha"] == pytest.approx(math.sqrt(8)) and e.last["beta"] == 1.0 and e.alpha.disabled
    e.rule.value = "α = 1"
    assert e.last["update"]["DeepNorm"] == pytest.approx(e.last["update"]["post-LN"])  # α = β = 1 is post-LN
    e.rule.value = "custom"
    e.alpha.value = 3.0
    assert not e.alpha.disabled and e.last["alpha"] == pytest.approx(3.0)


def test_update_size_against_depth():
    post = [vb.model_update("post-LN", n) for n in (2, 16)]
    deep = [vb.model_update("DeepNorm", n) for n in (2, 16)]
    assert post[1] > 3 * post[0]  # grows with depth
    assert deep[1] < post[1] / 5  # DeepNet's constants keep it small
    a, b = deepnet_constants(16)
    assert vb.model_update("DeepNorm", 16, a, 1.0) < post[1] and vb.model_update("DeepNorm", 16, 1.0, b) < post[1]
    grads, rms = vb.depth_profile("pre-LN", 6)
    assert len(grads) == len(rms) == 6 and rms[-1] > rms[0]  # pre-LN's stream grows
