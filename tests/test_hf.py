"""Hugging Face interop, with transformers as the oracle: tiny random `glm`, `glm4` and `glm4_moe` checkpoints made
by transformers load into the one Decoder and give transformers' logits (fp32, relative error <= 1e-4) for prefill,
cached decoding and greedy generation; save_hf writes what transformers loads back (the MTP layer and zero-size
shared experts included, so transformers' MtpModel loads our files); sharded checkpoints; the wrong RoPE pairing;
errors that name the problem."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="HF parity tests need transformers>=5.24")

from hf_oracle import cached_decode_errors, save_tiny, sharpen_  # noqa: E402  (tests/hf_oracle.py)
from safetensors.torch import load_file, save_file  # noqa: E402

from glmkit import backend  # noqa: E402
from glmkit.generate import generate  # noqa: E402
from glmkit.hf import HFCheckpointError, load_hf, save_hf  # noqa: E402
from glmkit.models.decoder import Decoder  # noqa: E402
from glmkit.models.presets import get_config  # noqa: E402
from glmkit.testing import rel_err  # noqa: E402

TOL = 1e-4
KINDS = {"glm": ("GlmConfig", "GlmForCausalLM"), "glm4": ("Glm4Config", "Glm4ForCausalLM")}


def tiny_hf(kind: str, **overrides):
    """A random transformers model: hidden 64, 2 layers, vocab 128, 4 query heads sharing 2 KV heads.
    Weights are redrawn with unit-scale fan-in init (q/k ×2) so attention is sharp and positions matter —
    with the default 0.02 init every check would pass on an almost position-blind model."""
    cfg_cls, model_cls = (getattr(transformers, n) for n in KINDS[kind])
    fields = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        pad_token_id=0,
        eos_token_id=[1, 2],
    )
    fields.update(overrides)
    return sharpen_(model_cls(cfg_cls(**fields)).eval())


@pytest.mark.parametrize("kind", list(KINDS))
def test_prefill_logits_match(kind, tmp_path):
    hf = tiny_hf(kind)
    ours = load_hf(save_tiny(hf, tmp_path / kind))
    assert ours.config.sandwich_norms == (kind == "glm4") and ours.config.rope_interleave
    x = torch.randint(0, 128, (3, 17))
    with torch.no_grad():
        err = rel_err(hf(x).logits, ours(x))
    assert err <= TOL, f"{kind} prefill: rel err {err:.2e}"


@pytest.mark.parametrize("kind", list(KINDS))
def test_cached_decoding_matches(kind, tmp_path):
    hf = tiny_hf(kind)
    ours = load_hf(save_tiny(hf, tmp_path / kind))
    errs = cached_decode_errors(hf, ours, torch.randint(0, 128, (2, 15)), prefix=7)
    assert max(errs) <= TOL, f"{kind} cached decode: rel errs {[f'{e:.1e}' for e in errs]}"


@pytest.mark.parametrize("kind", list(KINDS))
def test_round_trip_through_transformers(kind, tmp_path):
    torch.manual_seed(0)
    ours = Decoder(
        get_config(
            "cpu-small", num_hidden_layers=2, vocab_size=128, sandwich_norms=kind == "glm4", tie_word_embeddings=False
        )
    ).eval()
    save_hf(ours, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == kind
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    x = torch.randint(0, 128, (2, 11))
    with torch.no_grad():
        err = rel_err(ours(x), hf(x).logits)
        back = load_hf(tmp_path / "out")
        err_back = rel_err(ours(x), back(x))
    assert err <= TOL and err_back == 0.0


def test_tied_embeddings_round_trip(tmp_path):
    hf = tiny_hf("glm4", tie_word_embeddings=True)
    path = save_tiny(hf, tmp_path / "tied")
    ours = load_hf(path)
    assert ours.lm_head.weight is ours.embed_tokens.weight
    x = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        assert rel_err(hf(x).logits, ours(x)) <= TOL
    save_hf(ours, tmp_path / "tied_out")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "tied_out" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()


def test_sharded_checkpoints(tmp_path):
    hf = tiny_hf("glm4")
    path = save_tiny(hf, tmp_path / "hf_sharded", max_shard_size="20KB")
    assert (path / "model.safetensors.index.json").is_file() and len(list(path.glob("model-*.safetensors"))) > 1
    ours = load_hf(path)
    x = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        ref = hf(x).logits
        assert rel_err(ref, ours(x)) <= TOL
    out = save_hf(ours, tmp_path / "ours_sharded", max_shard_size=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == {p.name for p in shards}
    back = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        assert rel_err(ref, back(x).logits) <= TOL


def test_wrong_rope_pairing_silently_changes_logits(tmp_path):
    """GLM-4 (glm/glm4) pairs interleaved dims; GLM-4.5 half-split ones. Loading with the other pairing
    raises nothing — every tensor fits — and the logits are simply wrong."""
    hf = tiny_hf("glm4")
    path = save_tiny(hf, tmp_path / "g")
    x = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        ref = hf(x).logits
        right = rel_err(ref, load_hf(path)(x))
        wrong = rel_err(ref, load_hf(path, rope_interleave=False)(x))
        full = rel_err(ref, load_hf(path, partial_rotary_factor=1.0)(x))
    assert right <= TOL
    assert wrong > 0.2 and full > 0.2, (wrong, full)  # measured ≈0.85 and ≈0.67


# -- errors --------------------------------------------------------------------------------------------
def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_unsupported_model_type(tmp_path):
    path = save_tiny(tiny_hf("glm4"), tmp_path / "m")
    _edit_config(path, model_type="llama")
    with pytest.raises(HFCheckpointError, match=r"unsupported model_type 'llama'.*'glm', 'glm4', 'glm4_moe'"):
        load_hf(path)


def test_missing_unexpected_and_mismatched_weights(tmp_path):
    from safetensors.torch import load_file, save_file

    path = save_tiny(tiny_hf("glm"), tmp_path / "m")
    tensors = load_file(str(path / "model.safetensors"))
    tensors.pop("model.layers.1.self_attn.k_proj.bias")
    tensors["model.layers.0.mlp.down_proj.weight"] = torch.zeros(64, 95)
    tensors["model.layers.0.extra.weight"] = torch.zeros(3)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(HFCheckpointError) as e:
        load_hf(path)
    msg = str(e.value)
    assert "missing 1: model.layers.1.self_attn.k_proj.bias (32,)" in msg
    assert "model.layers.0.extra.weight (3,)" in msg
    assert "model.layers.0.mlp.down_proj.weight: checkpoint (64, 95), config expects (64, 96)" in msg


def test_config_that_contradicts_itself(tmp_path):
    path = save_tiny(tiny_hf("glm"), tmp_path / "m")
    _edit_config(path, num_key_value_heads=3)
    with pytest.raises(HFCheckpointError, match="contradicts itself.*num_key_value_heads=3"):
        load_hf(path)
    _edit_config(path, num_key_value_heads=2, head_dim=None, hidden_size=66)
    with pytest.raises(HFCheckpointError, match="head_dim"):
        load_hf(path)


def test_missing_files_and_unsavable_models(tmp_path):
    with pytest.raises(HFCheckpointError, match="no config.json"):
        load_hf(tmp_path)
    path = save_tiny(tiny_hf("glm"), tmp_path / "m")
    (path / "model.safetensors").unlink()
    with pytest.raises(HFCheckpointError, match="no model.safetensors"):
        load_hf(path)
    model = Decoder(get_config("cpu-small", num_hidden_layers=1, rope_interleave=False, use_qk_norm=True))
    with pytest.raises(HFCheckpointError, match="rope_interleave=False.*use_qk_norm=True"):
        save_hf(model, tmp_path / "x")
    with pytest.raises(TypeError, match="Decoder"):
        save_hf(torch.nn.Linear(2, 2), tmp_path / "y")


def test_greedy_generation_matches_transformers(tmp_path):
    hf = tiny_hf("glm4")
    ours = load_hf(save_tiny(hf, tmp_path / "g"))
    prompt = torch.randint(3, 128, (1, 6))
    ref = hf.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 6:].tolist()
    assert generate(ours, prompt, 8, stop_tokens=()).tokens[0] == ref


# -- glm4_moe (GLM-4.5) -------------------------------------------------------------------------------------
V = 128


def tiny_moe(**overrides):
    """A random transformers Glm4MoeForCausalLM: hidden 64, 3 layers (1 dense + 2 MoE), 8 experts top-2 + 1
    shared, 4 query heads over 2 KV heads, QK-norm. Weights redrawn at unit fan-in scale (q/k ×2) and a
    random routing bias, so attention is sharp, positions matter and the bias changes the selection."""
    fields = dict(
        vocab_size=V,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        routed_scaling_factor=2.5,
        use_qk_norm=True,
        attention_bias=True,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5},
        pad_token_id=0,
        eos_token_id=[1, 2],
    )
    fields.update(overrides)
    model = sharpen_(transformers.Glm4MoeForCausalLM(transformers.Glm4MoeConfig(**fields)).eval())
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.3)
    return model


CASES = {
    "qk_norm": {},
    "no_qk_norm_air_style": dict(use_qk_norm=False, routed_scaling_factor=1.0),
    "grouped_routing": dict(n_group=4, topk_group=2),
    "two_shared_two_dense_top3": dict(n_shared_experts=2, first_k_dense_replace=2, num_experts_per_tok=3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_moe_prefill_logits_match(case, tmp_path):
    hf = tiny_moe(**CASES[case])
    ours = load_hf(save_tiny(hf, tmp_path / case))
    assert type(ours) is Decoder and not ours.config.rope_interleave
    assert ours.config.num_nextn_predict_layers == 0  # transformers does not write the MTP layer
    x = torch.randint(0, V, (3, 19))
    with torch.no_grad():
        err = rel_err(hf(x).logits, ours(x))
    assert err <= TOL, f"{case} prefill: rel err {err:.2e}"


@pytest.mark.parametrize("impl", ["loop", "triton"])
def test_moe_prefill_matches_with_other_expert_paths(impl, tmp_path):
    """The readable loop and the Triton grouped GEMM (interpreter on CPU) give the same logits."""
    hf = tiny_moe()
    ours = load_hf(save_tiny(hf, tmp_path / "m"), moe_impl=impl)
    x = torch.randint(0, V, (2, 11))
    with torch.no_grad(), backend.audit() as a:
        err = rel_err(hf(x).logits, ours(x))
    assert err <= TOL, f"{impl}: rel err {err:.2e}"
    if impl == "triton":
        assert a.paths("moe_experts") == {"triton"}


def test_moe_cached_decoding_matches(tmp_path):
    hf = tiny_moe()
    ours = load_hf(save_tiny(hf, tmp_path / "m"))
    errs = cached_decode_errors(hf, ours, torch.randint(0, V, (2, 16)), prefix=7)
    assert max(errs) <= TOL, f"cached decode: rel errs {[f'{e:.1e}' for e in errs]}"


def test_moe_greedy_generation_matches_transformers(tmp_path):
    hf = tiny_moe()
    ours = load_hf(save_tiny(hf, tmp_path / "m"))
    prompt = torch.randint(3, V, (1, 6))
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert generate(ours, prompt, 10, stop_tokens=()).tokens[0] == ref[0, prompt.shape[1] :].tolist()


def test_moe_round_trip_through_transformers(tmp_path):
    """glmkit → save_hf → transformers.from_pretrained: same logits; → load_hf: same weights."""
    torch.manual_seed(0)
    cfg = get_config(
        "cpu-moe",
        vocab_size=V,
        num_hidden_layers=3,
        tie_word_embeddings=False,
        num_nextn_predict_layers=1,
        n_group=2,
        topk_group=1,
        routed_scaling_factor=2.5,
    )
    ours = Decoder(cfg).eval()
    with torch.no_grad():
        for m in ours.moe_layers():
            m.gate.e_score_correction_bias.normal_(0.0, 0.1)
    folder = save_hf(ours, tmp_path / "out")
    written = json.loads((folder / "config.json").read_text())
    assert written["model_type"] == "glm4_moe" and written["num_nextn_predict_layers"] == 1
    stored = load_file(str(folder / "model.safetensors"))
    assert "model.layers.3.mlp.experts.7.down_proj.weight" in stored  # per-expert, as zai-org stores
    assert torch.equal(stored["model.layers.3.shared_head.head.weight"], stored["lm_head.weight"])  # MTP copies
    hf = transformers.Glm4MoeForCausalLM.from_pretrained(str(folder)).eval()
    x = torch.randint(0, V, (2, 13))
    with torch.no_grad():
        assert rel_err(hf(x).logits, ours(x)) <= TOL
    back = load_hf(folder)
    assert back.config.num_nextn_predict_layers == 1 and back.config.mtp_tied
    assert back.mtp[0].head.weight is back.lm_head.weight
    theirs = back.state_dict()
    for k, v in ours.state_dict().items():
        assert torch.equal(v, theirs[k]), k
    with torch.no_grad():
        assert torch.equal(back.mtp_logits(x), ours.mtp_logits(x))


def _add_mtp_layer(folder, n_layers: int, copies_equal: bool):
    """Append a random MTP layer (model.layers.{N}.*) to a transformers-written checkpoint, as the
    zai-org files hold one: a decoder block (MoE), enorm, hnorm, eh_proj, shared_head.{norm,head},
    embed_tokens."""
    path = folder / "model.safetensors"
    t = load_file(str(path))
    src, dst = f"model.layers.{n_layers - 1}.", f"model.layers.{n_layers}."
    for k, v in list(t.items()):
        if k.startswith(src):
            t[dst + k[len(src) :]] = (
                torch.randn_like(v) / v.shape[-1] ** 0.5 if v.dim() >= 2 else 1 + 0.2 * torch.randn_like(v)
            )
    d = t["model.embed_tokens.weight"].shape[1]
    t[dst + "enorm.weight"] = 1 + 0.2 * torch.randn(d)
    t[dst + "hnorm.weight"] = 1 + 0.2 * torch.randn(d)
    t[dst + "shared_head.norm.weight"] = 1 + 0.2 * torch.randn(d)
    t[dst + "eh_proj.weight"] = torch.randn(d, 2 * d) / (2 * d) ** 0.5
    emb, head = t["model.embed_tokens.weight"], t["lm_head.weight"]
    t[dst + "embed_tokens.weight"] = emb.clone() if copies_equal else torch.randn_like(emb)
    t[dst + "shared_head.head.weight"] = head.clone() if copies_equal else torch.randn_like(head)
    save_file(t, str(path), metadata={"format": "pt"})
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 1
    (folder / "config.json").write_text(json.dumps(cfg))


def test_mtp_layer_matches_transformers_mtp_model(tmp_path, monkeypatch):
    """transformers 5's MtpModel is the oracle for the MTP layer. It finds MTP tensors through the main
    class's ignore patterns (layers 92/46 of the real checkpoints), pointed here at this tiny model's layer 3."""
    from transformers.modeling_layers import MtpModel
    from transformers.models.glm4_moe import modeling_glm4_moe

    hf = tiny_moe()
    folder = save_tiny(hf, tmp_path / "m")
    _add_mtp_layer(folder, 3, copies_equal=True)
    monkeypatch.setattr(
        modeling_glm4_moe.Glm4MoeForCausalLM, "_keys_to_ignore_on_load_unexpected", [r"model\.layers\.3\..*"]
    )
    main = transformers.Glm4MoeForCausalLM.from_pretrained(str(folder)).eval()
    mtp = MtpModel.from_pretrained(main).eval()
    ours = load_hf(folder)
    assert ours.config.num_nextn_predict_layers == 1 and ours.config.mtp_tied
    x = torch.randint(0, V, (2, 12))
    B, T = x.shape
    with torch.no_grad():
        hidden = main(x, output_hidden_states=True).hidden_states[-1]  # final-norm output
        assert rel_err(hidden, ours.hidden_states(x)) <= TOL
        pos = torch.arange(1, T)[None].expand(B, T - 1)
        h = mtp.forward_layer(0, hidden[:, :-1], pos, None, input_ids=x[:, 1:])
        ref = mtp._project_to_logits(h)
        err = rel_err(ref, ours.mtp_logits(x))
    assert err <= TOL, f"MTP logits: rel err {err:.2e}"


def test_mtp_copies_that_differ_are_kept(tmp_path):
    hf = tiny_moe()
    folder = save_tiny(hf, tmp_path / "m")
    _add_mtp_layer(folder, 3, copies_equal=False)
    ours = load_hf(folder)
    assert not ours.config.mtp_tied
    assert not torch.equal(ours.mtp[0].head.weight, ours.lm_head.weight)
    again = load_hf(save_hf(ours, tmp_path / "again"))
    assert not again.config.mtp_tied
    for k, v in ours.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def test_stacked_expert_layout_is_accepted(tmp_path):
    """transformers' in-memory layout (experts.gate_up_proj [E, 2I, H]) loads like the per-expert one."""
    hf = tiny_moe()
    folder = tmp_path / "stacked"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf.config.to_dict()))
    save_file(
        {k: v.contiguous() for k, v in hf.state_dict().items()},
        str(folder / "model.safetensors"),
        metadata={"format": "pt"},
    )
    ours = load_hf(folder)
    x = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        assert rel_err(hf(x).logits, ours(x)) <= TOL


