"""ByteTokenizer: bytes in, bytes out, GLM's specials, printable display strings, clear errors."""

import numpy as np
import pytest
import torch

from glmkit.tokenizer import ByteTokenizer

SPECIAL_NAMES = ("[MASK]", "[sMASK]", "[gMASK]", "[START]", "[END]", "[PAD]")


@pytest.fixture(scope="module")
def tok():
    return ByteTokenizer()


def random_text(rng, n):
    """Mixed ASCII, accented Latin, Greek, CJK and emoji code points."""
    pools = [range(0x20, 0x7F), range(0xC0, 0x180), range(0x391, 0x3C9), range(0x4E00, 0x4E80),
             range(0x1F600, 0x1F640), [0x0A, 0x09]]
    return "".join(chr(int(rng.choice(pools[int(rng.integers(len(pools)))]))) for _ in range(n))


def test_ids_are_utf8_bytes_and_roundtrip(tok):
    rng = np.random.default_rng(0)
    for n in (0, 1, 7, 200):
        text = random_text(rng, n)
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert tok.decode(ids) == text


def test_special_ids_and_vocab(tok):
    ids = [tok.pad_id, tok.mask_id, tok.smask_id, tok.gmask_id, tok.sop_id, tok.eop_id]
    assert len(set(ids)) == len(ids)
    assert all(256 <= i < tok.vocab_size for i in ids)  # never collide with a byte
    assert tok.vocab_size % 8 == 0
    assert tok.vocab_size >= 256 + len(ids)


def test_parse_special(tok):
    assert tok.encode("a[MASK]b", parse_special=True) == [97, tok.mask_id, 98]
    assert tok.encode("a[MASK]b") == list(b"a[MASK]b")  # literal text unless asked
    text = "x " + " ".join(SPECIAL_NAMES) + " y"
    ids = tok.encode(text, parse_special=True)
    specials = [i for i in ids if i >= 256]
    assert specials == [tok.mask_id, tok.smask_id, tok.gmask_id, tok.sop_id, tok.eop_id, tok.pad_id]
    assert tok.decode(ids) == text
    assert tok.encode("[MASK][MASK]", parse_special=True) == [tok.mask_id, tok.mask_id]


def test_decode_specials_and_invalid_utf8(tok):
    assert tok.decode([104, 105, tok.gmask_id, tok.sop_id]) == "hi[gMASK][START]"
    assert tok.decode([0xFF, 65]) == "\ufffdA"
    assert tok.decode([0xE2, 0x82, tok.eop_id, 0xAC]) == "\ufffd[END]\ufffd"  # specials break a byte run
    assert tok.decode([104, tok.pad_id, 105], skip_special=True) == "hi"
    assert tok.decode(torch.tensor([72, 105])) == "Hi"
    assert tok.decode(np.array([72, 105], dtype=np.int32)) == "Hi"


def test_token_strings_printable_one_per_token(tok):
    rng = np.random.default_rng(1)
    ids = tok.encode(random_text(rng, 300)) + list(range(256)) + [tok.mask_id, tok.eop_id]
    shown = tok.token_strings(ids)
    assert len(shown) == len(ids)
    assert all(s and s.isprintable() for s in shown)
    assert tok.token_strings(tok.encode("a b\n")) == ["a", "␣", "b", "⏎"]
    assert tok.token_strings([tok.mask_id, tok.sop_id]) == ["[MASK]", "[START]"]
    e_acute = tok.token_strings(tok.encode("é"))
    assert len(e_acute) == 2 and e_acute[0] == "é"


def test_errors(tok):
    with pytest.raises(TypeError, match="text must be a str"):
        tok.encode(b"bytes")
    with pytest.raises(TypeError, match="text must be a str"):
        tok.encode(None)
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([65, tok.vocab_size])
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([-1])
    with pytest.raises(TypeError, match="ids must be ints"):
        tok.decode([1.5])
    with pytest.raises(TypeError, match="integer dtype"):
        tok.decode(torch.tensor([1.0]))
    with pytest.raises(TypeError, match="sequence of ints"):
        tok.decode("abc")
    with pytest.raises(ValueError, match="out of range"):
        tok.token_strings([999])
