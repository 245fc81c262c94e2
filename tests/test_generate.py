"""Generation: GLM's blank-filling procedure (checked against a scripted model that sees every input
the procedure builds), [gMASK] generation's layout, determinism and seeding, and clear errors."""

from __future__ import annotations

import pytest
import torch

from glmkit.generate import fill_blanks, generate
from glmkit.models import GLMConfig, GLMModel
from glmkit.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
CFG = GLMConfig(vocab_size=TOK.vocab_size, n_layers=1, n_heads=2, d_model=16, d_ff=32, max_seq_len=64)


class Scripted(GLMModel):
    """Answers from a script instead of weights, and records every call. For the blank at Part-A
    position p, at block position b it emits ``script[p][b - 1]`` (then [END]). It asserts the layout
    GLM's procedure must build: Part A untouched with plain positions, Part B carrying the blank's
    position and block positions 1, 2, ..."""

    def __init__(self, script: dict[int, bytes]):
        super().__init__(CFG)
        self.script = {p: list(s) + [TOK.eop_id] for p, s in script.items()}
        self.calls = []

    def forward(self, input_ids, position_ids, sep, **kw):
        self._check_inputs(input_ids, position_ids, sep)
        ids, pos, blk, s = input_ids[0].tolist(), position_ids[0, 0].tolist(), position_ids[0, 1].tolist(), int(sep[0])
        self.calls.append((ids, pos, blk, s))
        assert pos[:s] == list(range(s)) and blk[:s] == [0] * s
        p, b = pos[-1], blk[-1]
        assert ids[-1] == TOK.sop_id if b == 1 else ids[-1] != TOK.sop_id
        logits = torch.zeros(1, len(ids), CFG.vocab_size)
        logits[0, -1, self.script[p][b - 1]] = 10.0
        return logits


def test_fill_blanks_follows_glms_procedure():
    text = "ab[MASK]cd[MASK]e"
    part_a = TOK.encode(text, parse_special=True)      # a b [M] c d [M] e: blanks at 2 and 5
    model = Scripted({2: b"XY", 5: b"Z"})
    r = fill_blanks(model, TOK, text)
    assert r.text == "abXYcdZe" and r.fills == ["XY", "Z"] and r.finished == [True, True]
    # The last call (for "Z"'s [END]) shows the whole sequence: Part A, then both spans in order, each
    # [START] + its tokens (no [END] fed back), at its blank's position with block positions 1, 2, ...
    ids, pos, blk, sep = model.calls[-1]
    assert sep == len(part_a) == 7
    assert ids == part_a + [TOK.sop_id, ord("X"), ord("Y"), TOK.sop_id, ord("Z")]
    assert pos == list(range(7)) + [2, 2, 2, 5, 5]
    assert blk == [0] * 7 + [1, 2, 3, 1, 2]
    assert len(model.calls) == 3 + 2                   # one forward per token, [END]s included


def test_fill_blanks_stops_at_max_span_len():
    model = Scripted({1: b"0123456789"})
    r = fill_blanks(model, TOK, "a[MASK]b", max_span_len=4)
    assert r.fills == ["0123"] and r.finished == [False] and r.text == "a0123b"


def test_generate_uses_the_gmask_layout():
    prompt = "hi"
    model = Scripted({2: b"there"})                     # [gMASK] sits at position 2
    r = generate(model, TOK, prompt, max_new_tokens=10)
    assert r.completion == "there" and r.text == "hithere" and r.finished
    ids, pos, blk, sep = model.calls[-1]
    assert ids == TOK.encode("hi") + [TOK.gmask_id, TOK.sop_id] + list(b"there")
    assert sep == 3 and pos == [0, 1, 2] + [2] * 6 and blk == [0, 0, 0] + [1, 2, 3, 4, 5, 6]
    short = generate(Scripted({2: b"there"}), TOK, prompt, max_new_tokens=3)
    assert short.completion == "the" and not short.finished


