"""Hugging Face interop for `glm4_moe` (GLM-4.5): tiny random checkpoints made by transformers load into
glmkit's GLMMoEModel and give transformers' logits (fp32, relative error <= 1e-4) for prefill and cached
decoding; the stored MTP layer loads, saves and matches transformers' own MtpModel; save_hf writes what
transformers loads; errors name the problem."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="HF parity tests need transformers>=5 (pip install 'transformers==5.23.0')")

from safetensors.torch import load_file, save_file  # noqa: E402

from glmkit.hf import HFCheckpointError, load_hf, save_hf  # noqa: E402
from glmkit.models.glm_moe import GLMMoEModel, get_config  # noqa: E402
from glmkit.sampling import generate  # noqa: E402
from glmkit.testing import rel_err  # noqa: E402
from hf_oracle import cached_decode_errors, save_tiny, sharpen_  # noqa: E402  (tests/hf_oracle.py)

TOL = 1e-4
V = 128


def tiny_hf(**overrides):
    """A random transformers Glm4MoeForCausalLM: hidden 64, 3 layers (1 dense + 2 MoE), 8 experts top-2 + 1
    shared, 4 query heads over 2 KV heads, QK-norm. Weights redrawn at unit fan-in scale (q/k ×2) and a
    random routing bias, so attention is sharp, positions matter and the bias changes the selection."""
    fields = dict(vocab_size=V, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
                  routed_scaling_factor=2.5, use_qk_norm=True, attention_bias=True, max_position_embeddings=256,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5},
                  pad_token_id=0, eos_token_id=[1, 2])
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
def test_prefill_logits_match(case, tmp_path):
    hf = tiny_hf(**CASES[case])
    ours = load_hf(save_tiny(hf, tmp_path / case))
    assert isinstance(ours, GLMMoEModel) and ours.config.rope_pairing == "half"
    assert ours.config.num_nextn_predict_layers == 0   # transformers does not write the MTP layer
    x = torch.randint(0, V, (3, 19))
    with torch.no_grad():
        err = rel_err(hf(x).logits, ours(x))
    assert err <= TOL, f"{case} prefill: rel err {err:.2e}"


@pytest.mark.parametrize("impl", ["loop", "triton"])
def test_prefill_matches_with_other_expert_paths(impl, tmp_path):
    """The readable loop and the Triton grouped GEMM (interpreter on CPU) give the same logits."""
    from glmkit import backend

    hf = tiny_hf()
    ours = load_hf(save_tiny(hf, tmp_path / "m"), moe_impl=impl)
    x = torch.randint(0, V, (2, 11))
    with torch.no_grad(), backend.audit() as a:
        err = rel_err(hf(x).logits, ours(x))
    assert err <= TOL, f"{impl}: rel err {err:.2e}"
    if impl == "triton":
        assert a.paths("moe_experts") == {"triton"}


def test_cached_decoding_matches(tmp_path):
    hf = tiny_hf()
    ours = load_hf(save_tiny(hf, tmp_path / "m"))
    errs = cached_decode_errors(hf, ours, torch.randint(0, V, (2, 16)), prefix=7)
    assert max(errs) <= TOL, f"cached decode: rel errs {[f'{e:.1e}' for e in errs]}"


def test_greedy_generation_matches_transformers(tmp_path):
    hf = tiny_hf()
    ours = load_hf(save_tiny(hf, tmp_path / "m"))
    prompt = torch.randint(3, V, (1, 6))
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert generate(ours, prompt, 10, stop_tokens=()).tokens[0] == ref[0, prompt.shape[1]:].tolist()


def test_round_trip_through_transformers(tmp_path):
    """glmkit → save_hf → transformers.from_pretrained: same logits; → load_hf: same weights."""
    torch.manual_seed(0)
    cfg = get_config("cpu-moe", vocab_size=V, n_layers=3, tie_word_embeddings=False, num_nextn_predict_layers=1,
                     n_group=2, topk_group=1, routed_scaling_factor=2.5)
    ours = GLMMoEModel(cfg).eval()
    with torch.no_grad():
        for m in ours.moe_layers():
            m.gate.e_score_correction_bias.normal_(0.0, 0.1)
    folder = save_hf(ours, tmp_path / "out")
    written = json.loads((folder / "config.json").read_text())
    assert written["model_type"] == "glm4_moe" and written["num_nextn_predict_layers"] == 1
    stored = load_file(str(folder / "model.safetensors"))
    assert "model.layers.3.mlp.experts.7.down_proj.weight" in stored          # per-expert, as zai-org stores
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
            t[dst + k[len(src):]] = torch.randn_like(v) / v.shape[-1] ** 0.5 if v.dim() >= 2 else 1 + 0.2 * torch.randn_like(v)
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

    hf = tiny_hf()
    folder = save_tiny(hf, tmp_path / "m")
    _add_mtp_layer(folder, 3, copies_equal=True)
    monkeypatch.setattr(modeling_glm4_moe.Glm4MoeForCausalLM, "_keys_to_ignore_on_load_unexpected",
                        [r"model\.layers\.3\..*"])
    main = transformers.Glm4MoeForCausalLM.from_pretrained(str(folder)).eval()
    mtp = MtpModel.from_pretrained(main).eval()
    ours = load_hf(folder)
    assert ours.config.num_nextn_predict_layers == 1 and ours.config.mtp_tied
    x = torch.randint(0, V, (2, 12))
    B, T = x.shape
    with torch.no_grad():
        hidden = main(x, output_hidden_states=True).hidden_states[-1]       # final-norm output
        assert rel_err(hidden, ours.hidden_states(x)) <= TOL
        pos = torch.arange(1, T)[None].expand(B, T - 1)
        h = mtp.forward_layer(0, hidden[:, :-1], pos, None, input_ids=x[:, 1:])
        ref = mtp._project_to_logits(h)
        err = rel_err(ref, ours.mtp_logits(x))
    assert err <= TOL, f"MTP logits: rel err {err:.2e}"


def test_mtp_copies_that_differ_are_kept(tmp_path):
    hf = tiny_hf()
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
    hf = tiny_hf()
    folder = tmp_path / "stacked"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf.config.to_dict()))
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    ours = load_hf(folder)
    x = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        assert rel_err(hf(x).logits, ours(x)) <= TOL


def test_bf16_load_keeps_routing_bias_fp32(tmp_path):
    ours = load_hf(save_tiny(tiny_hf(), tmp_path / "m"), dtype=torch.bfloat16)
    assert ours.dtype == torch.bfloat16
    assert all(m.gate.e_score_correction_bias.dtype == torch.float32 for m in ours.moe_layers())


def test_errors_name_the_problem(tmp_path):
    folder = save_tiny(tiny_hf(), tmp_path / "m")
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
        save_hf(GLMMoEModel(get_config("cpu-moe", n_layers=2, router="softmax")), tmp_path / "x")
    with pytest.raises(HFCheckpointError, match="rope_pairing='interleaved'"):
        save_hf(GLMMoEModel(get_config("cpu-moe", n_layers=2, rope_pairing="interleaved")), tmp_path / "y")
