"""The GLM-4.5 MoE model: presets against the published sizes, the expert paths agree, training-mode load
statistics, the bias update and aux loss, MTP, cached generation, and clear errors for bad configs."""

from __future__ import annotations

import pytest
import torch

from glmkit import backend
from glmkit.models.glm_dense import GLMDenseModel
from glmkit.models.glm_moe import GLMMoEConfig, GLMMoEModel, dense_twin, get_config
from glmkit.moe import MoE
from glmkit.moe_configs import GLM_4_5, GLM_4_5_AIR, PUBLISHED, param_counts
from glmkit.sampling import generate
from glmkit.testing import rel_err


@pytest.mark.parametrize("name,ref", [("glm-4.5", GLM_4_5), ("glm-4.5-air", GLM_4_5_AIR)])
def test_presets_instantiate_on_meta_with_the_published_sizes(name, ref):
    """Counted from the instantiated tensors, against glmkit.moe_configs' formula count (an independent
    tally) and the published 355B/32B and 106B/12B. The routing bias is a buffer (E per MoE layer) that
    the formula counts and parameters() does not."""
    with torch.device("meta"):
        model = GLMMoEModel(get_config(name))
    cfg = model.config
    pc = param_counts(ref)
    bias = cfg.n_moe_layers * cfg.n_routed_experts
    assert model.num_parameters() + bias == pc.total
    assert model.num_active_parameters() + bias == pc.active
    total, active = PUBLISHED[name]
    assert abs(pc.total / total - 1) < 0.01
    assert abs(pc.active / active - 1) < (0.02 if name == "glm-4.5-air" else 0.01)   # Air: "12B" is rounded
    # the MTP layer is stored but not counted in the published totals
    assert model.num_parameters(include_mtp=True) + bias + cfg.n_routed_experts == pc.total_with_mtp
    # GLM-4.5's attention: 96 heads of 128 over 8 KV heads, QK-norm (GLM-4.5 only), half-split RoPE on 64 dims
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.rotary_dim) == (96, 8, 128, 64)
    assert cfg.qk_norm == (name == "glm-4.5") and cfg.rope_pairing == "half" and cfg.rope_theta == 1e6


def test_small_presets_and_dense_twin():
    for name in ("cpu-moe", "gpu-moe"):
        cfg = get_config(name)
        moe = GLMMoEModel(cfg) if name == "cpu-moe" else None
        if moe is not None:
            twin = GLMDenseModel(dense_twin(cfg))
            # same compute per token: the twin's non-embedding parameters equal the MoE model's active ones
            # up to the routers (E·d per MoE layer) and the first dense layer's different width
            a, b = moe.num_active_parameters(), twin.num_parameters(exclude_embeddings=True)
            assert abs(a / b - 1) < 0.02, (a, b)
            assert moe.num_parameters() > 1.8 * a          # capacity well beyond compute
        assert cfg.vocab_size == 264


@pytest.mark.parametrize("impl", ["loop", "triton"])
def test_expert_paths_agree(impl):
    torch.manual_seed(1)
    cfg = get_config("cpu-moe", n_layers=2, hidden_size=64, n_heads=2, head_dim=32, moe_intermediate_size=32,
                     intermediate_size=96)
    ref = GLMMoEModel(cfg).eval()
    other = GLMMoEModel(get_config(cfg, moe_impl=impl)).eval()
    other.load_state_dict(ref.state_dict())
    x = torch.randint(0, cfg.vocab_size, (2, 13))
    y = torch.randint(0, cfg.vocab_size, (2, 13))
    ref.loss(x, y).backward()
    with backend.audit() as a:
        other.loss(x, y).backward()
    assert a.paths("moe_experts") == ({"triton"} if impl == "triton" else set())
    g_ref = dict(ref.named_parameters())
    for n, p in other.named_parameters():
        assert rel_err(g_ref[n].grad, p.grad) < 1e-4, n


def test_auto_impl_follows_the_backend():
    cfg = get_config("cpu-moe", n_layers=2, hidden_size=64, n_heads=2, head_dim=32, moe_intermediate_size=32)
    model = GLMMoEModel(cfg).eval()
    x = torch.randint(0, cfg.vocab_size, (1, 9))
    with torch.no_grad():
        with backend.audit() as a:
            base = model(x)
        assert a.paths("moe_experts") == {"torch"}
        with backend.use_backend("triton"), backend.audit() as a:
            kern = model(x)
        assert a.paths("moe_experts") == {"triton"} and a.paths("rms_norm") == {"triton"}
    assert rel_err(base, kern) < 1e-4


def test_training_mode_load_statistics_and_bias_update():
    torch.manual_seed(2)
    cfg = get_config("cpu-moe", n_layers=3)
    model = GLMMoEModel(cfg).train()
    assert len(model.moe_layers()) == cfg.n_moe_layers == 2
    assert all(isinstance(m, MoE) for m in model.moe_layers())
    x = torch.randint(0, cfg.vocab_size, (4, 32))
    model.loss(x, x)
    load = model.expert_load()
    assert load.shape == (2, cfg.n_routed_experts)
    assert torch.equal(load.sum(1), torch.full((2,), float(x.numel() * cfg.num_experts_per_tok)))
    model.loss(x, x)
    before = [m.gate.e_score_correction_bias.clone() for m in model.moe_layers()]
    loads = model.update_bias(0.01)
    assert torch.equal(loads, 2 * load)                      # two identical forwards accumulated
    for m, b, ld in zip(model.moe_layers(), before, loads):
        step = m.gate.e_score_correction_bias - b
        expected = 0.01 * torch.sign(ld.mean() - ld)
        assert torch.allclose(step, expected)
    assert model.update_bias(0.01).sum() == 0                # accumulators were reset


