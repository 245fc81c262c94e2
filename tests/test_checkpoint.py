"""Checkpoints: bitwise round trips (model, optimizer, RNG), the tied weight stored once, clear errors
that name what is wrong, and atomic saves (a crash mid-save leaves the previous checkpoint loadable)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import glmkit.checkpoint as ckpt
from glmkit.checkpoint import (latest_checkpoint, load_pretrained, load_training_state, save_pretrained,
                               save_training_state)
from glmkit.models import GLMConfig, GLMModel

CFG = GLMConfig(vocab_size=48, n_layers=2, n_heads=2, d_model=16, d_ff=32, max_seq_len=24)


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
    assert config["model_type"] == "glmkit_glm2021" and config["d_model"] == 16
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert "word_embeddings.weight" in keys and "lm_head.weight" not in keys
    assert json.loads(meta["aliases"]) == {"lm_head.weight": "word_embeddings.weight"}
    m2 = load_pretrained(tmp_path / "m")
    assert same_weights(m, m2)
    assert m2.lm_head.weight is m2.word_embeddings.weight  # re-tied, not two copies

    untied = GLMModel(GLMConfig(**{**CFG.to_dict(), "tie_word_embeddings": False}))
    save_pretrained(untied, tmp_path / "u")
    u2 = load_pretrained(tmp_path / "u")
    assert same_weights(untied, u2) and u2.lm_head.weight is not u2.word_embeddings.weight


def test_pretrained_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
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
    with pytest.raises(ValueError, match="model_type is 'llama', expected 'glmkit_glm2021'"):
        load_pretrained(d)
    (d / "config.json").write_text(json.dumps(cfg))

    tensors = load_file(str(d / "model.safetensors"))
    meta = {"format": "pt", "aliases": json.dumps({"lm_head.weight": "word_embeddings.weight"})}
    broken = dict(tensors)
    del broken["ln_f.weight"]
    broken["layers.0.attn.qkv.weight"] = torch.zeros(3, 3)
    broken["rotary.inv_freq"] = torch.zeros(4)
    save_file(broken, str(d / "model.safetensors"), metadata=meta)
    with pytest.raises(ValueError) as e:
        load_pretrained(d)
    msg = str(e.value)
    assert "missing from the file: ['ln_f.weight']" in msg
    assert "unexpected in the file: ['rotary.inv_freq']" in msg
    assert "layers.0.attn.qkv.weight: file (3, 3) vs model (48, 16)" in msg

    (d / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_pretrained(d)


def test_training_state_round_trip_is_bitwise(tmp_path):
    m, opt = trained_pair()
    torch.manual_seed(123)
    path = save_training_state(tmp_path, m, opt, step=7, extra={"seed": 3, "losses": [1.5, 0.25]})
    expected_draw = torch.rand(5)                     # what the RNG gives right after the save
    assert {p.name for p in path.iterdir()} == {"config.json", "model.safetensors", "optimizer.safetensors",
                                                "optimizer.json", "rng.safetensors", "trainer_state.json"}

    m2 = GLMModel(CFG)
    opt2 = torch.optim.AdamW(m2.parameters(), lr=5.0)
    torch.rand(100)                                   # move the RNG on; loading must restore it
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
    other = GLMModel(GLMConfig(**{**CFG.to_dict(), "n_layers": 3}))
    with pytest.raises(ValueError, match=r"different model config.*'n_layers': \(2, 3\)"):
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
    m2, opt2 = trained_pair(steps=3)                  # different weights, to save over the good ones

    # 1. Killed while writing the optimizer file (after the model files): the save raises.
    real_save_file = ckpt.save_file

    def dying_save_file(tensors, filename, metadata=None):
        if filename.endswith("optimizer.safetensors"):
            with open(filename, "wb") as f:
                f.write(b"\x00" * 10)                 # a half-written file
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

    save_training_state(tmp_path, m2, opt2, step=9)   # the next good save cleans the leftovers
    assert not leftover.exists() and latest_checkpoint(tmp_path).name == "step-00000009"
