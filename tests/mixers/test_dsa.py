"""The ``"dsa"`` mixer (glmkit.mixers.dsa): MLA + the lightning indexer + sparse attention, in the one decoder.

With T ≤ index_topk it is MLA (same weights, same logits); with T > k the selection changes the result. The torch
and kernel paths agree in training and decoding; cached decoding equals the full forward and rolls back; the cache
holds the latent plus one index key per token (shared layers: the latent only); index sharing reuses the previous
full layer's selection. Training: the dense warm-up trains the indexers alone on KL(p ‖ softmax(I)) and their recall
of the true top-k rises, through ``train()``; the sparse stage trains everything, with the indexer's loss and the LM
loss on disjoint parameters; the history keeps the loss and the recall. Whole forwards trace under
``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import pytest
import torch

import glmkit
from glmkit import backend
from glmkit.checkpoint import load_pretrained, save_pretrained
from glmkit.generate import generate
from glmkit.mixers import MIXERS, Step
from glmkit.mixers.dsa import DSA, DSAState, set_dsa_stage, topk_recall
from glmkit.mixers.mla import MLAState
from glmkit.models.decoder import Decoder
from glmkit.models.presets import get_config
from glmkit.ops.lightning_indexer import visibility
from glmkit.testing import rel_err
from glmkit.train import TrainConfig, train

V = 264


def _cfg(layers=2, topk=8, **extra):
    base = get_config("cpu-dsa")
    return get_config(base, num_hidden_layers=layers, extra={**base.extra, "index_topk": topk, **extra})


def _model(layers=2, topk=8, **extra):
    torch.manual_seed(0)
    return Decoder(_cfg(layers, topk, **extra)).eval()


def _mla_twin(model):
    """The "mla" model with the same weights (the indexers left out)."""
    c = model.config
    extra = {k: v for k, v in c.extra.items() if k in MIXERS["mla"].options}
    cfg = get_config(c, layer_types=["mla"] * c.num_hidden_layers, mtp_layer_type="mla", extra=extra)
    twin = Decoder(cfg).eval()
    twin.load_state_dict({k: v for k, v in model.state_dict().items() if ".indexer." not in k})
    return twin


def _step(B, T):
    return Step(position_ids=torch.arange(T)[None].expand(B, T), sep=torch.zeros(B, dtype=torch.long))


# ---- the mixer ------------------------------------------------------------------------------------------------
def test_registered_with_working_defaults():
    """A tiny config that names only the mixer builds a real layer (MLA's defaults + 8 index heads × 32, top-16)."""
    assert MIXERS["dsa"] is DSA and issubclass(DSA, MIXERS["mla"])
    cfg = get_config("cpu-small", num_hidden_layers=1, hidden_size=64, num_attention_heads=2, layer_types=["dsa"])
    layer = Decoder(cfg).layers[0].mixer
    assert (layer.index_heads, layer.index_dim, layer.topk, layer.stage) == (8, 32, 16, "sparse")
    x = torch.randn(2, 30, 64)
    with torch.no_grad():
        y = layer(x, _step(2, 30), None)
    assert y.shape == x.shape and torch.isfinite(y).all() and y.abs().sum() > 0


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_t_at_most_k_is_mla(path):
    """Same weights: with T ≤ k every causal key is selected and the logits are MLA's; with T > k they are not."""
    model = _model(topk=12)
    twin = _mla_twin(model)
    x = torch.randint(0, V, (2, 30))
    with torch.no_grad(), glmkit.use_backend(path), backend.audit() as a:
        assert rel_err(twin(x[:, :12]), model(x[:, :12])) < 1e-5
        assert rel_err(twin(x), model(x)) > 1e-2
    assert a.paths("sparse_mla") == {path} and a.paths("lightning_indexer") == {path}


def test_left_padded_batch_with_t_at_most_k_is_mla():
    model = _model(topk=32)
    twin = _mla_twin(model)
    x = torch.randint(0, V, (3, 17))
    mask = torch.ones(3, 17, dtype=torch.bool)
    mask[1, :6] = False
    mask[2, :2] = False
    with torch.no_grad():
        assert rel_err(twin(x, attention_mask=mask), model(x, attention_mask=mask)) < 1e-5


def test_kernel_and_torch_paths_agree_in_training():
    """Loss and gradients on the interpreter's kernels (indexer logits, sparse forward and backward) equal the torch
    path's; the aux loss too."""
    model = _model(topk=6)
    model.train()
    x = torch.randint(0, V, (2, 21))
    batch = {"input_ids": x[:, :-1], "targets": x[:, 1:]}

    def run():
        model.zero_grad()
        loss = model.loss(batch)
        aux = sum(model.aux_losses().values())
        (loss + aux).backward()
        return (
            loss.detach(),
            aux.detach(),
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        )

    with glmkit.use_backend("torch"):
        ref = run()
    with glmkit.use_backend("triton"), backend.audit() as a:
        got = run()
    assert a.paths("sparse_mla") == {"triton"}
    assert rel_err(ref[0], got[0]) < 1e-5 and rel_err(ref[1], got[1]) < 1e-4
    assert ref[2].keys() == got[2].keys()
    for n in ref[2]:
        assert rel_err(ref[2][n], got[2][n]) < 1e-4, n


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_cached_decoding_equals_the_full_forward_and_rolls_back(path):
    model = _model(topk=8)
    x = torch.randint(0, V, (2, 19))
    with torch.no_grad(), glmkit.use_backend(path), backend.audit() as a:
        full = model(x)
        cache = model.new_cache(2, 24)
        parts = [model(x[:, :10], cache=cache), model(x[:, 10:13], cache=cache)]
        parts += [model(x[:, t : t + 1], cache=cache) for t in range(13, 19)]
        assert rel_err(full, torch.cat(parts, 1)) < 1e-5
        cache.rollback(5)
        again = model(x[:, 14:19], cache=cache)
    assert rel_err(full[:, 14:], again) < 1e-5
    assert a.paths("sparse_mla_decode") == {path}


def test_cache_holds_latent_and_index_keys():
    model = _model(layers=3, indexer_types=["full", "shared", "full"])
    cache = model.new_cache(2, 20)
    kinds = [type(s) for s in cache.layers]
    assert kinds == [DSAState, MLAState, DSAState]
    assert tuple(cache.layers[0].index_keys.shape) == (2, 20, 32)
    per_token = 64 + 16 + 32  # kv_lora + rope + index head
    assert DSA.state_bytes(model.config, 20, batch_size=2, dtype=torch.float32) == 2 * 20 * per_token * 4
    assert cache.nbytes == 2 * 20 * 4 * (2 * per_token + (64 + 16))
    assert DSA.state_bytes(get_config("glm-5"), 1) == (512 + 64 + 128) * 2


def test_shared_layers_reuse_the_previous_selection(monkeypatch):
    """A "shared" layer has no indexer and attends over the indices of the last full layer of the same forward."""
    model = _model(layers=3, topk=6, indexer_types=["full", "shared", "shared"])
    assert hasattr(model.layers[0].mixer, "indexer") and not hasattr(model.layers[1].mixer, "indexer")
    import glmkit.mixers.dsa as dsa_mod

    seen = []
    original = dsa_mod.sparse_mla

    def spy(*args):
        seen.append(args[4])
        return original(*args)

    monkeypatch.setattr(dsa_mod, "sparse_mla", spy)
    with torch.no_grad():
        model(torch.randint(0, V, (2, 20)))
    assert len(seen) == 3 and all(s is seen[0] for s in seen)
    with pytest.raises(ValueError, match="no 'full' dsa layer comes before"):
        Decoder(_cfg(layers=2, indexer_types=["shared", "full"]))


@pytest.mark.parametrize(
    "extra, match",
    [
        (dict(index_topk=0), "index_topk=0 must be a positive int"),
        (dict(index_head_dim=8), "index_head_dim=8 must be >= qk_rope_head_dim=16"),
        (dict(dsa_stage="dense"), "dsa_stage='dense'"),
        (dict(indexer_types=["full"]), "indexer_types must be None or 2 entries"),
        (dict(q_lora_rank=None), "dsa needs q_lora_rank"),
    ],
)
def test_bad_options_are_named(extra, match):
    with pytest.raises(ValueError, match=match):
        Decoder(_cfg(**extra))


def test_topk_recall():
    p = torch.tensor([[[0.5, 0.3, 0.1, 0.1], [0.1, 0.2, 0.3, 0.4]]])
    vis = torch.ones(1, 2, 4, dtype=torch.bool)
    idx = torch.tensor([[[0, 2], [3, -1]]])
    # row 0: true top-2 {0, 1}, selected {0, 2} → 1/2; row 1: true {3, 2}, selected {3} → 1/2
    assert float(topk_recall(p, vis, idx, 2)) == 0.5
    assert float(topk_recall(p, vis, idx, 4)) == 1.0  # no row sees more than k keys


# ---- training: the two stages through train() -----------------------------------------------------------------
def _sharpen(model, factor=6.0):
    """Peaked attention (larger q/k up-projections), so that the true top-k is well defined for the recall."""
    with torch.no_grad():
        for layer in model.layers:
            layer.mixer.q_b_proj.weight.mul_(factor)
            layer.mixer.kv_b_proj.weight.mul_(factor)
    return model


def test_dense_warmup_trains_the_indexer_alone_and_recall_rises():
    model = _sharpen(Decoder(_cfg(topk=8)))
    set_dsa_stage(model, "warmup")
    assert model.config.extra["dsa_stage"] == "warmup"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".indexer." in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = TrainConfig(steps=40, batch_size=4, seq_len=48, lr=1e-2, warmup_steps=2, log_every=40)
    history = train(model, cfg=cfg, progress=False)
    for n, p in model.named_parameters():
        assert torch.equal(before[n], p.detach()) != (n in trainable), n  # the indexers moved, nothing else did
    kl, recall = history.aux["dsa_indexer"], history.stats["dsa_recall"]
    assert len(kl) == len(recall) == 40
    assert sum(kl[-5:]) < 0.6 * sum(kl[:5]), kl
    assert sum(recall[-5:]) / 5 > sum(recall[:5]) / 5 + 0.1, recall
    # the LM loss does not move: the model is frozen and its attention dense
    assert max(history.losses) - min(history.losses) < 0.3


def test_sparse_stage_separates_the_gradients_and_trains():
    """Sparse stage: the LM loss reaches everything but the indexers; the indexer loss reaches the indexers only
    (their inputs are detached). Then a short train() run lowers the LM loss and records loss and recall."""
    model = Decoder(_cfg(topk=8))
    set_dsa_stage(model, "sparse")
    assert all(p.requires_grad for p in model.parameters())
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
    cfg = TrainConfig(steps=25, batch_size=4, seq_len=48, lr=3e-3, warmup_steps=2)
    history = train(model, cfg=cfg, progress=False)
    assert sum(history.losses[-5:]) < sum(history.losses[:5]) - 1.0, history.losses
    assert len(history.stats["dsa_recall"]) == 25 and len(history.aux["dsa_indexer"]) == 25


def test_generates_and_round_trips(tmp_path):
    model = _model(topk=8)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [11, 12]]  # ragged: left padding
    cached = generate(model, prompts, 12, stop_tokens=(), use_cache=True)
    uncached = generate(model, prompts, 12, stop_tokens=(), use_cache=False)
    assert cached.tokens == uncached.tokens
    save_pretrained(model, tmp_path / "model")
    again = load_pretrained(tmp_path / "model").eval()
    x = torch.randint(0, V, (2, 24))
    with torch.no_grad():
        assert rel_err(model(x), again(x)) == 0.0
    assert again.config.layer_types == ["dsa", "dsa"] and again.config.opt("index_topk") == 8


