"""glmkit.kernels: the course's Triton kernels.

Installed as ``glmkit.kernels`` (the folder is ``kernels/`` at the top of the repository). Each kernel
module has a plain-torch reference elsewhere in glmkit and a test against it.

On a machine without CUDA, importing this package switches Triton to its CPU interpreter
(TRITON_INTERPRET=1) unless the variable is already set, so the same kernels run on a laptop, slowly.
That has to happen before ``triton.jit`` decorates the kernels, which is why it happens here.

    primer             lesson 00: a first kernel (fused scale-and-add), to learn the programming model
    glm_attention      lesson 01: flash attention forward under the GLM blank-infilling mask
    glm_attention_bwd  lessons 02-03: its backward (dq, dk, dv), so GPU training runs on our kernels
    rmsnorm            lesson 03: fused RMSNorm forward and backward (dx, dweight)
    swiglu             lesson 03: fused SwiGLU on the gate||up layout, forward and backward
    moe_align          lesson 04: token permutation (counts, padding to the block, sorted slot ids)
    moe_gemm           lesson 04: grouped GEMM gathering rows by token id, SwiGLU epilogue, combine; fwd+bwd
    rope               lesson 02: partial RoPE (interleaved or half-split pairs) on q and k, in place or not
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
