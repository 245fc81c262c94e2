"""The one inference-state protocol: a ``Cache`` holds, for one batch, what every layer keeps between forward
calls — whatever its mixer needs — plus the bookkeeping all layers share.

Generating token t+1 needs what tokens 0..t left behind in every layer. Recomputing it means running the whole
sequence again at every step; keeping it costs memory instead, and what is kept depends on the layer type:

    mixer                     state per layer (``Mixer.new_state``)                 grows with T?
    attention (GQA)           k, v       [B, H_kv, T_max, D] each                       yes
    MLA (lesson 05)           [c_KV | k_rot] [B, T_max, 512 + 64] (``MLAState``)     yes (576 values)
    DSA (lesson 06)           MLA's latent + the indexer's keys [B, T_max, 128]      yes
    gdn/kda (lesson 07)       a [B, H, d_k, d_v] fp32 recurrent state + a conv tail no

The shared part: ``length`` (positions already cached = where the next chunk is written) and ``valid [B, T_max]``
(which cached positions are real tokens: batched prompts are left-padded, so every row writes at the same
position and padded keys are masked out). A forward with a cache calls ``begin(T, mask)`` before the layers
and ``end(T)`` after them; each mixer reads and writes its own ``cache.layers[i]``.

Rolling back (speculative decoding, lesson 08): ``rollback(n)`` forgets the last n positions. Caches that grow
with T only move ``length`` back (the stale entries are overwritten later); a state that does not grow (a
recurrence, a conv tail) has to restore a snapshot, which it does in its own ``rollback(n)`` method. So that it
can, a cache made with ``max_rollback=m`` tells every forward (``Step.max_rollback``) to keep the states after
each of the last min(T, m) positions; rolling back further than that raises ``ValueError``.
"""

from __future__ import annotations

import torch


class KVState:
    """Softmax attention's state: k, v buffers ``[B, H_kv, T_max, D]`` written at the cache's length."""

    def __init__(self, batch_size: int, n_kv_heads: int, max_len: int, head_dim: int, dtype, device, v_dim=None):
        self.k = torch.zeros(batch_size, n_kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(batch_size, n_kv_heads, max_len, v_dim or head_dim, dtype=dtype, device=device)

    def append(self, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, H_kv, T, D] at [start, start + T); return views of [0, start + T)."""
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Cache:
    """Per-layer states (``layers[i]``, from each mixer's ``new_state``) and the shared ``length``/``valid``.
    Make one with ``model.new_cache(batch_size, max_len)``."""

    def __init__(self, states: list, batch_size: int, max_len: int, device, max_rollback: int = 0):
        self.layers = states
        self.batch_size, self.max_len = batch_size, max_len
        self.max_rollback = max_rollback  # how far rollback(n) must reach; states that do not grow keep this many
        # per-position snapshots of their last forward (``Step.max_rollback`` tells the mixers)
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.length = 0

    def begin(self, T: int, mask: torch.Tensor | None = None) -> int:
        """Before a forward of T new positions: check room, mark their keys (mask [B, T], True = real token;
        None = all real) and return the offset they are written at."""
        if self.length + T > self.max_len:
            raise ValueError(
                f"the cache is full: {self.length} positions cached + {T} new > max_len={self.max_len}; "
                f"allocate a larger one (max_len >= prompt length + max_new_tokens)"
            )
        self.valid[:, self.length : self.length + T] = True if mask is None else mask.to(torch.bool)
        return self.length

    def end(self, T: int) -> None:
        """After every layer has written its T positions."""
        self.length += T

    def rollback(self, n: int) -> None:
        """Forget the last n cached positions (speculative decoding's rejected tail)."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot roll back {n} positions: {self.length} are cached")
        for state in self.layers:  # before the length moves: a state that kept too little raises first
            if hasattr(state, "rollback"):
                state.rollback(n)
        self.length -= n

    def reset(self) -> None:
        self.length = 0
        self.valid.zero_()

    @property
    def nbytes(self) -> int:
        """Memory held by the layer states (every tensor attribute of each state)."""
        return sum(
            t.numel() * t.element_size()
            for s in self.layers
            if s is not None
            for t in vars(s).values()
            if isinstance(t, torch.Tensor)
        )

    def __repr__(self) -> str:
        kinds = sorted({type(s).__name__ for s in self.layers})
        return (
            f"Cache(layers={len(self.layers)} {kinds}, B={self.batch_size}, length={self.length}/{self.max_len}, "
            f"{self.nbytes / 2**20:.2f} MiB)"
        )


def kv_cache_bytes(
    n_layers: int,
    n_kv_heads: int,
    head_dim: int,
    seq_len: int,
    batch_size: int = 1,
    dtype: torch.dtype = torch.bfloat16,
) -> int:
    """Bytes of a full softmax-attention k/v cache: 2 · layers · B · H_kv · T · D · bytes per element
    (GLM-4-9B, one token, bf16: 40 · 2 · 128 · 2 · 2 = 40 KiB)."""
    return 2 * n_layers * batch_size * n_kv_heads * seq_len * head_dim * torch.empty((), dtype=dtype).element_size()
