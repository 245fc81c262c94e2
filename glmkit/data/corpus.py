"""Text to train on, with no download: built-in corpora built at run time, and loading your own text.

Built-in corpora (``list_corpora()``; sizes from ``corpus_stats(name)`` or ``python -m glmkit.data.corpus``):

* ``stories`` — generated short stories and facts from templates (who has which coloured object, counting,
  small sums, weekdays, spelling). The text is built by a self-contained pseudo-random generator, so it is
  byte-identical on every machine and Python version. It is very learnable: most blanks can be recovered
  from the rest of the paragraph, which is what a small model trained for a few CPU minutes needs in order
  to visibly learn blank infilling. ``default`` is this corpus.
* ``stdlib`` — real English prose: the docstrings of a fixed, sorted list of standard-library modules (and
  their public classes and functions) plus the language-reference topics that ``pydoc`` ships, cleaned to
  plain paragraphs (no code, no doctests, no markup). It depends on the Python version (docstrings change
  between releases) but is deterministic for a given installation.

Your own text: ``load_text(path)`` reads a file, or every ``.txt``/``.md`` file under a folder (sorted).
Lesson 01 uses ``train_val_split`` to hold out the end of the text for validation.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re
import textwrap
import warnings
from pathlib import Path

# ------------------------------------------------------------------------------------------------------
# The generated corpus
# ------------------------------------------------------------------------------------------------------

STORIES_TARGET_CHARS = 400_000  # ~400 KB: enough that a small model does not simply memorise it
_STORIES_SEED = 20210318  # the GLM paper's arXiv month; any fixed number works


class _SplitMix64:
    """A tiny deterministic PRNG (SplitMix64), so the generated corpus is identical on every machine:
    neither ``random`` nor numpy promise the same streams across versions for choice/shuffle."""

    def __init__(self, seed: int) -> None:
        self.state = seed & 0xFFFFFFFFFFFFFFFF

    def next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        return z ^ (z >> 31)

    def below(self, n: int) -> int:
        return self.next() % n  # modulo bias is ~n/2^64: irrelevant here

    def choice(self, seq):
        return seq[self.below(len(seq))]

    def sample(self, seq, k: int) -> list:
        pool = list(seq)
        return [pool.pop(self.below(len(pool))) for _ in range(k)]


_NAMES = (
    "Anna",
    "Ben",
    "Mia",
    "Leo",
    "Sara",
    "Tom",
    "Nora",
    "Max",
    "Lily",
    "Omar",
    "Eva",
    "Sam",
    "Zoe",
    "Ivan",
    "Rosa",
    "Hugo",
)
_COLOURS = ("red", "blue", "green", "yellow", "black", "white", "pink", "brown", "orange", "purple")
_THINGS = ("ball", "kite", "hat", "cup", "book", "box", "bag", "car", "shoe", "coat", "lamp", "pen")
_PLACES = ("kitchen", "garden", "park", "school", "library", "market", "station", "forest", "beach", "bedroom")
_ANIMALS = ("cat", "dog", "bird", "horse", "fox", "cow", "duck", "rabbit", "mouse", "goat")
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_NUMBER_WORDS = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
)
_FACTS = (  # fixed facts: learnable by memory, the rest of the corpus is learnable from context
    "The sky is blue.",
    "Grass is green.",
    "Snow is white.",
    "The sun is hot.",
    "Ice is cold.",
    "A week has seven days.",
    "A cat says meow.",
    "A dog says woof.",
    "A cow says moo.",
    "Fish swim in water.",
    "Birds can fly.",
    "Bees make honey.",
    "The moon shines at night.",
    "Rain falls from clouds.",
)


def _story_paragraph(r: _SplitMix64) -> str:
    kind = r.below(7)
    if kind == 0:  # possession and a gift: the end repeats facts stated earlier
        a, b = r.sample(_NAMES, 2)
        (c1, c2), (t1, t2) = r.sample(_COLOURS, 2), r.sample(_THINGS, 2)
        return (
            f"{a} has a {c1} {t1}. {b} has a {c2} {t2}. {a} gives the {c1} {t1} to {b}. "
            f"Now {b} has a {c1} {t1} and a {c2} {t2}, and {a} has nothing."
        )
    if kind == 1:  # where things are, asked back
        a = r.choice(_NAMES)
        an, p1, p2 = r.choice(_ANIMALS), *r.sample(_PLACES, 2)
        return (
            f"{a} sees a {an} in the {p1}. Then the {an} runs to the {p2}. "
            f"Where is the {an}? The {an} is in the {p2}. {a} stays in the {p1}."
        )
    if kind == 2:  # counting in digits and in words
        lo = r.below(20)
        hi = lo + 4 + r.below(6)
        seq = ", ".join(str(i) for i in range(lo, hi + 1))
        k = r.below(9) + 1
        words = " ".join(_NUMBER_WORDS[1 : k + 1])
        return f"Count from {lo} to {hi}: {seq}. In words, up to {_NUMBER_WORDS[k]}: {words}."
    if kind == 3:  # small sums, stated and repeated
        x, y = r.below(10), r.below(10)
        a = r.choice(_NAMES)
        return (
            f"{a} has {x} apples and finds {y} more. {x} plus {y} is {x + y}, "
            f"so {a} has {x + y} apples. {y} plus {x} is also {x + y}."
        )
    if kind == 4:  # weekdays
        d = r.below(7)
        a = r.choice(_NAMES)
        place = r.choice(_PLACES)
        return (
            f"Today is {_DAYS[d]}. Tomorrow is {_DAYS[(d + 1) % 7]}, and yesterday was {_DAYS[(d - 1) % 7]}. "
            f"On {_DAYS[(d + 1) % 7]} {a} goes to the {place}."
        )
    if kind == 5:  # spelling
        w = r.choice(_ANIMALS + _THINGS)
        return f"The word {w} has {len(w)} letters: {'-'.join(w)}. The {w} is {r.choice(_COLOURS)}."
    return " ".join(r.sample(_FACTS, 3))


@functools.cache
def _build_stories() -> str:
    r = _SplitMix64(_STORIES_SEED)
    paragraphs, size = [], 0
    while size < STORIES_TARGET_CHARS:
        p = _story_paragraph(r)
        paragraphs.append(p)
        size += len(p) + 1
    return "\n".join(paragraphs) + "\n"


# ------------------------------------------------------------------------------------------------------
# The standard-library corpus
# ------------------------------------------------------------------------------------------------------

# Pure, side-effect-free modules whose docstrings are mostly English prose. Missing ones (a module added or
# removed in some Python version, or left out of a minimal install) are skipped.
_STDLIB_MODULES = tuple(
    sorted(
        """
