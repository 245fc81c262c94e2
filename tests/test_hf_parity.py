"""Hugging Face interop: tiny random `glm` and `glm4` checkpoints made by transformers load into glmkit and
give transformers' logits (fp32, relative error <= 1e-4) for prefill and for cached decoding; save_hf
writes checkpoints transformers loads back; sharded checkpoints; clear errors; the wrong RoPE pairing."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="HF parity tests need transformers>=5 (pip install 'transformers==5.23.0')")

from glmkit.hf import HFCheckpointError, load_hf, save_hf  # noqa: E402
from glmkit.models.glm_dense import GLMDenseModel, get_config  # noqa: E402
from glmkit.testing import rel_err  # noqa: E402
from hf_oracle import cached_decode_errors, save_tiny, sharpen_  # noqa: E402  (tests/hf_oracle.py)

TOL = 1e-4
KINDS = {"glm": ("GlmConfig", "GlmForCausalLM"), "glm4": ("Glm4Config", "Glm4ForCausalLM")}


def tiny_hf(kind: str, **overrides):
    """A random transformers model: hidden 64, 2 layers, vocab 128, 4 query heads sharing 2 KV heads.
    Weights are redrawn with unit-scale fan-in init (q/k ×2) so attention is sharp and positions matter —
    with the default 0.02 init every check would pass on an almost position-blind model."""
    cfg_cls, model_cls = (getattr(transformers, n) for n in KINDS[kind])
    fields = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-5,
                  pad_token_id=0, eos_token_id=[1, 2])
    fields.update(overrides)
    return sharpen_(model_cls(cfg_cls(**fields)).eval())


@pytest.mark.parametrize("kind", list(KINDS))
def test_prefill_logits_match(kind, tmp_path):
    hf = tiny_hf(kind)
    ours = load_hf(save_tiny(hf, tmp_path / kind))
    assert ours.config.block == ("sandwich" if kind == "glm4" else "pre")
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
    ours = GLMDenseModel(get_config("cpu-small", n_layers=2, vocab_size=128, block="sandwich" if kind == "glm4" else "pre",
                                    tie_word_embeddings=False)).eval()
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
        wrong = rel_err(ref, load_hf(path, rope_pairing="half")(x))
        full = rel_err(ref, load_hf(path, partial_rotary_factor=1.0)(x))
    assert right <= TOL
    assert wrong > 0.2 and full > 0.2, (wrong, full)   # measured ≈0.85 and ≈0.67


# -- errors --------------------------------------------------------------------------------------------
def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_unsupported_model_type(tmp_path):
    path = save_tiny(tiny_hf("glm4"), tmp_path / "m")
    _edit_config(path, model_type="glm_moe_dsa")
    with pytest.raises(HFCheckpointError, match=r"unsupported model_type 'glm_moe_dsa'.*'glm', 'glm4', 'glm4_moe'"):
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
    assert "missing 1 tensors: model.layers.1.self_attn.k_proj.bias (32,)" in msg
    assert "model.layers.0.extra.weight (3,)" in msg
    assert "model.layers.0.mlp.down_proj.weight: checkpoint (64, 95), config expects (64, 96)" in msg


def test_config_that_contradicts_itself(tmp_path):
    path = save_tiny(tiny_hf("glm"), tmp_path / "m")
    _edit_config(path, num_key_value_heads=3)
    with pytest.raises(HFCheckpointError, match="contradicts itself.*n_kv_heads=3 does not divide n_heads=4"):
        load_hf(path)
    _edit_config(path, num_key_value_heads=2, head_dim=None, hidden_size=66)
    with pytest.raises(HFCheckpointError, match="does not divide hidden_size"):
        load_hf(path)


def test_missing_files_and_unsavable_models(tmp_path):
    with pytest.raises(HFCheckpointError, match="no config.json"):
        load_hf(tmp_path)
    path = save_tiny(tiny_hf("glm"), tmp_path / "m")
    (path / "model.safetensors").unlink()
    with pytest.raises(HFCheckpointError, match="no model.safetensors"):
        load_hf(path)
    model = GLMDenseModel(get_config("cpu-small", n_layers=1, rope_pairing="half", qk_norm=True))
    with pytest.raises(HFCheckpointError, match="rope_pairing='half'.*qk_norm=True"):
        save_hf(model, tmp_path / "x")


def test_greedy_generation_matches_transformers(tmp_path):
    from glmkit.sampling import generate

    hf = tiny_hf("glm4")
    ours = load_hf(save_tiny(hf, tmp_path / "g"))
    prompt = torch.randint(3, 128, (1, 6))
    ref = hf.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 6:].tolist()
    assert generate(ours, prompt, 8, stop_tokens=()).tokens[0] == ref