def test_greedy_is_deterministic_and_sampling_is_seeded():
    torch.manual_seed(0)
    m = GLMModel(CFG)
    text = "The [MASK] sat on the [MASK]."
    a = fill_blanks(m, TOK, text, max_span_len=6)
    b = fill_blanks(m, TOK, text, max_span_len=6)
    assert a.text == b.text
    kw = dict(strategy="sample", temperature=3.0, max_span_len=12)
    s1, s2 = fill_blanks(m, TOK, text, seed=1, **kw), fill_blanks(m, TOK, text, seed=1, **kw)
    s3 = fill_blanks(m, TOK, text, seed=2, **kw)
    assert s1.fill_ids == s2.fill_ids and s1.fill_ids != s3.fill_ids
    top1 = fill_blanks(m, TOK, text, strategy="sample", top_k=1, seed=5, max_span_len=6)
    assert top1.fill_ids == a.fill_ids                  # top-1 sampling is greedy
    g1 = generate(m, TOK, "Once", max_new_tokens=8, strategy="sample", seed=3, top_k=20)
    g2 = generate(m, TOK, "Once", max_new_tokens=8, strategy="sample", seed=3, top_k=20)
    assert g1.ids == g2.ids
    # Never a special token other than [END]: fills decode to plain bytes.
    assert all(t < 256 for f in s1.fill_ids + s3.fill_ids for t in f)


def test_generation_restores_training_mode():
    m = GLMModel(CFG).train()
    fill_blanks(m, TOK, "x[MASK]", max_span_len=2)
    assert m.training


def test_bad_input_errors():
    m = GLMModel(CFG)
    with pytest.raises(ValueError, match="text is empty"):
        fill_blanks(m, TOK, "   ")
    with pytest.raises(ValueError, match="contains no \\[MASK\\]"):
        fill_blanks(m, TOK, "no blanks here")
    with pytest.raises(ValueError, match="text is too long for the model: 70 tokens \\+ 1 \\[START\\] tokens "
                                         "\\(one per blank\\) > max_seq_len = 64"):
        fill_blanks(m, TOK, "x" * 69 + "[MASK]")
    with pytest.raises(ValueError, match="temperature must be a positive finite number"):
        fill_blanks(m, TOK, "a[MASK]", strategy="sample", temperature=0)
    with pytest.raises(ValueError, match="temperature"):
        generate(m, TOK, "a", temperature=float("nan"))
    with pytest.raises(ValueError, match="top_k must be a positive int"):
        fill_blanks(m, TOK, "a[MASK]", strategy="sample", top_k=0)
    with pytest.raises(ValueError, match="strategy must be one of \\('greedy', 'sample'\\)"):
        fill_blanks(m, TOK, "a[MASK]", strategy="beam")
    with pytest.raises(ValueError, match="max_span_len must be a positive int"):
        fill_blanks(m, TOK, "a[MASK]", max_span_len=0)
    with pytest.raises(TypeError, match="text must be a str"):
        fill_blanks(m, TOK, b"a[MASK]")
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(m, TOK, "")
    with pytest.raises(ValueError, match="prompt is too long for the model: 63 tokens \\+ \\[gMASK\\] \\+ "
                                         "\\[START\\] = 65 > max_seq_len = 64"):
        generate(m, TOK, "y" * 63)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
        generate(m, TOK, "a", max_new_tokens=0)
    with pytest.warns(UserWarning, match="leaves room for 2 new tokens"):
        r = generate(m, TOK, "y" * 61, max_new_tokens=10)
    assert len(r.ids) <= 2
    small_vocab = GLMModel(GLMConfig(**{**CFG.to_dict(), "vocab_size": 100}))
    with pytest.raises(ValueError, match="tokenizer vocab_size 264 is larger than the model's 100"):
        fill_blanks(small_vocab, TOK, "a[MASK]")


def test_a_model_overfit_to_one_sentence_fills_its_blanks():
    """End to end: GLM's objective on one sentence, a few hundred tiny steps, then greedy fills."""
    from glmkit.blank_infilling import BlankInfillingConfig, BlankInfillingData
    from glmkit.train import TrainConfig, train

    sentence = "a cat sat on the mat."
    torch.manual_seed(0)
    model = GLMModel(GLMConfig(vocab_size=TOK.vocab_size, n_layers=2, n_heads=2, d_model=48, d_ff=192,
                               max_seq_len=48))
    data = BlankInfillingData(sentence, seq_len=48, batch_size=16, cfg=BlankInfillingConfig(span_prob=1.0))
    train(model, data, TrainConfig(steps=300, batch_size=16, seq_len=48, lr=5e-3, warmup_steps=10),
          progress=False, live_plot=False, device="cpu")
    assert fill_blanks(model, TOK, "a cat [MASK] on the mat.").fills == ["sat"]
    r = fill_blanks(model, TOK, "a [MASK] sat on the [MASK].")
    assert r.fills == ["cat", "mat"] and r.text == sentence and r.finished == [True, True]
