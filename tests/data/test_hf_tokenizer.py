"""HFTokenizer over a tokenizer.json the test trains (byte-level BPE with GLM-4's special tokens)."""

from __future__ import annotations

import json

import pytest
import torch

tokenizers = pytest.importorskip(
    "tokenizers", reason="HFTokenizer needs the tokenizers library (pip install tokenizers)"
)

from glmkit.data.hf_tokenizer import HFTokenizer, chat  # noqa: E402

SPECIALS = [
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
]
CORPUS = [
    "The cat sat on the mat.",
    "GLM fills in the blanks, one span at a time.",
    "Rotary embeddings rotate pairs of dimensions.",
    "Grouped-query attention shares keys and values.",
    "Bonjour, ça va ? Très bien — merci !",
] * 20


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    path = tmp_path_factory.mktemp("tok")
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|endoftext|>", "pad_token": {"content": "<|endoftext|>", "special": True}})
    )
    return path


def test_round_trip_and_specials(folder):
    tok = HFTokenizer.from_folder(folder)
    assert 256 < tok.vocab_size <= 400
    for text in CORPUS[:5] + ["unseen wörds 123 ✓"]:
        ids = tok.encode(text)
        assert all(isinstance(i, int) for i in ids) and tok.decode(ids) == text
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == tok.token_to_id("<|endoftext|>")
    assert tok.pad_token_id == tok.eos_token_id and tok.bos_token_id is None
    assert set(SPECIALS) <= set(tok.special_tokens)
    ids = tok.encode("hi<|user|>there")
    assert tok.token_to_id("<|user|>") in ids  # written specials become one id
    assert "<|user|>" not in tok.decode(ids, skip_special_tokens=True)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([10**6])


def test_glm4_chat_format(folder):
    tok = HFTokenizer.from_folder(folder)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The cat?"}]
    text = tok.format_chat(msgs)
    assert text == "[gMASK]<sop><|system|>\nBe brief.<|user|>\nThe cat?<|assistant|>\n"
    ids = tok.chat_ids(msgs)
    assert ids[:2] == [tok.token_to_id("[gMASK]"), tok.token_to_id("<sop>")]
    assert tok.decode(ids) == text
    stops = tok.stop_token_ids
    assert stops == [tok.token_to_id(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")]
    with pytest.raises(ValueError, match="role 'bot'"):
        tok.format_chat([{"role": "bot", "content": "x"}])


def test_chat_with_a_tiny_model(folder):
    """chat() is the greedy continuation of the GLM-4 prompt, stopping at a stop token: checked against an argmax
    loop written here over full forward passes (no cache, no glmkit.generate)."""
    from glmkit.models.decoder import Decoder
    from glmkit.models.presets import get_config

    tok = HFTokenizer.from_folder(folder)
    model = Decoder(get_config("cpu-small", num_hidden_layers=1, vocab_size=tok.vocab_size)).eval()
    messages = [{"role": "user", "content": "Hello"}]
    reply = chat(model, tok, messages, max_new_tokens=5)
    ids, new = tok.chat_ids(messages), []
    with torch.no_grad():
        for _ in range(5):
            nxt = int(model(torch.tensor([ids + new]))[0, -1].argmax())
            new.append(nxt)
            if nxt in tok.stop_token_ids:
                break
    assert reply == tok.decode(new, skip_special_tokens=True)


def test_missing_and_inconsistent_files(tmp_path, folder):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        HFTokenizer.from_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_text((folder / "tokenizer.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(ValueError, match="eos_token='</s>'"):
        HFTokenizer.from_folder(tmp_path)
