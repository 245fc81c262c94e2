"""glmkit.data.lm_data: LMData is a function of (seed, step), its windows are slices of the token stream with the
targets shifted by one, its train and held-out splits are disjoint, and bad arguments are named."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from glmkit.data.corpus import load_corpus
from glmkit.data.lm_data import LMBatch, LMData
from glmkit.data.tokenizer import ByteTokenizer


def random_lines(n_lines: int, alphabet: str, width: int) -> str:
    idx = torch.randint(0, len(alphabet), (n_lines, width))
    return "".join("".join(alphabet[i] for i in row) + "\n" for row in idx.tolist())


def test_lm_data_is_a_function_of_the_step():
    a = LMData(batch_size=4, seq_len=24, seed=3)
    b = LMData(batch_size=4, seq_len=24, seed=3)
    for step in (0, 1, 17):
        x, y = a.batch(step), b.batch(step)
        assert isinstance(x, LMBatch) and x.input_ids.dtype == torch.int64 and x.input_ids.shape == (4, 24)
        assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.targets, y.targets)
    assert not torch.equal(a.batch(0).input_ids, a.batch(1).input_ids)
    assert not torch.equal(a.batch(0).input_ids, LMData(batch_size=4, seq_len=24, seed=4).batch(0).input_ids)

    # each row is a window of the token stream at starts(step); the targets are the inputs shifted by one
    batch, starts = a.batch(5), a.starts(5)
    tokens = torch.from_numpy(a.tokens)
    for row, s in enumerate(starts.tolist()):
        assert torch.equal(batch.input_ids[row], tokens[s : s + 24])
        assert torch.equal(batch.targets[row], tokens[s + 1 : s + 25])
    assert batch.n_tokens == 4 * 24
    it = a.iterate(5)
    assert torch.equal(next(it).input_ids, batch.input_ids) and torch.equal(next(it).input_ids, a.batch(6).input_ids)


def test_train_and_held_out_splits_are_disjoint():
    # 30 lines of lower case, then 10 of upper case: val_fraction 0.25 cuts exactly between them.
    text = random_lines(30, "abcdefghij ", 40) + random_lines(10, "ABCDEFGHIJ ", 40)
    tok = ByteTokenizer()
    lower, upper = set(tok.encode("abcdefghij \n")), set(tok.encode("ABCDEFGHIJ \n"))
    train_data = LMData(text, batch_size=8, seq_len=32, seed=1, val_fraction=0.25)
    val_data = LMData(text, batch_size=8, seq_len=32, seed=1, split="val", val_fraction=0.25)
    for step in range(20):
        tb, vb = train_data.batch(step), val_data.batch(step)
        assert set(tb.input_ids.flatten().tolist()) | set(tb.targets.flatten().tolist()) <= lower
        assert set(vb.input_ids.flatten().tolist()) | set(vb.targets.flatten().tolist()) <= upper

    # On the built-in corpus the two splits partition the text: train is the head, val the tail.
    full = tok.encode(load_corpus("stories"))
    tr, va = LMData(batch_size=1, seq_len=16), LMData(batch_size=1, seq_len=16, split="val")
    assert tr.tokens.tolist() + va.tokens.tolist() == full
    assert 0.04 < len(va.tokens) / len(full) < 0.06


def test_token_ids_instead_of_text():
    """A 1-D array of ids is split like text (head / tail) and windowed as is."""
    ids = np.arange(200) % 50
    tr, va = (
        LMData(ids, batch_size=2, seq_len=8, val_fraction=0.25),
        LMData(ids, batch_size=2, seq_len=8, split="val", val_fraction=0.25),
    )
    assert tr.tokens.tolist() + va.tokens.tolist() == ids.tolist()
    b = tr.batch(3)
    assert torch.equal(b.targets[:, :-1], b.input_ids[:, 1:])


def test_lm_data_errors():
    with pytest.raises(ValueError, match="split must be one of"):
        LMData(split="test")
    with pytest.raises(ValueError, match="fewer than one window"):
        LMData("short text\n" * 3, seq_len=64)
    with pytest.raises(ValueError, match="seq_len must be an int >= 1"):
        LMData(seq_len=0)
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        LMData(batch_size=1, seq_len=8).batch(-1)
    with pytest.raises(TypeError, match="LMBatch.targets must be an int64 tensor"):
        LMBatch(torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="both be \\[B, T\\]"):
        LMBatch(torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="integers"):
        LMData(np.linspace(0, 1, 100), seq_len=8)
    with pytest.raises(ValueError, match="vocab_size"):
        LMData(np.full(100, 300), seq_len=8)  # the byte tokenizer's ids are 0..263
