"""Hugging Face ``glm_moe_dsa`` (GLM-5/5.1: MLA + DSA + MoE) with transformers as the oracle: tiny random checkpoints
made by transformers load into the one Decoder (every layer the ``"dsa"`` mixer) and give transformers' logits (fp32,
relative error <= 1e-4) for prefill, cached decoding (latent cache + index keys) and greedy generation, with T well
above ``index_topk`` so that the sparse selection changes the result (checked: the same weights with a large k move
the logits far beyond the tolerance); index sharing ("shared" layers); save_hf writes what transformers loads back;
the GLM-5 preset on the meta device against 744B total / 40B active and against transformers' default config."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="HF parity tests need transformers>=5.24")

from hf_oracle import cached_decode_errors, save_tiny, sharpen_  # noqa: E402  (tests/hf_oracle.py)
from safetensors.torch import load_file  # noqa: E402

from glmkit import backend  # noqa: E402
from glmkit.generate import generate  # noqa: E402
from glmkit.hf import HFCheckpointError, config_from_hf, load_hf, save_hf  # noqa: E402
from glmkit.mixers.dsa import DSA, DSAState  # noqa: E402
from glmkit.mixers.mla import MLAState  # noqa: E402
from glmkit.models.decoder import Decoder  # noqa: E402
from glmkit.models.presets import PUBLISHED, get_config  # noqa: E402
from glmkit.testing import rel_err  # noqa: E402

TOL = 1e-4
V = 128
TOPK = 6


def tiny_dsa(**overrides):
    """A random transformers GlmMoeDsaForCausalLM: hidden 64, 3 layers (1 dense + 2 MoE), 8 experts top-2 + 1 shared,
    4 heads; MLA with q_lora 32, kv_lora 32, q·k head 24 + 8, v head 16; indexer 8 heads × 16, top-6. Weights at unit
    fan-in scale (sharp attention, spread index scores) and a random routing bias."""
    fields = dict(
        vocab_size=V,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=24,
        qk_rope_head_dim=8,
        v_head_dim=16,
        index_n_heads=8,
        index_head_dim=16,
        index_topk=TOPK,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        routed_scaling_factor=2.5,
        mlp_layer_types=["dense", "sparse", "sparse"],
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4},
        pad_token_id=0,
        eos_token_id=[1, 2],
    )
    fields.update(overrides)
    model = sharpen_(transformers.GlmMoeDsaForCausalLM(transformers.GlmMoeDsaConfig(**fields)).eval())
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.3)
    return model


CASES = {
    "all_full": {},
    "index_sharing": dict(indexer_types=["full", "shared", "full"]),
    "two_dense": dict(mlp_layer_types=["dense", "dense", "sparse"], n_group=4, topk_group=2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_prefill_logits_match(case, tmp_path):
    hf = tiny_dsa(**CASES[case])
    ours = load_hf(save_tiny(hf, tmp_path / case))
    cfg = ours.config
    assert cfg.layer_types == ["dsa"] * 3 and all(isinstance(layer.mixer, DSA) for layer in ours.layers)
    assert cfg.opt("index_topk") == TOPK and cfg.opt("indexer_types") == CASES[case].get("indexer_types")
    x = torch.randint(0, V, (3, 23))
    with torch.no_grad():
        err = rel_err(hf(x).logits, ours(x))
    assert err <= TOL, f"{case} prefill: rel err {err:.2e}"


def test_sparsity_and_the_pairing_matter(tmp_path):
    """The checks above can fail: with k = T (dense attention) or the other indexer RoPE pairing the logits move far
    beyond the tolerance (T = 24 > k = 6)."""
    hf = tiny_dsa()
    path = save_tiny(hf, tmp_path / "m")
    x = torch.randint(0, V, (2, 24))
    with torch.no_grad():
        ref = hf(x).logits
        assert rel_err(ref, load_hf(path)(x)) <= TOL
        dense = load_hf(path)
        for layer in dense.layers:
            layer.mixer.topk = 24
        wrong_pairing = load_hf(path)
        for layer in wrong_pairing.layers:
            layer.mixer.indexer.pairing = "half"
        errs = rel_err(ref, dense(x)), rel_err(ref, wrong_pairing(x))
    assert min(errs) > 1e-2, errs


def test_cached_decoding(tmp_path):
    hf = tiny_dsa(indexer_types=["full", "shared", "full"])
    ours = load_hf(save_tiny(hf, tmp_path / "m"))
    errs = cached_decode_errors(hf, ours, torch.randint(0, V, (2, 20)), prefix=9)
    assert max(errs) <= TOL, f"cached decode: rel errs {[f'{e:.1e}' for e in errs]}"
    cache = ours.new_cache(2, 32)
    assert [type(s) for s in cache.layers] == [DSAState, MLAState, DSAState]
    assert cache.nbytes == 2 * 32 * 4 * (3 * (32 + 8) + 2 * 16)  # B · T_max · fp32 · (3 latents + 2 index keys)


def test_cached_decoding_on_the_kernel_path(tmp_path):
    """Forced to "triton" on CPU: indexer logits, sparse prefill and the split decode kernel (interpreter)."""
    hf = tiny_dsa()
    ours = load_hf(save_tiny(hf, tmp_path / "m"))
    with backend.use_backend("triton"), backend.audit() as a:
        errs = cached_decode_errors(hf, ours, torch.randint(0, V, (2, 14)), prefix=8)
    assert max(errs) <= TOL, errs
    assert a.paths("sparse_mla_decode") == {"triton"} and a.paths("lightning_indexer") == {"triton"}


def test_greedy_generation_matches_transformers(tmp_path):
    hf = tiny_dsa()
    ours = load_hf(save_tiny(hf, tmp_path / "g"))
    prompt = torch.randint(3, V, (1, 9))
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert generate(ours, prompt, 12, stop_tokens=()).tokens[0] == ref[0, prompt.shape[1] :].tolist()


def test_round_trip_through_transformers(tmp_path):
    """glmkit (cpu-dsa shapes, index sharing, an MTP layer) → save_hf → transformers: same logits; → load_hf: the
    same weights and the MTP layer back."""
    torch.manual_seed(0)
    base = get_config("cpu-dsa")
    extra = {**base.extra, "index_topk": 5, "indexer_types": ["full", "full", "shared"]}
    cfg = get_config(base, vocab_size=V, num_hidden_layers=3, num_nextn_predict_layers=1, extra=extra)
    ours = Decoder(cfg).eval()
    with torch.no_grad():
        for m in ours.moe_layers():
            m.gate.e_score_correction_bias.normal_(0.0, 0.1)
        for layer in ours.layers:  # sharper attention and index scores than the 0.02 init
            layer.mixer.q_b_proj.weight.mul_(8)
            layer.mixer.kv_b_proj.weight.mul_(8)
    folder = save_hf(ours, tmp_path / "out")
    written = json.loads((folder / "config.json").read_text())
    assert written["model_type"] == "glm_moe_dsa" and written["indexer_types"] == ["full", "full", "shared"]
    assert (written["index_n_heads"], written["index_head_dim"], written["index_topk"]) == (8, 32, 5)
    stored = load_file(str(folder / "model.safetensors"))
    assert "model.layers.1.self_attn.indexer.k_norm.bias" in stored
    assert not any(k.startswith("model.layers.2.self_attn.indexer.") for k in stored)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    assert type(hf).__name__ == "GlmMoeDsaForCausalLM"
    x = torch.randint(0, V, (2, 21))
    with torch.no_grad():
        assert rel_err(hf(x).logits, ours(x)) <= TOL
    back = load_hf(folder)
    assert back.config.num_nextn_predict_layers == 1 and back.config.mtp_layer_type == "dsa"
    theirs = back.state_dict()
    for k, v in ours.state_dict().items():
        assert torch.equal(v, theirs[k]), k


def test_errors_name_the_problem(tmp_path):
    folder = save_tiny(tiny_dsa(), tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    for change, match in (
        (dict(index_topk=0), "index_topk=0 must be a positive int"),
        (dict(q_lora_rank=None), "q_lora_rank=None must be a positive int"),
        (dict(indexer_types=["full", "shared"]), "indexer_types must list 3"),
    ):
        (folder / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(HFCheckpointError, match=match):
            load_hf(folder)
    (folder / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "index_head_dim"}))
    with pytest.raises(HFCheckpointError, match=r"lacks required fields \['index_head_dim'\]"):
        load_hf(folder)
    mixed = get_config("cpu-dsa", num_hidden_layers=2, layer_types=["dsa", "mla"])
    with pytest.raises(HFCheckpointError, match="glm_moe_dsa needs"):
        save_hf(Decoder(mixed), tmp_path / "x")


# ---- GLM-5 ------------------------------------------------------------------------------------------------------
def test_glm5_preset_matches_transformers_defaults_and_published_size():
    """transformers' GlmMoeDsaConfig defaults are GLM-5 (checkpoint zai-org/GLM-5): read through config_from_hf they
    give the preset's fields (but RoPE θ). On the meta device: main model without the MTP layer 743.91B (the README's
    744B, −0.01 %), active without embedding and head 39.88B ("40B", −0.3 %); the MTP layer adds 9.95B."""
    preset = get_config("glm-5")
    from_hf = config_from_hf(transformers.GlmMoeDsaConfig().to_dict())
    # token ids are the checkpoint's; transformers' default RoPE θ is 1e4, GLM-5's config.json says 1e6 (§5.1); the
    # MTP layer count is not a field of transformers' class (the checkpoint's config.json has 1)
    skip = {"pad_token_id", "bos_token_id", "eos_token_id", "initializer_range", "extra", "mtp_tied", "rope_theta"}
    skip |= {"num_nextn_predict_layers"}
    for field in preset.to_dict():
        if field not in skip and field in from_hf.to_dict() and field not in preset.extra:
            assert getattr(from_hf, field) == getattr(preset, field), field
    for k, v in preset.extra.items():
        assert from_hf.opt(k) == v, k
    with torch.device("meta"):
        model = Decoder(preset)
    total, active = PUBLISHED["glm-5"]
    n, a = model.num_parameters(), model.num_active_parameters()
    assert n == 743_911_199_232 and abs(n / total - 1) < 0.01
    assert a == 39_881_544_192 and abs(a / active - 1) < 0.01
    assert model.num_parameters(include_mtp=True) - n == 9_952_920_320
    layer = model.layers[0].mixer
    assert (layer.H, layer.qk_dim, layer.v_dim, layer.kv_lora_rank, layer.q_lora_rank) == (64, 256, 256, 512, 2048)
    assert (layer.index_heads, layer.index_dim, layer.topk) == (32, 128, 2048)
    indexer = sum(p.numel() for p in layer.indexer.parameters())
    assert indexer == 2048 * 32 * 128 + 6144 * 128 + 2 * 128 + 6144 * 32  # wq_b, wk, k_norm, weights_proj
