"""The ``"mla"`` mixer (glmkit.mixers.mla): its two inference paths agree (naive expansion and absorbed "MQA mode",
on the torch path and the kernels'), cached decoding equals the full forward, the latent cache is what it should be,
the pieces DSA reuses (query latent, key indices), and it plugs into the decoder without editing it: trains with
``train``, generates with the cache, saves and loads through ``glmkit.checkpoint``, traces whole under
``torch.compile(fullgraph=True)``. Also the cache size per token and layer for every mixer on the real configs, and
the GLM-4.7-Flash preset against its published size."""

from __future__ import annotations

import pytest
import torch

import glmkit
from glmkit import backend
from glmkit.checkpoint import load_pretrained, save_pretrained
from glmkit.course.counting import param_counts
from glmkit.generate import generate
from glmkit.mixers import MIXERS, Step
from glmkit.mixers.attention import Attention
from glmkit.mixers.mla import MLA, MLAState
from glmkit.models.decoder import Decoder
from glmkit.models.presets import PUBLISHED, get_config
from glmkit.testing import assert_close, rel_err
from glmkit.train import TrainConfig, train

V = 264  # the byte vocabulary of the CPU presets


def _model(absorb="auto", extra=None, **changes):
    """cpu-mla with 2 layers, the mixer options in ``extra`` changed and ``mla_absorb`` set."""
    base = get_config("cpu-mla")
    cfg = get_config(base, num_hidden_layers=2, extra={**base.extra, **(extra or {}), "mla_absorb": absorb}, **changes)
    return Decoder(cfg).eval()


def _step(B, T, offset=0):
    return Step(position_ids=torch.arange(offset, offset + T)[None].expand(B, T), sep=torch.zeros(B, dtype=torch.long))


# -- the mixer -------------------------------------------------------------------------------------------------
def test_registered_with_working_defaults():
    """Every option has a default: a tiny config that names only the mixer builds, runs and differs from a copy
    with other weights (the defaults make a real layer: q·k head 48 + 16, v head 32, latent 64)."""
    assert MIXERS["mla"] is MLA
    cfg = get_config("cpu-small", num_hidden_layers=1, hidden_size=64, num_attention_heads=2, layer_types=["mla"])
    layer = Decoder(cfg).layers[0].mixer
    assert (layer.nope, layer.rope_dim, layer.v_dim, layer.kv_lora_rank, layer.q_lora_rank) == (48, 16, 32, 64, 64)
    x = torch.randn(2, 7, 64)
    with torch.no_grad():
        y = layer(x, _step(2, 7), None)
    assert y.shape == x.shape and torch.isfinite(y).all() and y.abs().sum() > 0


@pytest.mark.parametrize(
    "changes",
    [{}, dict(rope_interleave=False), dict(extra=dict(q_lora_rank=None, v_head_dim=48)), dict(attention_bias=False)],
    ids=["default", "half-split", "q_proj-v48", "no-bias"],
)
def test_naive_and_absorbed_paths_agree(changes):
    """Whole model, torch path: the expanded (naive) and absorbed forwards give the same logits, prefill and
    padded batches (fp32; the absorbed path sums in another order)."""
    torch.manual_seed(0)
    naive, absorbed = _model("never", **changes), _model("always", **changes)
    absorbed.load_state_dict(naive.state_dict())
    x = torch.randint(0, V, (3, 21))
    mask = torch.ones(3, 21, dtype=torch.bool)
    mask[1, :5] = False  # left padding
    with torch.no_grad():
        assert rel_err(naive(x), absorbed(x)) < 1e-5
        assert rel_err(naive(x, attention_mask=mask), absorbed(x, attention_mask=mask)) < 1e-5


