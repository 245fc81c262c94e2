"""Proof that training runs on our kernels: ``glmkit.backend.audit()`` around ``train()`` steps records which
implementation every dispatched op took, and counting wrappers around the kernels' backward entry points show
that the backward passes ran on them too.

* CPU, backend forced to "triton" (the Triton interpreter): every recorded op — attention, rmsnorm, swiglu,
  rope (and moe_experts for the MoE model) — took "triton", forward and backward.
* CPU, the default "auto" backend: the same ops all take "torch", and no kernel backward runs.
* CUDA (``-m gpu``): a few ``train()`` steps of the ``gpu-small`` dense and ``gpu-moe`` MoE presets under bf16
  autocast take only "triton".

What the audit does not see: ops that glmkit does not dispatch (the linear layers, embeddings, the router's
sigmoid/top-k, the cross entropy) are always torch (cuBLAS / ATen) and are not recorded.
"""

from __future__ import annotations

import collections

import pytest
import torch

import glmkit
from glmkit import backend
from glmkit.data.lm_data import LMData
from glmkit.models.decoder import Decoder
from glmkit.models.presets import get_config
from glmkit.train import TrainConfig, train

DENSE_OPS = {"attention", "rmsnorm", "swiglu", "rope"}


@pytest.fixture
def backward_calls(monkeypatch):
    """Counts, per op, the calls of each kernel's backward entry point (the functions the autograd
    Functions call; patched on their modules, which the Functions look up at call time)."""
    import glmkit.kernels.attention as attention
    import glmkit.kernels.moe_experts as moe_experts
    import glmkit.kernels.rmsnorm as rmsnorm
    import glmkit.kernels.rope as rope
    import glmkit.kernels.swiglu as swiglu

    calls: collections.Counter = collections.Counter()

    def counting(op, fn, only_if=None):
        def wrapper(*args, **kwargs):
            if only_if is None or only_if(kwargs):
                calls[op] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(attention, "attention_bwd", counting("attention", attention.attention_bwd))
    monkeypatch.setattr(rmsnorm, "rmsnorm_bwd", counting("rmsnorm", rmsnorm.rmsnorm_bwd))
    monkeypatch.setattr(swiglu, "swiglu_bwd", counting("swiglu", swiglu.swiglu_bwd))
    # RoPE's backward is the inverse rotation: rope_fwd(..., inverse=True)
    monkeypatch.setattr(rope, "rope_fwd", counting("rope", rope.rope_fwd, lambda kw: kw.get("inverse", False)))
    monkeypatch.setattr(moe_experts, "experts_bwd", counting("moe_experts", moe_experts.experts_bwd))
    return calls


def forward_counts(audit: backend.KernelAudit) -> dict[str, int]:
    return {op: sum(n for (o, _), n in audit.counts.items() if o == op) for op in audit.ops()}


def quiet(**kw):
    return dict(progress=False, **kw)


def tiny_dense() -> Decoder:
    # One sandwich layer (4 RMSNorms + the final one), D = 32, GQA 2/1: small enough for the interpreter.
    return Decoder(
        get_config(
            "cpu-small",
            num_hidden_layers=1,
            hidden_size=64,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=32,
            intermediate_size=96,
            max_position_embeddings=32,
        )
    )


def tiny_moe() -> Decoder:
    # Layer 0 dense, layer 1 MoE (4 experts, top-2, one shared expert); QK-norm adds two RMSNorms per layer.
    return Decoder(
        get_config(
            "cpu-moe",
            num_hidden_layers=2,
            hidden_size=64,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=32,
            intermediate_size=96,
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            max_position_embeddings=32,
        )
    )


def one_cpu_step(model, seq_len: int = 11):
    """One train() step on CPU (T = 11: not a multiple of any kernel block); returns its History."""
    cfg = TrainConfig(steps=1, batch_size=2, seq_len=seq_len, warmup_steps=1)
    return train(model, LMData(batch_size=2, seq_len=seq_len, seed=1), cfg, device="cpu", **quiet())


