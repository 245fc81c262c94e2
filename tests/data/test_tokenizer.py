"""ByteTokenizer: bytes in, bytes out, GLM's specials, printable display strings, clear errors."""

import numpy as np
import pytest
import torch

from glmkit.data.tokenizer import ByteTokenizer

SPECIAL_NAMES = ("[MASK]", "[sMASK]", "[gMASK]", "[START]", "[END]", "[PAD]")


@pytest.fixture(scope="module")
def tok():
    return ByteTokenizer()


def random_text(rng, n):
    """Mixed ASCII, accented Latin, Greek, CJK and emoji code points."""
    pools = [
        range(0x20, 0x7F),
        range(0xC0, 0x180),
        range(0x391, 0x3C9),
        range(0x4E00, 0x4E80),
        range(0x1F600, 0x1F640),
        [0x0A, 0x09],
    ]
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


# ---- WordTokenizer ------------------------------------------------------------------------------------
from glmkit.data.tokenizer import WordTokenizer  # noqa: E402

WORD_TEXT = "The cat sat on the mat.\nThe dog sat, too!  Then it ran to the park: 12 steps.\n"


@pytest.fixture(scope="module")
def wtok():
    return WordTokenizer.fit(WORD_TEXT)


def test_word_roundtrip_and_pieces(wtok):
    assert wtok.decode(wtok.encode(WORD_TEXT)) == WORD_TEXT
    pieces = [wtok.decode([i]) for i in wtok.encode("The cat sat.")]
    assert pieces == ["The", " cat", " sat", "."]  # one piece per word, its leading space included
    assert wtok.decode(wtok.encode(" the dog ran, too")) == " the dog ran, too"
    from glmkit.data.corpus import load_corpus

    text = load_corpus("stories")[:20000]
    t = WordTokenizer.fit(text)
    ids = t.encode(text)
    assert t.decode(ids) == text and len(ids) < len(text) / 3  # words: ~3.5x fewer tokens than bytes


def test_word_specials_and_vocab(wtok):
    ids = [wtok.pad_id, wtok.mask_id, wtok.smask_id, wtok.gmask_id, wtok.sop_id, wtok.eop_id, wtok.unk_id]
    assert len(set(ids)) == len(ids) and all(wtok.is_special(i) for i in ids)
    assert wtok.vocab_size % 8 == 0 and wtok.vocab_size >= wtok.n_special + len(wtok.pieces)
    assert wtok.encode("[MASK]") != [wtok.mask_id]  # literal text unless asked
    ids = wtok.encode("The cat [MASK] on [gMASK]", parse_special=True)
    assert ids == wtok.encode("The cat") + [wtok.mask_id] + wtok.encode(" on") + [wtok.gmask_id]
    assert wtok.decode(ids) == "The cat[MASK] on[gMASK]"  # the space before a blank is the fill's
    assert wtok.decode(ids, skip_special=True) == "The cat on"
    assert wtok.token_strings(wtok.encode("The cat\n")) == ["The", "␣cat", "⏎"]
    assert wtok.token_strings([wtok.eop_id]) == ["[END]"]
    assert set(wtok.sentence_end_ids) == {wtok.encode(p)[0] for p in (".", "!", ":", "\n")}
    assert set(wtok.whitespace_ids) == {wtok.encode(p)[0] for p in ("\n", " ")}


def test_word_unknown_words(wtok):
    ids = wtok.encode("The zebra sat.")
    assert ids[1] == wtok.unk_id and wtok.decode(ids) == "The[UNK] sat."
    assert wtok.encode("The cat", parse_special=False)[1] != wtok.unk_id


def test_word_fit_order_and_save_load(wtok, tmp_path):
    assert wtok.pieces[0] == " the" or wtok.pieces.index(" sat") < wtok.pieces.index(" park")  # by count
    assert WordTokenizer.fit(WORD_TEXT).pieces == wtok.pieces  # deterministic
    assert len(WordTokenizer.fit(WORD_TEXT, max_vocab=3).pieces) == 3
    assert " the" not in WordTokenizer.fit(WORD_TEXT, min_count=3).pieces
    path = tmp_path / "vocab.json"
    wtok.save(path)
    back = WordTokenizer.load(path)
    assert back.pieces == wtok.pieces and back.encode(WORD_TEXT) == wtok.encode(WORD_TEXT)


def test_word_errors(wtok, tmp_path):
    with pytest.raises(ValueError, match="empty"):
        WordTokenizer.fit("")
    with pytest.raises(TypeError, match="str"):
        WordTokenizer.fit(b"bytes")
    with pytest.raises(ValueError, match="min_count"):
        WordTokenizer.fit("a b", min_count=0)
    with pytest.raises(ValueError, match="distinct"):
        WordTokenizer(["a", "a"])
    with pytest.raises(ValueError, match="special"):
        WordTokenizer(["a", "[MASK]"])
    with pytest.raises(TypeError, match="str"):
        wtok.encode(5)
    with pytest.raises(ValueError, match="out of range"):
        wtok.decode([wtok.vocab_size])
    two = WordTokenizer(["a", "b"])  # 9 specials + 2 pieces, table rounded up to 16 rows
    assert two.vocab_size == 16
    with pytest.raises(ValueError, match="padding of the table"):
        two.decode([11])
    with pytest.raises(TypeError, match="ints"):
        wtok.decode([1.5])
    bad = tmp_path / "bad.json"
    bad.write_text('{"pieces": 3}')
    with pytest.raises(ValueError, match="not a saved WordTokenizer"):
        WordTokenizer.load(bad)


def test_word_tokenizer_drives_the_data_and_the_model(wtok):
    import numpy as np

    from glmkit.data import blank_infilling as bi
    from glmkit.generate import complete, fill_blanks
    from glmkit.models.glm2021 import GLMModel, get_config

    data = bi.BlankInfillingData(
        WORD_TEXT * 20,
        wtok,
        seq_len=32,
        batch_size=4,
        seed=0,
        cfg=bi.BlankInfillingConfig(span_prob=0.5, sentence_prob=0.3),
    )
    batch = data.batch(0)
    assert int(batch.input_ids.max()) < wtok.vocab_size
    for mode in ("mask", "smask", "gmask"):
        ex = bi.corrupt(wtok.encode(WORD_TEXT), bi.BlankInfillingConfig(), np.random.default_rng(0), wtok, mode=mode)
        assert wtok.decode(ex.part_a).count(wtok.id_to_special[ex.mask_token_ids[0]]) == len(ex.spans)
    torch.manual_seed(0)
    model = GLMModel(
        get_config("cpu-words", vocab_size=wtok.vocab_size, num_hidden_layers=1, hidden_size=32, intermediate_size=64)
    )
    assert torch.isfinite(model.loss(batch))
    r = fill_blanks(model, wtok, "The cat [MASK] on the mat.", max_span_len=3)
    assert len(r.fills) == 1 and r.text.startswith("The cat")
    g = complete(model, wtok, "The dog", max_new_tokens=3)
    assert g.text.startswith("The dog") and all(wtok.n_special <= i < wtok.n_ids for i in g.fill_ids[0])
