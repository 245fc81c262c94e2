"""A preallocated key/value cache for generation with the dense GLM models (``glmkit.models.glm_dense``).

What it implements
    Generating token t+1 needs the keys and values of tokens 0..t in every layer. Recomputing them means
    running the whole sequence through the model again at every step; keeping them costs memory instead:
    per layer ``2 · B · H_kv · T · D`` numbers. This cache
    allocates that memory once, ``k``/``v`` of shape ``[B, H_kv, T_max, D]`` per layer, writes each new
    chunk at the current length and hands the attention a view of the filled part. Batched prompts of
    different lengths are left-padded, so every row shares one write position; ``valid [B, T_max]`` marks
    which cached keys are real tokens (False = padding) so attention can ignore the rest.

How the lineage changes what it costs (``kv_cache_bytes`` is the calculator the lessons use)
    * GLM-2021, ChatGLM-6B, GLM-130B: multi-head attention, H_kv = H (ChatGLM-6B: 32 heads × 128 dims).
    * ChatGLM2/3 "multi-query" attention is grouped-query attention with 2 KV heads: the cache shrinks
      by H / H_kv = 16× for the same sequence, which is what made its 32K context affordable.
    * GLM-4-9B and GLM-4-9B-0414 keep 2 KV heads of 128 dims (40 layers): 40 KiB per token in bf16.
    * (Later lessons: GLM-5's MLA caches one compressed latent per token instead of per-head k/v.)

The decode step itself (one new query against all cached keys) is plain torch math in the model: the
flash-attention kernel is for prefill, where there are many queries.
"""

from __future__ import annotations

import torch

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def kv_cache_bytes(n_layers: int, n_kv_heads: int, head_dim: int, seq_len: int, batch_size: int = 1,
                   dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes a full k/v cache takes: 2 (k and v) · layers · B · H_kv · T · D · bytes per element.

    >>> kv_cache_bytes(40, 2, 128, 1, dtype=torch.bfloat16)   # GLM-4-9B, one token: 40 KiB
    40960
    """
    for name, v in (("n_layers", n_layers), ("n_kv_heads", n_kv_heads), ("head_dim", head_dim),
                    ("seq_len", seq_len), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"kv_cache_bytes: {name} must be a non-negative int, got {v!r}")
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"kv_cache_bytes: dtype must be a torch.dtype, got {type(dtype).__name__}")
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * n_layers * batch_size * n_kv_heads * seq_len * head_dim * elem


class KVCache:
    """Per-layer k/v buffers ``[B, H_kv, T_max, D]``, a shared fill ``length`` and a key mask ``valid``.

    Protocol (what ``GLMDenseModel.forward(..., cache=cache)`` does for a chunk of T new tokens):
      1. ``cache.set_valid(mask [B, T])`` (optional; default all real tokens) marks the chunk's keys;
      2. in each layer ``k_all, v_all = cache.write(layer, k, v)`` stores the chunk at
         ``[length, length + T)`` and returns views of ``[0, length + T)``;
      3. after the last layer ``cache.advance(T)``.
    ``length`` is therefore the number of positions already cached (the next write position).
    """

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        for name, v in (("n_layers", n_layers), ("batch_size", batch_size), ("n_kv_heads", n_kv_heads),
                        ("head_dim", head_dim), ("max_len", max_len)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"KVCache: {name} must be a positive int, got {v!r}")
        if dtype not in _FLOAT_DTYPES:
            raise TypeError(f"KVCache: dtype must be float32, float16 or bfloat16, got {dtype}")
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.length = 0
        self.n_layers, self.batch_size, self.n_kv_heads = n_layers, batch_size, n_kv_heads
        self.head_dim, self.max_len, self.dtype = head_dim, max_len, dtype

    @property
    def device(self) -> torch.device:
        return self.valid.device

    @property
    def nbytes(self) -> int:
        """Memory held by the k/v buffers (what ``kv_cache_bytes`` predicts for T = max_len)."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def reset(self) -> None:
        """Forget everything cached (buffers are kept and overwritten by the next writes)."""
        self.length = 0
        self.valid.zero_()

    def _check_room(self, T: int) -> None:
        if self.length + T > self.max_len:
            raise ValueError(
                f"KVCache is full: {self.length} positions cached + {T} new > max_len={self.max_len}; "
                f"allocate a larger cache (max_len >= prompt length + max_new_tokens)"
            )

    def set_valid(self, mask: torch.Tensor | None, T: int) -> None:
        """Mark the keys of the next T positions: mask [B, T] bool (True = real token) or None (all real)."""
        self._check_room(T)
        sl = slice(self.length, self.length + T)
        if mask is None:
            self.valid[:, sl] = True
            return
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (self.batch_size, T):
            raise ValueError(f"KVCache.set_valid: mask must be a [B, T] = [{self.batch_size}, {T}] tensor, got "
                             f"{tuple(getattr(mask, 'shape', ()))}")
        self.valid[:, sl] = mask.to(device=self.device, dtype=torch.bool)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, H_kv, T, D] at [length, length + T) of ``layer``; return views [B, H_kv, length + T, D]."""
        if not (0 <= layer < self.n_layers):
            raise ValueError(f"KVCache.write: layer must be in [0, {self.n_layers}), got {layer}")
        want = (self.batch_size, self.n_kv_heads, k.shape[2], self.head_dim) if k.dim() == 4 else None
        if want is None or tuple(k.shape) != want or k.shape != v.shape:
            raise ValueError(f"KVCache.write: k and v must be [B, H_kv, T, D] = "
                             f"[{self.batch_size}, {self.n_kv_heads}, T, {self.head_dim}], got k {tuple(k.shape)}, "
                             f"v {tuple(v.shape)}")
        T = k.shape[2]
        self._check_room(T)
        end = self.length + T
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, T: int) -> None:
        """Move the write position past the T positions every layer has just written."""
        self._check_room(T)
        self.length += T

    def __repr__(self) -> str:
        return (f"KVCache(layers={self.n_layers}, B={self.batch_size}, H_kv={self.n_kv_heads}, D={self.head_dim}, "
                f"length={self.length}/{self.max_len}, dtype={self.dtype}, {self.nbytes / 2**20:.2f} MiB)")
