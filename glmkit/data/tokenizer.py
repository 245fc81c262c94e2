"""A byte-level tokenizer with GLM's special tokens.

Every UTF-8 byte is one token (ids 0..255), so any text encodes with no training and no download; the
special tokens of GLM's blank-infilling objective follow from id 256. GLM itself used a trained subword
vocabulary (SentencePiece, ~50K pieces); bytes make sequences ~4x longer but keep lesson 01 free of a
tokenizer-training detour, and the objective does not care what a token is.

Special tokens (GLM names in brackets; the code of THUDM/GLM calls [START]/[END] ``sop``/``eop``):

    [PAD]    padding after Part B (never attended to by real tokens, never in the loss)
    [MASK]   one blank replacing a short span            ("bert" mode, Poisson(3) span lengths)
    [sMASK]  one blank replacing a whole sentence        (gap-sentence mode)
    [gMASK]  one blank replacing a long suffix           (generation mode; ChatGLM's prompt layout)
    [START]  first input of each Part-B span             (<|startofpiece|>)
    [END]    last target of each Part-B span             (<|endofpiece|>)
    [dBLOCK] GLM-10B's random replacement of Part-B inputs (``block_mask_prob``); unused by default
    [EOD]    end of a document, when a corpus joins several
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np

N_BYTES = 256  # ids 0..255 are the raw bytes
SPECIAL_TOKENS = ("[PAD]", "[MASK]", "[sMASK]", "[gMASK]", "[START]", "[END]", "[dBLOCK]", "[EOD]")

# Bytes that end a sentence for [sMASK] sampling (GLM splits on .?!;: and newline, plus CJK marks).
SENTENCE_END_BYTES = tuple(b".?!;:\n")
WHITESPACE_BYTES = tuple(b" \t\n\r\x0b\x0c")

# Display forms of bytes that do not print as themselves.
_SHOWN = {ord(" "): "␣", ord("\n"): "⏎", ord("\t"): "⇥", ord("\r"): "␍", 0x7F: "␡"}
_CONTINUATION = "⋯"  # a continuation byte of a multi-byte character (the character shows on its first byte)


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then GLM's special tokens.

    >>> tok = ByteTokenizer()
    >>> tok.encode("hi [MASK]", parse_special=True)
    [104, 105, 32, 257]
    >>> tok.decode([104, 105, tok.gmask_id])
    'hi[gMASK]'
    """

    def __init__(self) -> None:
        self.special_tokens: dict[str, int] = {s: N_BYTES + i for i, s in enumerate(SPECIAL_TOKENS)}
        self.id_to_special: dict[int, str] = {i: s for s, i in self.special_tokens.items()}
        self.pad_id = self.special_tokens["[PAD]"]  # 256
        self.mask_id = self.special_tokens["[MASK]"]  # 257
        self.smask_id = self.special_tokens["[sMASK]"]  # 258
        self.gmask_id = self.special_tokens["[gMASK]"]  # 259
        self.sop_id = self.special_tokens["[START]"]  # 260
        self.eop_id = self.special_tokens["[END]"]  # 261
        self.dblock_id = self.special_tokens["[dBLOCK]"]  # 262
        self.eod_id = self.special_tokens["[EOD]"]  # 263
        # 256 bytes + 8 specials = 264, already a multiple of 8 (embedding/matmul tiles like multiples of
        # 8). Rounding up keeps that true if a special is added: every id below vocab_size is valid.
        self.vocab_size = -(-(N_BYTES + len(SPECIAL_TOKENS)) // 8) * 8
        self.mask_ids = (self.mask_id, self.smask_id, self.gmask_id)
        self.sentence_end_ids = SENTENCE_END_BYTES
        self.whitespace_ids = WHITESPACE_BYTES
        self._special_re = re.compile("(" + "|".join(re.escape(s) for s in SPECIAL_TOKENS) + ")")

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size}, specials={self.special_tokens})"

    def __len__(self) -> int:
        return self.vocab_size

    def is_special(self, token_id: int) -> bool:
        return token_id >= N_BYTES

    # ---- text -> ids ------------------------------------------------------------------------------
    def encode(self, text: str, parse_special: bool = False) -> list[int]:
        """UTF-8 bytes of ``text`` as ids. With ``parse_special`` the literal strings "[MASK]", "[sMASK]",
        "[gMASK]", "[START]", "[END]", "[PAD]" (also "[dBLOCK]", "[EOD]") become their special ids;
        without it they are ordinary bytes."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if not parse_special:
            return list(text.encode("utf-8"))
        ids: list[int] = []
        for piece in self._special_re.split(text):  # split keeps the specials (odd positions)
            if piece in self.special_tokens:
                ids.append(self.special_tokens[piece])
            elif piece:
                ids.extend(piece.encode("utf-8"))
        return ids

    # ---- ids -> text ------------------------------------------------------------------------------
    def _check_ids(self, ids) -> list[int]:
        if isinstance(ids, (str, bytes)):
            raise TypeError(f"ids must be a sequence of ints, got {type(ids).__name__}")
        if hasattr(ids, "tolist") and not isinstance(ids, list):  # torch tensor or numpy array
            dtype = str(getattr(ids, "dtype", ""))
            if "int" not in dtype:
                raise TypeError(f"ids must have an integer dtype, got {dtype}")
            if getattr(ids, "ndim", 1) != 1:
                raise ValueError(f"ids must be 1-D, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        out = []
        for i in ids:
            if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
                raise TypeError(f"ids must be ints, got {type(i).__name__} ({i!r})")
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {int(i)} out of range [0, {self.vocab_size})")
            out.append(int(i))
        return out

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of ``ids``: byte runs decoded as UTF-8 (invalid runs become U+FFFD), specials shown as
        "[MASK]" etc. (or dropped with ``skip_special``)."""
        parts: list[str] = []
        run = bytearray()
        for i in self._check_ids(ids):
            if i < N_BYTES:
                run.append(i)
                continue
            parts.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            if not skip_special:
                parts.append(self.id_to_special[i])
        parts.append(run.decode("utf-8", errors="replace"))
        return "".join(parts)

    def token_strings(self, ids: Iterable[int]) -> list[str]:
        """One short printable string per token, for tables and plots.

        Printable ASCII shows as itself, space as '␣', newline as '⏎', tab as '⇥', other control bytes as
        their Unicode control pictures; a valid multi-byte character shows on its first byte and '⋯' on
        each continuation byte; a stray non-ASCII byte shows as its hex, e.g. '\\xff'; specials as "[MASK]".
        """
        ids = self._check_ids(ids)
        out: list[str] = []
        k = 0
        while k < len(ids):
            i = ids[k]
            if i >= N_BYTES:
                out.append(self.id_to_special[i])
            elif i in _SHOWN:
                out.append(_SHOWN[i])
            elif i < 0x20:
                out.append(chr(0x2400 + i))  # ␀..␟
            elif i < 0x80:
                out.append(chr(i))
            else:
                n = _utf8_len(i)
                chunk = bytes(ids[k : k + n]) if n and all(b < N_BYTES for b in ids[k : k + n]) else b""
                try:
                    ch = chunk.decode("utf-8") if n and len(chunk) == n else None
                except UnicodeDecodeError:
                    ch = None
                if ch is None:
                    out.append(f"\\x{i:02x}")
                else:
                    out.extend([ch] + [_CONTINUATION] * (n - 1))
                    k += n
                    continue
            k += 1
        return out


