"""Token mixers: the part of a decoder layer that moves information between positions. One file per mixer; the
decoder (``glmkit.models.decoder``) builds layer i's mixer from ``MIXERS[config.layer_types[i]]``.

The contract a mixer class keeps (``Attention`` in attention.py is the worked example):

    @register("name")                        the value of ``layer_types`` that selects it
    class MyMixer(nn.Module):
        options = {"my_field": 4}            config fields of its own (HF names) and their defaults; the config
                                             keeps them in ``DecoderConfig.extra`` and ``cfg.opt("my_field")``
                                             reads them
        def __init__(self, cfg, layer_idx)   validate what it needs from the config (raise ValueError)
        def forward(self, x, step, state)    x [B, T, d] → [B, T, d]; ``step`` is the ``Step`` below; ``state``
                                             is what ``new_state`` made (None without a cache)
        def new_state(self, batch_size, max_len, dtype, device)
                                             its per-layer inference state (``glmkit.cache``), or None
        hf_to_ours(sd, cfg) / ours_to_hf(sd, cfg)   (optional static methods) rename its tensors between a
                                             Hugging Face checkpoint (names under ``self_attn.``) and its own
                                             parameters (names under ``mixer.``); identity when absent

Registering a mixer touches no other module: the decoder, the trainer, the generator and the checkpoint code
only see this contract. Every module in this package is imported when the package is, so a new built-in mixer is
one new file here (plus its tests); a mixer defined anywhere else registers itself when its module is imported.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field

import torch

from glmkit.ops.rope import rope_cos_sin

MIXERS: dict[str, type] = {}


def register(name: str):
    """Class decorator: make a mixer selectable as ``layer_types[i] = name``."""

    def deco(cls):
        if MIXERS.get(name, cls) is not cls:
            raise ValueError(f"mixer name {name!r} is already taken by {MIXERS[name].__qualname__}")
        MIXERS[name] = cls
        cls.layer_type = name
        return cls

    return deco


@dataclass
class Step:
    """What every mixer of one forward call shares.

    position_ids [B, T]: absolute positions of the new tokens (RoPE angles); sep [B]: GLM's bidirectional prefix
    length per row, in cache coordinates (0 = causal); offset: positions already in the cache (where this chunk is
    written); visible [B, T, L] bool or None: the explicit mask (L = offset + T) when there is a cache to attend
    to or left padding; None means a plain prefill, where softmax mixers use the fast kernels with ``sep``;
    max_rollback: the cache's (0 without one), for mixers whose state does not grow with T.
    """

    position_ids: torch.Tensor
    sep: torch.Tensor
    offset: int = 0
    visible: torch.Tensor | None = None
    max_rollback: int = 0  # keep snapshots for ``Cache.rollback(n <= max_rollback)`` (see glmkit.cache)
    _rope: dict = field(default_factory=dict, repr=False)

    def rope(self, rotary_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, T, rotary_dim / 2] for these positions, computed once per forward and (dim, θ)."""
        key = (rotary_dim, theta)
        if key not in self._rope:
            self._rope[key] = rope_cos_sin(self.position_ids, rotary_dim, theta)
        return self._rope[key]


for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
