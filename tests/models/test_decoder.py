"""The one decoder: its config, every preset at its published size, the dense and MoE layer kinds, QK-norm and
both RoPE pairings, MoE bookkeeping, MTP, and a forward with no host sync (it traces whole under torch.compile)."""

from __future__ import annotations

import pytest
import torch

from glmkit import backend
from glmkit.course.counting import param_counts
from glmkit.models.decoder import Decoder, DecoderConfig
from glmkit.models.presets import PRESETS, PUBLISHED, dense_twin, get_config
from glmkit.moe import MoE
from glmkit.testing import rel_err


# -- presets and config ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["chatglm2-6b", "glm-4-9b", "glm-4-9b-0414", "glm-4.5", "glm-4.5-air"])
def test_real_presets_match_published_sizes(name):
    """On the meta device; MoE totals against the independent formula (glmkit.course.counting: the routing bias is
    a buffer, E per MoE layer, that it counts and parameters() does not) and the published totals / actives."""
    with torch.device("meta"):
        model = Decoder(get_config(name))
    total, active = PUBLISHED[name]
    n = model.num_parameters()
    assert abs(n / total - 1) < 0.01, (name, n)
    cfg = model.config
    if cfg.n_routed_experts:
        bias = cfg.mlp_layer_types.count("sparse") * cfg.n_routed_experts
        pc = param_counts(cfg)
        assert n + bias == pc.total and model.num_active_parameters() + bias == pc.active
        assert model.num_parameters(include_mtp=True) + bias + cfg.n_routed_experts == pc.total_with_mtp
        assert abs(pc.active / active - 1) < (0.02 if name == "glm-4.5-air" else 0.01)  # Air: "12B" is rounded
        assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (96, 8, 128)
        assert cfg.use_qk_norm == (name == "glm-4.5") and not cfg.rope_interleave and cfg.rope_theta == 1e6


def test_exact_counts_of_the_dense_shapes():
    with torch.device("meta"):
        counts = {n: Decoder(get_config(n)).num_parameters() for n in ("chatglm2-6b", "glm-4-9b", "glm-4-9b-0414")}
    assert counts["chatglm2-6b"] == 6_243_584_000
    assert counts["glm-4-9b-0414"] - counts["glm-4-9b"] == 2 * 4096 * 40  # the sandwich norms


