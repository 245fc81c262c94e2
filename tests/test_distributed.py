"""glmkit.distributed through the train command under torchrun: 2 gloo processes on the CPU give the 1-process losses
and weights for the same global batch (DDP, and FSDP2), and checkpoints move between world sizes — a 1-process run
resumed by 2 FSDP processes, which are SIGKILLed mid-run, resumed again by 1 process, ends where an uninterrupted
1-process run ends. The model has what the data-parallel code must handle: MoE loads summed over processes with the
bias update on, an MTP layer the loss does not reach, mHC streams. ``-m gpu``: the command under torchrun with NCCL
on one GPU, DDP and FSDP, resumed across the two."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from glmkit.cli import run_train
from glmkit.distributed import Local

REPO = Path(__file__).resolve().parents[1]
STEPS = 12
MODEL = dict(
    num_hidden_layers=2,
    hidden_size=64,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
    intermediate_size=96,
    moe_intermediate_size=32,
    n_routed_experts=4,
    num_experts_per_tok=2,
    num_nextn_predict_layers=1,
    hc_mult=2,
    swiglu_limit=8.0,
    max_position_embeddings=64,
)
TRAIN = dict(steps=STEPS, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=2, ckpt_every=4, bias_update_rate=0.01)

KILL_SCRIPT = """
import os, signal, sys
from glmkit.cli import run_train
from glmkit import distributed

def die(step, metrics, history):
    if step == {kill_at} and os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGKILL)  # no clean-up, no final checkpoint: a crash

try:
    run_train(sys.argv[1], callback=die, progress=False)
finally:
    distributed.shutdown()
"""


def _config(out_dir: Path, **top) -> dict:
    return {"out_dir": str(out_dir), "preset": "cpu-moe", "model": MODEL, "data": {"corpus": "stories"},
            "train": TRAIN, **top}  # fmt: skip


def _torchrun(tmp_path: Path, cfg: dict, nproc: int, script: str | None = None, timeout: int = 240, extra=()):
    path = tmp_path / f"{Path(cfg['out_dir']).name}.json"
    path.write_text(json.dumps(cfg))
    target = [str(tmp_path / "run.py")] if script else ["-m", "glmkit", "train", "--quiet", *extra]
    if script:
        (tmp_path / "run.py").write_text(script)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLMKIT_CACHE": str(tmp_path / "cache")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)  # glmkit from here
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        *target,
        str(path),
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=tmp_path)


def _final(out_dir: Path) -> tuple[list[float], dict[str, torch.Tensor]]:
    ckpt = out_dir / (out_dir / "latest").read_text().strip()
    state = json.loads((ckpt / "trainer_state.json").read_text())
    return state["extra"]["history"]["losses"], load_file(ckpt / "model.safetensors"), state["step"]


def _assert_same_run(ref, got, what):
    losses_ref, weights_ref, _ = ref
    losses, weights, step = got
    assert step == STEPS and len(losses) == STEPS, what
    worst = max(abs(a - b) / abs(a) for a, b in zip(losses_ref, losses))
    assert worst < 1e-5, (what, worst, losses_ref, losses)
    assert weights.keys() == weights_ref.keys()
    for name, w in weights_ref.items():  # 12 AdamW steps of lr 3e-3 move a weight by up to ~0.04
        err = float((weights[name].double() - w.double()).abs().max())
        assert err < 1e-4, (what, name, err)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 1-process run."""
    out = tmp_path_factory.mktemp("ref") / "ref"
    run_train(_config(out), progress=False)
    return _final(out)


def test_two_gloo_processes_ddp_match_one_process(tmp_path, reference):
    done = _torchrun(tmp_path, _config(tmp_path / "ddp", parallel="ddp"), nproc=2)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "DataParallel('ddp', rank 0 of 2, cpu)" in done.stderr
    _assert_same_run(reference, _final(tmp_path / "ddp"), "DDP, 2 processes")


def test_fsdp_kill_and_resume_across_world_sizes(tmp_path, reference):
    out = tmp_path / "fsdp"
    run_train(_config(out), max_steps=4, progress=False)  # 1 process: steps 1-4
    killed = _torchrun(tmp_path, _config(out, parallel="fsdp"), nproc=2, script=KILL_SCRIPT.format(kill_at=10))
    assert killed.returncode != 0 and "DataParallel('fsdp', rank 0 of 2, cpu)" in killed.stderr
    assert "Signal 9 (SIGKILL)" in killed.stderr
    assert (out / "latest").read_text().strip() == "step-00000008"  # 5-8 by FSDP; killed in step 10

    def resumed_from(ckpt):
        return json.loads((out / ckpt / "trainer_state.json").read_text())["extra"]["history"]["resumed_from"]

    assert resumed_from("step-00000008") == 4
    run_train(_config(out), progress=False)  # 1 process again: 9-12 from the FSDP checkpoint
    assert resumed_from("step-00000012") == 8
    _assert_same_run(reference, _final(out), "1 → 2 FSDP (killed) → 1 processes")


def test_batch_must_split_over_processes():
    Local().check(3)  # one process takes any batch
    with pytest.raises(ValueError, match="ddp.*torchrun"):
        run_train(_config(Path("unused"), parallel="ddp"))


@pytest.mark.gpu
def test_gpu_torchrun_nccl_one_process(tmp_path):
    """The train command under torchrun with NCCL on one GPU (bf16 autocast, the Triton kernels): DDP for 6 steps
    (stopped by --max-steps), then FSDP resumes to 12. Dense layers, so the MoE kernels' autotuning stays out of it
    (tests/ops/test_moe_experts.py runs them)."""
    model = {**MODEL, "hidden_size": 128, "head_dim": 64, "n_routed_experts": 0, "mlp_layer_types": None}
    train = {**TRAIN, "batch_size": 8, "bias_update_rate": 0.0}
    cfg = dict(_config(tmp_path / "gpu", parallel="ddp"), model=model, train=train)
    first = _torchrun(tmp_path, cfg, nproc=1, timeout=200, extra=["--max-steps", "6"])
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "DataParallel('ddp', rank 0 of 1, cuda:0)" in first.stderr
    assert (tmp_path / "gpu" / "latest").read_text().strip() == "step-00000006"
    second = _torchrun(tmp_path, {**cfg, "parallel": "fsdp"}, nproc=1, timeout=200)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "DataParallel('fsdp', rank 0 of 1, cuda:0)" in second.stderr
    print(first.stderr.splitlines()[-1], second.stderr.splitlines()[-1], sep="\n")  # loss, tokens/s
    losses, _, step = _final(tmp_path / "gpu")
    assert step == STEPS and len(losses) == STEPS and losses[-1] < losses[0]
