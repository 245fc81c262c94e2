"""GLM's autoregressive blank infilling (Du et al. 2021, arXiv:2103.10360): the pretraining objective.

How GLM differs from its predecessors:

* GPT (causal LM) predicts every token from the tokens to its left. It generates well but each token sees
  only one side of its context.
* BERT (cloze) replaces 15% of tokens by [MASK] and predicts each one independently from the bidirectional
  context. It understands well but cannot generate: it predicts a fixed number of tokens, independently.
* GLM blanks out whole *spans*, each replaced by ONE mask token, so the model is not told how long a span
  is. The corrupted text (Part A) is encoded bidirectionally, as in BERT. The spans are then generated
  autoregressively, as in GPT, one after another in a random order (Part B). Each span is fed as
  ``[START] s_1..s_l`` and trained to predict ``s_1..s_l [END]``. The loss is on Part B only.

  The mask (``glmkit.ops.attention.attention_mask``) makes this one transformer pass. Key j is visible to
  query i iff ``j < len(Part A)`` or ``j <= i``. Two rows of position ids tell a Part-B token where its
  blank is (row 0: the Part-A position of the span's mask token) and where it is inside the span (row 1:
  1..l+1; 0 on Part A).

Three ways to choose spans, each with its own mask token (GLM's ``--task-mask``), picked per example:

* ``mask``  [MASK]:  span lengths ~ Poisson(3) truncated to 1..39, drawn until >= 15% of tokens are
  covered, placed at random, non-overlapping and non-adjacent. Trains short blank filling (NLU).
* ``smask`` [sMASK]: whole sentences, in random order, until >= 15% of tokens are covered.
* ``gmask`` [gMASK]: one suffix of 50-100% of the text. This is left-to-right generation from a
  bidirectional prefix, and it is exactly ChatGLM's prompt layout ``tokens [gMASK] [START] answer``.

The paper's worked example (``build_example`` reproduces it exactly): x1..x6 with spans {x3}, {x5 x6},
Part-B order [span 2, span 1]::

    input      x1 x2 [M] x4 [M] | [S] x5 x6 [S] x3
    position    0  1  2  3  4   |  4  4  4   2  2
    block       0  0  0  0  0   |  1  2  3   1  2
    target      -  -  -  -  -   | x5 x6 [E] x3 [E]

Everything random draws from a ``numpy.random.Generator``; ``BlankInfillingData.batch(step)`` derives it
from ``(seed, step)`` so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from glmkit.data.tokenizer import SENTENCE_END_BYTES, WHITESPACE_BYTES

IGNORE_INDEX = -100  # targets with this value carry no loss (torch's cross_entropy default ignore_index)
MODES = ("mask", "smask", "gmask")  # [MASK] spans, [sMASK] sentences, [gMASK] one suffix


# ------------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------------


@dataclass
class BlankInfillingConfig:
    """How spans are chosen. Defaults are GLM's (``arguments.py`` of THUDM/GLM; its names in brackets).

    The mode of each example is drawn: ``mask`` with ``span_prob``, ``smask`` with ``sentence_prob``,
    ``gmask`` with the remainder ``gmask_prob = 1 - span_prob - sentence_prob``.
    """

    mask_ratio: float = 0.15  # [bert_ratio] fraction of tokens covered by [MASK] spans (at least)
    poisson_lambda: float = 3.0  # [avg_block_length] span lengths ~ Poisson(λ)
    max_span_len: int = 39  # GLM truncates the Poisson pmf to lengths 1..39
    span_prob: float = 0.5  # [bert_prob] probability of [MASK] mode
    sentence_prob: float = 0.0  # [gap_sentence_prob] probability of [sMASK] mode (GLM-10B used 0.3)
    gmask_min_ratio: float = 0.5  # [gpt_min_ratio] the [gMASK] suffix covers 50-100% of the text
    shuffle_spans: bool = True  # Part B in a random order (GLM's default; --no-shuffle-block turns it off)
    sentence_ratio: float = 0.15  # [gap_sentence_ratio] fraction covered by [sMASK] sentences (at least)

    def __post_init__(self) -> None:
        for name in ("mask_ratio", "poisson_lambda", "span_prob", "sentence_prob", "gmask_min_ratio", "sentence_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TypeError(f"BlankInfillingConfig.{name} must be a finite number, got {value!r}")
        for name in ("mask_ratio", "sentence_ratio"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(
                    f"BlankInfillingConfig.{name} must be in the open interval (0, 1), got {getattr(self, name)}"
                )
        for name in ("span_prob", "sentence_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(
                    f"BlankInfillingConfig.{name} must be a probability in [0, 1], got {getattr(self, name)}"
                )
        if self.span_prob + self.sentence_prob > 1.0 + 1e-9:
            raise ValueError(
                f"BlankInfillingConfig.span_prob + sentence_prob must be <= 1 (the rest is "
                f"gmask_prob), got {self.span_prob} + {self.sentence_prob}"
            )
        if not 0.0 < self.gmask_min_ratio <= 1.0:
            raise ValueError(f"BlankInfillingConfig.gmask_min_ratio must be in (0, 1], got {self.gmask_min_ratio}")
        if self.poisson_lambda <= 0:
            raise ValueError(f"BlankInfillingConfig.poisson_lambda must be > 0, got {self.poisson_lambda}")
        if isinstance(self.max_span_len, bool) or not isinstance(self.max_span_len, int) or self.max_span_len < 1:
            raise ValueError(f"BlankInfillingConfig.max_span_len must be an int >= 1, got {self.max_span_len!r}")
        if not isinstance(self.shuffle_spans, bool):
            raise TypeError(f"BlankInfillingConfig.shuffle_spans must be a bool, got {self.shuffle_spans!r}")

    @property
    def gmask_prob(self) -> float:
        """Probability of [gMASK] mode: what [MASK] and [sMASK] leave."""
        return max(0.0, 1.0 - self.span_prob - self.sentence_prob)

    def max_spans(self, n_tokens: int) -> int:
        """Most spans an example of ``n_tokens`` source tokens can get: ceil(ratio·n) for the ratio-driven
        modes (every span but the last adds >= 1 token while the total is still < ratio·n), 1 for [gMASK]."""
        worst = 1
        if self.span_prob > 0 or self.sentence_prob > 0:  # [sMASK] falls back to spans on blank text
            worst = max(worst, math.ceil(self.mask_ratio * n_tokens))
        if self.sentence_prob > 0:
            worst = max(worst, math.ceil(self.sentence_ratio * n_tokens))
        return worst


def max_example_len(n_tokens: int, cfg: BlankInfillingConfig) -> int:
    """Longest example ``n_tokens`` source tokens can give: n + 2·(number of spans).

    Part A = n − Σl + m (each span becomes one mask token), Part B = Σ(l + 1) ([START] + span), so
    L = n + 2m whatever the span lengths.
    """
    return n_tokens + 2 * cfg.max_spans(n_tokens)


def source_len_for(seq_len: int, cfg: BlankInfillingConfig) -> int:
    """The longest source window n with ``max_example_len(n, cfg) <= seq_len``: windows of this length
    never produce an example longer than the model's maximum sequence length."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 3:
        raise ValueError(f"seq_len must be an int >= 3 (one token + its mask + [START]), got {seq_len!r}")
    n = seq_len - 2
    while n > 1 and max_example_len(n, cfg) > seq_len:
        n -= 1
    return n