def test_absorbed_kernel_path_and_prefill_kernels():
    """Forced to "triton" (interpreter on CPU): the prefill runs the flash kernels with a 64-wide q·k head and a
    32-wide v head (forward and backward), decode steps the absorbed kernel; both match the torch path."""
    torch.manual_seed(1)
    model = _model()
    x = torch.randint(0, V, (2, 19))
    batch = {"input_ids": x[:, :-1], "targets": x[:, 1:]}
    model.loss(batch).backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    with glmkit.use_backend("triton"), backend.audit() as a:
        model.loss(batch).backward()
    assert a.paths("attention") == {"triton"}
    for n, p in model.named_parameters():
        if n in ref_grads:
            assert rel_err(ref_grads[n], p.grad) < 1e-4, n
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(2, 24)
        with glmkit.use_backend("triton"), backend.audit() as a:
            outs = [model(x[:, :12], cache=cache)] + [model(x[:, t : t + 1], cache=cache) for t in range(12, 19)]
    assert a.paths("mla_decode") == {"triton"} and a.paths("attention") == {"triton"}
    assert rel_err(full, torch.cat(outs, 1)) < 1e-5


def test_cached_decoding_equals_the_full_forward():
    """Prefill 9, then chunks of 1 and 3 tokens (the 3-token chunk takes the absorbed path with a causal mask
    inside it); and rolling the cache back replays the same logits."""
    torch.manual_seed(2)
    model = _model()
    x = torch.randint(0, V, (2, 16))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(2, 20)
        parts = [model(x[:, :9], cache=cache), model(x[:, 9:10], cache=cache), model(x[:, 10:13], cache=cache)]
        parts += [model(x[:, t : t + 1], cache=cache) for t in range(13, 16)]
        assert rel_err(full, torch.cat(parts, 1)) < 1e-5
        cache.rollback(4)
        again = model(x[:, 12:16], cache=cache)
    assert rel_err(full[:, 12:], again) < 1e-5


def test_the_cache_holds_only_the_latent():
    model = _model()
    cache = model.new_cache(3, 40)
    state = cache.layers[0]
    assert isinstance(state, MLAState) and tuple(state.latent.shape) == (3, 40, 64 + 16)
    assert cache.nbytes == 2 * 3 * 40 * 80 * 4  # layers · B · T · (kv_lora + rope) · fp32
    assert cache.nbytes == 2 * MLA.state_bytes(model.config, 40, batch_size=3, dtype=torch.float32)
    x = torch.randint(0, V, (3, 5))
    with torch.no_grad():
        model(x, cache=cache)
        c_kv, k_rot = model.layers[0].mixer.latent_kv(model.layers[0].input_norm(model.embed_tokens(x)), _step(3, 5))
    assert torch.equal(state.latent[:, :5, :64], c_kv) and torch.equal(state.latent[:, :5, 64:], k_rot)


