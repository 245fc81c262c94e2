"""The Gated DeltaNet mixer (glmkit.mixers.gdn) and the state both delta-rule mixers share.

(a) Parity with transformers' ``Qwen3NextGatedDeltaNet`` (the oracle: its weights copied in through ``hf_to_ours``,
grouped value heads, d_k ≠ d_v, a prefill across a chunk boundary, then step-by-step decode through both caches),
and the chunk reference against fla's ``naive_chunk_gated_delta_rule``. (b) The state, for GDN and KDA alike:
cached decoding in pieces (recurrent step and chunk path, with and without an initial state) equals the full
forward; left padding leaves the state untouched; ``rollback`` restores exactly the state of n tokens ago, across
forwards, and refuses what it did not keep. (c) The layer on the Triton kernels (the interpreter on CPU), forward,
backward and decode, against the torch path.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from delta_helpers import PARITY_TOL, compare_with_hf, fla_naive, layer_step, sharpen_

from glmkit import backend
from glmkit.mixers import MIXERS
from glmkit.mixers.gdn import DeltaRuleState, GatedDeltaNet
from glmkit.models.decoder import Decoder
from glmkit.models.presets import get_config
from glmkit.ops.delta_rule import chunk_gated_delta_rule_reference
from glmkit.testing import rel_err

# ---- (a) parity ---------------------------------------------------------------------------------------------


def test_layer_matches_qwen3_next():
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet

    dims = dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=24)
    hf_cfg = transformers.Qwen3NextConfig(
        hidden_size=64,
        num_hidden_layers=1,
        layer_types=["linear_attention"],
        linear_conv_kernel_dim=4,
        rms_norm_eps=1e-6,
        vocab_size=32,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        num_experts=2,
        num_experts_per_tok=1,
        moe_intermediate_size=8,
        intermediate_size=32,
        **dims,
    )
    hf = sharpen_(Qwen3NextGatedDeltaNet(hf_cfg, 0)).eval()
    cfg = get_config(
        "cpu-small", hidden_size=64, num_hidden_layers=1, layer_types=["gdn"], rms_norm_eps=1e-6, extra=dims
    )
    ours = GatedDeltaNet(cfg, 0)
    hf_sd = hf.state_dict()
    ours.load_state_dict(GatedDeltaNet.hf_to_ours(hf_sd, cfg))  # strict: every parameter, nothing extra
    back = GatedDeltaNet.ours_to_hf(ours.state_dict(), cfg)
    assert sorted(back) == sorted(hf_sd) and all(torch.equal(back[k], hf_sd[k]) for k in hf_sd)

    x = torch.randn(2, 75, 64)  # past one chunk of 64; the decode steps start at 69
    errs = compare_with_hf(hf, ours, transformers.DynamicCache(config=hf_cfg), x, prefix=69)
    assert max(errs) <= PARITY_TOL, errs


@pytest.mark.parametrize("T, chunk", [(100, 64), (37, 16)])
def test_chunk_reference_matches_fla_naive(T, chunk):
    """``chunk_gated_delta_rule_reference`` (scalar gate) against fla's ``naive_chunk_gated_delta_rule``: an
    initial state, a length that is not a chunk multiple."""
    naive = fla_naive("gated_delta_rule")
    B, H, K, V = 2, 3, 16, 12
    q, k = torch.randn(B, T, H, K), F.normalize(torch.randn(B, T, H, K), dim=-1)
    v, beta = torch.randn(B, T, H, V), torch.rand(B, T, H)
    g, s0 = F.logsigmoid(torch.randn(B, T, H) + 2.0), torch.randn(B, H, K, V)
    o_ref, s_ref = naive.naive_chunk_gated_delta_rule(
        q, k, v, g, beta, chunk_size=chunk, initial_state=s0, output_final_state=True
    )
    o, s = chunk_gated_delta_rule_reference(q, k, v, g, beta, None, s0, True, chunk_size=chunk)
    assert rel_err(o_ref, o) <= 1e-5 and rel_err(s_ref, s) <= 1e-5


def test_options_default_to_the_attention_shapes_and_errors_are_named():
    layer = GatedDeltaNet(get_config("cpu-small", num_hidden_layers=1, layer_types=["gdn"]), 0)
    assert (layer.Hk, layer.Hv, layer.dk, layer.dv) == (4, 4, 32, 32)  # cpu-small: 4 heads of 32
    assert layer.new_state(3, 10, torch.float32, "cpu").recurrent.shape == (3, 4, 32, 32)
    for extra, match in [
        ({"linear_num_key_heads": 3, "linear_num_value_heads": 4}, "multiple of linear_num_key_heads"),
        ({"linear_key_head_dim": 0}, "linear_key_head_dim"),
        ({"linear_conv_kernel_dim": 2.5}, "linear_conv_kernel_dim"),
    ]:
        with pytest.raises(ValueError, match=match):
            Decoder(get_config("cpu-small", num_hidden_layers=1, layer_types=["gdn"], extra=extra))


def test_state_bytes_is_the_allocated_state_and_does_not_grow():
    """``state_bytes`` of both mixers equals what ``new_cache`` allocates (grouped value heads, d_k ≠ d_v, a conv of
    width 3, bf16 and fp32), for any context length; at the published shapes (Qwen3-Next: 16 key heads and 32 value
    heads of 128; GLM-5.3-Flash's KDA: 64 heads of 128; conv width 4) the fp32 memory is 2 MiB and 4 MiB per layer
    and sequence, plus a bf16 conv tail of 3 · (q, k, v channels) · 2 bytes."""
    extra = {"linear_num_value_heads": 8, "linear_value_head_dim": 16, "linear_conv_kernel_dim": 3}
    for mixer, ex in (("gdn", extra), ("kda", {})):
        cfg = get_config("cpu-small", num_hidden_layers=1, layer_types=[mixer], extra=ex)
        model = Decoder(cfg)
        for B, L, dtype in ((1, 10, torch.bfloat16), (3, 500, torch.float32)):
            got = MIXERS[mixer].state_bytes(cfg, L, batch_size=B, dtype=dtype)
            assert got == model.new_cache(B, L, dtype=dtype).nbytes, (mixer, B, L, dtype)
    qwen = get_config(
        "cpu-small",
        num_hidden_layers=1,
        layer_types=["gdn"],
        extra={"linear_num_key_heads": 16, "linear_num_value_heads": 32, "linear_key_head_dim": 128},
    )
    assert GatedDeltaNet.state_bytes(qwen, 1) == 32 * 128 * 128 * 4 + 3 * (2 * 16 * 128 + 32 * 128) * 2
    glm = get_config(
        "cpu-small", num_hidden_layers=1, layer_types=["kda"], extra={"linear_num_heads": 64, "linear_head_dim": 128}
    )
    assert MIXERS["kda"].state_bytes(glm, 10**6, batch_size=2) == 2 * (64 * 128 * 128 * 4 + 3 * 3 * 64 * 128 * 2)


# ---- (b) the state, both mixers ----------------------------------------------------------------------------


def tiny_model(mixer: str, **extra) -> Decoder:
    """Two layers (the delta-rule mixer, then attention) at cpu-small's width, weights sharpened so that the
    recurrence matters (A_log kept: the decay stays a decay)."""
    cfg = get_config("cpu-small", num_hidden_layers=2, layer_types=[mixer, "attention"], extra=extra)
    model = Decoder(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in name:
                p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5)
    return model


def states(cache) -> list[DeltaRuleState]:
    return [s for s in cache.layers if isinstance(s, DeltaRuleState)]


@pytest.mark.parametrize("mixer", ["gdn", "kda"])
def test_cached_decoding_in_pieces_equals_the_full_forward(mixer):
    """Pieces of 5 (the recurrent step from zero), 66 (the chunk path from a state), 3, then single tokens; a
    reset cache starts from zero again."""
    model = tiny_model(mixer)
    x = torch.randint(0, 264, (2, 80))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(2, 80)
        cuts = [0, 5, 71, 74, *range(75, 81)]
        parts = [model(x[:, a:b], cache=cache) for a, b in zip(cuts, cuts[1:])]
        assert rel_err(full, torch.cat(parts, 1)) <= 1e-5
        cache.reset()
        assert rel_err(full[:, :7], model(x[:, :7], cache=cache)) <= 1e-5


@pytest.mark.parametrize("mixer", ["gdn", "kda"])
def test_left_padding_leaves_the_state_untouched(mixer):
    model = tiny_model(mixer)
    short, long = torch.randint(0, 264, (1, 6)), torch.randint(0, 264, (1, 10))
    pad = 4
    ids = torch.cat([torch.cat([torch.full((1, pad), 7), short], 1), long])
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, :pad] = False
    pos = (torch.arange(10)[None] - torch.tensor([[pad], [0]])).clamp_min(0)
    with torch.no_grad():
        batched = model(ids, pos, attention_mask=mask)
        assert rel_err(model(short)[0], batched[0, pad:]) <= 1e-5
        assert rel_err(model(long)[0], batched[1]) <= 1e-5
        cache, alone = model.new_cache(2, 12), model.new_cache(1, 12)
        model(ids, pos, attention_mask=mask, cache=cache)
        model(short, cache=alone)
        for s, a in zip(states(cache), states(alone)):  # the padded row's state is the unpadded prompt's
            assert rel_err(a.recurrent[0], s.recurrent[0]) <= 1e-6 and rel_err(a.conv[0], s.conv[0]) <= 1e-6
        nxt = torch.tensor([[5], [9]])
        step = model(nxt, torch.tensor([[6], [10]]), cache=cache)
        assert rel_err(model(torch.cat([short, nxt[:1]], 1))[:, -1], step[0:1, -1]) <= 1e-5


@pytest.mark.parametrize("mixer", ["gdn", "kda"])
def test_rollback_restores_the_state_of_n_tokens_ago(mixer):
    """Prefill, a forward of 4 tokens, rollback(2) = prefill + a forward of the first 2 (states and the next
    logits); the snapshots reach across forwards; rolling back further than was kept raises and changes nothing."""
    model = tiny_model(mixer)
    x = torch.randint(0, 264, (2, 16))
    with torch.no_grad():
        cache = model.new_cache(2, 16, max_rollback=4)
        model(x[:, :9], cache=cache)
        model(x[:, 9:13], cache=cache)
        cache.rollback(2)
        ref = model.new_cache(2, 16)
        model(x[:, :9], cache=ref)
        model(x[:, 9:11], cache=ref)
        for s, r in zip(states(cache), states(ref)):
            assert rel_err(r.recurrent, s.recurrent) <= 1e-6 and rel_err(r.conv, s.conv) <= 1e-6
        assert cache.length == ref.length == 11
        assert rel_err(model(x[:, 11:14], cache=ref), model(x[:, 11:14], cache=cache)) <= 1e-5

        model(x[:, 14:15], cache=cache)  # kept: the last 4 tokens, from two forwards (3 + 1)
        cache.rollback(4)  # back to 11 tokens, across two forwards
        with pytest.raises(ValueError, match="kept 0"):
            cache.rollback(1)
        assert cache.length == 11
        assert rel_err(model(x[:, :13])[:, 11:], model(x[:, 11:13], cache=cache)) <= 1e-5

        plain = model.new_cache(2, 16)  # max_rollback = 0 keeps nothing
        model(x[:, :5], cache=plain)
        with pytest.raises(ValueError, match="max_rollback"):
            plain.rollback(1)


# ---- (c) the kernels ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mixer, extra",
    [
        (
            "gdn",
            dict(linear_num_key_heads=1, linear_num_value_heads=2, linear_key_head_dim=16, linear_value_head_dim=16),
        ),
        ("kda", dict(linear_num_heads=2, linear_head_dim=16)),
    ],
)
def test_layer_on_the_triton_interpreter(mixer, extra):
    """Each layer with d_k = d_v = 16 (the kernels' smallest tile; GDN with grouped values) through the chunked
    kernels (forward and backward) and the decode kernel, against the torch path."""
    import glmkit

    cfg = get_config("cpu-small", hidden_size=64, num_hidden_layers=1, layer_types=[mixer], extra=extra)
    layer = sharpen_(MIXERS[mixer](cfg, 0))
    x = torch.randn(2, 37, 64, requires_grad=True)
    ref = layer(x, layer_step(2, 37), None)
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, *layer.parameters()])
    with glmkit.use_backend("triton"), backend.audit() as a:
        out = layer(x, layer_step(2, 37), None)
        grads = torch.autograd.grad(out.square().sum(), [x, *layer.parameters()])
        with torch.no_grad():
            state = layer.new_state(2, 40, torch.float32, "cpu")
            dec = [layer(x[:, :34], layer_step(2, 34), state)]
            dec += [layer(x[:, t : t + 1], layer_step(2, 1, t), state) for t in range(34, 37)]
    assert a.paths("delta_rule") == {"triton"} and a.paths("delta_rule_step") == {"triton"}, a
    assert rel_err(ref, out) <= 1e-5 and rel_err(ref, torch.cat(dec, 1)) <= 1e-5
    for name, r, g in zip(["x", *dict(layer.named_parameters())], ref_grads, grads):
        assert rel_err(r, g) <= 1e-4, name


# ---- GPU ----------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_gdn_layer_on_kernels_matches_the_torch_path():
    """Qwen3-Next-like head shapes (GVA 2:1, d = 128) in fp32: prefill, backward and decode on the kernels."""
    cfg = get_config(
        "gpu-small",
        num_hidden_layers=1,
        layer_types=["gdn"],
        extra=dict(
            linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=128, linear_value_head_dim=128
        ),
    )
    layer = sharpen_(GatedDeltaNet(cfg, 0)).cuda()
    x = torch.randn(2, 1000, 512, device="cuda", requires_grad=True)
    with backend.use_backend("torch"):
        ref = layer(x, layer_step(2, 1000, device="cuda"), None)
        ref_dx = torch.autograd.grad(ref.square().sum(), x)[0]
    with backend.audit() as a:
        out = layer(x, layer_step(2, 1000, device="cuda"), None)
        dx = torch.autograd.grad(out.square().sum(), x)[0]
        with torch.no_grad():
            state = layer.new_state(2, 1000, torch.float32, "cuda")
            dec = [layer(x[:, :990], layer_step(2, 990, device="cuda"), state)]
            dec += [layer(x[:, t : t + 1], layer_step(2, 1, t, "cuda"), state) for t in range(990, 1000)]
    assert a.paths("delta_rule") == {"triton"} and a.paths("delta_rule_step") == {"triton"}, a
    # the delta-rule kernels take fp32 dots in full precision (not TF32): the op's own tests hold them to 1e-5
    assert rel_err(ref, out) < 1e-4 and rel_err(ref_dx, dx) < 1e-4
    assert rel_err(ref[:, 990:], torch.cat(dec, 1)[:, 990:]) < 1e-4