def _utf8_len(lead: int) -> int:
    """Length of the UTF-8 sequence a lead byte announces (0 for a continuation or invalid byte)."""
    if 0xC2 <= lead <= 0xDF:
        return 2
    if 0xE0 <= lead <= 0xEF:
        return 3
    if 0xF0 <= lead <= 0xF4:
        return 4
    return 0


# ------------------------------------------------------------------------------------------------------
# A word-level tokenizer
# ------------------------------------------------------------------------------------------------------

# One piece per word (letters, digits, underscore), per punctuation mark, or per whitespace character; a
# single space before a word or a punctuation mark is glued to it (" cat", " ,"), as in GPT-2's
# pre-tokenizer. Concatenating the pieces gives the text back exactly.
WORD_PATTERN = re.compile(r" ?\w+| ?[^\w\s]|\s")
WORD_SPECIAL_TOKENS = SPECIAL_TOKENS + ("[UNK]",)
_SENTENCE_END_CHARS = ".?!;:\n"


class WordTokenizer:
    """Whole words (with their leading space) as tokens, fitted on a text; GLM's specials first.

    Same interface as ``ByteTokenizer`` (``pad_id, mask_id, smask_id, gmask_id, sop_id, eop_id``,
    ``vocab_size``, ``encode(text, parse_special=False)``, ``decode(ids)``, ``token_strings(ids)``), so
    ``BlankInfillingData``, the model and ``glmkit.generate`` take either. Why words: GLM's Poisson(3) span
    lengths count tokens of a ~30K-50K subword vocabulary, i.e. mostly whole words; over bytes the same law
    blanks out word fragments. On a small corpus a word vocabulary is tiny (the ``stories`` corpus has 231
    pieces) and sequences are ~3.5x shorter than in bytes, so a CPU model learns much faster.

    Ids: the 9 specials ``[PAD] [MASK] [sMASK] [gMASK] [START] [END] [dBLOCK] [EOD] [UNK]`` are 0..8, then
    the pieces in order of decreasing count (ties alphabetical), so a fit is deterministic. A piece not in
    the vocabulary encodes as ``[UNK]`` (decode shows "[UNK]"; the round trip then loses it).

    >>> tok = WordTokenizer.fit("The cat sat. The dog sat.")
    >>> tok.decode(tok.encode("The dog sat on [MASK].", parse_special=True))
    'The dog sat[UNK][MASK].'
    """

    def __init__(self, pieces: Iterable[str]) -> None:
        pieces = list(pieces)
        if not all(isinstance(p, str) and p for p in pieces):
            raise TypeError("pieces must be non-empty strings")
        if len(set(pieces)) != len(pieces):
            raise ValueError("pieces must be distinct")
        clash = sorted(set(pieces) & set(WORD_SPECIAL_TOKENS))
        if clash:
            raise ValueError(f"pieces must not contain the special tokens {clash}")
        self.special_tokens: dict[str, int] = {s: i for i, s in enumerate(WORD_SPECIAL_TOKENS)}
        self.id_to_special: dict[int, str] = {i: s for s, i in self.special_tokens.items()}
        self.pad_id = self.special_tokens["[PAD]"]
        self.mask_id = self.special_tokens["[MASK]"]
        self.smask_id = self.special_tokens["[sMASK]"]
        self.gmask_id = self.special_tokens["[gMASK]"]
        self.sop_id = self.special_tokens["[START]"]
        self.eop_id = self.special_tokens["[END]"]
        self.dblock_id = self.special_tokens["[dBLOCK]"]
        self.eod_id = self.special_tokens["[EOD]"]
        self.unk_id = self.special_tokens["[UNK]"]
        self.n_special = len(WORD_SPECIAL_TOKENS)
        self.pieces = pieces
        self.piece_to_id = {p: self.n_special + i for i, p in enumerate(pieces)}
        n = self.n_ids = self.n_special + len(pieces)  # ids in use; the table is rounded up to 8
        self.vocab_size = -(-n // 8) * 8  # rows n..vocab_size-1 are never produced (generate bans them)
        self.mask_ids = (self.mask_id, self.smask_id, self.gmask_id)
        # For [sMASK] sentences and whitespace handling in glmkit.data.blank_infilling.
        self.sentence_end_ids = tuple(
            i for p, i in self.piece_to_id.items() if p.strip(" ") and p.strip(" ")[-1] in _SENTENCE_END_CHARS
        )
        self.whitespace_ids = tuple(i for p, i in self.piece_to_id.items() if not p.strip())
        self._special_re = re.compile("(" + "|".join(re.escape(s) for s in WORD_SPECIAL_TOKENS) + ")")

    # ---- fitting and saving ---------------------------------------------------------------------------
    @classmethod
    def fit(cls, text: str, max_vocab: int | None = None, min_count: int = 1) -> WordTokenizer:
        """The pieces of ``text`` (``WORD_PATTERN``) seen at least ``min_count`` times, most frequent
        first, at most ``max_vocab`` of them (None: all)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if not text:
            raise ValueError("text is empty: nothing to fit a vocabulary on")
        if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
            raise ValueError(f"min_count must be an int >= 1, got {min_count!r}")
        if max_vocab is not None and (isinstance(max_vocab, bool) or not isinstance(max_vocab, int) or max_vocab < 1):
            raise ValueError(f"max_vocab must be a positive int or None, got {max_vocab!r}")
        counts: dict[str, int] = {}
        for piece in WORD_PATTERN.findall(text):
            counts[piece] = counts.get(piece, 0) + 1
        for s in WORD_SPECIAL_TOKENS:  # a literal "[MASK]" in the text is three pieces, never one
            counts.pop(s, None)
        ranked = sorted((p for p, c in counts.items() if c >= min_count), key=lambda p: (-counts[p], p))
        return cls(ranked[:max_vocab] if max_vocab is not None else ranked)

    def to_dict(self) -> dict:
        return {"type": "WordTokenizer", "pieces": list(self.pieces)}

    def save(self, path) -> None:
        """Write the vocabulary as JSON (``{"type": "WordTokenizer", "pieces": [...]}``)."""
        import json
        from pathlib import Path

        Path(path).write_text(json.dumps(self.to_dict(), ensure_ascii=False, indent=0), encoding="utf-8")

    @classmethod
    def load(cls, path) -> WordTokenizer:
        import json
        from pathlib import Path

        d = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(d, dict) or d.get("type") != "WordTokenizer" or not isinstance(d.get("pieces"), list):
            raise ValueError(
                f"{str(path)!r} is not a saved WordTokenizer (expected {{'type': 'WordTokenizer', 'pieces': [...]}})"
            )
        return cls(d["pieces"])

    def __repr__(self) -> str:
        return f"WordTokenizer(vocab_size={self.vocab_size}, pieces={len(self.pieces)})"

    def __len__(self) -> int:
        return self.vocab_size

    def is_special(self, token_id: int) -> bool:
        return token_id < self.n_special

    # ---- text <-> ids ---------------------------------------------------------------------------------
    def encode(self, text: str, parse_special: bool = False) -> list[int]:
        """Ids of the pieces of ``text``; unseen pieces become ``[UNK]``. With ``parse_special`` the
        literal "[MASK]", "[gMASK]", ... become their special ids, and one space right before a special is
        dropped: in training the blanked piece carries its own leading space (" Monday"), so
        "Tomorrow is [MASK]." is read as "Tomorrow is" + [MASK] + "." and filled with " Monday"."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        chunks = self._special_re.split(text) if parse_special else [text]
        ids: list[int] = []
        for k, chunk in enumerate(chunks):
            if parse_special and chunk in self.special_tokens:
                ids.append(self.special_tokens[chunk])
                continue
            if k + 1 < len(chunks) and chunk.endswith(" ") and not chunk.endswith("  "):
                chunk = chunk[:-1]  # "is [MASK]": the space belongs to the blanked word (" Monday")
            if chunk:
                ids.extend(self.piece_to_id.get(p, self.unk_id) for p in WORD_PATTERN.findall(chunk))
        return ids

    _check_ids = ByteTokenizer._check_ids

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """The pieces joined; specials shown as "[MASK]" etc. (or dropped with ``skip_special``)."""
        out = []
        for i in self._check_ids(ids):
            if i >= self.n_special + len(self.pieces):
                raise ValueError(
                    f"token id {i} is padding of the table (the vocabulary ends at "
                    f"{self.n_special + len(self.pieces) - 1})"
                )
            if i < self.n_special:
                if not skip_special:
                    out.append(self.id_to_special[i])
            else:
                out.append(self.pieces[i - self.n_special])
        return "".join(out)

    def token_strings(self, ids: Iterable[int]) -> list[str]:
        """One printable string per token: spaces as '␣', newline as '⏎', tab as '⇥', specials as "[MASK]"."""
        out = []
        for i in self._check_ids(ids):
            if i < self.n_special:
                out.append(self.id_to_special[i])
            elif i >= self.n_special + len(self.pieces):
                out.append(f"<{i}>")
            else:
                out.append("".join(_SHOWN.get(ord(c), c) for c in self.pieces[i - self.n_special]))
        return out
