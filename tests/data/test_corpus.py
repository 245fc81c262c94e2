"""Built-in corpora (no download) and loading a user's own text."""

import re

import pytest

from glmkit.data import corpus
from glmkit.data.corpus import corpus_stats, list_corpora, load_corpus, load_text, train_val_split
from glmkit.data.tokenizer import ByteTokenizer

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def test_list_corpora():
    names = list_corpora()
    assert {"default", "stories", "stdlib"} <= set(names)
    assert all(isinstance(d, str) and d for d in names.values())


def test_stories_size_determinism_cache():
    text = load_corpus("stories")
    assert len(text.encode("utf-8")) >= 300_000
    assert load_corpus("default") == text
    assert load_corpus("stories") is text  # cached in memory
    assert corpus._build_stories.__wrapped__() == text  # a fresh build gives the same bytes
    assert text.isascii()


def test_stories_are_self_consistent():
    """The stories are learnable because their facts agree with each other: check them independently."""
    text = load_corpus("stories")
    sums = re.findall(r"(\d+) plus (\d+) is (?:also )?(\d+)", text)
    assert len(sums) > 100
    assert all(int(a) + int(b) == int(c) for a, b, c in sums)
    days = re.findall(r"Today is (\w+)\. Tomorrow is (\w+), and yesterday was (\w+)\.", text)
    assert len(days) > 100
    for today, tomorrow, yesterday in days:
        i = DAYS.index(today)
        assert (DAYS[(i + 1) % 7], DAYS[(i - 1) % 7]) == (tomorrow, yesterday)
    gifts = re.findall(
        r"(\w+) has a (\w+) (\w+)\. (\w+) has a (\w+) (\w+)\. (\w+) gives the (\w+) (\w+) to (\w+)\. "
        r"Now (\w+) has a (\w+) (\w+) and a (\w+) (\w+)",
        text,
    )
    assert len(gifts) > 100
    for a, c1, t1, b, c2, t2, giver, gc, gt, receiver, now, nc1, nt1, nc2, nt2 in gifts:
        assert (giver, gc, gt, receiver, now) == (a, c1, t1, b, b)
        assert (nc1, nt1, nc2, nt2) == (c1, t1, c2, t2)
    spelled = re.findall(r"The word (\w+) has (\d+) letters: ([a-z-]+)\.", text)
    assert spelled and all(len(w) == int(n) and s.replace("-", "") == w for w, n, s in spelled)


def test_stdlib_corpus_is_prose():
    text = load_corpus("stdlib")
    assert len(text.encode("utf-8")) >= 100_000  # ~360 KB on Python 3.11; docstrings vary by version
    lines = text.splitlines()
    assert len(set(lines)) == len(lines)  # deduplicated
    assert all(line.endswith(".") and line[0].isupper() for line in lines)
    assert ">>>" not in text and "::" not in text


def test_corpus_stats_and_unknown_name():
    stats = corpus_stats("stories")
    text = load_corpus("stories")
    assert stats["bytes"] == len(ByteTokenizer().encode(text))
    assert stats["chars"] == len(text) and stats["lines"] == text.count("\n")
    with pytest.raises(ValueError, match="unknown corpus 'nope'"):
        load_corpus("nope")
    with pytest.raises(TypeError, match="corpus name must be a str"):
        load_corpus(3)


def test_load_text_file_and_folder(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "two.txt").write_text("second\r\nline\n", encoding="utf-8")
    (tmp_path / "a.md").write_bytes("\ufefffirst é".encode("utf-8"))  # BOM is dropped
    (tmp_path / "c.bin").write_bytes(b"\x00\x01")  # not a .txt/.md: ignored
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.txt").write_text("hidden")
    assert load_text(tmp_path) == "first é\n\nsecond\nline\n"
    assert load_text(tmp_path / "b" / "two.txt") == "second\nline\n"
    assert load_text(str(tmp_path), extensions=(".TXT",)) == "second\nline\n"  # case-insensitive


def test_load_text_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_text(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="no .txt/.md files"):
        load_text(tmp_path)
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        load_text(tmp_path)
    (tmp_path / "blob.txt").write_bytes(b"abc\x00def")
    with pytest.raises(ValueError, match=r"blob\.txt.*binary"):
        load_text(tmp_path)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin\.txt.*not valid UTF-8"):
        load_text(latin)
    with pytest.raises(TypeError, match="path must be"):
        load_text(42)


def test_train_val_split():
    text = "".join(f"line {i}\n" for i in range(1000))
    train, val = train_val_split(text, 0.1)
    assert train + val == text
    assert abs(len(val) - 0.1 * len(text)) <= 0.01 * len(text) + 1
    assert train.endswith("\n") and val.startswith("line")  # cut at a line start
    tokens = list(range(100))
    t, v = train_val_split(tokens, 0.05)
    assert t + v == tokens and len(v) == 5
    for bad in (0, 1, -0.1, 1.5):
        with pytest.raises(ValueError, match="val_fraction"):
            train_val_split(text, bad)
    with pytest.raises(ValueError, match="too short"):
        train_val_split("a", 0.5)


def test_packaged_sample_text_loads():
    from pathlib import Path

    import glmkit

    sample = Path(glmkit.__file__).parent / "data" / "sample.md"
    text = load_text(sample)
    assert text.startswith("# A short note") and text.endswith("ending.\n")
    assert load_text(sample.parent) == text  # the folder holds just this one text file
