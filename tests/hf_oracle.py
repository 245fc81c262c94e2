"""Helpers for the tests that use transformers as the parity oracle (tests/test_hf.py).

``sharpen_`` redraws a tiny random model's weights at unit fan-in scale (q/k ×2) so attention is sharp and
positions matter: with transformers' default 0.02 init every parity check would pass on an almost
position-blind model. ``cached_decode_errors`` runs a prefill and then one token at a time through both
models' KV caches and returns the relative error of every step's logits.
"""

from __future__ import annotations

import torch

from glmkit.testing import rel_err


@torch.no_grad()
def sharpen_(model):
    """Weights (2-D and the stacked 3-D experts) ~ N(0, gain²/fan_in); norms ~ N(1, 0.2²); biases ~ N(0, 0.2²)."""
    for name, p in model.named_parameters():
        if p.numel() == 0:
            continue
        if p.dim() >= 2:
            gain = 2.0 if ("q_proj" in name or "k_proj" in name) else 1.0
            p.normal_(0.0, gain / p.shape[-1] ** 0.5)
        else:
            p.normal_(1.0 if "norm" in name else 0.0, 0.2)
    return model


def save_tiny(model, path, **kw):
    model.save_pretrained(str(path), safe_serialization=True, **kw)
    return path


@torch.no_grad()
def cached_decode_errors(hf, ours, x: torch.Tensor, prefix: int, max_len: int = 32) -> list[float]:
    """Prefill x[:, :prefix], then decode x's remaining tokens one by one through transformers' cache (its
    ``cache=`` argument, transformers >= 5.24) and a glmkit ``Cache``: the relative error of every step's logits."""
    ref = hf(x[:, :prefix], use_cache=True)
    cache = ours.new_cache(x.shape[0], max_len)
    errs = [rel_err(ref.logits, ours(x[:, :prefix], cache=cache))]
    for t in range(prefix, x.shape[1]):
        ref = hf(x[:, t : t + 1], cache=ref.cache, use_cache=True)
        errs.append(rel_err(ref.logits, ours(x[:, t : t + 1], cache=cache)))
    return errs