def test_aux_loss_reaches_the_router():
    cfg = get_config("cpu-moe", n_layers=2, aux_loss_alpha=0.01)
    model = GLMMoEModel(cfg).train()
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    model.loss(x, x)
    aux = model.aux_loss()
    assert aux is not None and aux.item() > 0
    aux.backward()
    assert model.moe_layers()[0].gate.weight.grad.abs().sum() > 0
    assert GLMMoEModel(get_config("cpu-moe", n_layers=2)).train().aux_loss() is None


def test_mtp_logits_use_the_next_token():
    torch.manual_seed(3)
    cfg = get_config("cpu-moe", n_layers=2, num_nextn_predict_layers=1)
    model = GLMMoEModel(cfg).eval()
    assert model.mtp[0].embed_tokens.weight is model.embed_tokens.weight   # tied, as in the paper
    x = torch.randint(0, cfg.vocab_size, (2, 10))
    with torch.no_grad():
        logits = model.mtp_logits(x)
        assert logits.shape == (2, 9, cfg.vocab_size)
        x2 = x.clone()
        x2[:, 5] = (x2[:, 5] + 1) % cfg.vocab_size            # token 5 feeds MTP position 4 and later
        changed = (model.mtp_logits(x2) - logits).abs().amax(dim=(0, 2))
    # earlier positions move only by rounding (the sorted expert GEMMs regroup tokens), later ones for real
    assert torch.all(changed[:4] < 1e-5) and torch.all(changed[4:] > 1e-3), changed
    with pytest.raises(ValueError, match="no MTP layer"):
        GLMMoEModel(get_config("cpu-moe", n_layers=2)).mtp_logits(x)


def test_cached_and_uncached_generation_agree():
    torch.manual_seed(4)
    model = GLMMoEModel(get_config("cpu-moe", n_layers=2)).eval()
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    a = generate(model, prompts, 8, stop_tokens=(), use_cache=True)
    b = generate(model, prompts, 8, stop_tokens=(), use_cache=False)
    assert a.tokens == b.tokens


@pytest.mark.parametrize("overrides,match", [
    (dict(num_experts_per_tok=9), "num_experts_per_tok=9"),
    (dict(n_group=3), "n_group=3"),
    (dict(n_group=4, topk_group=1, num_experts_per_tok=3), "hold fewer than"),
    (dict(first_k_dense_replace=7), "first_k_dense_replace=7"),
    (dict(router="relu"), "router='relu'"),
    (dict(moe_impl="fast"), "moe_impl='fast'"),
    (dict(activation="gelu"), "swiglu"),
    (dict(moe_intermediate_size=0), "moe_intermediate_size"),
])
def test_bad_configs_are_named(overrides, match):
    with pytest.raises(ValueError, match=match):
        get_config("cpu-moe", **overrides)


def test_wrong_config_type_is_refused():
    from glmkit.models.glm_dense import get_config as dense_config

    with pytest.raises(TypeError, match="GLMMoEConfig"):
        GLMMoEModel(dense_config("cpu-small"))
    assert isinstance(get_config("cpu-moe"), GLMMoEConfig)


# ----------------------------------------------------------------------------------------------------
# CUDA (pytest -m gpu on the H200)
# ----------------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_gpu_moe_model_on_kernels_matches_the_torch_path():
    """fp32 on CUDA: every op on the Triton kernels (auto backend) against the same model on the torch
    path (SDPA, sorted experts with torch._grouped_mm or per-expert matmuls)."""
    torch.manual_seed(5)
    cfg = get_config("gpu-moe", n_layers=3)
    model = GLMMoEModel(cfg).to("cuda").eval()
    x = torch.randint(0, cfg.vocab_size, (2, 333), device="cuda")
    with torch.no_grad():
        with backend.audit() as a:
            kern = model(x)
        with backend.use_backend("torch"):
            ref = model(x)
    assert a.only_triton() and {"attention", "rms_norm", "swiglu", "rope", "moe_experts"} <= a.ops(), a
    assert rel_err(kern, ref) < 2e-3   # tl.dot on fp32 runs TF32 (10-bit mantissa) on Hopper


@pytest.mark.gpu
def test_gpu_moe_trains_in_bf16_on_the_kernels():
    """30 bf16-autocast steps of gpu-moe on the corpus with the bias update: the loss falls and balance holds."""
    from glmkit.lm_data import LMData
    from glmkit.train import TrainConfig, train

    torch.manual_seed(6)
    model = GLMMoEModel(get_config("gpu-moe"))
    cfg = TrainConfig(steps=30, batch_size=8, seq_len=256, lr=2e-3, warmup_steps=3, bias_update_rate=0.003)
    with backend.audit() as a:
        h = train(model, LMData(batch_size=8, seq_len=256, seed=1), cfg, device="cuda", progress=False,
                  live_plot=False)
    assert a.only_triton(), a
    first, last = sum(h.losses[:3]) / 3, sum(h.losses[-3:]) / 3
    assert last < first - 1.0, (first, last)
    assert all(torch.isfinite(torch.tensor(h.losses)))
