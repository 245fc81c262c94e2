"""glmkit.mhc (mHC hyper-connections and the plain residual) and the decoder built on them: glm5_next's
``Glm5NextTextHyperConnection`` as the oracle, what the Sinkhorn step guarantees, ``hc_mult = 1`` as today's decoder,
and a decoder with N = 4 streams that trains, caches, compiles whole and round-trips through a checkpoint."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from glmkit.checkpoint import load_pretrained, save_pretrained
from glmkit.mhc import HyperConnection, Residual, expand_streams, merge_streams, sinkhorn
from glmkit.models.decoder import Decoder, DecoderConfig
from glmkit.models.presets import get_config
from glmkit.testing import rel_err


def _hf_hyper_connection(d: int, n: int, iters: int):
    from transformers.models.glm5_next.configuration_glm5_next import Glm5NextTextConfig
    from transformers.models.glm5_next.modeling_glm5_next import Glm5NextTextHyperConnection

    cfg = Glm5NextTextConfig(
        vocab_size=64,
        hidden_size=d,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        index_topk=16,
        hc_mult=n,
        hc_sinkhorn_iters=iters,
        pad_token_id=0,
    )
    return Glm5NextTextHyperConnection(cfg), cfg.rms_norm_eps, cfg.hc_eps


@pytest.mark.parametrize("n, d, iters", [(4, 24, 20), (3, 17, 5), (2, 8, 1)])
def test_matches_glm5_next(n, d, iters):
    """Same parameters (random, scaled so the sigmoids and the softmax are far from flat) → the same pre-mix, post
    gains, Sinkhorn matrix, branch input and layer output as transformers' glm5_next (its decoder layer's formula)."""
    hf, norm_eps, eps = _hf_hyper_connection(d, n, iters)
    ours = HyperConnection(d, n, iters, eps, norm_eps)
    g = torch.Generator().manual_seed(n * 100 + d)
    with torch.no_grad():
        hf.fn.copy_(torch.randn(hf.fn.shape, generator=g))
        hf.base.copy_(torch.randn(hf.base.shape, generator=g))
        hf.scale.copy_(torch.rand(3, generator=g) + 0.5)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in hf.state_dict().items()}
    ours.load_state_dict(hf.state_dict())
    streams = torch.randn(2, 5, n, d, generator=g)
    post_hf, comb_hf, x_hf = hf(streams)
    pre, post, comb = ours.weights(streams)
    assert rel_err(post_hf, post) < 1e-6 and rel_err(comb_hf, comb) < 1e-6
    assert rel_err(x_hf, (pre.unsqueeze(-1) * streams).sum(-2)) < 1e-6

    branch = nn.Linear(d, d)
    want = post_hf.unsqueeze(-1) * branch(x_hf).unsqueeze(-2) + torch.matmul(comb_hf.transpose(-1, -2), streams)
    got = ours(streams, branch)
    assert got.shape == streams.shape and rel_err(want, got) < 1e-6


def test_sinkhorn_scales_rows_and_columns_to_one():
    """Sinkhorn only rescales rows and columns (result = diag(r) · M · diag(c): every 2×2 cross ratio of
    result / M is 1) and, from a positive matrix, reaches row and column sums of 1."""
    m = torch.rand(6, 5, 5, dtype=torch.float64) * 3 + 0.01
    s = sinkhorn(m, iters=40, eps=0.0)
    assert (s > 0).all()
    assert (s.sum(-2) - 1).abs().max() < 1e-12  # the last step normalises columns
    assert (s.sum(-1) - 1).abs().max() < 1e-6
    ratio = s / m
    cross = (
        ratio[:, :, None, :, None]
        * ratio[:, None, :, None, :]
        / (ratio[:, :, None, None, :] * ratio[:, None, :, :, None])
    )
    assert (cross - 1).abs().max() < 1e-9
    one = sinkhorn(m, iters=1, eps=0.0)  # one round: columns only
    assert (one.sum(-2) - 1).abs().max() < 1e-12 and (one.sum(-1) - 1).abs().max() > 1e-3


def test_mixing_is_bounded_and_keeps_the_stream_mean():
    """With the branch switched off, each new stream is a convex combination of the old (no stream grows past the
    largest input stream) and the mean over streams is unchanged (to Sinkhorn's row error)."""
    n, d = 4, 32
    hc = HyperConnection(d, n, sinkhorn_iters=20)
    with torch.no_grad():
        hc.fn.normal_(0.0, 0.15)  # logits of std ~1.7: far from the near-uniform initial mix
    streams = torch.randn(3, 7, n, d) * torch.tensor([1.0, 5.0, 0.1, 2.0])[:, None]
    out = hc(streams, lambda x: torch.zeros_like(x))
    _, _, comb = hc.weights(streams)
    assert (comb.sum(-2) - 1).abs().max() < 1e-5 and (comb.sum(-1) - 1).abs().max() < 1e-3
    assert (out.norm(dim=-1) <= streams.norm(dim=-1).amax(-1, keepdim=True) * (1 + 1e-5)).all()
    assert rel_err(streams.mean(-2), out.mean(-2)) < 1e-3


def test_initial_weights_and_validation():
    hc = HyperConnection(16, 4)
    assert hc.fn.shape == (24, 64) and (hc.base == 0).all() and (hc.scale == 1).all()
    assert abs(hc.fn.std().item() - 0.02) < 0.004
    pre, post, comb = hc.weights(torch.randn(2, 3, 4, 16))
    # z has unit RMS, so the logits have std ≈ 0.02·√(N·d) = 0.16: near σ(0) + ε, 2σ(0) and a uniform mix
    assert ((pre - 0.5).abs() < 0.15).all() and ((post - 1).abs() < 0.3).all()
    assert (comb - 0.25).abs().max() < 0.1
    with pytest.raises(ValueError, match="hc_mult"):
        HyperConnection(16, 1)
    with pytest.raises(ValueError, match="sinkhorn_iters"):
        HyperConnection(16, 2, sinkhorn_iters=0)
    with pytest.raises(ValueError, match="streams"):
        hc.weights(torch.randn(2, 3, 16))
    for field, value in (("hc_mult", 0), ("hc_sinkhorn_iters", 0), ("hc_eps", -1.0), ("swiglu_limit", -2.0)):
        with pytest.raises(ValueError, match=field):
            get_config("cpu-small", **{field: value})


def test_one_stream_is_the_plain_residual():
    """hc_mult = 1 (the default): no parameters, ``x + branch(x)`` bit for bit, and a decoder whose state dict is
    the one it always had."""
    x = torch.randn(2, 3, 8)
    branch = nn.Linear(8, 8)
    assert torch.equal(Residual()(x, branch), x + branch(x))
    assert expand_streams(x, 1) is x and merge_streams(x, 1) is x
    model = Decoder(get_config("cpu-moe", num_hidden_layers=2))
    assert not any("_hc" in k for k in model.state_dict())
    assert all(isinstance(b.attn_hc, Residual) and isinstance(b.ffn_hc, Residual) for b in model.layers)


def _hc_model(**changes) -> Decoder:
    torch.manual_seed(0)
    cfg = get_config("cpu-moe", num_hidden_layers=2, hidden_size=64, head_dim=16, hc_mult=4, **changes)
    return Decoder(cfg)


def test_decoder_with_streams_names_shapes_cache_and_checkpoint(tmp_path):
    model = _hc_model(num_nextn_predict_layers=1).eval()
    sd = model.state_dict()
    for i in range(2):
        for hc in ("attn_hc", "ffn_hc"):
            assert sd[f"layers.{i}.{hc}.fn"].shape == (24, 256)  # glm5_next: [(2 + N)·N, N·d]
            assert sd[f"layers.{i}.{hc}.base"].shape == (24,) and sd[f"layers.{i}.{hc}.scale"].shape == (3,)
    assert "mtp.0.block.attn_hc.fn" in sd
    per_layer = 2 * (24 * 256 + 24 + 3)
    plain = Decoder(get_config(model.config, hc_mult=1))
    assert model.num_parameters() - plain.num_parameters() == 2 * per_layer

    x = torch.randint(0, 264, (2, 11))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(2, 16)
        pre = model(x[:, :7], cache=cache)
        steps = [model(x[:, t : t + 1], cache=cache) for t in range(7, 11)]
        assert rel_err(full, torch.cat([pre, *steps], dim=1)) < 1e-5
        assert model.mtp_logits(x).shape == (2, 10, 264)
    save_pretrained(model, tmp_path)
    again = load_pretrained(tmp_path).eval()
    assert again.config == model.config and again.config.hc_mult == 4
    with torch.no_grad():
        assert torch.equal(again(x), full)


def test_decoder_with_streams_traces_whole_and_trains():
    torch._dynamo.reset()
    model = _hc_model(swiglu_limit=7.0, hc_sinkhorn_iters=5)  # 5 rounds: a shorter trace, the same graph shape
    x = torch.randint(0, 264, (2, 12))
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    model.train()
    assert rel_err(model(x), compiled(x)) < 1e-6
    model.eval()
    cache = model.new_cache(2, 16)
    with torch.no_grad():
        compiled(x, cache=cache)
        assert compiled(x[:, :1], cache=cache).shape == (2, 1, 264)

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    seq = torch.randint(0, 264, (4, 17))
    losses = []
    for _ in range(25):
        loss = model.loss({"input_ids": seq[:, :-1], "targets": seq[:, 1:]})
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses
    grads = [p.grad for n, p in model.named_parameters() if "_hc." in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_config_fields_round_trip():
    cfg = get_config("cpu-small", hc_mult=2, hc_sinkhorn_iters=7, hc_eps=1e-5, swiglu_limit=10)
    back = DecoderConfig.from_dict(cfg.to_dict())
    assert back == cfg and back.swiglu_limit == 10.0 and isinstance(back.swiglu_limit, float)


@pytest.mark.gpu
def test_gpu_decoder_with_streams_bf16_kernels_no_sync():
    """On the GPU with the Triton kernels: bf16 autocast close to fp32, gradients reach every mHC parameter, and a
    training forward and a cached decode step make no host sync (after a warm-up: autotuning may sync)."""
    model = _hc_model(swiglu_limit=7.0).cuda()
    x = torch.randint(0, 264, (4, 64), device="cuda")
    batch = {"input_ids": x[:, :-1], "targets": x[:, 1:]}
    with torch.no_grad():
        want = model(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = model(x)
    assert rel_err(want, got.float()) < 3e-2

    def decode():
        cache = model.new_cache(4, 80)
        model(x, cache=cache)
        return cache

    model.train()
    for checked in (False, True):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if checked else 0)
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model.loss(batch)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        model.zero_grad()
        loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "_hc." in n]
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    model.eval()
    with torch.no_grad():
        for checked in (False, True):
            cache = decode()
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error" if checked else 0)
            try:
                step = model(x[:, :1], cache=cache)
            finally:
                torch.cuda.set_sync_debug_mode(0)
    assert step.shape == (4, 1, 264) and torch.isfinite(step).all()


def test_hf_export_refuses_glm5_next_pieces():
    """No HF family glmkit saves today has mHC or the clamped SwiGLU: saving says so rather than dropping them."""
    from glmkit.hf import HFCheckpointError, family_of

    assert family_of(get_config("cpu-moe")) == "glm4_moe"
    for change in ({"hc_mult": 2}, {"swiglu_limit": 10.0}):
        with pytest.raises(HFCheckpointError, match="glm5_next"):
            family_of(get_config("cpu-moe", **change))
