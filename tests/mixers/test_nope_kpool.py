"""GLM-5.3-Flash's attention layers in the one decoder: NoPE MLA (``qk_rope_head_dim = 0``, the ``"mla"`` and ``"dsa"``
mixers) and the KPool indexer (``index_kpool``, the ``"dsa"`` mixer; glmkit/kpool.py), and the capstone presets
built from them.

NoPE: the naive and absorbed paths agree (the absorbed ops get one zero rotary column), the cache row is c_KV alone,
and nothing depends on the positions. KPool: with T <= index_topk the layer is NoPE MLA, beyond it the pooled
selection changes the result; torch and kernel paths agree in training (loss, aux loss, gradients); cached decoding
equals the full forward and rolls back; the cache keeps the gate scores; the dense warm-up trains the indexer alone
and the sparse stage keeps the LM loss off the indexer and the indexer loss on it. cpu-capstone trains, generates
(cached = uncached, left padding), round-trips and traces whole under ``torch.compile(fullgraph=True)``; on the GPU
the capstone runs on the kernels (fp32 against the torch path, bf16 train(), no host sync in decoding)."""

from __future__ import annotations

import pytest
import torch

import glmkit
from glmkit import backend
from glmkit.checkpoint import load_pretrained, save_pretrained
from glmkit.generate import generate
from glmkit.mixers import MIXERS, Step
from glmkit.mixers.dsa import DSA, DSAState, set_dsa_stage
from glmkit.models.decoder import Decoder
from glmkit.models.presets import get_config
from glmkit.testing import rel_err
from glmkit.train import TrainConfig, train

V = 264
NOPE = dict(qk_nope_head_dim=32, qk_rope_head_dim=0, v_head_dim=32)


def _mla(absorb="auto", layers=2):
    base = get_config("cpu-mla")
    extra = {**base.extra, **NOPE, "mla_absorb": absorb}
    torch.manual_seed(0)
    return Decoder(get_config(base, num_hidden_layers=layers, head_dim=32, extra=extra)).eval()


def _dsa(layers=2, topk=8, kpool=4, **extra):
    """cpu-dsa with NoPE and KPool (indexer 8 heads × 32)."""
    base = get_config("cpu-dsa")
    ex = {**base.extra, **NOPE, "index_topk": topk, "index_kpool": kpool, **extra}
    torch.manual_seed(0)
    return Decoder(get_config(base, num_hidden_layers=layers, head_dim=32, extra=ex)).eval()


def _sharpen(model, factor=6.0):
    with torch.no_grad():
        for layer in model.layers:
            if isinstance(layer.mixer, DSA):
                layer.mixer.q_b_proj.weight.mul_(factor)
                layer.mixer.kv_b_proj.weight.mul_(factor)
    return model


# ---- NoPE MLA ---------------------------------------------------------------------------------------------------
def test_nope_paths_agree_and_the_cache_is_the_latent_alone():
    """Naive and absorbed forwards (torch path and the interpreter's kernels), prefill and cached decode, agree."""
    naive, absorbed = _mla("never"), _mla("always")
    absorbed.load_state_dict(naive.state_dict())
    x = torch.randint(0, V, (2, 13))
    with torch.no_grad():
        ref = naive(x)
        for path in ("torch", "triton"):
            with glmkit.use_backend(path):
                assert rel_err(ref, absorbed(x)) < 1e-5, path
                cache = absorbed.new_cache(2, 16)
                parts = [absorbed(x[:, :8], cache=cache)] + [
                    absorbed(x[:, t : t + 1], cache=cache) for t in range(8, 13)
                ]
                assert rel_err(ref, torch.cat(parts, 1)) < 1e-5, path
    assert cache.layers[0].latent.shape == (2, 16, 64)  # kv_lora_rank + 0
    layer = naive.layers[0].mixer
    assert (layer.rope_dim, layer.qk_dim) == (0, 32)
    assert MIXERS["mla"].state_bytes(naive.config, 1, dtype=torch.float32) == 64 * 4


