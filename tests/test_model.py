"""GLM-2021 model: shapes, the Part-A/Part-B visibility the mask promises, tied head, parameter counts
of the published sizes (closed form, derived by hand), the loss, and clear errors for bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from glmkit.models import PRESETS, GLMConfig, GLMModel, get_config
from glmkit.tokenizer import ByteTokenizer

TINY = dict(vocab_size=64, n_layers=2, n_heads=2, d_model=32, d_ff=64, max_seq_len=40)


def tiny_model(**overrides) -> GLMModel:
    return GLMModel(GLMConfig(**{**TINY, **overrides})).eval()


def random_inputs(B: int, T: int, V: int, seps: list[int]):
    """Random ids, GLM-shaped positions (Part A 0..sep-1 / block 0; Part B at a random Part-A position,
    block 1..) and the Part-A lengths."""
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
        # A different Part-B token (and block position) leaves every Part-A logit unchanged ...
        ids_b, pos_b = ids.clone(), pos.clone()
        j = sep + 4
        ids_b[:, j] = (ids[:, j] + 1) % 64
        pos_b[:, 1, j] = 1
        changed_b = m(ids_b, pos_b, seps)
        assert torch.equal(changed_b[:, :sep], base[:, :sep])
        # ... and, Part B being causal, the Part-B logits before it too; from j on they change.
        assert torch.equal(changed_b[:, :j], base[:, :j])
        assert not torch.allclose(changed_b[:, j:], base[:, j:])
        # A different Part-A token changes the Part-B logits (and the other Part-A ones: bidirectional).
        ids_a = ids.clone()
        ids_a[:, sep - 1] = (ids[:, sep - 1] + 1) % 64
        changed_a = m(ids_a, pos, seps)
        assert not torch.allclose(changed_a[:, sep:], base[:, sep:])
        assert not torch.allclose(changed_a[:, 0], base[:, 0])


def test_sep_is_per_sample():
    """Sample 0 with Part A = 5 must equal itself run alone, whatever sample 1's Part-A length is."""
    m = tiny_model()
    ids, pos, sep = random_inputs(2, 17, 64, [5, 11])
    with torch.no_grad():
        both = m(ids, pos, sep)
        alone = m(ids[:1], pos[:1], sep[:1])
    torch.testing.assert_close(both[:1], alone, rtol=1e-5, atol=1e-5)


def test_tied_head():
    m = tiny_model()
    assert m.lm_head.weight is m.word_embeddings.weight
    ids, pos, sep = random_inputs(1, 9, 64, [4])
    m(ids, pos, sep).sum().backward()
    assert m.word_embeddings.weight.grad is not None
    untied = tiny_model(tie_word_embeddings=False)
    assert untied.lm_head.weight is not untied.word_embeddings.weight
    assert untied.num_parameters() == m.num_parameters() + 64 * 32


def expected_parameters(V: int, L: int, d: int, f: int, S: int, tied: bool = True) -> int:
    """Counted by hand. Embeddings: V*d words, and two (S+1)*d position tables (position, block
    position). Each layer: LN (2d) + QKV (3d*d + 3d) + output proj (d*d + d) + LN (2d) + up (d*f + f) +
    down (f*d + d). With f = 4d that is 12d^2 + 13d. A final LN (2d). The head adds V*d only if untied."""
    per_layer = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (d * f + f) + (f * d + d)
    if f == 4 * d:
        assert per_layer == 12 * d * d + 13 * d
    return V * d + 2 * (S + 1) * d + L * per_layer + 2 * d + (0 if tied else V * d)


@pytest.mark.parametrize("name, published", [("glm-base", 110e6), ("glm-large", 335e6), ("glm-10b", 10e9)])
def test_published_presets_on_meta_device(name, published):
    cfg = get_config(name)
    with torch.device("meta"):
        m = GLMModel(cfg)
    assert m.word_embeddings.weight.is_meta
    n = m.num_parameters()
    assert n == expected_parameters(cfg.vocab_size, cfg.n_layers, cfg.d_model, cfg.d_ff, cfg.max_seq_len)
    assert abs(n - published) / published < 0.02, f"{name}: {n / 1e6:.1f}M vs published ~{published / 1e6:.0f}M"


