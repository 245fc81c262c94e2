"""The benchmark scripts still run: each one's ``--smoke`` mode (tiny shapes, one timed call, any device; on a CPU the
kernels run under the Triton interpreter) in a fresh interpreter from the repository root. A smoke run re-raises
what a GPU run would log and skip, so exit status 0 means every code path of the script ran; its figures mean
nothing and it writes no result file."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"

# script -> lines its output must contain (the table headers, and the smoke marker)
EXPECTED = {
    "bench_glm_attention.py": [
        "| D | T | B×H | ours TFLOP/s | ours config (autotuned) | Flex TFLOP/s | SDPA dense TFLOP/s ",
        "| config | TFLOP/s | rel err vs SDPA |",
        "- SMOKE RUN",
    ],
    "bench_glm_attention_causal.py": [
        "| D | T | B×H | ours TFLOP/s | cuDNN TFLOP/s | flash TFLOP/s | ours/cuDNN | ours/flash ",
        "| config | TFLOP/s | rel err vs cuDNN |",
        "- SMOKE RUN",
    ],
    "bench_glm_attention_bwd.py": [
        "| D | T | B×H | ours TFLOP/s | cuDNN TFLOP/s | flash TFLOP/s | ours/cuDNN | ours/flash | ours GLM sep=T/2 ",
        "- SMOKE RUN",
    ],
    "bench_moe.py": [
        "| kernel | ms | TFLOP/s | vs torch._grouped_mm | rel. err vs grouped_mm |",
        "| routing | max/mean expert load | impl | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s ",
        "| ratio | measured | target | met |",
        "- SMOKE RUN",
    ],
    "bench_norm_swiglu_rope.py": [
        "| shape | pass | ours GB/s | liger | compile | eager | ours/liger | ours/compile | ours/eager | err ours ",
        "| shape | ours GB/s | ours in place GB/s | compile | eager | ours/compile | ours/eager | fwd+bwd ours GB/s ",
        "- SMOKE RUN",
    ],
    "bench_delta_rule.py": [
        "| B, T, H, D | fwd ours ms",
        "| T | B | GDN fwd ms",
        "| B | H | gate | state MiB",
        "- SMOKE RUN",
    ],
    "bench_dsa.py": [
        "| T | dense MLA ms | dense TFLOP/s | logits ms | indexer TFLOP/s | top-k ms | sparse attn ms | ",
        "| B | µs | GB/s (selected rows) | of 1 GiB copy | rel err |",
        "| fwd ms | fwd+bwd ms | bwd ms | bwd TFLOP/s (2.5× fwd FLOPs) |",
        "| ratio | measured | target | met |",
        "- SMOKE RUN",
    ],
    "bench_hybrid.py": [
        "| T | hybrid ms | twin ms | hybrid tokens/s | twin tokens/s | hybrid/twin |",
        "| P | hybrid ms/step | twin ms/step | hybrid/twin | hybrid cache MiB | twin cache MiB | memory twin/hybrid |",
        "- SMOKE RUN",
    ],
    "bench_speculative.py": [
        "| preset | parameters (main / MTP) | MTP | data | steps | batch × bytes | train s | loss (last 5%) ",
        "| mode | draft tokens | tokens/s | ms/token | vs generate() | vs lean loop | identical tokens (bf16) ",
        "| draft tokens | ms per round | tokens per round | prefill | draft | verify | accept | rollback | other |",
        "| ratio | measured | target | met |",
        "- SMOKE RUN",
    ],
    "bench_capstone.py": [
        "| component | fwd MFLOP/token | train MFLOP/token | share |",
        "| path | B | ms/step | tokens/s | TFLOP/s (model FLOPs) | MFU | peak memory GiB |",
        "| B | draft tokens | tokens/s | ms per step | vs plain | acceptance by draft position | mean accepted ",
        "| ratio | measured | target | met |",
        "- SMOKE RUN",
    ],
    "bench_mla.py": [
        "| T | B×H | pass | ours TFLOP/s | SDPA cuDNN | SDPA flash | ours D=128 (H·D same) | ours/cuDNN ",
        "| H | B | L | cache MiB | splits | ours µs | ours GB/s | of copy | composite µs | ours/composite ",
        "- SMOKE RUN",
    ],
    "sweep_kernels.py": [
        "# Kernel tuning sweeps on ",
        "| kernel | config (BM×BN w s) | ms | err | share of charged FLOPs/s |",
        "| shape | impl | block_t | warps | heads/prog | GB/s | err |",
        "| block_m | config (BN BK w s) | by slot TFLOP/s | vs grouped_mm | gathering TFLOP/s | vs grouped_mm | err |",
        "| piece | impl | ms | TFLOP/s | err vs old |",
        "| layer | fwd ms (no grad) | fwd ms (autograd) | fwd+bwd ms | bwd ≈ ms | fwd+bwd TFLOP/s |",
        "| piece | config | ms | TFLOP/s | err vs autotuned |",
        "| shape | pass | warps | programs | GB/s |",
        "| shape | pass | BLOCK | warps | GB/s |",
        "SMOKE RUN",
    ],
    "time_lessons.py": [
        "| lesson | run | machine | date | measured (s) | notes |",
        "| 00 | smoke | ",
    ],
}


def _results_state() -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in RESULTS.iterdir()}


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_smoke(script):
    if script == "time_lessons.py" and importlib.util.find_spec("nbclient") is None:
        pytest.skip("nbclient is not installed")
    before = _results_state()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{script} --smoke exited {proc.returncode}:\n{out[-4000:]}"
    assert "Traceback" not in out, out[-4000:]
    for line in EXPECTED[script]:
        assert line in proc.stdout, f"{script} --smoke did not print {line!r}:\n{proc.stdout[-4000:]}"
    if script == "time_lessons.py":
        assert "ok |" in proc.stdout, proc.stdout
    assert _results_state() == before, "a smoke run wrote to benchmarks/results/"
