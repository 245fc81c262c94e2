"""Hugging Face ``glm4_moe_lite`` (GLM-4.7-Flash: MLA + MoE) with transformers as the oracle: tiny random checkpoints
made by transformers load into the one Decoder (every layer the ``"mla"`` mixer) and give transformers' logits (fp32,
relative error <= 1e-4) for prefill, cached decoding through the latent cache, and greedy generation; both RoPE
pairings, q_lora_rank None (a plain q_proj), biases, a non-zero routing bias; save_hf writes what transformers loads
back; the MTP layer round-trips; errors name the problem."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="HF parity tests need transformers>=5.24")

from hf_oracle import cached_decode_errors, save_tiny, sharpen_  # noqa: E402  (tests/hf_oracle.py)
from safetensors.torch import load_file  # noqa: E402

from glmkit import backend  # noqa: E402
from glmkit.generate import generate  # noqa: E402
from glmkit.hf import HFCheckpointError, load_hf, save_hf  # noqa: E402
from glmkit.mixers.mla import MLA, MLAState  # noqa: E402
from glmkit.models.decoder import Decoder  # noqa: E402
from glmkit.models.presets import get_config  # noqa: E402
from glmkit.testing import rel_err  # noqa: E402

TOL = 1e-4
V = 128


def tiny_lite(**overrides):
    """A random transformers Glm4MoeLiteForCausalLM: hidden 64, 3 layers (1 dense + 2 MoE), 8 experts top-2 + 1
    shared, 4 heads; MLA with q_lora 32, kv_lora 32, q·k head 24 + 8, v head 16 (q·k and v differ). Weights redrawn
    at unit fan-in scale and a random routing bias, so attention is sharp, positions matter and the bias changes
    the experts chosen."""
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
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        routed_scaling_factor=1.8,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4},
        pad_token_id=0,
        eos_token_id=[1, 2],
    )
    fields.update(overrides)
    model = sharpen_(transformers.Glm4MoeLiteForCausalLM(transformers.Glm4MoeLiteConfig(**fields)).eval())
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.3)
    return model


CASES = {
    "interleaved": {},
    "half_split": dict(rope_interleave=False),
    "no_q_lora_with_bias": dict(q_lora_rank=None, attention_bias=True),
    "grouped_routing_two_dense": dict(n_group=4, topk_group=2, mlp_layer_types=["dense", "dense", "sparse"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_prefill_logits_match(case, tmp_path):
    hf = tiny_lite(**CASES[case])
    ours = load_hf(save_tiny(hf, tmp_path / case))
    cfg = ours.config
    assert cfg.layer_types == ["mla"] * 3 and all(isinstance(layer.mixer, MLA) for layer in ours.layers)
    assert cfg.rope_interleave == CASES[case].get("rope_interleave", True)
    assert cfg.opt("q_lora_rank") == CASES[case].get("q_lora_rank", 32) and cfg.head_dim == 32
    x = torch.randint(0, V, (3, 19))
    with torch.no_grad():
        err = rel_err(hf(x).logits, ours(x))
    assert err <= TOL, f"{case} prefill: rel err {err:.2e}"


def test_the_routing_bias_and_the_pairing_matter(tmp_path):
    """The checks above can fail: zeroing the routing bias, or loading with the other RoPE pairing, moves the
    logits far beyond the tolerance."""
    hf = tiny_lite()
    path = save_tiny(hf, tmp_path / "m")
    x = torch.randint(0, V, (2, 24))
    with torch.no_grad():
        ref = hf(x).logits
        wrong_pairing = rel_err(ref, load_hf(path, rope_interleave=False)(x))
        no_bias = load_hf(path)
        for m in no_bias.moe_layers():
            m.gate.e_score_correction_bias.zero_()
        wrong_bias = rel_err(ref, no_bias(x))
    assert wrong_pairing > 0.05 and wrong_bias > 0.05, (wrong_pairing, wrong_bias)


@pytest.mark.parametrize("case", ["interleaved", "half_split"])
def test_cached_decoding_through_the_latent_cache(case, tmp_path):
    hf = tiny_lite(**CASES[case])
    ours = load_hf(save_tiny(hf, tmp_path / case))
    errs = cached_decode_errors(hf, ours, torch.randint(0, V, (2, 16)), prefix=7)
    assert max(errs) <= TOL, f"cached decode: rel errs {[f'{e:.1e}' for e in errs]}"
    cache = ours.new_cache(2, 32)
    assert {type(s) for s in cache.layers} == {MLAState}
    assert cache.nbytes == 3 * 2 * 32 * (32 + 8) * 4  # layers · B · T_max · (kv_lora + rope) · fp32 bytes


def test_absorbed_decode_on_the_kernel_path(tmp_path):
    """Forced to "triton" on CPU: the decode steps run the absorbed kernel (interpreter) and still match."""
    hf = tiny_lite()
    ours = load_hf(save_tiny(hf, tmp_path / "m"))
    with backend.use_backend("triton"), backend.audit() as a:
        errs = cached_decode_errors(hf, ours, torch.randint(0, V, (2, 11)), prefix=6)
    assert max(errs) <= TOL, errs
    assert a.paths("mla_decode") == {"triton"}


def test_greedy_generation_matches_transformers(tmp_path):
    hf = tiny_lite()
    ours = load_hf(save_tiny(hf, tmp_path / "g"))
    prompt = torch.randint(3, V, (1, 6))
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert generate(ours, prompt, 10, stop_tokens=()).tokens[0] == ref[0, prompt.shape[1] :].tolist()


def test_round_trip_through_transformers(tmp_path):
    """glmkit (cpu-mla, with an MTP layer) → save_hf → transformers: same logits; → load_hf: same weights and the
    MTP layer back."""
    torch.manual_seed(0)
    cfg = get_config("cpu-mla", vocab_size=V, num_hidden_layers=3, num_nextn_predict_layers=1, rope_interleave=False)
    ours = Decoder(cfg).eval()
    with torch.no_grad():
        for m in ours.moe_layers():
            m.gate.e_score_correction_bias.normal_(0.0, 0.1)
    folder = save_hf(ours, tmp_path / "out")
    written = json.loads((folder / "config.json").read_text())
    assert written["model_type"] == "glm4_moe_lite" and not written["rope_interleave"]
    assert written["rope_parameters"]["partial_rotary_factor"] == 1.0 and "head_dim" not in written
    stored = load_file(str(folder / "model.safetensors"))
    assert "model.layers.1.self_attn.kv_b_proj.weight" in stored and "model.layers.3.eh_proj.weight" in stored
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    assert type(hf).__name__ == "Glm4MoeLiteForCausalLM"
    x = torch.randint(0, V, (2, 13))
    with torch.no_grad():
        assert rel_err(hf(x).logits, ours(x)) <= TOL
    back = load_hf(folder)
    assert back.config.num_nextn_predict_layers == 1 and back.config.mtp_layer_type == "mla"
    theirs = back.state_dict()
    for k, v in ours.state_dict().items():
        assert torch.equal(v, theirs[k]), k
    with torch.no_grad():
        assert torch.equal(back.mtp_logits(x), ours.mtp_logits(x))


def test_errors_name_the_problem(tmp_path):
    folder = save_tiny(tiny_lite(), tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    for change, match in (
        (dict(num_key_value_heads=2), "num_key_value_heads=2 must equal num_attention_heads=4"),
        (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}), "partial"),
        (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}), "rope_type='yarn'"),
        (dict(kv_lora_rank=None), "kv_lora_rank=None must be a positive int"),
    ):
        (folder / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(HFCheckpointError, match=match):
            load_hf(folder)
    (folder / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "v_head_dim"}))
    with pytest.raises(HFCheckpointError, match=r"lacks required fields \['v_head_dim'\]"):
        load_hf(folder)
    (folder / "config.json").write_text(json.dumps({**cfg, "v_head_dim": 8}))
    with pytest.raises(
        HFCheckpointError, match=r"kv_b_proj.weight: checkpoint \(160, 32\), config expects \(128, 32\)"
    ):
        load_hf(folder)
    mixed = get_config("cpu-mla", num_hidden_layers=2, layer_types=["mla", "attention"])
    with pytest.raises(HFCheckpointError, match="glm4_moe_lite needs"):
        save_hf(Decoder(mixed), tmp_path / "x")
