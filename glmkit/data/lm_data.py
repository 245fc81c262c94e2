"""Next-token (causal language-model) batches: random windows of a token stream, a pure function of the step.

What it implements
    ``LMData(text=None, tokenizer=None, batch_size=16, seq_len=128, seed=0, split="train")`` cuts a text —
    by default the built-in ``stories`` corpus (``glmkit.data.corpus``), byte-tokenized — into a training part and
    a held-out tail (``glmkit.data.corpus.train_val_split``: the last ``val_fraction`` of the text, cut at a line
    start, so no line is in both), and ``batch(step)`` draws ``batch_size`` random windows of ``seq_len + 1``
    tokens from one part. Each window gives ``input_ids = w[:-1]`` and ``targets = w[1:]``: the target at
    position t is the token after input t. The result is an ``LMBatch`` (``input_ids``, ``targets``,
    both [B, T] int64), which ``glmkit.train.train`` feeds to ``model.loss(input_ids, targets)`` of the
    dense and MoE GLM models (``glmkit.models.glm_dense``, ``glmkit.models.glm_moe``).

How it differs from the blank-infilling data of lesson 01 (``glmkit.data.blank_infilling.BlankInfillingData``)
    Nothing is corrupted: there are no masked spans, no Part A / Part B, no 2D positions and no ``sep``.
    The model reads the window left to right under a plain causal mask (``sep = 0``) and every position
    predicts its successor, so all B·T targets count in the loss (blank infilling scores only Part B, the
    spans). The targets arrive already shifted: the models never shift them themselves. The course trains
    the dense and MoE models (lessons 03 on) this way, as plain causal LMs.

Reproducible like ``BlankInfillingData``: the window starts of batch ``step`` come from
``np.random.default_rng((seed, step))``, so the same (seed, step) always gives the same batch and a resumed
run sees exactly the batches an uninterrupted one would have. No iterator state needs saving.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

SPLITS = ("train", "val")
IGNORE_INDEX = -100  # targets the loss skips (torch's cross_entropy default; LMData itself never emits it)


@dataclass
class LMBatch:
    """A next-token batch.

    input_ids [B, T] int64   the tokens the model reads
    targets   [B, T] int64   targets[:, t] is the token after input_ids[:, t] (-100 = not scored)
    """

    input_ids: torch.Tensor
    targets: torch.Tensor

    def __post_init__(self) -> None:
        for name in ("input_ids", "targets"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or t.dtype != torch.int64:
                raise TypeError(f"LMBatch.{name} must be an int64 tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        if self.input_ids.dim() != 2 or self.targets.shape != self.input_ids.shape:
            raise ValueError(
                f"LMBatch.input_ids and targets must both be [B, T], got "
                f"{tuple(self.input_ids.shape)} and {tuple(self.targets.shape)}"
            )

    def to(self, device, non_blocking: bool = False) -> LMBatch:
        return LMBatch(
            self.input_ids.to(device, non_blocking=non_blocking), self.targets.to(device, non_blocking=non_blocking)
        )

    @property
    def n_tokens(self) -> int:
        """Targets that count in the loss."""
        return int((self.targets != IGNORE_INDEX).sum())


def _token_array(tokens) -> np.ndarray:
    """1-D int64 array from a list/tuple of ints, a numpy array or a torch tensor of token ids."""
    if isinstance(tokens, torch.Tensor):
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise TypeError(f"token ids must be integers, got a {tokens.dtype} tensor")
        tokens = tokens.cpu().numpy()
    arr = np.asarray(tokens)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"token ids must be integers, got {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"token ids must be 1-D, got shape {arr.shape}")
    return arr.astype(np.int64)


class LMData:
    """Batches of random next-token windows from one split of a text, a pure function of (seed, step).

    text:        a str (encoded with ``tokenizer``) or 1-D token ids; None = the built-in corpus ``corpus``.
    tokenizer:   None = ``glmkit.data.tokenizer.ByteTokenizer()`` (vocab 264: the presets cpu-small, gpu-small
                 and cpu-moe are sized for it).
    split:       "train" (the head of the text) or "val" (the held-out tail, ``val_fraction`` of it).
    batch_size, seq_len: B windows of T = seq_len inputs (each window is seq_len + 1 tokens long).
    seed:        with the step, seeds the window starts.
    """

    def __init__(
        self,
        text=None,
        tokenizer=None,
        batch_size: int = 16,
        seq_len: int = 128,
        seed: int = 0,
        split: str = "train",
        *,
        corpus: str = "stories",
        val_fraction: float = 0.05,
    ) -> None:
        for name, value, lo in (("batch_size", batch_size, 1), ("seq_len", seq_len, 1), ("seed", seed, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if tokenizer is None:
            from glmkit.data.tokenizer import ByteTokenizer

            tokenizer = ByteTokenizer()
        if text is None:
            from glmkit.data.corpus import load_corpus

            text = load_corpus(corpus)
        from glmkit.data.corpus import train_val_split

        if isinstance(text, str):
            if not text:
                raise ValueError("text is empty: nothing to train on")
            parts = train_val_split(text, val_fraction)
            tokens = np.asarray(tokenizer.encode(parts[SPLITS.index(split)]), dtype=np.int64)
        else:
            parts = train_val_split(_token_array(text), val_fraction)
            tokens = parts[SPLITS.index(split)]
        if len(tokens) < seq_len + 1:
            raise ValueError(
                f"the {split!r} split holds {len(tokens)} tokens, fewer than one window of "
                f"seq_len + 1 = {seq_len + 1}: use more text or a shorter seq_len"
            )
        vocab = getattr(tokenizer, "vocab_size", None)
        if vocab is not None and (tokens.min() < 0 or tokens.max() >= vocab):
            raise ValueError(f"token ids must lie in [0, vocab_size={vocab}), got [{tokens.min()}, {tokens.max()}]")
        self.tokens = tokens
        self.tokenizer, self.batch_size, self.seq_len, self.seed, self.split = (
            tokenizer,
            batch_size,
            seq_len,
            seed,
            split,
        )

    def __repr__(self) -> str:
        return (
            f"LMData({self.split!r}: {len(self.tokens)} tokens, batch_size={self.batch_size}, "
            f"seq_len={self.seq_len}, seed={self.seed})"
        )

    def starts(self, step: int) -> np.ndarray:
        """Where the B windows of batch ``step`` begin in ``self.tokens`` (for display and tests)."""
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        rng = np.random.default_rng((self.seed, int(step)))
        return rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)  # window fits: s + T + 1 <= n

    def batch(self, step: int) -> LMBatch:
        """Batch number ``step``: the same (seed, step) always gives the same batch."""
        idx = self.starts(step)[:, None] + np.arange(self.seq_len + 1)[None, :]  # [B, T + 1]
        windows = torch.from_numpy(self.tokens[idx])
        return LMBatch(input_ids=windows[:, :-1].contiguous(), targets=windows[:, 1:].contiguous())

    def iterate(self, start_step: int = 0):
        """Batches start_step, start_step + 1, ... (endless)."""
        step = start_step
        while True:
            yield self.batch(step)
            step += 1