def test_course_presets_and_dense_twin():
    for name in ("cpu-small", "gpu-small", "cpu-moe", "gpu-moe"):
        with torch.device("meta"):
            assert Decoder(PRESETS[name]).num_parameters() < 120e6
    moe = Decoder(get_config("cpu-moe"))
    twin = Decoder(dense_twin(moe.config))
    a, b = moe.num_active_parameters(), twin.num_parameters(exclude_embeddings=True)
    assert abs(a / b - 1) < 0.02, (a, b)  # same compute per token, up to the routers
    assert moe.num_parameters() > 1.8 * a  # capacity well beyond compute
    assert twin.config.mlp_layer_types == ["dense"] * 4 and not twin.moe_layers()


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(hidden_size=100, num_attention_heads=3), "head_dim"),
        (dict(num_attention_heads=4, num_key_value_heads=3), "num_key_value_heads"),
        (dict(head_dim=18, partial_rotary_factor=0.5), "even"),
        (dict(partial_rotary_factor=1.5), "partial_rotary_factor"),
        (dict(layer_types=["attention", "flash"]), "layer_types"),
        (dict(mlp_layer_types=["dense"]), "mlp_layer_types"),
        (dict(mlp_layer_types=["dense", "sparse"]), "n_routed_experts"),
        (dict(eos_token_id=(999,)), "eos_token_id"),
        (dict(router="relu", n_routed_experts=4, moe_intermediate_size=8), "router"),
        (
            dict(n_routed_experts=8, num_experts_per_tok=9, moe_intermediate_size=8, first_k_dense_replace=1),
            "num_experts_per_tok",
        ),
        (dict(n_routed_experts=8, n_group=3, moe_intermediate_size=8, first_k_dense_replace=1), "n_group"),
        (dict(extra={"kv_lora_rank": 8}), "kv_lora_rank"),
        (dict(num_hidden_layers=2.0), "num_hidden_layers"),
    ],
)
def test_config_errors_are_named(fields, match):
    base = dict(vocab_size=264, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    with pytest.raises(ValueError, match=match):
        Decoder(DecoderConfig(**{**base, **fields}))


def test_config_roundtrip_and_preset_errors():
    cfg = get_config("cpu-moe", num_nextn_predict_layers=1)
    assert DecoderConfig.from_dict(cfg.to_dict()) == cfg
    assert get_config("cpu-moe", num_hidden_layers=6).mlp_layer_types == ["dense"] + ["sparse"] * 5
    with pytest.raises(ValueError, match="unknown preset"):
        get_config("glm-7")
    with pytest.raises(ValueError, match="unknown fields"):
        get_config("cpu-small", n_layer=3)
    with pytest.raises(TypeError, match="DecoderConfig"):
        Decoder(PRESETS["cpu-small"].to_dict())


# -- the forward ----------------------------------------------------------------------------------------
def test_forward_shapes_and_edge_checks():
    model = Decoder(get_config("cpu-small", num_hidden_layers=2))
    assert model(torch.randint(0, 264, (3, 7))).shape == (3, 7, 264)
    with pytest.raises(ValueError, match="outside"):
        model.check_tokens(torch.full((1, 3), 264))
    with pytest.raises(ValueError, match="position_ids"):
        model(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("kv", [4, 2, 1])  # MHA, GQA, MQA
def test_gqa_variants_run(kv):
    model = Decoder(get_config("cpu-small", num_hidden_layers=1, num_key_value_heads=kv))
    assert model.layers[0].mixer.qkv_proj.weight.shape[0] == (4 + 2 * kv) * 32
    assert torch.isfinite(model(torch.randint(0, 264, (2, 5)))).all()


def test_sep_makes_prefix_bidirectional():
    model = Decoder(get_config("cpu-small", num_hidden_layers=2)).eval()
    x = torch.randint(0, 264, (1, 8))
    y = x.clone()
    y[0, 3] = (x[0, 3] + 1) % 264  # change a token inside the prefix
    with torch.no_grad():
        causal_a, causal_b = model(x), model(y)
        prefix_a, prefix_b = model(x, sep=5), model(y, sep=5)
    assert torch.equal(causal_a[:, :3], causal_b[:, :3])  # causal: earlier positions can't see it
    assert not torch.allclose(prefix_a[:, :3], prefix_b[:, :3])  # prefix: they can


def test_rope_pairing_and_qk_norm_change_the_model():
    torch.manual_seed(1)
    a = Decoder(get_config("cpu-small", num_hidden_layers=2)).eval()
    b = Decoder(get_config("cpu-small", num_hidden_layers=2, rope_interleave=False)).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 264, (1, 12))
    with torch.no_grad():
        assert rel_err(a(x), b(x)) > 1e-4
        assert torch.equal(a(x[:, :1]), b(x[:, :1]))  # position 0: no rotation, identical
    c = Decoder(get_config("cpu-small", num_hidden_layers=2, use_qk_norm=True))
    assert {"layers.0.mixer.q_norm.weight", "layers.0.mixer.k_norm.weight"} <= set(c.state_dict())


def test_sandwich_norms_are_four_per_layer():
    def names(cfg):
        return sorted(n for n, m in Decoder(cfg).layers[0].named_modules() if type(m).__name__ == "RMSNorm")

    assert names(get_config("cpu-small", num_hidden_layers=1)) == [
        "input_norm",
        "post_mixer_norm",
        "post_mlp_norm",
        "pre_mlp_norm",
    ]
    assert names(get_config("cpu-small", num_hidden_layers=1, sandwich_norms=False)) == ["input_norm", "pre_mlp_norm"]


def test_cpu_small_learns():
    torch.manual_seed(0)
    model = Decoder(get_config("cpu-small", num_hidden_layers=2))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, 264, (4, 33))
    losses = []
    for _ in range(25):
        loss = model.loss({"input_ids": x[:, :-1], "targets": x[:, 1:]})
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


def test_forward_has_no_host_sync():
    """The whole forward (dense and MoE layers, training mode with the MoE load bookkeeping, a prefill and a decode
    step against the cache) traces as one graph: a host sync or a data-dependent branch would break it."""
    torch._dynamo.reset()
    model = Decoder(get_config("cpu-moe", num_hidden_layers=2, aux_loss_alpha=0.01))
    x = torch.randint(0, 264, (2, 12))
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    model.train()
    assert rel_err(model(x), compiled(x)) < 1e-6
    model.eval()
    cache = model.new_cache(2, 16)
    with torch.no_grad():
        compiled(x, cache=cache)
        step = compiled(x[:, :1], cache=cache)
    assert step.shape == (2, 1, 264) and cache.length == 13


# -- MoE --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["loop", "triton"])
def test_expert_paths_agree(impl):
    torch.manual_seed(1)
    cfg = get_config(
        "cpu-moe",
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=2,
        head_dim=32,
        moe_intermediate_size=32,
        intermediate_size=96,
    )
    ref = Decoder(cfg).eval()
    other = Decoder(get_config(cfg, moe_impl=impl)).eval()
    other.load_state_dict(ref.state_dict())
    batch = {"input_ids": torch.randint(0, 264, (2, 13)), "targets": torch.randint(0, 264, (2, 13))}
    ref.loss(batch).backward()
    with backend.audit() as a:
        other.loss(batch).backward()
    assert a.paths("moe_experts") == ({"triton"} if impl == "triton" else {"torch"})
    g_ref = dict(ref.named_parameters())
    for n, p in other.named_parameters():
        assert rel_err(g_ref[n].grad, p.grad) < 1e-4, n