abc argparse array ast asyncio.base_events asyncio.events asyncio.futures asyncio.locks asyncio.protocols
asyncio.queues asyncio.streams asyncio.subprocess asyncio.tasks asyncio.transports base64 bdb bisect bz2 calendar
cmath cmd code codecs codeop collections collections.abc colorsys compileall concurrent.futures
concurrent.futures.process concurrent.futures.thread configparser contextlib contextvars copy copyreg csv ctypes
dataclasses datetime decimal difflib dis doctest email.headerregistry email.message email.parser email.policy
email.utils enum errno faulthandler filecmp fileinput fnmatch fractions ftplib functools gc getopt gettext glob
graphlib gzip hashlib heapq hmac html html.parser http.client http.cookiejar http.cookies http.server imaplib
importlib importlib.abc importlib.metadata importlib.resources importlib.util inspect io ipaddress itertools json
json.decoder json.encoder keyword linecache locale logging logging.handlers lzma mailbox math mimetypes mmap
multiprocessing.managers multiprocessing.pool multiprocessing.process multiprocessing.queues
multiprocessing.synchronize netrc numbers operator optparse os pathlib pdb pickle pickletools pkgutil platform
plistlib poplib pprint profile pstats pydoc queue quopri random re reprlib runpy sched secrets selectors shelve
shlex shutil signal smtplib socket socketserver sqlite3 ssl stat statistics string struct subprocess symtable sys
sysconfig tabnanny tarfile tempfile textwrap threading time timeit token tokenize tomllib trace traceback
tracemalloc types typing unicodedata unittest unittest.case unittest.loader unittest.mock unittest.result
unittest.runner unittest.suite urllib.error urllib.parse urllib.request urllib.robotparser uuid venv warnings wave
weakref webbrowser wsgiref.handlers wsgiref.simple_server xml.dom.minidom xml.etree.ElementTree xml.sax xmlrpc.client
xmlrpc.server zipapp zipfile zipimport zlib zoneinfo
""".split()
    )
)

_LINE_STARTS_NOT_PROSE = (" ", "\t", ">>>", "...", "..", "-", "*", "+", "|", "=", ":")
_MARKUP = re.compile(r"[{}\[\]<>=_`\\@#$%^&*|~]|::|\(\)")  # code, reST roles, signatures


def _prose_paragraphs(doc: str):
    """Yield the paragraphs of a docstring that read as plain English prose, each joined to one line."""
    for para in re.split(r"\n\s*\n", doc):
        lines = textwrap.dedent(para).strip("\n").split("\n")
        if any(line.startswith(_LINE_STARTS_NOT_PROSE) for line in lines):  # code, lists, tables, doctests
            continue
        text = re.sub(r"\s+", " ", " ".join(lines)).strip()
        if len(text) < 40 or not text[0].isupper() or not text.endswith("."):
            continue
        if sum(c.isalpha() or c in " ,.;:'-" for c in text) < 0.9 * len(text) or _MARKUP.search(text):
            continue
        yield text


def _docstrings(module) -> list[str]:
    """The module's docstring, then its public classes/functions (and their methods), in sorted order."""
    docs = [inspect.getdoc(module) or ""]
    for name in sorted(vars(module)):
        obj = vars(module)[name]
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        docs.append(inspect.getdoc(obj) or "")
        if inspect.isclass(obj):
            for meth_name in sorted(vars(obj)):
                meth = vars(obj)[meth_name]
                if isinstance(meth, (classmethod, staticmethod)):
                    meth = meth.__func__
                if not meth_name.startswith("_") and (inspect.isroutine(meth) or isinstance(meth, property)):
                    docs.append(inspect.getdoc(meth) or "")
    return docs