def test_nope_layer_does_not_see_positions():
    """Shifted position ids change nothing (with RoPE they would): order reaches it through the causal mask only."""
    layer = _mla().layers[0].mixer
    x = torch.randn(2, 9, 128)
    sep = torch.zeros(2, dtype=torch.long)
    with torch.no_grad():
        a = layer(x, Step(position_ids=torch.arange(9)[None].expand(2, 9), sep=sep), None)
        b = layer(x, Step(position_ids=torch.arange(100, 109)[None].expand(2, 9), sep=sep), None)
    assert torch.equal(a, b)


# ---- KPool DSA ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["torch", "triton"])
def test_kpool_t_at_most_k_is_mla(path):
    """Same weights as a NoPE MLA twin: with T <= k (every complete pool + the tail = every earlier token) the
    logits are MLA's, left-padded rows included; with T > k they are not."""
    model = _dsa(topk=12)
    extra = {k: v for k, v in model.config.extra.items() if k in MIXERS["mla"].options}
    twin = Decoder(get_config(model.config, layer_types=["mla"] * 2, mtp_layer_type="mla", extra=extra)).eval()
    twin.load_state_dict({k: v for k, v in model.state_dict().items() if ".indexer." not in k})
    x = torch.randint(0, V, (2, 30))
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, :4] = False
    with torch.no_grad(), glmkit.use_backend(path), backend.audit() as a:
        assert rel_err(twin(x[:, :12]), model(x[:, :12])) < 1e-5
        got, want = model(x[:, :12], attention_mask=mask), twin(x[:, :12], attention_mask=mask)
        assert rel_err(want[mask], got[mask]) < 1e-5
        assert rel_err(twin(x), model(x)) > 1e-2
    assert a.paths("sparse_mla") == {path}


def test_kpool_kernel_and_torch_paths_agree_in_training():
    model = _sharpen(_dsa(topk=8))
    model.train()
    x = torch.randint(0, V, (2, 26))
    batch = {"input_ids": x[:, :-1], "targets": x[:, 1:]}

    def run():
        model.zero_grad()
        loss = model.loss(batch)
        aux = sum(model.aux_losses().values())
        (loss + aux).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.detach(), aux.detach(), grads

    with glmkit.use_backend("torch"):
        ref = run()
    with glmkit.use_backend("triton"), backend.audit() as a:
        got = run()
    assert a.paths("sparse_mla") == {"triton"}
    assert rel_err(ref[0], got[0]) < 1e-5 and rel_err(ref[1], got[1]) < 1e-4
    assert ref[2].keys() == got[2].keys() and any("index_kpool_compress_gate" in n for n in ref[2])
    for n in ref[2]:
        assert rel_err(ref[2][n], got[2][n]) < 1e-4, n


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_kpool_cached_decoding_equals_the_full_forward_and_rolls_back(path):
    model = _dsa(topk=8)
    x = torch.randint(0, V, (2, 21))
    with torch.no_grad(), glmkit.use_backend(path), backend.audit() as a:
        full = model(x)
        cache = model.new_cache(2, 24)
        parts = [model(x[:, :9], cache=cache), model(x[:, 9:12], cache=cache)]
        parts += [model(x[:, t : t + 1], cache=cache) for t in range(12, 21)]
        assert rel_err(full, torch.cat(parts, 1)) < 1e-5
        cache.rollback(6)
        again = model(x[:, 15:21], cache=cache)
    assert rel_err(full[:, 15:], again) < 1e-5
    assert a.paths("sparse_mla_decode") == {path}
    assert isinstance(cache.layers[0], DSAState) and cache.layers[0].pool_gates.shape == (2, 24, 32)
    per_token = 64 + 0 + 2 * 32  # c_KV, no rotary key, index key and gate scores
    assert DSA.state_bytes(model.config, 24, batch_size=2, dtype=torch.float32) == 2 * 24 * per_token * 4
    assert DSA.state_bytes(get_config("glm-5.3-flash"), 1) == (512 + 128 + 128) * 2