def test_pieces_for_dsa():
    """query returns the normalised q latent; attend's key indices: all causal keys = no selection, a subset =
    the same as masking the others out by hand."""
    torch.manual_seed(3)
    layer = _model().layers[0].mixer
    B, T = 2, 11
    x = torch.randn(B, T, 128)
    step = _step(B, T)
    with torch.no_grad():
        q_nope, q_rot, c_q = layer.query(x, step)
        assert c_q.shape == (B, T, 64) and q_nope.shape == (B, 4, T, 48) and q_rot.shape == (B, 4, T, 16)
        assert_close("c_Q is RMS-normalised", layer.q_a_layernorm(layer.q_a_proj(x)), c_q, 0.0)
        c_kv, k_rot = layer.latent_kv(x, step)
        plain = layer.attend(q_nope, q_rot, c_kv, k_rot, step)
        everything = torch.arange(T).expand(B, T, T)
        assert rel_err(plain, layer.attend(q_nope, q_rot, c_kv, k_rot, step, keys=everything)) < 1e-5
        keys = torch.stack([torch.tensor([0, t // 2, t]) for t in range(T)]).expand(B, T, 3)
        chosen = torch.zeros(B, T, T, dtype=torch.bool).scatter_(-1, keys, True)
        by_hand = Step(position_ids=step.position_ids, sep=step.sep, visible=chosen)
        for absorb in (True, False):
            got = layer.attend(q_nope, q_rot, c_kv, k_rot, step, keys=keys, absorb=absorb)
            assert rel_err(layer.attend(q_nope, q_rot, c_kv, k_rot, by_hand, absorb=False), got) < 1e-5
        assert rel_err(plain, got) > 1e-2  # the selection changed something


def test_absorbed_weights_are_views_of_kv_b_proj():
    layer = _model().layers[0].mixer
    w_uk, w_uv = layer.absorbed_weights()
    assert w_uk.shape == (4, 48, 64) and w_uv.shape == (4, 32, 64)
    assert w_uk.data_ptr() == layer.kv_b_proj.weight.data_ptr()
    c = torch.randn(5, 64)
    k, v = layer.expand(c[None], torch.zeros(1, 5, 16))
    assert_close("k_nope = W_UK c", torch.einsum("hnr,lr->hln", w_uk, c), k[0, :, :, :48], 1e-6)
    assert_close("v = W_UV c", torch.einsum("hvr,lr->hlv", w_uv, c), v[0], 1e-6)


@pytest.mark.parametrize(
    "extra, match",
    [
        (dict(kv_lora_rank=0), "kv_lora_rank=0 must be a positive int"),
        (dict(q_lora_rank=2.5), "q_lora_rank=2.5 must be a positive int or None"),
        (dict(qk_rope_head_dim=7), "qk_rope_head_dim=7 must be even"),
        (dict(mla_absorb="sometimes"), "mla_absorb='sometimes'"),
    ],
)
def test_bad_options_are_named(extra, match):
    cfg = get_config("cpu-mla", num_hidden_layers=1)
    cfg.extra = {**cfg.extra, **extra}
    with pytest.raises(ValueError, match=match):
        Decoder(cfg)


# -- in the decoder, unchanged -----------------------------------------------------------------------------------
def test_trains_generates_and_round_trips(tmp_path):
    """cpu-mla (MoE FFNs, MLA mixers) with the one trainer, generator and checkpoint code."""
    torch.manual_seed(0)
    model = Decoder(get_config("cpu-mla", num_hidden_layers=2))
    cfg = TrainConfig(steps=30, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=3)
    history = train(model, cfg=cfg, out_dir=tmp_path / "run", progress=False)
    assert sum(history.losses[-5:]) < sum(history.losses[:5]) - 2.0, history.losses  # it learns
    model.eval()
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12]]  # ragged: left padding
    cached = generate(model, prompts, 8, stop_tokens=(), use_cache=True)
    uncached = generate(model, prompts, 8, stop_tokens=(), use_cache=False)
    assert cached.tokens == uncached.tokens
    save_pretrained(model, tmp_path / "model")
    again = load_pretrained(tmp_path / "model").eval()
    x = torch.randint(0, V, (2, 16))
    with torch.no_grad():
        assert rel_err(model(x), again(x)) == 0.0
    assert again.config.layer_types == ["mla", "mla"] and again.config.opt("kv_lora_rank") == 64


def test_forward_has_no_host_sync():
    """Training forward, prefill and a decode step against the latent cache, absorbed and naive, trace as one
    graph each."""
    torch._dynamo.reset()
    model = _model()
    x = torch.randint(0, V, (2, 12))
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    model.train()
    assert rel_err(model(x), compiled(x)) < 1e-6
    model.eval()
    cache = model.new_cache(2, 16)
    with torch.no_grad():
        compiled(x, cache=cache)
        step = compiled(x[:, :1], cache=cache)
    assert step.shape == (2, 1, V) and cache.length == 13


# -- cache sizes and presets ------------------------------------------------------------------------------------
def test_state_bytes_per_token_on_the_real_configs():
    """Cache bytes per token and layer in bf16: GLM-4-9B (GQA, 2 KV heads of 128) 1 KiB, GLM-4.5 (8 KV heads)
    4 KiB, its MHA twin (96 heads) 48 KiB, MQA (one KV head) 512 B, GLM-4.7-Flash's MLA 576 values = 1152 B."""

    def per_token(name, **changes):
        cfg = get_config(name, **changes)
        return MIXERS[cfg.layer_types[0]].state_bytes(cfg, 1)

    assert per_token("glm-4-9b") == 2 * 2 * 128 * 2
    assert per_token("glm-4.5") == 4096
    assert per_token("glm-4.5", num_key_value_heads=96) == 2 * 96 * 128 * 2
    assert per_token("glm-4.5", num_key_value_heads=1) == 2 * 128 * 2
    assert per_token("glm-4.7-flash") == 1152
    assert MLA.state_bytes(get_config("glm-4.7-flash"), 4096, batch_size=2) == 2 * 4096 * 1152
    small = Decoder(get_config("cpu-small", num_hidden_layers=1))
    n = small.new_cache(2, 10, dtype=torch.bfloat16).nbytes
    assert n == Attention.state_bytes(small.config, 10, batch_size=2)


def test_glm_4_7_flash_preset_matches_its_published_size():
    """On the meta device. Published: "30B-A3B" (model card). Main model without the MTP layer 29.94B; the MTP
    layer adds 0.64B, its stored embedding and head copies 0.63B more (31.22B: the "31B" HF shows); active without
    embedding and head 3.26B ("A3B" is that rounded). Counts agree with the independent formula."""
    with torch.device("meta"):
        model = Decoder(get_config("glm-4.7-flash"))
    total, active = PUBLISHED["glm-4.7-flash"]
    cfg = model.config
    bias = cfg.mlp_layer_types.count("sparse") * cfg.n_routed_experts  # routing-bias buffers: stored, not parameters
    pc = param_counts(cfg)
    assert model.num_parameters() + bias == pc.total == 29_943_393_920
    assert abs(pc.total / total - 1) < 0.01
    assert model.num_parameters(include_mtp=True) + bias + cfg.n_routed_experts == pc.total_with_mtp
    assert abs(pc.total_with_mtp_copies / 31e9 - 1) < 0.01
    assert model.num_active_parameters() + bias == pc.active and round(pc.active / 1e9) == active / 1e9
    layer = model.layers[1].mixer
    assert isinstance(layer, MLA) and (layer.H, layer.qk_dim, layer.v_dim, layer.kv_lora_rank) == (20, 256, 256, 512)


# -- GPU ----------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_gpu_kernels_in_the_model_and_no_host_sync():
    """cpu-mla with dense FFNs on CUDA in fp32 (the kernels' fixed tiles, no autotuning): the training forward+backward
    on the flash kernels (q·k head 64, v head 32) and decode steps on the absorbed kernel give the torch path's loss,
    gradients and logits; a prefill and a decode step make no host sync."""
    torch.manual_seed(4)
    model = _model(n_routed_experts=0).cuda()
    assert set(model.config.mlp_layer_types) == {"dense"}
    x = torch.randint(0, V, (2, 70), device="cuda")
    batch = {"input_ids": x[:, :-1], "targets": x[:, 1:]}
    with backend.use_backend("torch"):
        ref = model.loss(batch)
        ref_grads = torch.autograd.grad(ref, list(model.parameters()))
        with torch.no_grad():
            full = model(x)
    with backend.audit() as a:
        loss = model.loss(batch)
        grads = torch.autograd.grad(loss, list(model.parameters()))
    assert a.paths("attention") == {"triton"}, a
    assert rel_err(ref, loss) < 2e-3
    for (name, _), r, g in zip(model.named_parameters(), ref_grads, grads):
        assert rel_err(r, g) < 1e-2, name
    cache = model.new_cache(2, 72)
    with torch.no_grad(), backend.audit() as a:
        parts = [model(x[:, :60], cache=cache)] + [model(x[:, t : t + 1], cache=cache) for t in range(60, 70)]
    assert a.paths("mla_decode") == {"triton"}, a
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