@functools.cache
def _build_stdlib() -> str:
    docs: list[str] = []
    with warnings.catch_warnings():  # touching deprecated attributes (typing.io, ...) warns
        warnings.simplefilter("ignore")
        for name in _STDLIB_MODULES:
            try:
                module = importlib.import_module(name)
            except Exception:  # absent in this Python version or install: skip, deterministically
                continue
            docs.extend(_docstrings(module))
    try:  # the language reference topics behind help('if') etc.
        from pydoc_data.topics import topics

        docs.extend(topics[k] for k in sorted(topics))
    except Exception:
        pass
    seen: set[str] = set()
    paragraphs = []
    for doc in docs:
        for p in _prose_paragraphs(doc):
            if p not in seen:  # many docstrings repeat ("Return self==value.")
                seen.add(p)
                paragraphs.append(p)
    if not paragraphs:
        raise RuntimeError(
            "this Python installation carries no usable docstrings (run with -OO?); use load_corpus('stories') instead"
        )
    return "\n".join(paragraphs) + "\n"


# ------------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------------

_CORPORA = {
    "default": ("the 'stories' corpus", _build_stories),
    "stories": (
        "generated short stories and facts from templates (~400 KB, identical on every machine; "
        "very learnable: most blanks follow from the rest of the paragraph)",
        _build_stories,
    ),
    "stdlib": (
        "English prose from the docstrings of standard-library modules and pydoc's language "
        "reference topics (~350 KB, depends on the Python version)",
        _build_stdlib,
    ),
}


