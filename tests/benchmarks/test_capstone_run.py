"""benchmarks/capstone_h200.py, the capstone's H200 training run, checked on a CPU (``--smoke``:
configs/capstone_cpu.toml on the stdlib's json package with a 320-token BPE, 3 steps): every stage runs through
``python -m glmkit train`` / ``generate``, and the bundle holds what benchmarks/README.md (capstone section) says,
without weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("tokenizers")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]


def test_capstone_run_smoke(tmp_path):
    out, work = tmp_path / "bundle", tmp_path / "work"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "GLMKIT_CACHE": str(tmp_path / "cache")}
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "capstone_h200.py"),
        "--smoke",
        "--out",
        str(out),
        "--work",
        str(work),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert sorted(p.name for p in out.iterdir()) == [
        "export_parity.txt",
        "history.json",
        "run.json",
        "samples.txt",
        "train.log",
    ]
    run = json.loads((out / "run.json").read_text())
    assert run["smoke"] and run["errors"] == {} and run["run_config"]["preset"] == "cpu-capstone"
    assert run["train"]["steps"] == 3 and run["train"]["tokens"] == 3 * 2 * 80
    assert set(run["acceptance"]) == {"1", "2"} and len(run["acceptance"]["2"]["acceptance"]) == 2
    assert {(r["batch"], r["draft_tokens"]) for r in run["decode"]} == {(b, n) for b in (1, 2) for n in (0, 1, 2)}
    assert all(r["identical"] for r in run["decode"] if r["draft_tokens"])  # greedy speculation = plain decoding
    parity = run["export_parity"]
    assert parity["torch path"]["rel_err"] < 1e-4 and parity["greedy_tokens_equal"]
    history = json.loads((out / "history.json").read_text())
    assert history["steps"] == [1, 2, 3] and "dsa_recall" in history["stats"] and history["expert_loads"]
    samples = (out / "samples.txt").read_text()
    assert samples.count("def fibonacci(n):") == 2 and "temperature 0.8" in samples
    assert not list(out.rglob("*.safetensors"))
