"""GLM's blank-infilling objective: span sampling, Part A / Part B, both position rows, mask, batches.

Expected values are written out by hand (the paper's worked example) or derived independently of the
code under test (a Poisson pmf from factorials, a brute-force mask, reconstructing the text from Part B).
"""

import math
import re

import numpy as np
import pytest
import torch

from glmkit.data.blank_infilling import (
    IGNORE_INDEX,
    BlankInfillingConfig,
    BlankInfillingData,
    GLMBatch,
    build_example,
    collate,
    corrupt,
    gmask_span,
    max_example_len,
    sample_span_lengths,
    sample_spans,
    sentence_spans,
    source_len_for,
    span_length_distribution,
)
from glmkit.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
M, S, E = TOK.mask_id, TOK.sop_id, TOK.eop_id
IDS = dict(mask_id=M, sop_id=S, eop_id=E)
TEXT = (
    "Anna has a red ball. Ben has a blue kite! Does Anna give the ball to Ben? She does; now Ben has both.\n"
    "Count: 1, 2, 3.  The end"
)


# ---- the paper's worked example -------------------------------------------------------------------------


def test_worked_example_exact():
    x = [11, 12, 13, 14, 15, 16]  # x1..x6
    ex = build_example(x, [(2, 3), (4, 6)], order=[1, 0], **IDS)
    assert ex.sep == 5
    assert ex.input_ids.tolist() == [11, 12, M, 14, M, S, 15, 16, S, 13]
    assert ex.position_ids.tolist() == [[0, 1, 2, 3, 4, 4, 4, 4, 2, 2], [0, 0, 0, 0, 0, 1, 2, 3, 1, 2]]
    assert ex.targets.tolist() == [IGNORE_INDEX] * 5 + [15, 16, E, 13, E]
    assert ex.input_ids.dtype == ex.targets.dtype == ex.position_ids.dtype == torch.int64
    assert ex.part_a == [11, 12, M, 14, M] and ex.part_b == [S, 15, 16, S, 13]


def test_worked_example_in_order_and_own_mask_tokens():
    x = [11, 12, 13, 14, 15, 16]
    ex = build_example(x, [(2, 3), (4, 6)], **IDS, mask_token_ids=[TOK.smask_id, TOK.gmask_id])
    assert ex.input_ids.tolist() == [11, 12, TOK.smask_id, 14, TOK.gmask_id, S, 13, S, 15, 16]
    assert ex.position_ids.tolist() == [[0, 1, 2, 3, 4, 2, 2, 4, 4, 4], [0, 0, 0, 0, 0, 1, 2, 1, 2, 3]]
    assert ex.targets.tolist()[5:] == [13, E, 15, 16, E]


# ---- span lengths ------------------------------------------------------------------------------------------


def poisson_truncated(lam, max_len):
    pmf = [math.exp(-lam) * lam**k / math.factorial(k) for k in range(1, max_len + 1)]
    return [p / sum(pmf) for p in pmf]


def test_span_length_distribution_is_truncated_poisson():
    for lam, max_len in ((3.0, 39), (3.0, 5), (1.5, 1), (7.0, 20)):
        p = span_length_distribution(lam, max_len)
        assert p.shape == (max_len,)
        np.testing.assert_allclose(p, poisson_truncated(lam, max_len), rtol=1e-10)


def test_sampled_span_lengths_follow_poisson3():
    cfg = BlankInfillingConfig()
    rng = np.random.default_rng(1234)
    draws = []
    for _ in range(5):
        lengths = sample_span_lengths(20_000, cfg, rng)  # ~950 spans each
        draws += lengths[:-1]  # the last one stopped the loop: length-biased, leave it out
    draws = np.array(draws)
    p = poisson_truncated(3.0, 39)
    mean = sum((k + 1) * pk for k, pk in enumerate(p))  # ≈ 3.157: Poisson(3) without the zero
    assert abs(draws.mean() - mean) < 0.1
    observed = [np.sum(draws == k) for k in range(1, 8)] + [np.sum(draws >= 8)]
    expected = [len(draws) * p[k - 1] for k in range(1, 8)] + [len(draws) * sum(p[7:])]
    chi2 = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
    assert chi2 < 30, (observed, expected)  # 7 degrees of freedom: p < 1e-4 if the law were right
    assert draws.min() >= 1 and draws.max() <= 39


