"""Exercise 01 (one blank-infilling example, span sampling, the Part-B loss) in the grading system: the
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

EX01 = Path(__file__).resolve().parents[2] / "exercises" / "01_blank_infilling"
FAST = {"total_timeout": 60, "startup_timeout": 30}


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    out = tmp_path_factory.mktemp("release01")
    log = io.StringIO()
    assert release(EX01.parent, out, ["01"], force=True, out=log) == [], log.getvalue()
    return out / EX01.name, log.getvalue()


@pytest.fixture(scope="module")
def exercise():
    return load_exercise(EX01)


def test_points_and_messages_are_consistent(exercise):
    assert sum(c.points for c in exercise.checks) == exercise.points == 33
    assert exercise.public_points == 20 and len(exercise.public) == 9 and len(exercise.hidden) == 8
    assert all(c.message.strip() and c.timeout > 0 for c in exercise.checks)


def test_master_full_marks_stub_zero_and_release_ships_only_stubs(released):
    d, log = released
    assert "master ex01.py: 33/33 points" in log
    assert "stub: 0/33 points, 17/17 checks say 'not implemented yet'" in log
    assert sorted(p.name for p in d.iterdir()) == ["checks.py", "ex01.ipynb", "ex01.py", "exercise.toml"]
    stub = (d / "ex01.py").read_text()
    for fn in ("part_a_b", "position_rows", "sample_spans", "part_b_loss"):
        assert f'NotImplementedError("ex01.{fn}: not implemented yet' in stub
    assert "lgamma" not in stub and "cross_entropy(" not in stub and "BEGIN SOLUTION" not in stub


# name -> (a line of the master, what a learner might write instead, the checks that must catch it)
MISTAKES = {
    "a span's last token predicts the next [START]": (
        "ends = (nxt == sop_id) | (nxt == pad_id)",
        "ends = nxt == pad_id",
        {"loss_worked_example", "loss_padded_batches", "loss_edges", "loss_ids_are_arguments"},
    ),
    "a mean of per-example means": (
        "return F.cross_entropy(logits[scored].float(), targets[scored])",
        "return torch.stack([F.cross_entropy(logits[i][scored[i]], targets[i][scored[i]]) for i in range(B)]).mean()",
        {"loss_padded_batches", "loss_edges"},
    ),
    "spans packed at the start": (
        "offsets = sorted(rng.randint(0, spare) for _ in lengths)",
        "offsets = [0 for _ in lengths]",
        {"spans_are_placed_at_random"},
    ),
    "lengths not truncated at max_len": (
        "ks = list(range(1, max_len + 1))",
        "ks = list(range(1, 40))",
        {"spans_other_settings"},
    ),
    "a mask token's position ignores the earlier spans": (
        "mask_pos.append(s - shift)",
        "mask_pos.append(s)",
        {"random_positions", "shuffled_order", "spans_at_the_edges", "long_text"},  # the worked example: no shift
    ),
}


@pytest.mark.parametrize("name", list(MISTAKES))
def test_a_typical_mistake_loses_exactly_the_points_of_the_checks_that_catch_it(exercise, name):
    old, new, catching = MISTAKES[name]
    master = (EX01 / "ex01.py").read_text()
    assert_loses_exactly(exercise, with_mistake(master, old, new), catching, seed="test-02")


def test_self_check_teaches_and_shows_public_inputs(tmp_path):
    d = tmp_path / EX01.name
    shutil.copytree(EX01, d, ignore=shutil.ignore_patterns("hidden_checks.py", "__pycache__"))
    old, new, _ = MISTAKES["a span's last token predicts the next [START]"]
    (d / "ex01.py").write_text((d / "ex01.py").read_text().replace(old, new))
    log = io.StringIO()
    assert self_check(d, seed=5, out=log, limits=FAST) is False
    text = log.getvalue()
    assert "FAIL  loss: the worked example" in text and "not the next span's [START]" in text
    assert "sep=[5]" in text and "PASS  spans: the law of the lengths" in text
    assert "Public checks: 7 of 9 pass (15 of 20 points)." in text
    assert "hidden checks worth 13 more points (33 in all)" in text


@pytest.mark.parametrize("solved", [False, True], ids=["stub", "master"])
def test_the_notebook_runs_top_to_bottom(released, tmp_path, solved):
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    d = tmp_path / "ex"
    shutil.copytree(released[0], d)
    if solved:
        shutil.copy(EX01 / "ex01.py", d / "ex01.py")
    nb = nbformat.read(d / "ex01.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=180, resources={"metadata": {"path": str(d)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "hidden checks worth 13 more points" in text
    if solved:
        assert "Public checks: 9 of 9 pass" in text and "(should be close to 0)" in text
        assert "share of lengths 1..6" in text and "(not written yet" not in text
    else:
        assert "Public checks: 0 of 9 pass" in text and "(not written yet: ex01.sample_spans" in text