# ------------------------------------------------------------------------------------------------------
# Span sampling
# ------------------------------------------------------------------------------------------------------


def span_length_distribution(lam: float, max_len: int) -> np.ndarray:
    """P(length = k) for k = 1..max_len: the Poisson(λ) pmf restricted to 1..max_len and renormalised.

    Returns [max_len] float64 summing to 1 (index k-1 holds length k).
    """
    if not lam > 0:
        raise ValueError(f"lam must be > 0, got {lam}")
    if isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer)) or max_len < 1:
        raise ValueError(f"max_len must be an int >= 1, got {max_len!r}")
    k = np.arange(1, max_len + 1, dtype=np.float64)
    log_pmf = k * math.log(lam) - lam - np.array([math.lgamma(x + 1) for x in k])  # log(λ^k e^-λ / k!)
    pmf = np.exp(log_pmf - log_pmf.max())  # the constant shift cancels in the renormalisation
    return pmf / pmf.sum()


def _check_n(n_tokens) -> int:
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, (int, np.integer)):
        raise TypeError(f"n_tokens must be an int, got {type(n_tokens).__name__}")
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be >= 1 (empty token list), got {n_tokens}")
    return int(n_tokens)


def sample_span_lengths(n_tokens: int, cfg: BlankInfillingConfig, rng: np.random.Generator) -> list[int]:
    """Span lengths drawn i.i.d. until their total is >= ``cfg.mask_ratio · n_tokens``.

    Lengths follow ``span_length_distribution(λ, min(max_span_len, n_tokens))``: a span never exceeds the
    text. At least one span; at most ceil(ratio·n) spans (each adds >= 1 while the total is short).
    """
    n = _check_n(n_tokens)
    target = cfg.mask_ratio * n
    p = span_length_distribution(cfg.poisson_lambda, min(cfg.max_span_len, n))
    draws = rng.choice(len(p), size=math.ceil(target), p=p) + 1  # ceil(target) draws always suffice
    count = int(np.searchsorted(np.cumsum(draws), target)) + 1  # first prefix whose total >= target
    return [int(x) for x in draws[:count]]


