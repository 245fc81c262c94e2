"""The capstone's corpus: the Python source code that ships with the interpreter, tokenised by a byte-level BPE
trained on it, as a next-token batch stream. No download: every machine that runs glmkit has it.

Which files (``python_files``): every ``*.py`` under the standard library folder, ``sysconfig.get_paths()["stdlib"]``,
walked without following symbolic links, in sorted order of the relative POSIX path, except
    * folders named ``site-packages`` / ``dist-packages`` (installed packages, not the interpreter's),
      ``__pycache__``, ``encodings`` (generated codec tables) and ``pydoc_data`` (one generated dict of help text);
    * files over 512 KB (generated data), with a NUL byte, or not valid UTF-8 (a few deliberately mis-encoded test
      files). The test suite (``test/``, ``*/tests/``, ``idle_test/``) is kept: it is real code.
On CPython 3.11.7 that is 1,661 files, 29.3 MB. The list depends on the Python version; for one installation it is
fixed (``python -m glmkit.data.python_corpus`` prints it, and each built corpus keeps it in ``files.tsv``).

Held out (``val``): the ⌈n/50⌉ files (2%) whose SHA-256 of the relative path is smallest; whole files, so no line
of a validation file is ever trained on. The rest is ``train``. The tokenizer is trained on ``train`` only.

The token streams: each file's ids followed by ``<|endoftext|>``, files in sorted order, per split (``tokens``).
Training windows cross file boundaries, as in GPT-style pre-training; the end-of-text token tells the model where.

Built once, cached (``PythonCorpus``): the tokenizer (``tokenizer.json``, ``tokenizer_config.json``) and the token
arrays (``train.npy``, ``val.npy``) go into ``$GLMKIT_CACHE`` (default ``~/.cache/glmkit``) under a key made of the
Python version, the tokenizers version, the vocabulary size, this module's selection rule and a hash of every
file's path and content; a folder is written complete under a temporary name, then renamed (two processes building
at once both finish, one folder stays). Measured on the 2-core course VM, vocab 8192: tokenizer training 4-7 s,
encoding 13-16 s (first use only); 7.96M tokens, 3.68 bytes per token.

``CodeData`` is ``glmkit.data.lm_data.LMData`` over these tokens: the same random windows, a pure function of
(seed, step), so a resumed run sees exactly the batches an uninterrupted one would have.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from glmkit.data.bpe import EOS, load_tokenizer, save_tokenizer, train_bpe
from glmkit.data.lm_data import SPLITS, LMData

SELECTION_VERSION = 1  # bump when the file selection or the stream layout changes: it is part of the cache key
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "encodings", "pydoc_data"})
MAX_FILE_BYTES = 512_000
VAL_EVERY = 50  # one file in 50 is held out
DEFAULT_VOCAB = 8192


@dataclass(frozen=True)
class SourceFile:
    """One source file: ``path`` relative to the root (POSIX), its ``text`` and its ``split`` ("train"/"val")."""

    path: str
    text: str
    split: str


def stdlib_root() -> Path:
    """The standard library folder of the running interpreter."""
    return Path(sysconfig.get_paths()["stdlib"])


def _readable(path: Path) -> str | None:
    if path.stat().st_size > MAX_FILE_BYTES:
        return None
    data = path.read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def python_files(root: str | os.PathLike | None = None) -> list[SourceFile]:
    """The corpus's files under ``root`` (default: the stdlib), selected and split as the module docstring says,
    sorted by path."""
    root = Path(root) if root is not None else stdlib_root()
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    found: list[tuple[str, str]] = []
    for folder, dirs, names in os.walk(root, followlinks=False):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("config-"))
        for name in sorted(names):
            path = Path(folder) / name
            if name.endswith(".py") and path.is_file() and not path.is_symlink():
                text = _readable(path)
                if text is not None:
                    found.append((path.relative_to(root).as_posix(), text))
    found.sort()
    if not found:
        raise ValueError(f"no readable *.py file under {root}")
    digest = {p: hashlib.sha256(p.encode()).hexdigest() for p, _ in found}
    n_val = math.ceil(len(found) / VAL_EVERY) if len(found) > 1 else 0
    val = set(sorted(digest, key=lambda p: (digest[p], p))[:n_val])
    return [SourceFile(p, t, "val" if p in val else "train") for p, t in found]


def default_cache_dir() -> Path:
    """``$GLMKIT_CACHE``, else ``$XDG_CACHE_HOME/glmkit``, else ``~/.cache/glmkit``."""
    if os.environ.get("GLMKIT_CACHE"):
        return Path(os.environ["GLMKIT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "glmkit"


def _key(files: list[SourceFile], vocab_size: int) -> str:
    import tokenizers

    h = hashlib.sha256(f"{SELECTION_VERSION}|{tokenizers.__version__}|{vocab_size}|{VAL_EVERY}".encode())
    for f in files:
        h.update(f"{f.path}\0{f.split}\0".encode())
        h.update(hashlib.sha256(f.text.encode()).digest())
    return h.hexdigest()[:16]


class PythonCorpus:
    """The Python-source corpus with its BPE tokenizer, built on first use and cached (module docstring).

    ``PythonCorpus(vocab_size=8192, root=None, cache_dir=None)``; ``tokenizer`` (an ``HFTokenizer``), ``eos_id``,
    ``tokens(split)`` (int64 ids), ``stats`` (files, bytes, tokens per split; build times), ``folder`` (the cache
    folder, an HF tokenizer folder too), ``files`` (path and split of every file).
    """

    def __init__(
        self,
        vocab_size: int = DEFAULT_VOCAB,
        root: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
        verbose: bool = False,
    ) -> None:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 257:
            raise ValueError(f"vocab_size must be an int >= 257 (256 bytes + <|endoftext|>), got {vocab_size!r}")
        self.root = Path(root) if root is not None else stdlib_root()
        self.vocab_size = vocab_size
        source = python_files(self.root)
        name = f"python{sys.version_info.major}.{sys.version_info.minor}-bpe{vocab_size}-{_key(source, vocab_size)}"
        self.folder = Path(cache_dir if cache_dir is not None else default_cache_dir()) / name
        if not (self.folder / "meta.json").is_file():
            self._build(source, verbose)
        self.stats = json.loads((self.folder / "meta.json").read_text(encoding="utf-8"))
        self.tokenizer = load_tokenizer(self.folder)
        self.eos_id = self.tokenizer.token_to_id(EOS)
        self._tokens: dict[str, np.ndarray] = {}

    @property
    def files(self) -> list[tuple[str, str]]:
        """(path, split) of every file, in stream order."""
        lines = (self.folder / "files.tsv").read_text(encoding="utf-8").splitlines()
        return [tuple(line.split("\t")) for line in lines]

    def tokens(self, split: str = "train") -> np.ndarray:
        """All ids of a split, files in order, each followed by ``<|endoftext|>`` (int64, read-only)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if split not in self._tokens:
            arr = np.load(self.folder / f"{split}.npy").astype(np.int64)
            arr.setflags(write=False)
            self._tokens[split] = arr
        return self._tokens[split]

    def _build(self, source: list[SourceFile], verbose: bool) -> None:
        tmp = self.folder.with_name(f".tmp-{self.folder.name}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            by_split = {s: [f for f in source if f.split == s] for s in SPLITS}
            t0 = time.perf_counter()
            tok = train_bpe((f.text for f in by_split["train"]), self.vocab_size, (EOS,))
            t1 = time.perf_counter()
            save_tokenizer(tok, tmp)
            eos = tok.token_to_id(EOS)
            dtype = np.uint16 if tok.get_vocab_size() <= np.iinfo(np.uint16).max + 1 else np.int32
            meta = {
                "python": sys.version.split()[0],
                "root": str(self.root),
                "vocab_size": tok.get_vocab_size(),
                "selection_version": SELECTION_VERSION,
                "tokenizer_train_s": round(t1 - t0, 2),
            }
            for split, files in by_split.items():
                ids = [e.ids + [eos] for e in tok.encode_batch([f.text for f in files])] if files else []
                arr = np.fromiter((i for row in ids for i in row), dtype=dtype)
                np.save(tmp / f"{split}.npy", arr)
                meta[split] = {
                    "files": len(files),
                    "bytes": sum(len(f.text.encode()) for f in files),
                    "tokens": int(arr.size),
                }
            meta["encode_s"] = round(time.perf_counter() - t1, 2)
            (tmp / "files.tsv").write_text("".join(f"{f.path}\t{f.split}\n" for f in source), encoding="utf-8")
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")  # written last
            try:
                os.rename(tmp, self.folder)
            except OSError:
                if not (self.folder / "meta.json").is_file():  # not another process's complete build: a real error
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if verbose:
            print(f"built {self.folder} in {meta['tokenizer_train_s'] + meta['encode_s']:.1f} s", file=sys.stderr)

    def __repr__(self) -> str:
        s = self.stats
        return (
            f"PythonCorpus(Python {s['python']}, vocab {s['vocab_size']}: train {s['train']['files']} files "
            f"{s['train']['bytes'] / 1e6:.1f} MB {s['train']['tokens']} tokens, val {s['val']['files']} files "
            f"{s['val']['tokens']} tokens)"
        )


class CodeData(LMData):
    """``LMData`` (random next-token windows, a pure function of (seed, step)) over a ``PythonCorpus`` split.

    ``CodeData(corpus=None, batch_size=16, seq_len=128, seed=0, split="train")``; None builds/loads the default
    ``PythonCorpus()``. ``tokenizer`` is the corpus's ``HFTokenizer``."""

    def __init__(
        self,
        corpus: PythonCorpus | None = None,
        batch_size: int = 16,
        seq_len: int = 128,
        seed: int = 0,
        split: str = "train",
    ) -> None:
        for name, value, lo in (("batch_size", batch_size, 1), ("seq_len", seq_len, 1), ("seed", seed, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
        corpus = corpus if corpus is not None else PythonCorpus()
        tokens = corpus.tokens(split)
        if len(tokens) < seq_len + 1:
            raise ValueError(
                f"the {split!r} split of {corpus!r} holds {len(tokens)} tokens, fewer than one window of "
                f"seq_len + 1 = {seq_len + 1}"
            )
        self.corpus, self.tokens, self.tokenizer = corpus, tokens, corpus.tokenizer
        self.batch_size, self.seq_len, self.seed, self.split = batch_size, seq_len, seed, split


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Build (or find) the Python-source corpus and print its statistics.")
    p.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB)
    p.add_argument("--files", action="store_true", help="list every file with its split")
    args = p.parse_args(argv)
    corpus = PythonCorpus(args.vocab_size, verbose=True)
    print(corpus)
    print(f"cache: {corpus.folder}")
    s = corpus.stats
    for split in SPLITS:
        b, t = s[split]["bytes"], s[split]["tokens"]
        print(f"{split:5s} {s[split]['files']:5d} files {b:11,d} bytes {t:10,d} tokens {b / max(t, 1):.2f} bytes/token")
    if args.files:
        for path, split in corpus.files:
            print(f"{split}\t{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
