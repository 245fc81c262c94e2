"""The 3:1 hybrid presets (three KDA layers, then one full-attention layer): the same model as cpu-small/gpu-small
but for the mixers, a state that does not grow with the context in three of every four layers; it trains with
``train()``, generates with the cache exactly as without, saves and loads, and its forward (training, cached prefill,
decode, snapshots for rollback) traces whole under ``torch.compile(fullgraph=True)``. On the GPU: forward and backward
on the kernels, ``train()``, cached decoding, no host sync."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from glmkit import backend
from glmkit.checkpoint import load_pretrained, save_pretrained
from glmkit.generate import generate
from glmkit.models.decoder import Decoder
from glmkit.models.presets import PRESETS, get_config
from glmkit.testing import rel_err
from glmkit.train import TrainConfig, train


@pytest.mark.parametrize("name, twin, layers", [("cpu-hybrid", "cpu-small", 4), ("gpu-hybrid", "gpu-small", 8)])
def test_hybrid_presets_are_3_to_1_twins_of_the_small_presets(name, twin, layers):
    cfg = PRESETS[name]
    assert cfg.layer_types == (["kda"] * 3 + ["attention"]) * (layers // 4)
    assert dataclasses.replace(cfg, layer_types=None) == dataclasses.replace(PRESETS[twin], layer_types=None)
    with torch.device("meta"):
        hybrid, full = Decoder(cfg), Decoder(PRESETS[twin])
        # the state of the KDA layers is fixed: at 4K tokens the cache is about a quarter of the twin's
        long = hybrid.new_cache(1, 4096).nbytes / full.new_cache(1, 4096).nbytes
    assert 0.25 < long < 0.3, long
    assert 1.0 < hybrid.num_parameters() / full.num_parameters() < 1.3


def test_cpu_hybrid_trains_generates_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = Decoder(get_config("cpu-hybrid"))
    cfg = TrainConfig(steps=35, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=3)
    history = train(model, cfg=cfg, out_dir=tmp_path / "run", progress=False, max_steps=30)
    assert sum(history.losses[-5:]) < sum(history.losses[:5]) - 2.5  # it learns
    model.eval()
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12], [13, 14, 15]]  # left-padded into one batch
    cached = generate(model, prompts, 12, stop_tokens=(), use_cache=True)
    uncached = generate(model, prompts, 12, stop_tokens=(), use_cache=False)
    assert cached.tokens == uncached.tokens
    save_pretrained(model, tmp_path / "model")
    again = load_pretrained(tmp_path / "model").eval()
    assert again.config.layer_types == model.config.layer_types
    x = torch.randint(0, 264, (2, 16))
    with torch.no_grad():
        assert rel_err(model(x), again(x)) == 0.0
    more = train(Decoder(get_config("cpu-hybrid")), cfg=cfg, out_dir=tmp_path / "run", progress=False)
    assert more.resumed_from == 30 and len(more.losses) == 35  # resuming restores the KDA weights too


def test_hybrid_forward_has_no_host_sync():
    """Training forward, a cached prefill and decode steps that keep rollback snapshots: one graph each (the
    snapshots taken inside the graph then roll the cache back)."""
    torch._dynamo.reset()
    model = Decoder(get_config("cpu-hybrid"))
    x = torch.randint(0, 264, (2, 12))
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    model.train()
    assert rel_err(model(x), compiled(x)) < 1e-6
    model.eval()
    with torch.no_grad():
        ref = model(x)
        cache = model.new_cache(2, 16, max_rollback=2)
        parts = [compiled(x[:, :10], cache=cache), compiled(x[:, 10:11], cache=cache), compiled(x[:, 11:], cache=cache)]
        assert rel_err(ref, torch.cat(parts, 1)) < 1e-5
        cache.rollback(2)
        assert rel_err(ref[:, 10:], model(x[:, 10:], cache=cache)) < 1e-5
    assert cache.length == 12


# ---- GPU (B = 4 everywhere: the kernels' autotune key includes B·H, so the tests share their compiles) -------
ONE_PERIOD = ["kda", "kda", "kda", "attention"]  # gpu-hybrid cut to 4 layers: one period of its pattern


@pytest.mark.gpu
def test_gpu_hybrid_forward_backward_on_the_kernels():
    """fp32 against the torch path (loss and every gradient), then bf16 autocast: every op on the Triton kernels."""
    torch.manual_seed(7)
    model = Decoder(get_config("gpu-hybrid", num_hidden_layers=4, layer_types=ONE_PERIOD)).cuda()
    x = torch.randint(0, 264, (4, 333), device="cuda")
    batch = {"input_ids": x[:, :-1], "targets": x[:, 1:]}
    with backend.use_backend("torch"):
        ref = model.loss(batch)
        ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    with backend.audit() as a:
        loss = model.loss(batch)
        grads = torch.autograd.grad(loss, list(model.parameters()))
    assert a.only_triton() and {"delta_rule", "attention", "rmsnorm"} <= a.ops(), a
    # fp32 kernels against the torch path: summation order only (a wrong gradient would be off by O(1))
    assert rel_err(ref, loss) < 1e-3
    for (name, _), r, g in zip(model.named_parameters(), ref_grads, grads):
        assert rel_err(r, g) < 1e-2, name
    with backend.audit() as a, torch.autocast("cuda", dtype=torch.bfloat16):
        model.loss(batch).backward()
    assert a.paths("delta_rule") == {"triton"}, a
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.gpu
def test_gpu_hybrid_trains_and_decodes_with_the_cache(tmp_path):
    torch.manual_seed(8)
    model = Decoder(get_config("gpu-hybrid"))
    cfg = TrainConfig(steps=40, batch_size=4, seq_len=256, lr=2e-3, warmup_steps=4)
    history = train(model, cfg=cfg, progress=False, device="cuda")
    assert sum(history.losses[-5:]) < sum(history.losses[:5]) - 2.5
    model.eval()
    x = torch.randint(0, 264, (4, 200), device="cuda")
    with torch.no_grad(), backend.audit() as a:
        full = model(x)
        cache = model.new_cache(4, 200)
        parts = [model(x[:, :190], cache=cache)] + [model(x[:, t : t + 1], cache=cache) for t in range(190, 200)]
    assert a.paths("delta_rule_step") == {"triton"}, a
    assert rel_err(full, torch.cat(parts, 1)) < 2e-3


@pytest.mark.gpu
def test_gpu_hybrid_forward_is_sync_free():
    torch.manual_seed(9)
    model = Decoder(get_config("gpu-hybrid", num_hidden_layers=4, layer_types=ONE_PERIOD)).cuda()
    x = torch.randint(0, 264, (4, 256), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model.loss({"input_ids": x, "targets": x}).backward()  # warm-up: autotuning may sync, the checked run not
    cache = model.new_cache(4, 260)
    with torch.no_grad():
        model(x, cache=cache)
        model(x[:, :1], cache=cache)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.loss({"input_ids": x, "targets": x})
        with torch.no_grad():
            cache.reset()
            model(x, cache=cache)
            model(x[:, :1], cache=cache)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss)
