"""GLM-2021: shapes, the Part-A/Part-B visibility the mask promises, the tied head, parameter counts of the
published sizes (closed form, by hand), the Part-B loss, its cache (it is a Decoder), and clear config errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from glmkit.data.tokenizer import ByteTokenizer
from glmkit.models.glm2021 import PRESETS, GLMConfig, GLMModel, get_config
from glmkit.testing import rel_err

TINY = dict(
    vocab_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    hidden_size=32,
    intermediate_size=64,
    max_position_embeddings=40,
)


def tiny_model(**overrides) -> GLMModel:
    return GLMModel(GLMConfig(**{**TINY, **overrides})).eval()


def random_inputs(B: int, T: int, V: int, seps: list[int]):
    """Random ids, GLM-shaped positions (Part A 0..sep-1 / block 0; Part B at a random Part-A position, block
    1..) and the Part-A lengths."""
    ids = torch.randint(0, V, (B, T))
    pos = torch.zeros(B, 2, T, dtype=torch.long)
    for b, s in enumerate(seps):
        pos[b, 0, :s] = torch.arange(s)
        if s < T:
            pos[b, 0, s:] = torch.randint(0, max(s, 1), ()).item()
            pos[b, 1, s:] = torch.arange(1, T - s + 1)
    return ids, pos, torch.tensor(seps)


def test_shapes_and_odd_lengths():
    m = tiny_model()
    for B, T in [(1, 1), (2, 7), (3, 40)]:
        ids, pos, sep = random_inputs(B, T, 64, [min(T, k) for k in (0, 3, T)][:B])
        assert m(ids, pos, sep).shape == (B, T, 64)


def test_part_a_cannot_see_part_b_but_part_b_sees_part_a():
    m = tiny_model()
    T, sep = 23, 13
    ids, pos, seps = random_inputs(2, T, 64, [sep, sep])
    with torch.no_grad():
        base = m(ids, pos, seps)
        ids_b, pos_b = ids.clone(), pos.clone()
        j = sep + 4
        ids_b[:, j] = (ids[:, j] + 1) % 64  # a different Part-B token (and block position) ...
        pos_b[:, 1, j] = 1
        changed_b = m(ids_b, pos_b, seps)
        assert torch.equal(changed_b[:, :j], base[:, :j])  # ... leaves Part A and earlier Part B alone
        assert not torch.allclose(changed_b[:, j:], base[:, j:])
        ids_a = ids.clone()
        ids_a[:, sep - 1] = (ids[:, sep - 1] + 1) % 64  # a different Part-A token changes Part B and Part A
        changed_a = m(ids_a, pos, seps)
        assert not torch.allclose(changed_a[:, sep:], base[:, sep:])
        assert not torch.allclose(changed_a[:, 0], base[:, 0])


def test_sep_is_per_sample():
    m = tiny_model()
    ids, pos, sep = random_inputs(2, 17, 64, [5, 11])
    with torch.no_grad():
        torch.testing.assert_close(m(ids, pos, sep)[:1], m(ids[:1], pos[:1], sep[:1]), rtol=1e-5, atol=1e-5)


def test_tied_head():
    m = tiny_model()
    assert m.lm_head.weight is m.embed_tokens.weight
    ids, pos, sep = random_inputs(1, 9, 64, [4])
    m(ids, pos, sep).sum().backward()
    assert m.embed_tokens.weight.grad is not None
    untied = tiny_model(tie_word_embeddings=False)
    assert untied.lm_head.weight is not untied.embed_tokens.weight
    assert untied.num_parameters() == m.num_parameters() + 64 * 32


def expected_parameters(V: int, L: int, d: int, f: int, S: int, tied: bool = True) -> int:
    """Counted by hand. Embeddings: V·d words, and two (S+1)·d position tables. Each layer: LN (2d) + QKV
    (3d·d + 3d) + output proj (d·d + d) + LN (2d) + up (d·f + f) + down (f·d + d); with f = 4d that is 12d² + 13d.
    A final LN (2d). The head adds V·d only if untied."""
    per_layer = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (d * f + f) + (f * d + d)
    if f == 4 * d:
        assert per_layer == 12 * d * d + 13 * d
    return V * d + 2 * (S + 1) * d + L * per_layer + 2 * d + (0 if tied else V * d)


@pytest.mark.parametrize("name, published", [("glm-base", 110e6), ("glm-large", 335e6), ("glm-10b", 10e9)])
def test_published_presets_on_meta_device(name, published):
    c = get_config(name)
    with torch.device("meta"):
        m = GLMModel(c)
    n = m.num_parameters()
    assert n == expected_parameters(
        c.vocab_size, c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.max_position_embeddings
    )
    assert abs(n - published) / published < 0.02, f"{name}: {n / 1e6:.1f}M vs published ~{published / 1e6:.0f}M"


def test_course_presets():
    for name in ("cpu-tiny", "gpu-small"):
        assert get_config(name).vocab_size == ByteTokenizer().vocab_size
    assert get_config("glm-large").num_attention_heads == 16 and get_config("glm-10b").num_hidden_layers == 48


def test_loss_is_part_b_cross_entropy():
    m = tiny_model()
    ids, pos, sep = random_inputs(2, 15, 64, [6, 9])
    targets = torch.full_like(ids, -100)
    for b, s in enumerate(sep.tolist()):
        targets[b, s:] = torch.randint(0, 64, (15 - s,))
    batch = {"input_ids": ids, "targets": targets, "position_ids": pos, "sep": sep}
    with torch.no_grad():
        want = F.cross_entropy(m(ids, pos, sep).reshape(-1, 64), targets.reshape(-1), ignore_index=-100)
        torch.testing.assert_close(m.loss(batch), want, rtol=1e-5, atol=1e-6)


def test_cached_part_b_equals_the_full_forward():
    """Part A in one prefill (bidirectional: sep), then Part B token by token through the cache with its 2D
    positions: the logits of one full forward."""
    m = tiny_model()
    ids, pos, sep = random_inputs(1, 16, 64, [7])
    with torch.no_grad():
        full = m(ids, pos, sep)
        cache = m.new_cache(1, 16)
        parts = [m(ids[:, :7], pos[:, :, :7], sep, cache=cache)]
        parts += [m(ids[:, t : t + 1], pos[:, :, t : t + 1], sep, cache=cache) for t in range(7, 16)]
    assert rel_err(full, torch.cat(parts, 1)) < 1e-5


def test_config_roundtrip_and_errors():
    cfg = get_config("cpu-tiny", num_hidden_layers=3)
    assert GLMConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="must divide hidden_size"):
        GLMConfig(**{**TINY, "num_attention_heads": 5})
    with pytest.raises(ValueError, match="dropout"):
        GLMConfig(**{**TINY, "dropout": 1.5})
    with pytest.raises(ValueError, match="hidden_size must be a positive int"):
        GLMConfig(**{**TINY, "hidden_size": 32.0})
    with pytest.raises(ValueError, match="valid names: .*cpu-tiny"):
        get_config("gpt-5")
    with pytest.raises(ValueError, match="unknown fields"):
        get_config("cpu-tiny", n_layer=2)
    with pytest.raises(TypeError, match="needs a GLMConfig"):
        GLMModel({"hidden_size": 4})
    assert set(PRESETS) >= {"glm-base", "glm-large", "glm-10b", "cpu-tiny", "cpu-words", "gpu-small"}


def test_bad_inputs_have_clear_errors():
    m = tiny_model()
    ids, pos, sep = random_inputs(2, 10, 64, [4, 6])
    with pytest.raises(ValueError, match="integer tensor"):
        m(ids.float(), pos, sep)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        m(ids[0], pos, sep)
    with pytest.raises(ValueError, match="position_ids"):
        m(ids, pos[:, :, :9], sep)
    with pytest.raises(ValueError, match="sep"):
        m(ids, pos, sep[:1])
    bad = ids.clone()
    bad[1, 3] = 64
    with pytest.raises(ValueError, match="token id 64, outside"):
        m.check_tokens(bad)
