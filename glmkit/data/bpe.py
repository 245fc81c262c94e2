"""Training a byte-level BPE tokenizer with the ``tokenizers`` library, saved in the Hugging Face layout
(``tokenizer.json`` + ``tokenizer_config.json``) that ``glmkit.data.hf_tokenizer.HFTokenizer`` and transformers load.

What it implements
    ``train_bpe(texts, vocab_size)`` learns merges on an iterable of strings; ``save_tokenizer(tok, folder)`` writes
    the two files; ``load_tokenizer(folder)`` reads them back as an ``HFTokenizer``. The vocabulary is the 256 byte
    symbols, the special tokens (``<|endoftext|>`` by default, which separates documents and ends generation), then
    ``vocab_size - 256 - specials`` merges, most frequent pair first.

How it differs from the course's other tokenizers
    ``glmkit.data.tokenizer.ByteTokenizer`` (lessons 00-08) is one id per byte: nothing to learn, and every model
    sees 3-4 times as many tokens per text. The published GLM-4 / GLM-5 tokenizers are byte-level BPEs of ~151K
    ids trained on web-scale text; this is the same algorithm (GPT-2's byte-level BPE: bytes mapped to printable
    symbols, text pre-split by GPT-2's regex so merges never cross a word/space/punctuation boundary) at a small
    vocabulary, trained in seconds on the corpus the capstone learns from. Training is deterministic: the same texts
    and vocab_size give byte-identical ``tokenizer.json`` files (checked for any number of threads).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from glmkit.data.hf_tokenizer import HFTokenizer, _require_tokenizers

EOS = "<|endoftext|>"
N_BYTES = 256  # the initial alphabet: one symbol per byte value


def train_bpe(texts: Iterable[str], vocab_size: int, special_tokens: Sequence[str] = (EOS,)):
    """A ``tokenizers.Tokenizer``: byte-level BPE with ``vocab_size`` ids (bytes + specials + merges) learned on
    ``texts``."""
    tk = _require_tokenizers()
    from tokenizers import decoders, models, pre_tokenizers, trainers

    specials = list(special_tokens)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < N_BYTES + len(specials):
        raise ValueError(
            f"vocab_size must be an int >= {N_BYTES + len(specials)} (256 bytes + {len(specials)} special tokens), "
            f"got {vocab_size!r}"
        )
    tok = tk.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def save_tokenizer(tok, folder: str | os.PathLike, eos_token: str = EOS, model_max_length: int | None = None) -> Path:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` (eos = pad = ``eos_token``) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if tok.token_to_id(eos_token) is None:
        raise ValueError(f"eos_token {eos_token!r} is not in the tokenizer's vocabulary")
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": eos_token,
        "pad_token": eos_token,
        "clean_up_tokenization_spaces": False,
    }
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return folder


def load_tokenizer(folder: str | os.PathLike) -> HFTokenizer:
    """The tokenizer in ``folder`` (``save_tokenizer``'s layout, or any HF fast tokenizer folder)."""
    return HFTokenizer.from_folder(folder)
