"""glmkit.data.python_corpus and glmkit.data.bpe: which files, the held-out split, a deterministic cached build of the
BPE tokenizer and token streams (on a small stdlib package, to stay fast), the HF folder layout, and CodeData's
batches as a pure function of (seed, step)."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch

pytest.importorskip("tokenizers", reason="the Python corpus needs the tokenizers library")

from glmkit.data import python_corpus as pc  # noqa: E402
from glmkit.data.bpe import EOS, train_bpe  # noqa: E402
from glmkit.data.hf_tokenizer import HFTokenizer  # noqa: E402
from glmkit.data.python_corpus import CodeData, PythonCorpus, python_files, stdlib_root  # noqa: E402

SMALL = stdlib_root() / "json"  # 5 files, ~50 KB: one of them held out


def test_selection_rules(tmp_path):
    (tmp_path / "b.py").write_text("x = 1\n")
    (tmp_path / "a.py").write_text("def f():\n    return 'é'\n")
    (tmp_path / "latin1.py").write_bytes("s = 'caf\xe9'\n".encode("latin-1"))  # not UTF-8
    (tmp_path / "nul.py").write_bytes(b"x = 1\0\n")
    (tmp_path / "big.py").write_text("x = 1\n" * 100_000)  # 600 KB: generated data
    (tmp_path / "notes.txt").write_text("not python")
    for skipped in ("site-packages", "encodings", "pydoc_data", "pkg/__pycache__", "config-3.11-x86_64-linux-gnu"):
        (tmp_path / skipped).mkdir(parents=True, exist_ok=True)
        (tmp_path / skipped / "m.py").write_text("y = 2\n")
    (tmp_path / "pkg" / "tests").mkdir()
    (tmp_path / "pkg" / "tests" / "test_m.py").write_text("assert True\n")
    (tmp_path / "link.py").symlink_to(tmp_path / "a.py")
    files = python_files(tmp_path)
    assert [f.path for f in files] == ["a.py", "b.py", "pkg/tests/test_m.py"]
    assert files[0].text == "def f():\n    return 'é'\n"
    digests = {f.path: hashlib.sha256(f.path.encode()).hexdigest() for f in files}
    assert [f.path for f in files if f.split == "val"] == [min(digests, key=digests.get)]  # ⌈3/50⌉ = 1
    with pytest.raises(FileNotFoundError):
        python_files(tmp_path / "missing")


def test_the_stdlib_selection():
    files = python_files()
    paths = [f.path for f in files]
    assert paths == sorted(paths) and len(set(paths)) == len(paths) and len(files) > 500
    assert not any(p.split("/")[0] in ("site-packages", "encodings", "pydoc_data") for p in paths)
    assert "json/decoder.py" in paths and any(p.startswith("test/") for p in paths)
    val = [f for f in files if f.split == "val"]
    assert len(val) == math.ceil(len(files) / 50)
    assert sum(len(f.text.encode()) for f in files) > 5e6


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return PythonCorpus(vocab_size=400, root=SMALL, cache_dir=tmp_path_factory.mktemp("cache"))


def test_build_is_lossless_and_split_by_file(corpus):
    files = python_files(SMALL)
    assert corpus.files == [(f.path, f.split) for f in files]
    assert corpus.tokenizer.vocab_size == 400 and corpus.tokenizer.token_to_id(EOS) == corpus.eos_id
    for split in ("train", "val"):
        ids = corpus.tokens(split)
        assert ids.dtype == np.int64 and ids[-1] == corpus.eos_id and not ids.flags.writeable
        ends = np.flatnonzero(ids == corpus.eos_id)
        docs = np.split(ids, ends + 1)[:-1]
        want = [f.text for f in files if f.split == split]
        assert len(docs) == len(want) and corpus.stats[split]["files"] == len(want)
        assert [corpus.tokenizer.decode(d[:-1].tolist()) for d in docs] == want  # byte-level BPE: lossless
        assert corpus.stats[split]["tokens"] == ids.size
        assert corpus.stats[split]["bytes"] == sum(len(t.encode()) for t in want)
    text = files[0].text
    assert len(corpus.tokenizer.encode(text)) < 0.6 * len(text.encode())  # merges were learned


def test_build_is_deterministic_and_cached(corpus, tmp_path, monkeypatch):
    again = PythonCorpus(vocab_size=400, root=SMALL, cache_dir=tmp_path)
    assert again.folder.name == corpus.folder.name
    assert (again.folder / "tokenizer.json").read_bytes() == (corpus.folder / "tokenizer.json").read_bytes()
    assert all(np.array_equal(again.tokens(s), corpus.tokens(s)) for s in ("train", "val"))
    monkeypatch.setattr(pc, "train_bpe", lambda *a, **k: pytest.fail("the cached corpus was rebuilt"))
    PythonCorpus(vocab_size=400, root=SMALL, cache_dir=tmp_path)
    assert not list(tmp_path.glob(".tmp-*"))
    assert pc._key(python_files(SMALL), 401) != pc._key(python_files(SMALL), 400)  # another cache entry


def test_the_folder_loads_in_glmkit_and_transformers(corpus):
    tok = HFTokenizer.from_folder(corpus.folder)
    assert tok.eos_token == EOS and tok.pad_token_id == corpus.eos_id
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(corpus.folder))
    code = "def add(a, b):\n    return a + b  # ünïcode\n"
    assert hf(code)["input_ids"] == tok.encode(code) and hf.decode(tok.encode(code)) == code
    assert hf.eos_token_id == corpus.eos_id


def test_code_data_is_a_function_of_seed_and_step(corpus):
    data = CodeData(corpus, batch_size=3, seq_len=32, seed=5)
    a, b = data.batch(7), CodeData(corpus, batch_size=3, seq_len=32, seed=5).batch(7)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.input_ids, data.batch(8).input_ids)
    assert a.input_ids.shape == (3, 32) and a.input_ids.dtype == torch.int64
    assert torch.equal(a.input_ids[:, 1:], a.targets[:, :-1])
    tokens = corpus.tokens("train")
    for row, s in enumerate(data.starts(7)):
        assert torch.equal(a.input_ids[row], torch.tensor(tokens[s : s + 32]))
    val = CodeData(corpus, batch_size=2, seq_len=32, split="val")
    assert val.tokens is corpus.tokens("val") and int(val.batch(0).input_ids.max()) < 400
    with pytest.raises(ValueError, match="seq_len"):
        CodeData(corpus, seq_len=10**7)
    with pytest.raises(ValueError, match="split"):
        CodeData(corpus, split="test")


def test_bad_vocab_sizes():
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(["x"], 100)
    with pytest.raises(ValueError, match="vocab_size"):
        PythonCorpus(vocab_size=10, root=SMALL)
