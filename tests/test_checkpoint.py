"""Checkpoints: bitwise round trips (model, optimizer, RNG), the tied weight stored once, clear errors
that name what is wrong, and atomic saves (a crash mid-save leaves the previous checkpoint loadable)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import glmkit.checkpoint as ckpt
from glmkit.checkpoint import (
    latest_checkpoint,
    load_pretrained,
    load_training_state,
    save_pretrained,
    save_training_state,
)
from glmkit.models.decoder import Decoder
from glmkit.models.glm2021 import GLMConfig, GLMModel
from glmkit.models.presets import get_config

CFG = GLMConfig(
    vocab_size=48,
    num_hidden_layers=2,
    num_attention_heads=2,
    hidden_size=16,
    intermediate_size=32,
    max_position_embeddings=24,
)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def trained_pair(cfg: GLMConfig = CFG, steps: int = 2):
    """A model and its AdamW after a few steps (so the moments are non-zero)."""
    m = GLMModel(cfg)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for _ in range(steps):
        ids = torch.randint(0, cfg.vocab_size, (2, 9))
        m(ids, None, torch.tensor([4, 9])).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return m, opt


def test_pretrained_round_trip_is_bitwise_and_stores_the_tied_weight_once(tmp_path):
    m, _ = trained_pair()
    save_pretrained(m, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "glmkit_glm2021" and config["hidden_size"] == 16
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert "embed_tokens.weight" in keys and "lm_head.weight" not in keys
    assert json.loads(meta["aliases"]) == {"lm_head.weight": "embed_tokens.weight"}
    m2 = load_pretrained(tmp_path / "m")
    assert same_weights(m, m2)
    assert m2.lm_head.weight is m2.embed_tokens.weight  # re-tied, not two copies

    untied = GLMModel(GLMConfig(**{**CFG.to_dict(), "tie_word_embeddings": False}))
    save_pretrained(untied, tmp_path / "u")
    u2 = load_pretrained(tmp_path / "u")
    assert same_weights(untied, u2) and u2.lm_head.weight is not u2.embed_tokens.weight


def test_decoder_round_trip_keeps_the_routing_bias_and_the_mtp_layer(tmp_path):
    m = Decoder(get_config("cpu-moe", num_hidden_layers=2, num_nextn_predict_layers=1))
    with torch.no_grad():
        m.moe_layers()[0].gate.e_score_correction_bias.normal_()
    save_pretrained(m, tmp_path / "moe")
    m2 = load_pretrained(tmp_path / "moe")
    assert type(m2) is Decoder and m2.config == m.config and same_weights(m, m2)
    assert m2.mtp[0].embed_tokens.weight is m2.embed_tokens.weight


def test_pretrained_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_pretrained(tmp_path / "empty")
    m = GLMModel(CFG)
    d = save_pretrained(m, tmp_path / "m")
    (d / "model.safetensors").rename(d / "moved.safetensors")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_pretrained(d)
    (d / "moved.safetensors").rename(d / "model.safetensors")

    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type is 'llama', expected one of"):
        load_pretrained(d)
    (d / "config.json").write_text(json.dumps(cfg))

    tensors = load_file(str(d / "model.safetensors"))
    meta = {"format": "pt", "aliases": json.dumps({"lm_head.weight": "embed_tokens.weight"})}
    broken = dict(tensors)
    del broken["final_norm.weight"]
    broken["layers.0.mixer.qkv_proj.weight"] = torch.zeros(3, 3)
    broken["rotary.inv_freq"] = torch.zeros(4)
    save_file(broken, str(d / "model.safetensors"), metadata=meta)
    with pytest.raises(ValueError) as e:
        load_pretrained(d)
    msg = str(e.value)
    assert "missing from the file: ['final_norm.weight']" in msg
    assert "unexpected in the file: ['rotary.inv_freq']" in msg
    assert "layers.0.mixer.qkv_proj.weight: file (3, 3) vs model (48, 16)" in msg

    (d / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_pretrained(d)


def test_training_state_round_trip_is_bitwise(tmp_path):
    m, opt = trained_pair()
    torch.manual_seed(123)
    path = save_training_state(tmp_path, m, opt, step=7, extra={"seed": 3, "losses": [1.5, 0.25]})
    expected_draw = torch.rand(5)  # what the RNG gives right after the save
    assert {p.name for p in path.iterdir()} == {
        "config.json",
        "model.safetensors",
        "optimizer.safetensors",
        "optimizer.json",
        "rng.safetensors",
        "trainer_state.json",
    }

    m2 = GLMModel(CFG)
    opt2 = torch.optim.AdamW(m2.parameters(), lr=5.0)
    torch.rand(100)  # move the RNG on; loading must restore it
    state = load_training_state(tmp_path, m2, opt2)
    assert state.step == 7 and state.extra == {"seed": 3, "losses": [1.5, 0.25]} and state.path == path
    assert same_weights(m, m2)
    assert torch.equal(torch.rand(5), expected_draw)
    sd, sd2 = opt.state_dict(), opt2.state_dict()
    assert sd["param_groups"] == sd2["param_groups"]
    assert sd["state"].keys() == sd2["state"].keys()
    for i in sd["state"]:
        for k, v in sd["state"][i].items():
            assert torch.equal(v, sd2["state"][i][k]) and v.dtype == sd2["state"][i][k].dtype, (i, k)

    # The checkpoint folder is a model folder; a training folder loads its latest checkpoint.
    assert same_weights(m, load_pretrained(path)) and same_weights(m, load_pretrained(tmp_path))


def test_training_state_errors(tmp_path):
    m, opt = trained_pair()
    assert load_training_state(tmp_path / "none", m) is None
    save_training_state(tmp_path, m, opt, step=1)
    other = GLMModel(GLMConfig(**{**CFG.to_dict(), "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match=r"different model config.*'num_hidden_layers': \(2, 3\)"):
        load_training_state(tmp_path, other)
    with pytest.raises(ValueError, match="step must be a non-negative int"):
        save_training_state(tmp_path, m, opt, step=-1)
    with pytest.raises(TypeError, match="JSON-serialisable"):
        save_training_state(tmp_path, m, opt, step=2, extra={"t": torch.zeros(1)})
    assert latest_checkpoint(tmp_path).name == "step-00000001"  # the failed save left nothing behind


def test_keeps_only_the_newest_checkpoints(tmp_path):
    m, opt = trained_pair()
    for step in (10, 20, 30, 40):
        save_training_state(tmp_path, m, opt, step=step, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000030", "step-00000040"]
    assert latest_checkpoint(tmp_path).name == "step-00000040"


def test_a_crash_mid_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    m, opt = trained_pair()
    save_training_state(tmp_path, m, opt, step=5)
    good = {k: v.clone() for k, v in m.state_dict().items()}
    m2, opt2 = trained_pair(steps=3)  # different weights, to save over the good ones

    # 1. Killed while writing the optimizer file (after the model files): the save raises.
    real_save_file = ckpt.save_file

    def dying_save_file(tensors, filename, metadata=None):
        if filename.endswith("optimizer.safetensors"):
            with open(filename, "wb") as f:
                f.write(b"\x00" * 10)  # a half-written file
            raise KeyboardInterrupt("killed mid-save")
        return real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", dying_save_file)
    with pytest.raises(KeyboardInterrupt):
        save_training_state(tmp_path, m2, opt2, step=6)
    monkeypatch.setattr(ckpt, "save_file", real_save_file)

    # 2. A hard kill (no cleanup runs) leaves a temporary folder behind: simulate one.
    leftover = tmp_path / ".tmp-step-00000007-99999"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"\x00" * 7)

    # 3. Killed after the new folder was renamed into place but before the pointer moved.
    def dying_pointer(path, text):
        raise KeyboardInterrupt("killed before the pointer update")

    monkeypatch.setattr(ckpt, "_atomic_write_text", dying_pointer)
    with pytest.raises(KeyboardInterrupt):
        save_training_state(tmp_path, m2, opt2, step=8)
    monkeypatch.undo()
    assert (tmp_path / "latest").read_text().strip() == "step-00000005"

    fresh = GLMModel(CFG)
    state = load_training_state(tmp_path, fresh, torch.optim.AdamW(fresh.parameters()))
    assert state.step == 5
    assert all(torch.equal(good[k], v) for k, v in fresh.state_dict().items())
    assert not (tmp_path / "step-00000006").exists()

    save_training_state(tmp_path, m2, opt2, step=9)  # the next good save cleans the leftovers
    assert not leftover.exists() and latest_checkpoint(tmp_path).name == "step-00000009"


# -- folders written by glmkit 0.1 --------------------------------------------------------------------------
# glmkit 0.1's names, written down here independently of the converter: (new name piece, old name piece).
_OLD_GLM2021 = [
    ("embed_tokens", "word_embeddings"),
    ("block_pos_embed", "block_position_embeddings"),
    ("pos_embed", "position_embeddings"),
    (".input_norm.", ".ln1."),
    (".pre_mlp_norm.", ".ln2."),
    ("final_norm.", "ln_f."),
    (".mixer.qkv_proj.", ".attn.qkv."),
    (".mixer.o_proj.", ".attn.proj."),
    (".mlp.up_proj.", ".mlp.fc1."),
    (".mlp.down_proj.", ".mlp.fc2."),
]


def _old_folder(folder, config: dict, tensors: dict, model_type: str):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": model_type, **config}))
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        str(folder / "model.safetensors"),
        metadata={"format": "pt", "model_type": model_type, "aliases": "{}"},
    )


def test_glmkit_0_1_folders_load_with_the_same_outputs(tmp_path):
    x = torch.randint(0, 48, (2, 9))
    glm = GLMModel(CFG).eval()
    old = {}
    for name, t in glm.state_dict().items():
        if name == "lm_head.weight":
            continue
        for new, was in _OLD_GLM2021:
            name = name.replace(new, was)
        old[name] = t
    _old_folder(
        tmp_path / "g",
        {
            "vocab_size": 48,
            "n_layers": 2,
            "n_heads": 2,
            "d_model": 16,
            "d_ff": 32,
            "max_seq_len": 24,
            "dropout": 0.0,
            "layernorm_eps": 1e-5,
            "init_std": 0.02,
            "tie_word_embeddings": True,
        },
        old,
        "glmkit_glm2021",
    )
    with torch.no_grad():
        assert torch.equal(load_pretrained(tmp_path / "g").eval()(x), glm(x))

    dense = Decoder(get_config("cpu-moe", num_hidden_layers=2, vocab_size=48)).eval()
    old = {}
    for name, t in dense.state_dict().items():
        name = name.replace(".mixer.", ".attn.").replace("post_mixer_norm", "post_attn_norm")
        if name.endswith("shared_experts.gate_up_proj.weight"):  # 0.1 kept the shared expert's gate and up apart
            gate, up = t.chunk(2)
            old[name.replace("gate_up_proj", "gate_proj")], old[name.replace("gate_up_proj", "up_proj")] = gate, up
        elif name != "lm_head.weight":
            old[name] = t
    c = dense.config
    _old_folder(
        tmp_path / "d",
        {
            "vocab_size": 48,
            "hidden_size": c.hidden_size,
            "n_layers": 2,
            "n_heads": 4,
            "n_kv_heads": 2,
            "head_dim": 32,
            "intermediate_size": c.intermediate_size,
            "max_seq_len": 256,
            "qkv_bias": True,
            "qk_norm": True,
            "position": "rope",
            "partial_rotary_factor": 0.5,
            "rope_pairing": "half",
            "rope_theta": 1e6,
            "block": "pre",
            "norm": "rmsnorm",
            "activation": "swiglu",
            "tie_word_embeddings": True,
            "n_routed_experts": 8,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 128,
            "n_shared_experts": 1,
            "first_k_dense_replace": 1,
        },
        old,
        "glmkit_glm_moe",
    )
    with torch.no_grad():
        assert torch.equal(load_pretrained(tmp_path / "d").eval()(x), dense(x))


def test_glmkit_0_1_folders_without_an_equivalent_say_so(tmp_path):
    _old_folder(
        tmp_path / "deep",
        {
            "vocab_size": 48,
            "hidden_size": 16,
            "n_layers": 1,
            "n_heads": 2,
            "intermediate_size": 32,
            "block": "deepnorm",
            "norm": "layernorm",
        },
        {},
        "glmkit_glm_dense",
    )
    with pytest.raises(ValueError, match="DeepNorm.*retrain"):
        load_pretrained(tmp_path / "deep")
    m, opt = trained_pair()
    path = save_training_state(tmp_path / "run", m, opt, step=3)
    state = json.loads((path / "trainer_state.json").read_text())
    (path / "trainer_state.json").write_text(json.dumps({**state, "model_type": "glmkit_glm_dense"}))
    with pytest.raises(ValueError, match="glmkit 0.1 training checkpoint.*load_pretrained"):
        load_training_state(tmp_path / "run", m, opt)