@pytest.mark.parametrize(
    "extra, match",
    [
        (dict(index_kpool=3), "index_kpool=3 must be None or a positive int dividing index_topk=8"),
        (dict(index_kpool=0), "index_kpool=0"),
        (dict(index_kpool_always_select_tail=1), "index_kpool_always_select_tail=1"),
        (dict(qk_rope_head_dim=-2), "qk_rope_head_dim=-2 must be an int >= 0"),
        (dict(latent_norm_eps=0.0), "latent_norm_eps=0.0"),
    ],
)
def test_bad_options_are_named(extra, match):
    with pytest.raises(ValueError, match=match):
        _dsa(**extra)


def test_kpool_dense_warmup_trains_the_indexer_alone_and_recall_rises():
    model = _sharpen(_dsa(topk=8))
    set_dsa_stage(model, "warmup")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("index_kpool_compress_ape" in n for n in trainable) and all(".indexer." in n for n in trainable)
    cfg = TrainConfig(steps=40, batch_size=4, seq_len=48, lr=1e-2, warmup_steps=2, log_every=40)
    history = train(model, cfg=cfg, progress=False)
    kl, recall = history.aux["dsa_indexer"], history.stats["dsa_recall"]
    assert len(kl) == len(recall) == 40
    assert sum(kl[-5:]) < 0.7 * sum(kl[:5]), kl
    assert sum(recall[-5:]) / 5 > sum(recall[:5]) / 5 + 0.05, recall


def test_kpool_sparse_stage_separates_the_gradients():
    model = _dsa(topk=8)
    model.train()
    x = torch.randint(0, V, (2, 30))
    lm = model.loss({"input_ids": x[:, :-1], "targets": x[:, 1:]})
    aux = model.aux_losses()["dsa_indexer"]
    params = dict(model.named_parameters())
    g_lm = torch.autograd.grad(lm, list(params.values()), allow_unused=True, retain_graph=True)
    g_aux = torch.autograd.grad(aux, list(params.values()), allow_unused=True)
    for (n, _), a, b in zip(params.items(), g_lm, g_aux):
        indexer = ".indexer." in n
        assert (a is None or not a.abs().any()) == indexer, n
        assert bool(b is not None and b.abs().any()) == indexer, n