def test_span_lengths_stop_at_the_ratio():
    cfg = BlankInfillingConfig(mask_ratio=0.3)
    rng = np.random.default_rng(5)
    for n in (1, 2, 3, 10, 99, 500):
        lengths = sample_span_lengths(n, cfg, rng)
        assert sum(lengths) >= 0.3 * n > sum(lengths[:-1])
        assert all(1 <= l <= n for l in lengths)


# ---- span placement ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.15, 0.5, 0.9])
def test_spans_cover_ratio_and_never_touch(ratio):
    cfg = BlankInfillingConfig(mask_ratio=ratio)
    for seed in range(40):
        rng = np.random.default_rng(seed)
        for n in (1, 2, 3, 4, 7, 10, 33, 100, 257):
            spans = sample_spans(n, cfg, rng)
            assert spans, n
            assert all(0 <= s < e <= n for s, e in spans), (n, spans)
            assert all(e1 < s2 for (_, e1), (s2, _) in zip(spans, spans[1:])), (n, spans)  # gap >= 1, sorted
            assert sum(e - s for s, e in spans) >= ratio * n


def test_span_positions_vary():
    cfg = BlankInfillingConfig()
    rng = np.random.default_rng(0)
    starts = {sample_spans(50, cfg, rng)[0][0] for _ in range(200)}
    assert len(starts) > 10


def test_gmask_suffix_length():
    cfg = BlankInfillingConfig()
    rng = np.random.default_rng(3)
    for n in (1, 2, 3, 9, 64, 101):
        seen = set()
        for _ in range(300):
            s, e = gmask_span(n, cfg, rng)
            assert e == n and 0.5 * n <= e - s <= n
            seen.add(e - s)
        if n <= 9:  # every allowed length shows up
            assert seen == set(range(max(1, math.ceil(n / 2)), n + 1))
    cfg = BlankInfillingConfig(gmask_min_ratio=0.25)
    assert min(e - s for s, e in (gmask_span(100, cfg, rng) for _ in range(500))) < 50


def test_sentence_spans_align_to_sentences():
    tokens = TOK.encode(TEXT)
    # Independent sentence split: runs ending in a terminator (or the end), leading whitespace dropped.
    sentences = {m.lstrip(" \n") for m in re.findall(r"[^.?!;:\n]*[.?!;:\n]|[^.?!;:\n]+$", TEXT)} - {""}
    cfg = BlankInfillingConfig(sentence_ratio=0.15)
    rng = np.random.default_rng(0)
    covered_sentences = set()
    for _ in range(200):
        spans = sentence_spans(tokens, cfg, rng)
        assert spans == sorted(spans)
        assert sum(e - s for s, e in spans) >= 0.15 * len(tokens)
        for s, e in spans:
            piece = TOK.decode(tokens[s:e])
            assert piece in sentences, piece
            before = TOK.decode(tokens[:s]).rstrip(" \n")
            assert before == "" or before[-1] in ".?!;:\n" or TOK.decode(tokens[:s]).endswith("\n")
            covered_sentences.add(piece)
    assert covered_sentences == sentences  # every sentence gets picked sometimes
    with pytest.raises(ValueError, match="no sentence"):
        sentence_spans(TOK.encode("  \n "), cfg, rng)


# ---- random examples ---------------------------------------------------------------------------------------