def list_corpora() -> dict[str, str]:
    """Names of the built-in corpora and what each holds (nothing is built)."""
    return {name: desc for name, (desc, _) in _CORPORA.items()}


def load_corpus(name: str = "default") -> str:
    """The text of a built-in corpus, built on first use and cached in memory."""
    if not isinstance(name, str):
        raise TypeError(f"corpus name must be a str, got {type(name).__name__}")
    if name not in _CORPORA:
        raise ValueError(
            f"unknown corpus {name!r}; available: {', '.join(_CORPORA)} (for your own text use load_text(path))"
        )
    return _CORPORA[name][1]()


def corpus_stats(name: str = "default") -> dict:
    """Size of a built-in corpus: characters, UTF-8 bytes (= ByteTokenizer tokens), lines, words."""
    text = load_corpus(name)
    return {
        "name": name,
        "chars": len(text),
        "bytes": len(text.encode("utf-8")),
        "lines": text.count("\n"),
        "words": len(text.split()),
    }


def load_text(path, extensions: tuple[str, ...] = (".txt", ".md")) -> str:
    """Read a UTF-8 text file, or every file under a folder whose name ends in one of ``extensions``
    (recursively, sorted by path, hidden files and folders skipped), joined by blank lines.

    Raises FileNotFoundError for a missing path, ValueError for a binary or non-UTF-8 file (naming it) or
    when nothing readable is found.
    """
    if not isinstance(path, (str, Path)):
        raise TypeError(f"path must be a str or pathlib.Path, got {type(path).__name__}")
    if isinstance(extensions, str):
        extensions = (extensions,)
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"no such file or folder: {str(root)!r}")
    if root.is_file():
        files = [root]
    else:
        exts = tuple(e.lower() for e in extensions)
        files = sorted(
            f
            for f in root.rglob("*")
            if f.is_file()
            and f.name.lower().endswith(exts)
            and not any(part.startswith(".") for part in f.relative_to(root).parts)
        )
        if not files:
            raise ValueError(f"no {'/'.join(extensions)} files under {str(root)!r}")
    texts = []
    for f in files:
        data = f.read_bytes()
        if b"\x00" in data:
            raise ValueError(f"{str(f)!r} looks binary (contains NUL bytes), not text")
        try:
            text = data.decode("utf-8-sig")  # -sig: drop a leading byte-order mark
        except UnicodeDecodeError as e:
            raise ValueError(
                f"{str(f)!r} is not valid UTF-8 text (byte {e.start}: {e.reason}); convert it to UTF-8 or leave it out"
            ) from None
        text = text.replace("\r\n", "\n").strip()
        if text:
            texts.append(text)
    if not texts:
        raise ValueError(
            f"{str(root)!r}: the text is empty"
            if root.is_file()
            else f"all {len(files)} files under {str(root)!r} are empty"
        )
    return "\n\n".join(texts) + "\n"


def train_val_split(text, val_fraction: float = 0.05):
    """Split a text (or token list) into (train, val): the last ``val_fraction`` becomes validation.

    A contiguous tail, not a random sample: held-out text then shares no sentence with training text. For a
    str the cut moves forward to the next line start (if one lies within 1% of the text) so no line is split.
    """
    if not isinstance(val_fraction, (int, float)) or not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    if len(text) < 2:
        raise ValueError(f"text is too short to split ({len(text)} items)")
    cut = min(max(round(len(text) * (1.0 - val_fraction)), 1), len(text) - 1)
    if isinstance(text, str):
        nl = text.find("\n", cut - 1)
        if 0 <= nl < len(text) - 1 and nl + 1 - cut <= len(text) // 100:
            cut = nl + 1
    return text[:cut], text[cut:]


if __name__ == "__main__":
    for corpus_name, description in list_corpora().items():
        s = corpus_stats(corpus_name)
        print(
            f"{corpus_name:8s} {s['bytes'] / 1e3:7.1f} KB  {s['lines']:6d} lines  {s['words']:7d} words  {description}"
        )
