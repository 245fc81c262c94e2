"""Exercise 06 (DSA's lightning indexer: the index scores, the top-k selection, the warm-up's KL target and loss, the
score kernel in Triton) in the grading system: the master passes every public and hidden check and the released stub
fails them all with "not implemented yet"; the release ships exactly the learner's files; a typical mistake loses
exactly the points of the checks that catch it (public and hidden), while other correct answers (the keys of a row
in another order) keep full marks; the notebook runs top to bottom on the stub and on the master. The kernel runs
under the Triton interpreter, at small shapes."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
from exercise_meta import assert_loses_exactly, with_mistake  # tests/exercises/exercise_meta.py

from glmkit.grading.commands import release, self_check
from glmkit.grading.exercise import load_exercise
from glmkit.grading.runner import run_checks

EX06 = Path(__file__).resolve().parents[2] / "exercises" / "06_dsa_indexer"
FAST = {"total_timeout": 90, "startup_timeout": 60}


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    out = tmp_path_factory.mktemp("release06")
    log = io.StringIO()
    assert release(EX06.parent, out, ["06"], force=True, out=log) == [], log.getvalue()
    return out / EX06.name, log.getvalue()


@pytest.fixture(scope="module")
def exercise():
    return load_exercise(EX06)


def test_points_and_messages_are_consistent(exercise):
    assert sum(c.points for c in exercise.checks) == exercise.points == 33
    assert exercise.public_points == 22 and len(exercise.public) == 9 and len(exercise.hidden) == 6
    assert all(c.message.strip() and c.timeout > 0 for c in exercise.checks)


def test_master_full_marks_stub_zero_and_release_ships_only_stubs(released):
    d, log = released  # release validates first: master and stub
    assert "master ex06.py: 33/33 points" in log
    assert "stub: 0/33 points, 15/15 checks say 'not implemented yet'" in log
    assert "verified: no solution code, no hidden check" in log
    assert sorted(p.name for p in d.iterdir()) == ["checks.py", "ex06.ipynb", "ex06.py", "exercise.toml"]
    stub = (d / "ex06.py").read_text()
    for fn in [*load_exercise(EX06).functions, "index_scores_kernel"]:
        assert f'NotImplementedError("ex06.{fn}: not implemented yet' in stub, fn
    assert "BEGIN SOLUTION" not in stub and "tl.maximum(" not in stub and "log_softmax" not in stub
    assert "@triton.jit" in stub and "BLOCK_D = max(16" in stub  # the given skeleton stays


def test_released_stub_self_check_says_not_implemented(released):
    d, _ = released
    log = io.StringIO()
    assert self_check(d, seed=1, out=log, limits=FAST) is False
    text = log.getvalue()
    assert text.count("not implemented yet") == 9
    assert "Public checks: 0 of 9 pass (0 of 22 points)." in text
    assert "hidden checks worth 11 more points (33 in all) are run as well" in text


SCORES = {"scores_prefill", "scores_decode", "scores_scale_and_fp16", "scores_edges"}
KERNEL = {"kernel_prefill", "kernel_decode", "kernel_odd_shapes", "kernel_fp16"}
# (a line of the master, what a learner might write instead, the checks that must catch it)
MISTAKES = {
    "ReLU after the sum over heads": (
        'logits = torch.einsum("bth,bths->bts", w.float(), per_head.clamp_min(0.0))',
        'logits = torch.einsum("bth,bths->bts", w.float(), per_head).clamp_min(0.0)',
        SCORES,
    ),
    "a query does not see itself": (
        "key_pos[None, None, :] > query_pos[None, :, None]",
        "key_pos[None, None, :] >= query_pos[None, :, None]",
        SCORES,
    ),
    "offset ignored": (
        "query_pos = torch.arange(offset, offset + T, device=q.device)",
        "query_pos = torch.arange(T, device=q.device)",
        {"scores_decode", "scores_edges"},
    ),
    "invisible keys selected instead of -1": (
        "return torch.where(best.values == NEG_INF, torch.full_like(best.indices, -1), best.indices)",
        "return best.indices",
        {"topk_fewer_keys", "topk_negative_and_edges"},
    ),
    "scores <= 0 taken for invisible": (
        "best.values == NEG_INF, torch.full_like",
        "best.values <= 0, torch.full_like",
        {"topk_selected", "topk_fewer_keys", "topk_negative_and_edges"},
    ),
    "target summed over heads, not averaged": (
        "return a.mean(dim=2)",
        "return a.sum(dim=2)",
        {"target_dense", "target_padding"},
    ),
    "KL in the wrong direction": (
        "p * (torch.log(p.clamp_min(1e-38)) - log_q)",
        "log_q.exp() * (log_q - torch.log(p.clamp_min(1e-38)))",
        {"kl_warmup", "kl_sparse_and_zeros"},
    ),
    "0 * log 0 left as NaN": (
        "terms = torch.where(p > 0, p * (torch.log(p.clamp_min(1e-38)) - log_q), torch.zeros_like(p))",
        "terms = p * (torch.log(p) - log_q)",
        {"kl_warmup", "kl_sparse_and_zeros"},
    ),
    "kernel without the ReLU": (
        "acc += w_h[:, None] * tl.maximum(dot, 0.0)",
        "acc += w_h[:, None] * dot",
        KERNEL,
    ),
    "kernel without the causal mask": ('acc = tl.where(seen, acc, float("-inf"))', "pass", KERNEL),
    "grid rounded down": (
        "grid = (triton.cdiv(T, BLOCK_T), triton.cdiv(L, BLOCK_L), B)",
        "grid = (T // BLOCK_T, L // BLOCK_L, B)",
        KERNEL,
    ),
}


@pytest.mark.parametrize("name", list(MISTAKES))
def test_a_typical_mistake_loses_exactly_the_points_of_the_checks_that_catch_it(exercise, name):
    old, new, catching = MISTAKES[name]
    master = (EX06 / "ex06.py").read_text()
    assert_loses_exactly(exercise, with_mistake(master, old, new), catching, seed="test-06")


def test_other_correct_answers_keep_full_marks(exercise):
    """Only what the contracts fix is compared: the keys of a row in reverse order, and the KL through torch's own
    xlogy (0 · log 0 = 0) instead of a masked log."""
    master = (EX06 / "ex06.py").read_text()
    for old, new in (
        (
            "return torch.where(best.values == NEG_INF, torch.full_like(best.indices, -1), best.indices)",
            "return torch.where(best.values == NEG_INF, -1, best.indices).flip(-1)",
        ),
        (
            "terms = torch.where(p > 0, p * (torch.log(p.clamp_min(1e-38)) - log_q), torch.zeros_like(p))",
            "terms = torch.xlogy(p, p) - torch.where(p > 0, p * log_q, torch.zeros_like(p))",
        ),
    ):
        assert master.count(old) == 1
        master = master.replace(old, new)
    res = run_checks(exercise, master, exercise.checks, seed="test-06-alt")
    assert res.points == exercise.points, [
        (c.name, c.status, c.summary, c.detail) for c in res.checks if c.status != "passed"
    ]


def test_self_check_teaches_and_shows_public_inputs(tmp_path):
    d = tmp_path / EX06.name
    shutil.copytree(EX06, d, ignore=shutil.ignore_patterns("hidden_checks.py", "__pycache__"))
    src = (d / "ex06.py").read_text()
    for name in ("ReLU after the sum over heads", "invisible keys selected instead of -1"):
        old, new, _ = MISTAKES[name]
        src = src.replace(old, new)
    (d / "ex06.py").write_text(src)
    log = io.StringIO()
    assert self_check(d, seed=5, out=log, limits=FAST) is False
    text = log.getvalue()
    assert "FAIL  scores: a prefill" in text and "the ReLU acts on EACH head's score" in text
    assert "inputs: q [2, 23, 4, 16]" in text
    assert "FAIL  top-k: queries that see fewer keys than k" in text and "PASS  top-k: the selected keys" in text
    assert "Public checks: 5 of 9 pass (14 of 22 points)." in text


@pytest.mark.parametrize("solved", [False, True], ids=["stub", "master"])
def test_the_notebook_runs_top_to_bottom(released, tmp_path, solved):
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    d = tmp_path / "ex"
    shutil.copytree(released[0], d)
    if solved:
        shutil.copy(EX06 / "ex06.py", d / "ex06.py")  # a learner who finished
    nb = nbformat.read(d / "ex06.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=180, resources={"metadata": {"path": str(d)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "hidden checks worth 11 more points" in text
    if solved:
        assert "Public checks: 9 of 9 pass" in text and "(not written yet" not in text
        assert "selected: [2, 5, 6, 7]" in text and "KL = 0 at the target: True" in text
        assert "kernel vs torch: max |difference| = " in text
    else:
        assert "Public checks: 0 of 9 pass" in text and "(not written yet: ex06.index_scores" in text
