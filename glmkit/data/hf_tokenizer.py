"""Real tokenizers for Hugging Face GLM checkpoints: ``tokenizer.json`` through the ``tokenizers`` library,
special tokens from ``tokenizer_config.json``, and GLM-4's chat format.

What it implements
    ``HFTokenizer.from_folder(folder)`` wraps the fast tokenizer a checkpoint ships (``tokenizer.json``:
    normaliser, pre-tokeniser, BPE model, decoder and the added special tokens) with ``encode``/``decode``,
    the special tokens named in ``tokenizer_config.json`` (eos, pad, bos), and ``chat_ids``: the GLM-4
    prompt format, so that ``chat(model, tokenizer, messages)`` talks to a loaded GLM-4-9B-0414.
    (glmkit's own ``ByteTokenizer`` stays the course's tokenizer for models trained from scratch.)

How the tokenizer side changed along the lineage (glm-lineage.md §1.6, §2.2)
    * GLM-2021: the BERT/GPT-2 vocabularies of its time plus the blank-infilling specials
      ``[MASK] [sMASK] [gMASK] [START]/<sop> [END]/<eop>``.
    * ChatGLM-6B: a 130K SentencePiece vocabulary (icetk) with ``[gMASK]`` and ``<sop>`` appended to every prompt
      (``prompt [gMASK] <sop> answer <eop>``).
    * ChatGLM2/3: a 65K SentencePiece vocabulary; the prompt now *starts* with ``[gMASK] sop`` and roles
      become special tokens ``<|system|> <|user|> <|assistant|> <|observation|>`` (ChatGLM3).
    * GLM-4 / GLM-4-0414: a 151K byte-level BPE vocabulary shipped as ``tokenizer.json``; the template is
      ``[gMASK]<sop><|system|>\\n…<|user|>\\n…<|assistant|>\\n`` and generation stops on ``<|endoftext|>``,
      ``<|user|>`` or ``<|observation|>``. Only this format is built here (no tools, no thinking blocks).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

GLM4_ROLES = ("system", "user", "assistant", "observation")
GLM4_PREFIX = "[gMASK]<sop>"
# Tokens that end an assistant turn in GLM-4's chat format (the ones present in the vocabulary are used).
GLM4_STOP_TOKENS = ("<|endoftext|>", "<|user|>", "<|observation|>")


def _require_tokenizers():
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        raise ImportError("glmkit.hf_tokenizer needs the `tokenizers` library: pip install tokenizers") from None
    return tokenizers


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json stores a special token as a string or as {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` plus the special tokens and chat format of a GLM checkpoint.

    ``encode(text) -> list[int]`` (special tokens written in the text, e.g. ``<|user|>``, become their ids);
    ``decode(ids, skip_special_tokens=False) -> str``; ``eos_token_id``, ``pad_token_id``, ``bos_token_id``
    (None when the checkpoint defines none); ``chat_ids(messages)`` the GLM-4 prompt;
    ``stop_token_ids`` the ids that end an assistant turn.
    """

    def __init__(self, tokenizer, config: dict[str, Any] | None = None) -> None:
        tk = _require_tokenizers()
        if not isinstance(tokenizer, tk.Tokenizer):
            raise TypeError(f"HFTokenizer needs a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
        self.tokenizer = tokenizer
        self.config = dict(config or {})
        for role in ("eos", "pad", "bos"):
            text = _token_text(self.config.get(f"{role}_token"))
            tid = None if text is None else tokenizer.token_to_id(text)
            if text is not None and tid is None:
                raise ValueError(
                    f"tokenizer_config.json names {role}_token={text!r}, which is not in tokenizer.json's vocabulary"
                )
            setattr(self, f"{role}_token", text)
            setattr(self, f"{role}_token_id", tid)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> HFTokenizer:
        """Read ``tokenizer.json`` (required) and ``tokenizer_config.json`` (optional) from a checkpoint folder."""
        tk = _require_tokenizers()
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"no tokenizer.json in {folder} (only fast tokenizers are supported; "
                f"a tokenizer.model SentencePiece file is not read)"
            )
        config = {}
        cfg_path = folder / "tokenizer_config.json"
        if cfg_path.is_file():
            config = json.loads(cfg_path.read_text(encoding="utf-8"))
        return cls(tk.Tokenizer.from_file(str(path)), config)

    # -- ids <-> text -------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (a model's embedding may have more rows: padding)."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def special_tokens(self) -> dict[str, int]:
        """The added tokens marked special, text → id."""
        return {t.content: i for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special}

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.tokenizer.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` applies the tokenizer's post-processor (if any)."""
        if not isinstance(text, str):
            raise TypeError(f"encode: text must be a str, got {type(text).__name__}")
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"decode: ids {bad[:8]} are outside the vocabulary [0, {self.vocab_size})")
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    # -- GLM-4 chat ---------------------------------------------------------------------------------
    @staticmethod
    def format_chat(messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """GLM-4's prompt text: ``[gMASK]<sop>`` then ``<|role|>\\ncontent`` per message, then
        ``<|assistant|>\\n`` when the model is to answer. messages: [{"role": ..., "content": ...}, ...]."""
        if isinstance(messages, dict) or not isinstance(messages, Sequence):
            raise TypeError("messages must be a list of {'role': ..., 'content': ...} dicts")
        parts = [GLM4_PREFIX]
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")
            if m["role"] not in GLM4_ROLES:
                raise ValueError(f"message {i}: role {m['role']!r} is not one of {GLM4_ROLES}")
            parts.append(f"<|{m['role']}|>\n{m['content']}")
        if add_generation_prompt:
            parts.append("<|assistant|>\n")
        return "".join(parts)

    def chat_ids(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of ``format_chat(messages)``; raises if the vocabulary lacks GLM-4's role tokens."""
        needed = [GLM4_PREFIX[:7], GLM4_PREFIX[7:]] + [
            f"<|{m['role']}|>" for m in messages if isinstance(m, dict) and m.get("role") in GLM4_ROLES
        ]
        if add_generation_prompt:
            needed.append("<|assistant|>")
        absent = sorted({t for t in needed if self.token_to_id(t) is None})
        if absent:
            raise ValueError(f"this tokenizer has no GLM-4 chat tokens {absent}: it is not a GLM-4 tokenizer")
        return self.encode(self.format_chat(messages, add_generation_prompt))

    @property
    def stop_token_ids(self) -> list[int]:
        """Ids that end an assistant turn: eos plus GLM-4's ``<|user|>``/``<|observation|>`` where present."""
        ids = [self.eos_token_id] if self.eos_token_id is not None else []
        ids += [self.token_to_id(t) for t in GLM4_STOP_TOKENS]
        return list(dict.fromkeys(i for i in ids if i is not None))

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size}, eos={self.eos_token!r}, pad={self.pad_token!r})"


def chat(
    model, tokenizer: HFTokenizer, messages: Sequence[dict[str, str]], max_new_tokens: int = 256, **generate_kwargs: Any
) -> str:
    """One assistant reply: GLM-4 prompt → ``glmkit.generate.generate`` (stopping on ``stop_token_ids``) →
    decoded text. ``generate_kwargs``: temperature, top_k, top_p, use_cache, generator."""
    from glmkit.generate import generate

    ids = tokenizer.chat_ids(messages)
    generate_kwargs.setdefault("stop_tokens", tokenizer.stop_token_ids)
    out = generate(model, [ids], max_new_tokens, **generate_kwargs)
    return tokenizer.decode(out.tokens[0], skip_special_tokens=True)