def sample_spans(
    n_tokens: int, cfg: BlankInfillingConfig, rng: np.random.Generator, max_tries: int = 100
) -> list[tuple[int, int]]:
    """Random [MASK] spans over ``n_tokens`` tokens: half-open ``(start, end)``, sorted by start,
    non-overlapping and non-adjacent (at least one kept token between two spans), covering
    >= ``cfg.mask_ratio`` of the tokens.

    Placement as GLM's ``sample_spans``: with m spans of total length S there are n − S − (m − 1) spare
    tokens; draw m offsets in 0..spare, sort them, and lay the spans out left to right, each followed by
    one obligatory gap. If the drawn lengths cannot fit (only for tiny n or high ratios) they are redrawn;
    after ``max_tries`` one span of ceil(ratio·n) tokens is used.
    """
    n = _check_n(n_tokens)
    for _ in range(max_tries):
        lengths = sample_span_lengths(n, cfg, rng)
        if sum(lengths) + len(lengths) - 1 <= n:
            break
    else:
        lengths = [max(1, math.ceil(cfg.mask_ratio * n))]
    rng.shuffle(lengths)
    spare = n - sum(lengths) - (len(lengths) - 1)
    offsets = np.sort(rng.integers(0, spare + 1, size=len(lengths)))
    spans, cursor = [], 0
    for offset, length in zip(offsets.tolist(), lengths):
        start = cursor + offset
        spans.append((start, start + length))
        cursor += length + 1  # the span, then its obligatory gap
    return spans


def sentence_spans(
    tokens,
    cfg: BlankInfillingConfig,
    rng: np.random.Generator,
    end_ids: Sequence[int] = SENTENCE_END_BYTES,
    space_ids: Sequence[int] = WHITESPACE_BYTES,
) -> list[tuple[int, int]]:
    """Whole-sentence [sMASK] spans: sentences taken in random order until they cover
    >= ``cfg.sentence_ratio`` of the tokens, returned sorted by start.

    A sentence ends with (and includes) a token in ``end_ids`` (default: the bytes of ``.?!;:`` and newline,
    as GLM's splitter) or the end of the text. Its leading whitespace stays in Part A, and a sentence that
    is only whitespace is never a span. A text with no sentence end is one sentence.
    """
    toks = _as_token_list(tokens)
    ends, spaces = set(end_ids), set(space_ids)
    sentences, start = [], 0
    for i, t in enumerate(toks):
        if t in ends or i == len(toks) - 1:
            s = start
            while s <= i and toks[s] in spaces:  # leading whitespace belongs to the gap, not the sentence
                s += 1
            if s <= i:
                sentences.append((s, i + 1))
            start = i + 1
    if not sentences:
        raise ValueError("tokens hold no sentence (only whitespace): use mode 'mask' or 'gmask'")
    target = cfg.sentence_ratio * len(toks)
    chosen, covered = [], 0
    for k in rng.permutation(len(sentences)).tolist():
        chosen.append(sentences[k])
        covered += sentences[k][1] - sentences[k][0]
        if covered >= target:
            break
    return sorted(chosen)


