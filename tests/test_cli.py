"""glmkit.cli: ``python -m glmkit train CONFIG`` (TOML or JSON, on the Python-source corpus of a small stdlib package,
resumed where it stopped) and ``python -m glmkit generate CHECKPOINT``; config errors named. Data parallel runs of the
same command: tests/test_distributed.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("tokenizers")

from glmkit.cli import check_config, find_tokenizer, run_generate, run_train  # noqa: E402
from glmkit.data.hf_tokenizer import HFTokenizer  # noqa: E402
from glmkit.data.python_corpus import stdlib_root  # noqa: E402
from glmkit.data.tokenizer import ByteTokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOML = """
out_dir = "{out}"
preset = "cpu-small"

[model]
num_hidden_layers = 1
max_position_embeddings = 64
hc_mult = 2

[data]
corpus = "python"
root = "{root}"
vocab_size = 320

[train]
steps = {steps}
batch_size = 4
seq_len = 32
ckpt_every = 3
eval_every = 3
eval_batches = 1
"""


def _env(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLMKIT_CACHE": str(tmp_path / "cache")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)  # glmkit from here
    return env


def _cli(tmp_path, *args, timeout=240):
    return subprocess.run(
        [sys.executable, "-m", "glmkit", *args], env=_env(tmp_path), capture_output=True, text=True, timeout=timeout
    )


def test_train_resume_and_generate(tmp_path, monkeypatch):
    monkeypatch.setenv("GLMKIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    cfg = tmp_path / "run.toml"
    cfg.write_text(TOML.format(out=out, root=stdlib_root() / "json", steps=6))
    done = _cli(tmp_path, "train", str(cfg), "--max-steps", "3")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "train: 100%" not in done.stderr and "step 3: loss" in done.stderr  # stopped at 3 of 6, with a bar
    assert (out / "latest").read_text().strip() == "step-00000003"
    run = json.loads((out / "run.json").read_text())
    assert run["model"]["vocab_size"] == 320 and run["model"]["hc_mult"] == 2 and run["train"]["steps"] == 6
    tok = find_tokenizer(out / "step-00000003")
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == 320
    assert run["model"]["eos_token_id"] == [tok.eos_token_id] == [tok.token_to_id("<|endoftext|>")]

    history = run_train(cfg, progress=False)  # resumes at 3
    assert history.resumed_from == 3 and history.steps == [1, 2, 3, 4, 5, 6] and history.eval_steps == [3, 6]

    a = run_generate(out, ["def ", "import"], max_new_tokens=6, temperature=0.0, device="cpu")
    b = run_generate(out / "step-00000006", ["def ", "import"], max_new_tokens=6, temperature=0.0, device="cpu")
    assert a == b and len(a) == 2 and all(isinstance(t, str) for t in a)
    shown = _cli(tmp_path, "generate", str(out), "--prompt", "def ", "--max-new-tokens", "4", "--seed", "3")
    assert shown.returncode == 0 and shown.stdout.startswith("def "), shown.stderr[-3000:]


def test_json_config_on_a_byte_corpus(tmp_path):
    out = tmp_path / "bytes"
    config = {
        "out_dir": str(out),
        "preset": "cpu-small",
        "model": {"num_hidden_layers": 1},
        "data": {"corpus": "stories"},
        "train": {"steps": 2, "batch_size": 2, "seq_len": 16},
    }
    history = run_train(config, progress=False)
    assert history.steps == [1, 2]
    assert isinstance(find_tokenizer(out), ByteTokenizer)
    assert len(run_generate(out, ["Anna has"], max_new_tokens=3, device="cpu")[0]) > 0


@pytest.mark.parametrize(
    "change, match",
    [
        ({"epochs": 3}, "unknown keys"),
        ({"out_dir": None}, "out_dir"),
        ({"parallel": "tensor"}, "parallel"),
        ({"device": "tpu"}, "device"),
        ({"data": {"corpus": "python", "tokens": 1}}, "unknown \\[data\\]"),
        ({"preset": None, "model": {}}, "preset"),
        ({"train": "fast"}, "\\[train\\]"),
    ],
)
def test_config_errors_are_named(change, match):
    raw = {"out_dir": "x", "preset": "cpu-small", "data": {"corpus": "stories"}}
    raw.update(change)
    raw = {k: v for k, v in raw.items() if v is not None}
    with pytest.raises(ValueError, match=match):
        check_config(raw)


def test_config_errors_found_when_building(tmp_path):
    base = {"out_dir": str(tmp_path / "x"), "preset": "cpu-small", "train": {"steps": 1, "batch_size": 1}}
    with pytest.raises(ValueError, match="byte-level"):
        run_train({**base, "data": {"corpus": "stories", "vocab_size": 300}})
    with pytest.raises(ValueError, match="corpus"):
        run_train({**base, "data": {"corpus": "wikipedia"}})
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        run_train({**base, "data": {"corpus": "stories"}, "model": {"vocab_size": 100}})
    with pytest.raises(ValueError, match="TrainConfig"):
        run_train({**base, "data": {"corpus": "stories"}, "train": {"stepz": 1}})
    with pytest.raises(FileNotFoundError):
        find_tokenizer(tmp_path)


def test_main_lists_the_commands():
    from glmkit.__main__ import _parser

    text = _parser().format_help()
    assert all(c in text for c in ("doctor", "grade", "train", "generate"))


# ---- the capstone's configs (configs/capstone_*.toml) and --time-budget --------------------------------------------
def test_capstone_cpu_config_trains_and_generates_from_the_command_line(tmp_path):
    """configs/capstone_cpu.toml as lesson 09 runs it (its out_dir relative to the working directory), stopped after 2
    steps, then sampled; the corpus is the shared cache's (built on first use)."""
    env = {k: v for k, v in _env(tmp_path).items() if k != "GLMKIT_CACHE"}
    if "GLMKIT_CACHE" in os.environ:
        env["GLMKIT_CACHE"] = os.environ["GLMKIT_CACHE"]
    run = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "glmkit", *a], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    done = run("train", str(REPO / "configs" / "capstone_cpu.toml"), "--max-steps", "2", "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "runs" / "capstone-cpu"
    saved = json.loads((out / "run.json").read_text())
    assert saved["preset"] == "cpu-capstone" and saved["model"]["vocab_size"] == 8192
    assert saved["model"]["layer_types"] == ["kda", "kda", "kda", "dsa"] and saved["model"]["hc_mult"] == 4
    history = json.loads((out / "history.json").read_text())
    assert history["steps"] == [1, 2] and {"mtp", "dsa_indexer"} <= set(history["aux"])
    assert "dsa_recall" in history["stats"] and len(history["expert_loads"]) == 1  # the last step's snapshot
    shown = run("generate", str(out), "--prompt", "def ", "--max-new-tokens", "5", "--temperature", "0")
    assert shown.returncode == 0 and shown.stdout.startswith("def "), shown.stderr[-3000:]


def test_capstone_h200_config_resolves_to_the_capstone_preset():
    from glmkit.cli import _model_config, read_config
    from glmkit.models.presets import get_config
    from glmkit.train import TrainConfig

    raw = read_config(REPO / "configs" / "capstone_h200.toml")
    assert raw["preset"] == "capstone" and raw["device"] == "cuda"
    assert raw["data"] == {"corpus": "python", "vocab_size": 8192}
    cfg = _model_config(raw, 8192, eos_id=3)
    assert cfg == get_config("capstone", eos_token_id=[3], pad_token_id=3)
    train = TrainConfig.from_dict(raw["train"])
    assert train.seq_len == 1024 > cfg.opt("index_topk") and train.seq_len <= cfg.max_position_embeddings
    assert cfg.num_nextn_predict_layers == 1 and train.mtp_weight > 0 and train.eval_every > 0 and train.ckpt_every > 0
    cpu = read_config(REPO / "configs" / "capstone_cpu.toml")
    cpu_train = TrainConfig.from_dict(cpu["train"])
    assert cpu["preset"] == "cpu-capstone" and cpu_train.seq_len > get_config("cpu-capstone").opt("index_topk")


def test_time_budget_fits_the_schedule(tmp_path):
    """--time-budget: after 13 steps the schedule is cut to what fits, so the run ends (checkpointed, history.json
    written) with its cosine finished, long before the configured 5000 steps."""
    from glmkit.checkpoint import latest_checkpoint
    from glmkit.cli import FIT_AFTER, FIT_STEPS

    out = tmp_path / "budget"
    config = {
        "out_dir": str(out),
        "preset": "cpu-small",
        "device": "cpu",
        "model": {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2},
        "data": {"corpus": "stories"},
        "train": {"steps": 5000, "batch_size": 1, "seq_len": 8, "warmup_steps": 2, "ckpt_every": 0},
    }
    with pytest.raises(ValueError, match="time_budget"):
        run_train(config, progress=False, time_budget=0)
    history = run_train(config, progress=False, time_budget=4.0)
    last = history.steps[-1]
    assert FIT_AFTER + FIT_STEPS + 1 <= last < 5000 and history.elapsed_s < 8.0
    assert json.loads((out / "history.json").read_text())["steps"] == history.steps
    saved = json.loads((latest_checkpoint(out) / "trainer_state.json").read_text())
    fitted = saved["extra"]["train_config"]["steps"]
    assert saved["step"] == last <= fitted < 5000  # the checkpoint records the shortened schedule
    if fitted == last:  # stopped where the fitted schedule ends (not by the clock): the cosine reached its floor
        assert history.lrs[-1] < 0.15 * max(history.lrs)