def check_example(ex, tokens):
    """Properties every example must have, checked without the builder's logic."""
    L, sep = ex.length, ex.sep
    inp, tgt, pos = ex.input_ids.tolist(), ex.targets.tolist(), ex.position_ids.tolist()
    assert ex.position_ids.shape == (2, L)
    assert len(tokens) + 2 * len(ex.spans) == L  # each span: one mask in A, one [START] + [END] in B
    assert tgt[:sep] == [IGNORE_INDEX] * sep
    assert pos[0][:sep] == list(range(sep)) and pos[1][:sep] == [0] * sep
    assert all(t != IGNORE_INDEX for t in tgt[sep:])
    # Split Part B into spans at each block position 1.
    starts = [i for i in range(sep, L) if pos[1][i] == 1]
    assert starts and starts[0] == sep
    filled = {}
    for a, b in zip(starts, starts[1:] + [L]):
        assert inp[a] == S and tgt[b - 1] == E
        assert pos[1][a:b] == list(range(1, b - a + 1))
        assert len(set(pos[0][a:b])) == 1
        where = pos[0][a]
        assert where < sep and inp[where] in TOK.mask_ids  # points at its own mask token in Part A
        assert inp[a + 1 : b] == tgt[a : b - 1]  # teacher forcing: input is the target shifted right
        assert where not in filled
        filled[where] = tgt[a : b - 1]
    # Put every span back into its mask token: the original text comes back.
    rebuilt = []
    for i, t in enumerate(inp[:sep]):
        rebuilt += filled[i] if i in filled else [t]
    assert rebuilt == list(tokens)
    assert len(filled) == sum(t in TOK.mask_ids for t in inp[:sep])


def test_random_examples_all_modes():
    cfg = BlankInfillingConfig(span_prob=0.4, sentence_prob=0.3)
    rng = np.random.default_rng(7)
    text = TOK.encode(TEXT)
    for trial in range(300):
        n = int(rng.integers(1, len(text) + 1))
        tokens = text[:n]
        mode = ("mask", "smask", "gmask", None)[trial % 4]
        if mode == "smask" and not TOK.decode(tokens).strip():
            continue
        ex = corrupt(tokens, cfg, rng, TOK, mode=mode)
        check_example(ex, tokens)
        assert ex.length <= max_example_len(n, cfg)
        if ex.mode == "gmask":
            assert ex.part_a[-1] == TOK.gmask_id and len(ex.spans) == 1 and ex.spans[0][1] == n
        else:
            want = TOK.mask_id if ex.mode == "mask" else TOK.smask_id
            assert [t for t in ex.part_a if t in TOK.mask_ids] == [want] * len(ex.spans)


def test_mode_frequencies_and_shuffle():
    cfg = BlankInfillingConfig(span_prob=0.5, sentence_prob=0.3)
    assert cfg.gmask_prob == pytest.approx(0.2)
    rng = np.random.default_rng(11)
    tokens = TOK.encode(TEXT)
    modes = [corrupt(tokens, cfg, rng, TOK).mode for _ in range(2000)]
    for mode, p in (("mask", 0.5), ("smask", 0.3), ("gmask", 0.2)):
        assert abs(modes.count(mode) / len(modes) - p) < 0.04
    orders = [corrupt(tokens, cfg, rng, TOK, mode="mask").order for _ in range(50)]
    assert any(o != sorted(o) for o in orders)
    fixed = BlankInfillingConfig(shuffle_spans=False)
    for _ in range(50):
        ex = corrupt(tokens, fixed, rng, TOK, mode="mask")
        assert ex.order == list(range(len(ex.spans)))


# ---- batches -----------------------------------------------------------------------------------------------