def test_bf16_load_keeps_routing_bias_fp32(tmp_path):
    ours = load_hf(save_tiny(tiny_moe(), tmp_path / "m"), dtype=torch.bfloat16)
    assert ours.dtype == torch.bfloat16
    assert all(m.gate.e_score_correction_bias.dtype == torch.float32 for m in ours.moe_layers())


def test_moe_errors_name_the_problem(tmp_path):
    folder = save_tiny(tiny_moe(), tmp_path / "m")
    t = load_file(str(folder / "model.safetensors"))
    del t["model.layers.2.mlp.experts.5.up_proj.weight"]
    t["model.layers.1.mlp.gate.weight"] = torch.zeros(7, 64)
    save_file(t, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(HFCheckpointError) as e:
        load_hf(folder)
    msg = str(e.value)
    assert "model.layers.2.mlp.experts.5.up_proj.weight" in msg and "missing" in msg
    assert "model.layers.1.mlp.gate.weight" in msg and "(7, 64)" in msg
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_experts_per_tok"] = 9
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HFCheckpointError, match="num_experts_per_tok=9"):
        load_hf(folder)
    cfg["num_experts_per_tok"], cfg["n_group"] = 2, 3
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HFCheckpointError, match="n_group=3"):
        load_hf(folder)


def test_models_hf_cannot_express_are_refused(tmp_path):
    with pytest.raises(HFCheckpointError, match="router='softmax'"):
        save_hf(Decoder(get_config("cpu-moe", num_hidden_layers=2, router="softmax")), tmp_path / "x")
    with pytest.raises(HFCheckpointError, match="rope_interleave=True"):
        save_hf(Decoder(get_config("cpu-moe", num_hidden_layers=2, rope_interleave=True)), tmp_path / "y")


