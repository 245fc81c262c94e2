"""Exercise 03 (RMSNorm kernels forward and backward, the optimizer side of a training step) in the grading system: the
master passes every public and hidden check and the released stub fails them all with "not implemented yet";
the release ships exactly the learner's files; a typical mistake loses exactly the points of the checks that
catch it (public and hidden); the notebook runs top to bottom on the stub and on the master."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
from exercise_meta import assert_loses_exactly, with_mistake  # tests/exercises/exercise_meta.py

from glmkit.grading.commands import release, self_check
from glmkit.grading.exercise import load_exercise

EX03 = Path(__file__).resolve().parents[2] / "exercises" / "03_rmsnorm_and_training_step"
FAST = {"total_timeout": 60, "startup_timeout": 30}


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    out = tmp_path_factory.mktemp("release03")
    log = io.StringIO()
    assert release(EX03.parent, out, ["03"], force=True, out=log) == [], log.getvalue()
    return out / EX03.name, log.getvalue()


@pytest.fixture(scope="module")
def exercise():
    return load_exercise(EX03)


def test_points_and_messages_are_consistent(exercise):
    assert sum(c.points for c in exercise.checks) == exercise.points == 36
    assert exercise.public_points == 24 and len(exercise.public) == 10 and len(exercise.hidden) == 6
    assert all(c.message.strip() and c.timeout > 0 for c in exercise.checks)


def test_master_full_marks_stub_zero_and_release_ships_only_stubs(released):
    d, log = released
    assert "master ex03.py: 36/36 points" in log
    assert "stub: 0/36 points, 16/16 checks say 'not implemented yet'" in log
    assert sorted(p.name for p in d.iterdir()) == ["checks.py", "ex03.ipynb", "ex03.py", "exercise.toml"]
    stub = (d / "ex03.py").read_text()
    for fn in ("rmsnorm_fwd_kernel", "rms_norm_fwd", "rmsnorm_bwd_kernel", "rms_norm_bwd", "lr_at", "adamw_step"):
        assert f'NotImplementedError("ex03.{fn}: not implemented yet' in stub, fn
    assert "tl.sqrt(" not in stub and "partial.sum" not in stub and "BEGIN SOLUTION" not in stub


# name -> (a line of the master, what a learner might write instead, the checks that must catch it)
MISTAKES = {
    "dw taken from one row": (
        "return dx, partial.sum(dim=0)",
        "return dx, partial[0]",
        {"backward_ragged", "backward_half_precision", "backward_edges"},
    ),
    "weight decay on biases and norm gains too": (
        "wd = weight_decay if p.dim() >= 2 else 0.0",
        "wd = weight_decay",
        {"adamw_first_update", "adamw_clipping_and_decay", "training_step_settings"},
    ),
    "warm-up one step late": (
        "return lr * (step + 1) / warmup",
        "return lr * step / warmup",
        {"lr_schedule", "adamw_first_update", "training_step_settings"},
    ),
}


@pytest.mark.parametrize("name", list(MISTAKES))
def test_a_typical_mistake_loses_exactly_the_points_of_the_checks_that_catch_it(exercise, name):
    old, new, catching = MISTAKES[name]
    master = (EX03 / "ex03.py").read_text()
    assert_loses_exactly(exercise, with_mistake(master, old, new), catching, seed="test-02")


def test_self_check_teaches_and_shows_public_inputs(tmp_path):
    d = tmp_path / EX03.name
    shutil.copytree(EX03, d, ignore=shutil.ignore_patterns("hidden_checks.py", "__pycache__"))
    old, new, _ = MISTAKES["weight decay on biases and norm gains too"]
    (d / "ex03.py").write_text((d / "ex03.py").read_text().replace(old, new))
    log = io.StringIO()
    assert self_check(d, seed=5, out=log, limits=FAST) is False
    text = log.getvalue()
    assert "FAIL  training step: the first AdamW update" in text and "only for matrices" in text
    assert "parameter shapes [(6, 5), (5,), (3, 4)], step 0" in text and "PASS  backward: dx and dw" in text
    assert "Public checks: 8 of 10 pass (19 of 24 points)." in text
    assert "hidden checks worth 12 more points (36 in all)" in text


@pytest.mark.parametrize("solved", [False, True], ids=["stub", "master"])
def test_the_notebook_runs_top_to_bottom(released, tmp_path, solved):
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    d = tmp_path / "ex"
    shutil.copytree(released[0], d)
    if solved:
        shutil.copy(EX03 / "ex03.py", d / "ex03.py")
    nb = nbformat.read(d / "ex03.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=180, resources={"metadata": {"path": str(d)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "hidden checks worth 12 more points" in text
    if solved:
        assert "Public checks: 10 of 10 pass" in text and "max |param - torch.optim|" in text
        assert "dw dtype: torch.float32" in text and "(not written yet" not in text
    else:
        assert "Public checks: 0 of 10 pass" in text and "(not written yet: ex03.rms_norm_bwd" in text