def gmask_span(n_tokens: int, cfg: BlankInfillingConfig, rng: np.random.Generator) -> tuple[int, int]:
    """The single [gMASK] span: a suffix whose length is uniform in ceil(gmask_min_ratio·n)..n."""
    n = _check_n(n_tokens)
    shortest = max(1, math.ceil(cfg.gmask_min_ratio * n))
    length = int(rng.integers(shortest, n + 1))
    return (n - length, n)


# ------------------------------------------------------------------------------------------------------
# Part A / Part B
# ------------------------------------------------------------------------------------------------------


def _as_token_list(tokens) -> list[int]:
    """Token ids from a list/tuple of ints, a 1-D integer numpy array or a 1-D integer torch tensor."""
    if isinstance(tokens, (str, bytes)):
        raise TypeError(f"tokens must be token ids, not {type(tokens).__name__}; encode the text first")
    if isinstance(tokens, (torch.Tensor, np.ndarray)):
        is_int = (
            not tokens.dtype.is_floating_point and not tokens.dtype.is_complex and tokens.dtype != torch.bool
            if isinstance(tokens, torch.Tensor)
            else np.issubdtype(tokens.dtype, np.integer)
        )
        if not is_int:
            raise TypeError(f"tokens must have an integer dtype, got {tokens.dtype}")
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
        toks = tokens.tolist()
    else:
        toks = list(tokens)
        for t in toks:
            if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)):
                raise TypeError(f"tokens must be ints, got {type(t).__name__} ({t!r})")
        toks = [int(t) for t in toks]
    if not toks:
        raise ValueError("tokens is empty: need at least one token")
    return toks


@dataclass
class GLMExample:
    """One blank-infilling example. L = len(Part A) + len(Part B).

    input_ids    [L] int64   Part A (text with one mask token per span), then Part B ([START] + span, ...)
    targets      [L] int64   IGNORE_INDEX on Part A, then span + [END] for each span in Part-B order
    position_ids [2, L] int64 row 0: position (Part B: the Part-A index of its span's mask token);
                              row 1: block position (0 on Part A, 1..l+1 inside each span)
    sep          int         len(Part A)
    tokens, spans, order, mask_token_ids, mode: what it was built from, for display.
    """

    input_ids: torch.Tensor
    targets: torch.Tensor
    position_ids: torch.Tensor
    sep: int
    tokens: list[int]
    spans: list[tuple[int, int]]
    order: list[int]
    mask_token_ids: list[int]
    mode: str | None = None
    mask_positions: list[int] = field(default_factory=list)  # Part-A index of each span's mask token

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def part_a(self) -> list[int]:
        return self.input_ids[: self.sep].tolist()

    @property
    def part_b(self) -> list[int]:
        return self.input_ids[self.sep :].tolist()

    def table(self, tokenizer) -> str:
        """A four-row text table (input, position, block position, target), Part A | Part B."""
        tgt = [("·" if t == IGNORE_INDEX else tokenizer.token_strings([t])[0]) for t in self.targets.tolist()]
        rows = [
            ("input", tokenizer.token_strings(self.input_ids.tolist())),
            ("position", [str(p) for p in self.position_ids[0].tolist()]),
            ("block", [str(p) for p in self.position_ids[1].tolist()]),
            ("target", tgt),
        ]
        width = [max(len(r[1][j]) for r in rows) for j in range(self.length)]
        lines = []
        for name, cells in rows:
            a = " ".join(c.rjust(w) for c, w in zip(cells[: self.sep], width))
            b = " ".join(c.rjust(w) for c, w in zip(cells[self.sep :], width[self.sep :]))
            lines.append(f"{name:>8s}  {a} | {b}")
        return "\n".join(lines)


