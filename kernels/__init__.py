"""glmkit.kernels: the course's Triton kernels.

Installed as ``glmkit.kernels`` (the folder is ``kernels/`` at the top of the repository).

On a machine without CUDA, importing this package switches Triton to its CPU interpreter
(TRITON_INTERPRET=1) unless the variable is already set, so the same kernels run on a laptop, slowly.
That has to happen before ``triton.jit`` decorates the kernels, which is why it happens here.

    primer        lesson 00: first kernels (fused scale-and-add, row softmax), with their references beside them
    attention     lessons 01-03: flash attention under the GLM mask, forward and backward
    rmsnorm       lesson 03: fused RMSNorm forward and backward (dx, dweight)
    swiglu        lesson 03: fused SwiGLU on the gate||up layout, forward and backward
    rope          lesson 02: partial RoPE (interleaved or half-split pairs) on q and k, forward and backward
    moe_align     lesson 04: token permutation (counts, padding to the block, sorted slot ids)
    moe_experts   lesson 04: grouped GEMMs gathering rows by token id, SwiGLU epilogue, combine; fwd+bwd
    mla_decode    lesson 05: absorbed MLA decode (all heads of a token on one latent row), split-K over the cache
    lightning_indexer  lesson 06: DSA's fused causal index logits Σ_h w·ReLU(q·k) (fp32, for the top-k)
    sparse_mla    lesson 06: MLA in MQA mode over per-token index sets, fwd+bwd; split decode + combine
    delta_rule    lesson 07: chunked (gated) delta rule, scalar or per-channel (KDA) decay, fwd+bwd; decode step
Each kernel module ``kernels/<op>.py`` has its op in ``glmkit/ops/<op>.py`` (reference, dispatch, autograd) and its
tests in ``tests/ops/test_<op>.py``.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