def test_no_shared_expert_round_trips_through_transformers_and_mtp_model(tmp_path):
    """transformers writes an absent shared expert (n_shared_experts=0) as zero-size tensors: they load, and our
    files carry them too, so transformers' own classes — MtpModel included — load what save_hf wrote."""
    from transformers.modeling_layers import MtpModel
    from transformers.models.glm4_moe import modeling_glm4_moe

    hf = tiny_moe(n_shared_experts=0)
    folder = save_tiny(hf, tmp_path / "m")
    assert (
        load_file(str(folder / "model.safetensors"))["model.layers.1.mlp.shared_experts.gate_proj.weight"].numel() == 0
    )
    ours = load_hf(folder)
    assert ours.moe_layers()[0].shared_experts is None
    x = torch.randint(0, V, (2, 11))
    with torch.no_grad():
        assert rel_err(hf(x).logits, ours(x)) <= TOL
    mine = Decoder(
        get_config(
            "cpu-moe",
            vocab_size=V,
            num_hidden_layers=3,
            n_shared_experts=0,
            num_nextn_predict_layers=1,
            tie_word_embeddings=False,
        )
    ).eval()
    out = save_hf(mine, tmp_path / "out")
    stored = load_file(str(out / "model.safetensors"))
    assert tuple(stored["model.layers.3.mlp.shared_experts.down_proj.weight"].shape) == (128, 0)
    with pytest.MonkeyPatch.context() as mp:  # MtpModel finds layer N through these patterns (92/46 in real files)
        mp.setattr(
            modeling_glm4_moe.Glm4MoeForCausalLM, "_keys_to_ignore_on_load_unexpected", [r"model\.layers\.3\..*"]
        )
        main = transformers.Glm4MoeForCausalLM.from_pretrained(str(out)).eval()
        mtp = MtpModel.from_pretrained(main).eval()
    with torch.no_grad():
        hidden = main(x, output_hidden_states=True).hidden_states[-1]
        pos = torch.arange(1, x.shape[1])[None].expand(x.shape[0], -1)
        ref = mtp._project_to_logits(mtp.forward_layer(0, hidden[:, :-1], pos, None, input_ids=x[:, 1:]))
        assert rel_err(ref, mine.mtp_logits(x)) <= TOL