def build_example(
    tokens,
    spans: Sequence[tuple[int, int]],
    order: Sequence[int] | None = None,
    *,
    mask_id: int,
    sop_id: int,
    eop_id: int,
    mask_token_ids: Sequence[int] | None = None,
    max_len: int | None = None,
    mode: str | None = None,
) -> GLMExample:
    """Build Part A / Part B, both position rows and the targets from chosen spans.

    tokens: [n] ids. spans: half-open (start, end), sorted by start, non-overlapping, non-empty, within
    0..n. order: a permutation of range(len(spans)) giving the Part-B order (None = left to right).
    mask_token_ids: one mask id per span (default ``mask_id`` for all), e.g. [gMASK] for a suffix.
    max_len: if given, raise if the example is longer (the model's maximum sequence length).
    """
    toks = _as_token_list(tokens)
    n = len(toks)
    spans = [tuple(s) for s in spans]
    if not spans:
        raise ValueError("spans is empty: an example needs at least one span to predict")
    prev_end = 0
    for k, span in enumerate(spans):
        if len(span) != 2 or not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in span):
            raise TypeError(f"span {k} must be a pair of ints (start, end), got {span!r}")
        start, end = int(span[0]), int(span[1])
        if not 0 <= start < end <= n:
            raise ValueError(
                f"span {k} = ({start}, {end}) is empty or out of range for {n} tokens (need 0 <= start < end <= n)"
            )
        if start < prev_end:
            raise ValueError(
                f"span {k} = ({start}, {end}) overlaps or precedes span {k - 1} = {spans[k - 1]}; "
                "spans must be sorted by start and non-overlapping"
            )
        prev_end = end
    spans = [(int(s), int(e)) for s, e in spans]
    m = len(spans)
    order = list(range(m)) if order is None else [int(k) for k in order]
    if sorted(order) != list(range(m)):
        raise ValueError(f"order must be a permutation of range({m}) (one entry per span), got {order}")
    mask_token_ids = [mask_id] * m if mask_token_ids is None else [int(t) for t in mask_token_ids]
    if len(mask_token_ids) != m:
        raise ValueError(f"mask_token_ids has {len(mask_token_ids)} entries for {m} spans")

    # Part A: the text with each span collapsed to its one mask token.
    part_a, mask_positions, cursor = [], [], 0
    for (start, end), mid in zip(spans, mask_token_ids):
        part_a += toks[cursor:start]
        mask_positions.append(len(part_a))
        part_a.append(mid)
        cursor = end
    part_a += toks[cursor:]
    sep = len(part_a)

    inputs, targets = list(part_a), [IGNORE_INDEX] * sep
    pos, block = list(range(sep)), [0] * sep
    for k in order:  # Part B: [START] + span in, span + [END] out, all at the mask token's position
        start, end = spans[k]
        span = toks[start:end]
        inputs += [sop_id] + span
        targets += span + [eop_id]
        pos += [mask_positions[k]] * (len(span) + 1)
        block += list(range(1, len(span) + 2))
    if max_len is not None and len(inputs) > max_len:
        raise ValueError(
            f"example length {len(inputs)} (Part A {sep} + Part B {len(inputs) - sep}) exceeds "
            f"max_len={max_len}; use a shorter text or fewer spans"
        )
    return GLMExample(
        input_ids=torch.tensor(inputs, dtype=torch.int64),
        targets=torch.tensor(targets, dtype=torch.int64),
        position_ids=torch.tensor([pos, block], dtype=torch.int64),
        sep=sep,
        tokens=toks,
        spans=spans,
        order=order,
        mask_token_ids=mask_token_ids,
        mode=mode,
        mask_positions=mask_positions,
    )