# ---- the capstone presets -----------------------------------------------------------------------------------------
def test_capstone_presets_are_glm_5_3_flash_shaped():
    for name in ("capstone", "cpu-capstone"):
        cfg = get_config(name)
        assert cfg.layer_types == ["kda", "kda", "kda", "dsa"] * (cfg.num_hidden_layers // 4)
        assert cfg.hc_mult == 4 and cfg.swiglu_limit == 10.0 and cfg.n_shared_experts == 1
        assert cfg.num_nextn_predict_layers == 1 and cfg.opt("qk_rope_head_dim") == 0
        assert cfg.opt("index_kpool") and cfg.opt("index_topk") % cfg.opt("index_kpool") == 0
    with torch.device("meta"):
        gpu = Decoder(get_config("capstone"))
    assert gpu.num_parameters() == 175_664_084 and gpu.num_active_parameters() == 47_475_668


def test_cpu_capstone_trains_generates_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = Decoder(get_config("cpu-capstone"))
    cfg = TrainConfig(steps=20, batch_size=4, seq_len=80, lr=3e-3, warmup_steps=2)
    history = train(model, cfg=cfg, out_dir=tmp_path / "run", progress=False)
    assert sum(history.losses[-4:]) < sum(history.losses[:4]) - 1.0, history.losses
    assert {"dsa_indexer", "mtp"} <= set(history.aux) and "dsa_recall" in history.stats
    model.eval()
    prompts = [list(range(5, 75)), [11, 12, 13]]  # beyond index_topk = 64; ragged: left padding
    cached = generate(model, prompts, 10, stop_tokens=(), use_cache=True)
    uncached = generate(model, prompts, 10, stop_tokens=(), use_cache=False)
    assert cached.tokens == uncached.tokens
    save_pretrained(model, tmp_path / "model")
    again = load_pretrained(tmp_path / "model").eval()
    x = torch.randint(0, V, (2, 70))
    with torch.no_grad():
        assert rel_err(model(x), again(x)) == 0.0


def test_cpu_capstone_forward_has_no_host_sync():
    """Training forward (the KPool selection and its loss included), prefill and a decode step with the mixed cache
    (KDA states, latents, index keys and gate scores) trace as one graph each."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Decoder(
        get_config("cpu-capstone", hc_sinkhorn_iters=3, extra={**get_config("cpu-capstone").extra, "index_topk": 16})
    )
    x = torch.randint(0, V, (2, 24))
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    model.train()
    assert rel_err(model(x), compiled(x)) < 1e-6
    model.eval()
    cache = model.new_cache(2, 28)
    with torch.no_grad():
        compiled(x, cache=cache)
        step = compiled(x[:, :1], cache=cache)
    assert step.shape == (2, 1, V) and cache.length == 25


# ---- GPU -----------------------------------------------------------------------------------------------------------
def _small_capstone(**changes):
    """The capstone's shapes (d = 768, KDA 6 × 128, NoPE MLA 128/128, KPool 8 × 64 in pools of 16) at 4 layers and
    top-64, so that T = 160 goes past k."""
    base = get_config("capstone")
    extra = {**base.extra, "index_topk": 64}
    return Decoder(get_config(base, num_hidden_layers=4, layer_types=base.layer_types[:4], extra=extra, **changes))


@pytest.mark.gpu
def test_gpu_capstone_kernels_match_the_torch_path():
    """fp32 on CUDA: loss, aux losses and gradients of a training forward on the kernels equal the torch path's."""
    torch.manual_seed(0)
    model = _small_capstone().cuda().train()
    x = torch.randint(0, 8192, (2, 161), device="cuda")
    batch = {"input_ids": x[:, :-1], "targets": x[:, 1:]}

    def run():
        model.zero_grad()
        loss = model.loss(batch)
        aux = model.aux_losses()
        (loss + sum(aux.values())).backward()
        return loss.detach(), {k: v.detach() for k, v in aux.items()}, [p.grad for p in model.parameters()]

    with backend.use_backend("torch"):
        ref = run()
    with backend.audit() as a:
        got = run()
    assert a.paths("sparse_mla") == {"triton"} and a.paths("delta_rule") == {"triton"}, a
    assert rel_err(ref[0], got[0]) < 2e-3
    for k in ref[1]:
        assert rel_err(ref[1][k], got[1][k]) < 1e-2, k
    for (name, _), r, g in zip(model.named_parameters(), ref[2], got[2]):
        if r is not None:
            assert rel_err(r, g) < 2e-2, name


@pytest.mark.gpu
def test_gpu_capstone_trains_under_autocast_and_decodes_without_host_sync():
    """train() on CUDA (bf16 autocast) for a few steps: finite losses, the indexer's loss and recall recorded; then
    a bf16 prefill and cached decode steps that match the full forward and make no host sync."""
    torch.manual_seed(0)
    model = _small_capstone()
    cfg = TrainConfig(steps=4, batch_size=4, seq_len=160, lr=2e-3, warmup_steps=1)
    with backend.audit() as a:
        h = train(model, cfg=cfg, progress=False, device="cuda")
    assert a.paths("sparse_mla") == {"triton"}, a
    assert all(torch.isfinite(torch.tensor(h.losses + h.aux["dsa_indexer"] + h.aux["mtp"])))
    assert len(h.stats["dsa_recall"]) == 4
    model = model.to(torch.bfloat16).eval()
    x = torch.randint(0, 8192, (4, 100), device="cuda")
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(4, 104)
        parts = [model(x[:, :90], cache=cache)] + [model(x[:, t : t + 1], cache=cache) for t in range(90, 100)]
        assert rel_err(full, torch.cat(parts, 1)) < 3e-2
        cache.reset()
        model(x[:, :90], cache=cache)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step = model(x[:, 90:91], cache=cache)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(step).all()