def test_collate_pads_after_part_b():
    a = build_example([1, 2, 3, 4, 5, 6], [(2, 3), (4, 6)], [1, 0], **IDS)  # L = 10
    b = build_example([7, 8, 9], [(0, 1)], **IDS)  # L = 5
    batch = collate([a, b], pad_id=TOK.pad_id)
    assert batch.input_ids.shape == (2, 10) and batch.position_ids.shape == (2, 2, 10)
    assert batch.sep.tolist() == [5, 3] and batch.sep.dtype == torch.int64
    assert batch.input_ids[1].tolist() == [M, 8, 9, S, 7] + [TOK.pad_id] * 5
    assert batch.targets[1].tolist() == [IGNORE_INDEX] * 3 + [7, E] + [IGNORE_INDEX] * 5
    assert batch.position_ids[1].tolist() == [[0, 1, 2, 0, 0] + [0] * 5, [0, 0, 0, 1, 2] + [0] * 5]
    assert batch.input_ids[0].tolist() == a.input_ids.tolist()
    assert batch.num_targets == 5 + 2
    wide = collate([a, b], pad_id=TOK.pad_id, pad_to=16)
    assert wide.seq_len == 16 and (wide.input_ids[:, 10:] == TOK.pad_id).all()
    moved = wide.to("cpu")
    assert torch.equal(moved.position_ids, wide.position_ids) and torch.equal(moved.sep, wide.sep)
    with pytest.raises(ValueError, match="shorter than the longest"):
        collate([a, b], pad_id=TOK.pad_id, pad_to=9)
    with pytest.raises(ValueError, match="examples is empty"):
        collate([], pad_id=TOK.pad_id)
    with pytest.raises(TypeError, match="int64"):
        GLMBatch(batch.input_ids.float(), batch.targets, batch.position_ids, batch.sep)
    with pytest.raises(ValueError, match="shapes"):
        GLMBatch(batch.input_ids, batch.targets, batch.position_ids[:, 0], batch.sep)


def test_data_is_a_function_of_seed_and_step():
    text = TEXT * 40
    cfg = BlankInfillingConfig(span_prob=0.4, sentence_prob=0.3)
    d1 = BlankInfillingData(text, TOK, seq_len=64, batch_size=4, cfg=cfg, seed=3)
    d2 = BlankInfillingData(text, TOK, seq_len=64, batch_size=4, cfg=cfg, seed=3)

    def same(x, y):
        return all(torch.equal(getattr(x, f), getattr(y, f)) for f in ("input_ids", "targets", "position_ids", "sep"))

    later = d1.batch(7)
    assert same(d1.batch(5), d2.batch(5))  # fresh object, same seed and step
    assert same(d1.batch(7), later)  # order of calls does not matter
    assert not same(d1.batch(5), d1.batch(6))
    assert not same(d1.batch(5), BlankInfillingData(text, TOK, 64, 4, cfg, seed=4).batch(5))
    resumed = d2.iterate(start_step=7)
    assert same(next(resumed), later) and same(next(resumed), d1.batch(8))


def test_data_never_exceeds_seq_len():
    text = TEXT * 40
    for cfg in (
        BlankInfillingConfig(),
        BlankInfillingConfig(mask_ratio=0.6, span_prob=0.5, sentence_prob=0.5, sentence_ratio=0.5),
    ):
        for seq_len in (3, 10, 64):
            data = BlankInfillingData(text, TOK, seq_len=seq_len, batch_size=8, cfg=cfg, seed=0)
            assert max_example_len(data.source_len, cfg) <= seq_len
            for step in range(25):
                batch = data.batch(step)
                assert batch.seq_len <= seq_len
                for ex in data.examples(step):
                    check_example(ex, ex.tokens)
    fixed = BlankInfillingData(text, TOK, seq_len=64, batch_size=2, pad_to_seq_len=True)
    assert fixed.batch(0).input_ids.shape == (2, 64)
    assert BlankInfillingData("ab", TOK, seq_len=64, batch_size=2).source_len == 2  # short text: all of it
    default = BlankInfillingData(seq_len=48, batch_size=3)  # built-in corpus, ByteTokenizer
    assert default.batch(0).batch_size == 3 and default.batch(0).seq_len <= 48


def test_source_len_for():
    cfg = BlankInfillingConfig()
    for seq_len in (3, 4, 50, 128, 512):
        n = source_len_for(seq_len, cfg)
        # n + 2·ceil(0.15·n) <= seq_len and one more token would break it
        assert n + 2 * math.ceil(0.15 * n) <= seq_len
        assert n == 1 or n + 1 + 2 * math.ceil(0.15 * (n + 1)) > seq_len