def corrupt(
    tokens,
    cfg: BlankInfillingConfig,
    rng: np.random.Generator,
    tokenizer=None,
    *,
    mask_id: int | None = None,
    smask_id: int | None = None,
    gmask_id: int | None = None,
    sop_id: int | None = None,
    eop_id: int | None = None,
    mode: str | None = None,
    sentence_end_ids: Sequence[int] | None = None,
    max_len: int | None = None,
) -> GLMExample:
    """Sample a mode (or use ``mode``), its spans and a Part-B order, and build the example.

    Special ids come from ``tokenizer`` (a ``ByteTokenizer``) unless given explicitly. [gMASK] mode gives
    ChatGLM's layout: Part A = prefix + [gMASK], Part B = [START] + suffix.
    """
    ids = {"mask_id": mask_id, "smask_id": smask_id, "gmask_id": gmask_id, "sop_id": sop_id, "eop_id": eop_id}
    for name, value in ids.items():
        if value is None:
            if tokenizer is None:
                raise ValueError(f"{name} is not given: pass a tokenizer or {name}=...")
            ids[name] = getattr(tokenizer, name)
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode must be one of {MODES} or None, got {mode!r}")
    toks = _as_token_list(tokens)
    u = rng.random()  # drawn even when mode is forced, so the rest of the stream does not shift
    forced = mode is not None
    if not forced:
        mode = "mask" if u < cfg.span_prob else "smask" if u < cfg.span_prob + cfg.sentence_prob else "gmask"
    if mode == "smask":
        ends = (
            sentence_end_ids
            if sentence_end_ids is not None
            else getattr(tokenizer, "sentence_end_ids", SENTENCE_END_BYTES)
        )
        try:
            spaces = getattr(tokenizer, "whitespace_ids", WHITESPACE_BYTES)
            spans = sentence_spans(toks, cfg, rng, end_ids=ends, space_ids=spaces)
        except ValueError:
            if forced:
                raise
            mode = "mask"  # a window of pure whitespace has no sentence: blank spans instead
    if mode == "mask":
        spans = sample_spans(len(toks), cfg, rng)
    elif mode == "gmask":
        spans = [gmask_span(len(toks), cfg, rng)]
    mid = ids[{"mask": "mask_id", "smask": "smask_id", "gmask": "gmask_id"}[mode]]
    order = rng.permutation(len(spans)).tolist() if cfg.shuffle_spans else None
    return build_example(
        toks,
        spans,
        order,
        mask_id=ids["mask_id"],
        sop_id=ids["sop_id"],
        eop_id=ids["eop_id"],
        mask_token_ids=[mid] * len(spans),
        max_len=max_len,
        mode=mode,
    )


# ------------------------------------------------------------------------------------------------------
# Batches
# ------------------------------------------------------------------------------------------------------