def test_forward_has_no_host_sync():
    torch._dynamo.reset()
    model = _model(topk=6)
    x = torch.randint(0, V, (2, 14))
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    model.train()
    assert rel_err(model(x), compiled(x)) < 1e-6
    model.eval()
    cache = model.new_cache(2, 18)
    with torch.no_grad():
        compiled(x, cache=cache)
        step = compiled(x[:, :1], cache=cache)
    assert step.shape == (2, 1, V) and cache.length == 15


def test_visibility_of_the_loss_matches_the_decoder():
    """The indexer loss's visibility is the decoder's explicit mask (left padding, causal, a query sees itself)."""
    model = _model()
    x = torch.randint(0, V, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, :3] = False
    step = model._step(x, None, None, mask, None)
    assert torch.equal(visibility(9, 9, 0, step.visible[:, -1], "cpu"), step.visible)


# ---- GPU -------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_gpu_kernels_in_the_model_and_no_host_sync():
    """fp32 on CUDA: training loss and gradients on the kernels equal the torch path's; cached decode steps take the
    split decode kernel; a prefill and a decode step make no host sync."""
    model = _model(topk=16).cuda()
    x = torch.randint(0, V, (2, 70), device="cuda")
    batch = {"input_ids": x[:, :-1], "targets": x[:, 1:]}
    model.train()
    with backend.use_backend("torch"):
        ref = model.loss(batch)
        ref_grads = torch.autograd.grad(ref, list(model.parameters()), allow_unused=True)
    with backend.audit() as a:
        loss = model.loss(batch)
        grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    assert a.paths("sparse_mla") == {"triton"}, a
    assert rel_err(ref, loss) < 2e-3
    for (name, _), r, g in zip(model.named_parameters(), ref_grads, grads):
        if r is not None:
            assert rel_err(r, g) < 1e-2, name
    model.eval()
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(2, 72)
        with backend.audit() as a:
            parts = [model(x[:, :60], cache=cache)] + [model(x[:, t : t + 1], cache=cache) for t in range(60, 70)]
    assert a.paths("sparse_mla_decode") == {"triton"}, a
    assert rel_err(full, torch.cat(parts, 1)) < 2e-3
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            cache.reset()
            model(x[:, :60], cache=cache)
            model(x[:, 60:61], cache=cache)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.gpu
def test_gpu_two_stages_through_train_under_autocast():
    """train() on CUDA (bf16 autocast: the bf16 kernels, the cache-free training path): a few warm-up steps then a
    few sparse steps, every loss finite, the recall recorded, the sparse attention on the kernels."""
    model = _sharpen(Decoder(_cfg(topk=16)))
    cfg = TrainConfig(steps=4, batch_size=4, seq_len=96, lr=3e-3, warmup_steps=1)
    set_dsa_stage(model, "warmup")
    warm = train(model, cfg=cfg, progress=False, device="cuda")
    set_dsa_stage(model, "sparse")
    with backend.audit() as a:
        sparse = train(model, cfg=cfg, progress=False, device="cuda")
    assert a.paths("sparse_mla") == {"triton"}, a
    for h in (warm, sparse):
        assert len(h.stats["dsa_recall"]) == 4 and all(0 <= r <= 1 for r in h.stats["dsa_recall"])
        assert all(torch.isfinite(torch.tensor(h.losses + h.aux["dsa_indexer"])))