# ---- errors ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mask_ratio=0.0), "mask_ratio"),
        (dict(mask_ratio=1.0), "mask_ratio"),
        (dict(sentence_ratio=1.2), "sentence_ratio"),
        (dict(span_prob=-0.1), "span_prob"),
        (dict(span_prob=0.7, sentence_prob=0.5), r"span_prob \+ sentence_prob"),
        (dict(max_span_len=0), "max_span_len"),
        (dict(poisson_lambda=0.0), "poisson_lambda"),
        (dict(gmask_min_ratio=0.0), "gmask_min_ratio"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BlankInfillingConfig(**kwargs)


def test_input_errors():
    x = [1, 2, 3, 4, 5, 6]
    with pytest.raises(TypeError, match="mask_ratio"):
        BlankInfillingConfig(mask_ratio="0.15")
    with pytest.raises(ValueError, match="tokens is empty"):
        build_example([], [(0, 1)], **IDS)
    with pytest.raises(ValueError, match="overlaps"):
        build_example(x, [(1, 3), (2, 4)], **IDS)
    with pytest.raises(ValueError, match="out of range"):
        build_example(x, [(4, 7)], **IDS)
    with pytest.raises(ValueError, match="empty or out of range"):
        build_example(x, [(3, 3)], **IDS)
    with pytest.raises(ValueError, match="spans is empty"):
        build_example(x, [], **IDS)
    with pytest.raises(ValueError, match="permutation"):
        build_example(x, [(0, 1), (3, 4)], order=[0, 0], **IDS)
    with pytest.raises(ValueError, match="mask_token_ids has 1"):
        build_example(x, [(0, 1), (3, 4)], mask_token_ids=[M], **IDS)
    with pytest.raises(ValueError, match="exceeds max_len=9"):
        build_example(x, [(0, 1), (3, 4)], max_len=9, **IDS)
    with pytest.raises(TypeError, match="integer dtype"):
        build_example(torch.tensor([1.0, 2.0]), [(0, 1)], **IDS)
    with pytest.raises(TypeError, match="encode the text first"):
        build_example("hello", [(0, 1)], **IDS)
    with pytest.raises(ValueError, match="n_tokens must be >= 1"):
        sample_spans(0, BlankInfillingConfig(), np.random.default_rng(0))
    with pytest.raises(ValueError, match="smask_id is not given"):
        corrupt(x, BlankInfillingConfig(), np.random.default_rng(0), mask_id=M, sop_id=S, eop_id=E)
    with pytest.raises(ValueError, match="no sentence"):
        corrupt(TOK.encode(" \n "), BlankInfillingConfig(), np.random.default_rng(0), TOK, mode="smask")
    only_sentences = BlankInfillingConfig(span_prob=0.0, sentence_prob=1.0)
    assert corrupt(TOK.encode("  "), only_sentences, np.random.default_rng(0), TOK).mode == "mask"  # fallback
    with pytest.raises(ValueError, match="mode must be one of"):
        corrupt(x, BlankInfillingConfig(), np.random.default_rng(0), TOK, mode="bert")
    with pytest.raises(ValueError, match="text is empty"):
        BlankInfillingData("", TOK, seq_len=32, batch_size=2)
    with pytest.raises(ValueError, match="seq_len must be an int >= 3"):
        BlankInfillingData("abc", TOK, seq_len=2, batch_size=2)
    with pytest.raises(ValueError, match="step must be"):
        BlankInfillingData("abc", TOK, seq_len=8, batch_size=2).batch(-1)


def test_example_table_lines_up():
    ex = build_example(TOK.encode("abcdef"), [(2, 3), (4, 6)], [1, 0], **IDS)
    lines = ex.table(TOK).splitlines()
    assert [line.split()[0] for line in lines] == ["input", "position", "block", "target"]
    assert len({len(line) for line in lines}) == 1 and len({line.index("|") for line in lines}) == 1
    assert lines[0].split("|")[1].split() == ["[START]", "e", "f", "[START]", "c"]