def test_training_mode_load_statistics_and_bias_update():
    torch.manual_seed(2)
    cfg = get_config("cpu-moe", num_hidden_layers=3)
    model = Decoder(cfg).train()
    assert len(model.moe_layers()) == 2 and all(isinstance(m, MoE) for m in model.moe_layers())
    x = torch.randint(0, 264, (4, 32))
    model.loss({"input_ids": x, "targets": x})
    load = model.expert_load()
    assert load.shape == (2, cfg.n_routed_experts)
    assert torch.equal(load.sum(1), torch.full((2,), float(x.numel() * cfg.num_experts_per_tok)))
    model.loss({"input_ids": x, "targets": x})
    before = [m.gate.e_score_correction_bias.clone() for m in model.moe_layers()]
    loads = model.update_bias(0.01)
    assert torch.equal(loads, 2 * load)  # two identical forwards accumulated
    for m, b, ld in zip(model.moe_layers(), before, loads):
        assert torch.allclose(m.gate.e_score_correction_bias - b, 0.01 * torch.sign(ld.mean() - ld))
    assert model.update_bias(0.01).sum() == 0  # accumulators were reset
    assert model.max_violation() >= 0


def test_aux_losses_are_named_and_reach_the_router():
    model = Decoder(get_config("cpu-moe", num_hidden_layers=2, aux_loss_alpha=0.01)).train()
    x = torch.randint(0, 264, (2, 16))
    model.loss({"input_ids": x, "targets": x})
    aux = model.aux_losses()
    assert list(aux) == ["MoE"] and aux["MoE"].item() > 0
    aux["MoE"].backward()
    assert model.moe_layers()[0].gate.weight.grad.abs().sum() > 0
    plain = Decoder(get_config("cpu-moe", num_hidden_layers=2)).train()
    plain.loss({"input_ids": x, "targets": x})
    assert plain.aux_losses() == {}


def test_mtp_logits_use_the_next_token():
    torch.manual_seed(3)
    model = Decoder(get_config("cpu-moe", num_hidden_layers=2, num_nextn_predict_layers=1)).eval()
    assert model.mtp[0].embed_tokens.weight is model.embed_tokens.weight  # tied, as in the paper
    assert isinstance(model.mtp[0].block.mlp, MoE)  # GLM-4.5's MTP block is an MoE layer
    x = torch.randint(0, 264, (2, 10))
    with torch.no_grad():
        logits = model.mtp_logits(x)
        assert logits.shape == (2, 9, 264)
        x2 = x.clone()
        x2[:, 5] = (x2[:, 5] + 1) % 264  # token 5 feeds MTP position 4 and later
        changed = (model.mtp_logits(x2) - logits).abs().amax(dim=(0, 2))
    assert torch.all(changed[:4] < 1e-5) and torch.all(changed[4:] > 1e-3), changed
    with pytest.raises(ValueError, match="no MTP layer"):
        Decoder(get_config("cpu-moe", num_hidden_layers=2)).mtp_logits(x)


def test_model_on_the_triton_kernels():
    """Attention, RMSNorm, SwiGLU, RoPE and the experts on the Triton kernels (the interpreter on CPU): a prefill
    with a GLM prefix and a cached continuation match the torch path."""
    import glmkit

    model = Decoder(
        get_config("cpu-moe", num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=64)
    ).eval()
    x = torch.randint(0, 264, (2, 19))
    with torch.no_grad():
        ref = model(x, sep=5)
        with glmkit.use_backend("triton"), backend.audit() as a:
            out = model(x, sep=5)
            cache = model.new_cache(2, 24)
            parts = [model(x[:, :10], sep=5, cache=cache), model(x[:, 10:], cache=cache)]
    assert {"attention", "rmsnorm", "swiglu", "rope", "moe_experts"} <= a.ops()
    assert rel_err(ref, out) <= 1e-5 and rel_err(ref, torch.cat(parts, 1)) <= 1e-5


# -- CUDA (pytest -m gpu on the H200) -----------------------------------------------------------------------
@pytest.mark.gpu
def test_gpu_moe_model_on_kernels_matches_the_torch_path():
    """fp32 on CUDA: every op on the Triton kernels (auto backend) against the torch path."""
    torch.manual_seed(5)
    model = Decoder(get_config("gpu-moe", num_hidden_layers=3)).to("cuda").eval()
    x = torch.randint(0, 264, (2, 333), device="cuda")
    with torch.no_grad():
        with backend.audit() as a:
            kern = model(x)
        with backend.use_backend("torch"):
            ref = model(x)
    assert a.only_triton() and {"attention", "rmsnorm", "swiglu", "rope", "moe_experts"} <= a.ops(), a
    assert rel_err(kern, ref) < 2e-3  # tl.dot on fp32 runs TF32 (10-bit mantissa) on Hopper


@pytest.mark.gpu
def test_gpu_forward_is_sync_free():
    """On the GPU the forward runs under torch.cuda.set_sync_debug_mode("error"): any host-device sync raises."""
    torch.manual_seed(6)
    for name in ("gpu-small", "gpu-moe"):
        model = Decoder(get_config(name, num_hidden_layers=3)).to("cuda")
        x = torch.randint(0, 264, (2, 256), device="cuda")
        model(x)  # warm-up: autotuning may sync, the checked run must not
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                model.train()
                loss = model.loss({"input_ids": x, "targets": x})
            model.eval()
            with torch.no_grad():
                model(x)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert torch.isfinite(loss)