@dataclass
class GLMBatch:
    """A padded batch. Padding goes after Part B, so the GLM mask needs no separate padding mask (real
    tokens never attend to later positions beyond Part A, and pads carry no loss).

    input_ids    [B, L] int64  (pad_id after each example)
    targets      [B, L] int64  (IGNORE_INDEX on Part A and padding)
    position_ids [B, 2, L] int64 (0 on padding)
    sep          [B] int64     Part-A length of each example
    """

    input_ids: torch.Tensor
    targets: torch.Tensor
    position_ids: torch.Tensor
    sep: torch.Tensor

    def __post_init__(self) -> None:
        for name in ("input_ids", "targets", "position_ids", "sep"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or t.dtype != torch.int64:
                raise TypeError(f"GLMBatch.{name} must be an int64 tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        B, L = self.input_ids.shape if self.input_ids.dim() == 2 else (None, None)
        if B is None or self.targets.shape != (B, L) or self.position_ids.shape != (B, 2, L) or self.sep.shape != (B,):
            raise ValueError(
                f"GLMBatch shapes must be input_ids/targets [B, L], position_ids [B, 2, L], sep [B]; "
                f"got {tuple(self.input_ids.shape)}, {tuple(self.targets.shape)}, "
                f"{tuple(self.position_ids.shape)}, {tuple(self.sep.shape)}"
            )

    def to(self, device, non_blocking: bool = False) -> GLMBatch:
        return GLMBatch(
            *(
                getattr(self, n).to(device, non_blocking=non_blocking)
                for n in ("input_ids", "targets", "position_ids", "sep")
            )
        )

    @property
    def batch_size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def num_targets(self) -> int:
        """Tokens that carry loss (Part B of every example)."""
        return int((self.targets != IGNORE_INDEX).sum())


def collate(examples: Sequence[GLMExample], pad_id: int, pad_to: int | None = None) -> GLMBatch:
    """Stack examples into a GLMBatch, padding after Part B to the longest (or to ``pad_to``)."""
    if not examples:
        raise ValueError("examples is empty: nothing to collate")
    longest = max(ex.length for ex in examples)
    L = longest if pad_to is None else pad_to
    if L < longest:
        raise ValueError(f"pad_to={pad_to} is shorter than the longest example ({longest} tokens)")
    B = len(examples)
    input_ids = torch.full((B, L), pad_id, dtype=torch.int64)
    targets = torch.full((B, L), IGNORE_INDEX, dtype=torch.int64)
    position_ids = torch.zeros((B, 2, L), dtype=torch.int64)
    for b, ex in enumerate(examples):
        input_ids[b, : ex.length] = ex.input_ids
        targets[b, : ex.length] = ex.targets
        position_ids[b, :, : ex.length] = ex.position_ids
    sep = torch.tensor([ex.sep for ex in examples], dtype=torch.int64)
    return GLMBatch(input_ids, targets, position_ids, sep)


# ------------------------------------------------------------------------------------------------------
# A deterministic data stream
# ------------------------------------------------------------------------------------------------------


class BlankInfillingData:
    """Batches of blank-infilling examples cut from one token stream, a pure function of (seed, step).

    ``batch(step)`` draws everything (window starts, modes, spans, Part-B orders) from
    ``np.random.default_rng((seed, step))``, so training resumed at step s sees exactly the batches an
    uninterrupted run would have seen; no iterator state needs saving.

    Every window has ``source_len = source_len_for(seq_len, cfg)`` tokens (or the whole stream if shorter),
    chosen so that len(Part A) + len(Part B) = n + 2·(spans) <= seq_len for any spans the config can draw.
    Batches are padded to their longest example (``pad_to_seq_len=True``: always to seq_len).

    text_or_token_ids: a str (encoded with ``tokenizer``) or token ids; None = ``load_corpus("default")``.
    tokenizer: None = ``ByteTokenizer()``; it supplies the special ids and [PAD].
    """

    def __init__(
        self,
        text_or_token_ids=None,
        tokenizer=None,
        seq_len: int = 128,
        batch_size: int = 16,
        cfg: BlankInfillingConfig | None = None,
        seed: int = 0,
        pad_to_seq_len: bool = False,
    ) -> None:
        if text_or_token_ids is None:  # the built-in corpus
            from glmkit.data.corpus import load_corpus

            text_or_token_ids = load_corpus("default")
        if tokenizer is None:
            from glmkit.data.tokenizer import ByteTokenizer

            tokenizer = ByteTokenizer()
        self.cfg = BlankInfillingConfig() if cfg is None else cfg
        if not isinstance(self.cfg, BlankInfillingConfig):
            raise TypeError(f"cfg must be a BlankInfillingConfig, got {type(cfg).__name__}")
        if isinstance(text_or_token_ids, str):
            if not text_or_token_ids:
                raise ValueError("text is empty: nothing to train on")
            self.tokens = np.asarray(tokenizer.encode(text_or_token_ids), dtype=np.int64)
        else:
            self.tokens = np.asarray(_as_token_list(text_or_token_ids), dtype=np.int64)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        self.tokenizer, self.seq_len, self.batch_size, self.seed = tokenizer, seq_len, batch_size, seed
        self.source_len = min(source_len_for(seq_len, self.cfg), len(self.tokens))
        self.pad_to_seq_len = pad_to_seq_len

    def __repr__(self) -> str:
        return (
            f"BlankInfillingData({len(self.tokens)} tokens, seq_len={self.seq_len}, "
            f"source_len={self.source_len}, batch_size={self.batch_size}, seed={self.seed})"
        )

    def examples(self, step: int) -> list[GLMExample]:
        """The examples of batch ``step`` before collation (for display)."""
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        rng = np.random.default_rng((self.seed, int(step)))
        starts = rng.integers(0, len(self.tokens) - self.source_len + 1, size=self.batch_size)
        return [
            corrupt(self.tokens[s : s + self.source_len], self.cfg, rng, self.tokenizer, max_len=self.seq_len)
            for s in starts.tolist()
        ]

    def batch(self, step: int) -> GLMBatch:
        """Batch number ``step``: the same (seed, step) always gives the same batch."""
        pad_to = self.seq_len if self.pad_to_seq_len else None
        return collate(self.examples(step), self.tokenizer.pad_id, pad_to=pad_to)

    def iterate(self, start_step: int = 0):
        """Batches start_step, start_step + 1, ... (endless)."""
        step = start_step
        while True:
            yield self.batch(step)
            step += 1