def test_course_presets():
    tok = ByteTokenizer()
    for name in ("cpu-tiny", "gpu-small"):
        cfg = get_config(name)
        assert cfg.vocab_size == tok.vocab_size
        with torch.device("meta"):
            n = GLMModel(cfg).num_parameters()
        assert n == expected_parameters(cfg.vocab_size, cfg.n_layers, cfg.d_model, cfg.d_ff, cfg.max_seq_len)
    assert get_config("glm-large").n_heads == 16 and get_config("glm-10b").n_layers == 48
    assert get_config("glm-base").d_model == 768 and get_config("glm-base").n_layers == 12


def test_loss_is_part_b_cross_entropy():
    m = tiny_model()
    ids, pos, sep = random_inputs(2, 15, 64, [6, 9])
    targets = torch.full_like(ids, -100)
    for b, s in enumerate(sep.tolist()):
        targets[b, s:] = torch.randint(0, 64, (15 - s,))
    batch = {"input_ids": ids, "targets": targets, "position_ids": pos, "sep": sep}
    with torch.no_grad():
        logits = m(ids, pos, sep)
        want = F.cross_entropy(logits.reshape(-1, 64), targets.reshape(-1), ignore_index=-100)
        torch.testing.assert_close(m.loss(batch), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="no Part-B targets"):
        m.loss({**batch, "targets": torch.full_like(ids, -100)})


def test_config_roundtrip_and_errors():
    cfg = get_config("cpu-tiny", n_layers=3)
    assert GLMConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="n_heads=5 must divide d_model=32"):
        GLMConfig(**{**TINY, "n_heads": 5})
    with pytest.raises(ValueError, match="dropout"):
        GLMConfig(**{**TINY, "dropout": 1.5})
    with pytest.raises(TypeError, match="d_model must be an int"):
        GLMConfig(**{**TINY, "d_model": 32.0})
    with pytest.raises(ValueError, match="valid names: .*cpu-tiny"):
        get_config("gpt-5")
    with pytest.raises(ValueError, match="unknown fields \\['n_layer'\\]"):
        get_config("cpu-tiny", n_layer=2)
    with pytest.raises(ValueError, match="unknown keys"):
        GLMConfig.from_dict({**cfg.to_dict(), "rope": True})
    assert set(PRESETS) >= {"glm-base", "glm-large", "glm-10b", "cpu-tiny", "gpu-small"}


def test_bad_inputs_have_clear_errors():
    m = tiny_model()
    ids, pos, sep = random_inputs(2, 10, 64, [4, 6])
    with pytest.raises(TypeError, match="input_ids must be an integer tensor"):
        m(ids.float(), pos, sep)
    with pytest.raises(ValueError, match=r"input_ids must have shape \[B, T\]"):
        m(ids[0], pos, sep)
    with pytest.raises(ValueError, match=r"position_ids must have shape \[B, 2, T\]"):
        m(ids, pos[:, :, :9], sep)
    with pytest.raises(TypeError, match="position_ids must be an integer tensor"):
        m(ids, pos.float(), sep)
    with pytest.raises(ValueError, match=r"sep must have shape \[B\]"):
        m(ids, pos, sep[:1])
    with pytest.raises(TypeError, match="sep must be an integer tensor"):
        m(ids, pos, sep.float())
    with pytest.raises(ValueError, match="sep .* must lie in \\[0, T=10\\]"):
        m(ids, pos, torch.tensor([4, 11]))
    long_ids, long_pos, long_sep = random_inputs(1, 41, 64, [20])
    with pytest.raises(ValueError, match="sequence length 41 is longer than the model allows: max_seq_len = 40"):
        m(long_ids, long_pos, long_sep)
    bad = ids.clone()
    bad[1, 3] = 64
    with pytest.raises(ValueError, match="token id 64, outside \\[0, vocab_size=64\\)"):
        m(bad, pos, sep)
    bad_pos = pos.clone()
    bad_pos[0, 1, 5] = 41
    with pytest.raises(ValueError, match="position_ids must lie in \\[0, max_seq_len=40\\]"):
        m(ids, bad_pos, sep)
    with pytest.raises(TypeError, match="needs a GLMConfig"):
        GLMModel({"d_model": 4})