def test_forced_triton_on_cpu_runs_every_op_on_the_kernels_forward_and_backward(backward_calls):
    model = tiny_dense()
    with glmkit.use_backend("triton"), backend.audit() as audit:
        h = one_cpu_step(model)
    assert audit.only_triton(), audit
    assert audit.ops() == DENSE_OPS, audit
    fwd = forward_counts(audit)
    assert fwd == {"attention": 1, "rope": 1, "swiglu": 1, "rmsnorm": 5}, audit
    assert dict(backward_calls) == fwd  # every forward kernel call had its backward kernel call
    assert h.losses[0] > 0 and all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_auto_backend_on_cpu_runs_every_op_on_torch(backward_calls):
    assert glmkit.get_backend() == "auto"
    with backend.audit() as audit:
        one_cpu_step(tiny_dense())
    assert audit.ops() == DENSE_OPS, audit
    assert all(audit.paths(op) == {"torch"} for op in DENSE_OPS) and not audit.only_triton(), audit
    assert not backward_calls  # no kernel backward either


def test_forced_triton_on_cpu_moe_model(backward_calls):
    model = tiny_moe()
    with glmkit.use_backend("triton"), backend.audit() as audit:
        h = one_cpu_step(model)
    assert audit.only_triton(), audit
    assert audit.ops() == DENSE_OPS | {"moe_experts"}, audit
    fwd = forward_counts(audit)
    # per layer: input/pre-MLP norm + q/k norms = 4 RMSNorms, + the final norm; swiglu: the dense MLP and
    # the shared expert; the routed experts once per MoE layer
    assert fwd == {"attention": 2, "rope": 2, "swiglu": 2, "rmsnorm": 9, "moe_experts": 1}, audit
    assert dict(backward_calls) == fwd
    assert len(h.max_violation) == 1

    with backend.audit() as audit:  # and the default backend on CPU: torch for all of them
        one_cpu_step(tiny_moe())
    assert all(audit.paths(op) == {"torch"} for op in audit.ops()) and "moe_experts" in audit.ops(), audit


# ----------------------------------------------------------------------------------------------------
# CUDA: the presets as they train, under bf16 autocast
# ----------------------------------------------------------------------------------------------------
def cuda_steps(model, steps: int = 3, seq_len: int = 256, batch_size: int = 4):
    cfg = TrainConfig(steps=steps, batch_size=batch_size, seq_len=seq_len, warmup_steps=1)
    data = LMData(batch_size=batch_size, seq_len=seq_len, seed=0)
    with backend.audit() as audit:
        h = train(model, data, cfg, device="cuda", **quiet())  # bf16 autocast on CUDA
    return audit, h


@pytest.mark.gpu
def test_gpu_small_trains_only_on_triton(backward_calls):
    assert glmkit.get_backend() == "auto"
    audit, h = cuda_steps(Decoder(get_config("gpu-small")))
    assert audit.only_triton(), audit
    assert audit.ops() == DENSE_OPS, audit
    assert dict(backward_calls) == forward_counts(audit)
    assert all(torch.isfinite(torch.tensor(h.losses)))


@pytest.mark.gpu
def test_gpu_moe_trains_only_on_triton(backward_calls):
    assert glmkit.get_backend() == "auto"
    model = Decoder(get_config("gpu-moe"))
    audit, h = cuda_steps(model)
    assert audit.only_triton(), audit
    assert audit.ops() == DENSE_OPS | {"moe_experts"}, audit
    assert dict(backward_calls) == forward_counts(audit)
    assert all(torch.isfinite(torch.tensor(h.losses))) and len(h.max_violation) == 3


def test_backend_setting_and_errors(monkeypatch):
    assert backend.get_backend() == "auto"
    with glmkit.use_backend("torch"):
        assert backend.resolve(torch.zeros(1)) == "torch" and "kernels off" in backend.describe()
    with glmkit.use_backend("triton"):
        assert backend.resolve(torch.zeros(1)) == "triton"
    assert backend.get_backend() == "auto" and backend.resolve(torch.zeros(1)) == "torch"  # CPU tensors: torch
    with pytest.raises(ValueError, match="backend must be one of"):
        glmkit.set_backend("cuda")
