"""Exercise 04 (GLM-4.5's router, aux-loss-free balancing, the token permutation kernel, the experts on its
blocks) in the grading
system: the master passes every public and hidden check and the released stub fails them all with "not
implemented yet"; the release ships exactly the learner's files; a typical mistake loses exactly the points
of the checks that catch it (public and hidden), while other correct answers (another order of the experts
in a row, another order of the slots inside an expert's run) keep full marks; the notebook runs top to
bottom on the stub and on the master. The kernels run under the Triton interpreter, at small shapes.
(tests/grading/test_grading.py's validate test also runs every exercise's master and stub.)"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
from exercise_meta import assert_loses_exactly, with_mistake  # tests/exercises/exercise_meta.py

from glmkit.grading.commands import release, self_check
from glmkit.grading.exercise import load_exercise
from glmkit.grading.runner import run_checks

EX04 = Path(__file__).resolve().parents[2] / "exercises" / "04_moe_routing"
FAST = {"total_timeout": 90, "startup_timeout": 60}
KERNELS = ("count_kernel", "align_kernel")  # written by the learner, reached through moe_align


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    out = tmp_path_factory.mktemp("release04")
    log = io.StringIO()
    assert release(EX04.parent, out, ["04"], force=True, out=log) == [], log.getvalue()
    return out / EX04.name, log.getvalue()


@pytest.fixture(scope="module")
def exercise():
    return load_exercise(EX04)


def test_points_and_messages_are_consistent(exercise):
    assert sum(c.points for c in exercise.checks) == exercise.points == 41
    assert exercise.public_points == 26 and len(exercise.public) == 11 and len(exercise.hidden) == 8
    assert all(c.message.strip() and c.timeout > 0 for c in exercise.checks)


def test_master_passes_all_checks_and_stub_fails_all_with_not_implemented(released):
    _, log = released  # release validates first: master and stub
    assert "master ex04.py: 41/41 points" in log
    assert "stub: 0/41 points, 19/19 checks say 'not implemented yet'" in log
    assert "verified: no solution code, no hidden check" in log


def test_release_ships_only_stubs(released):
    d, _ = released
    assert sorted(p.name for p in d.iterdir()) == ["checks.py", "ex04.ipynb", "ex04.py", "exercise.toml"]
    stub = (d / "ex04.py").read_text()
    for fn in [*load_exercise(EX04).functions, *KERNELS]:
        assert f'NotImplementedError("ex04.{fn}: not implemented yet' in stub, fn
    assert "BEGIN SOLUTION" not in stub and "tl.atomic_add(" not in stub and "tl.cumsum(" not in stub
    assert "def padded_size" in stub and "@triton.jit" in stub  # the given skeleton stays


def test_released_stub_self_check_says_not_implemented(released):
    d, _ = released
    log = io.StringIO()
    assert self_check(d, seed=1, out=log, limits=FAST) is False
    text = log.getvalue()
    assert text.count("not implemented yet") == 11
    assert "Public checks: 0 of 11 pass (0 of 26 points)." in text
    assert "hidden checks worth 15 more points (41 in all) are run as well" in text


# (what the master's line is replaced by, in ex04.py) -> the checks that must catch it, and only those
MISTAKES = {
    "weights by s + b": (
        "w = scores.gather(1, topk_idx)",
        "w = choice.gather(1, topk_idx)",
        {"bias_selects_only", "groups_with_bias", "route_edges", "real_router_sizes"},
    ),
    "weights not aligned with the experts": (
        "return topk_idx, topk_weight\n",
        "return topk_idx, topk_weight.flip(-1)\n",
        {"route_top_k", "bias_selects_only", "group_limited", "groups_with_bias", "route_edges", "real_router_sizes"},
    ),
    "group score = the group's max": (
        "topk(GROUP_TOPK, dim=-1).values.sum(dim=-1)",
        "max(dim=-1).values",
        {"group_limited", "groups_with_bias", "route_edges", "real_router_sizes"},
    ),
    "experts at the mean get -gamma": (
        "bias += gamma * torch.sign(load.mean() - load)",
        "bias += torch.where(load < load.mean(), gamma, -gamma)",
        {"balanced_experts_unchanged", "bias_load_kinds"},
    ),
    "forgot to pad": (
        "padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M",
        "padded = counts",
        {
            "align_uniform_ragged",
            "align_empty_and_collapsed",
            "align_padding_and_tail",
            "align_block_sizes",
            "align_many_slots_and_experts",
            "align_int32_and_single_token",
        },
    ),
    "gate and up swapped": (
        "gate, up = (x[tokens] @ w_gate_up[e].T).chunk(2, dim=-1)",
        "up, gate = (x[tokens] @ w_gate_up[e].T).chunk(2, dim=-1)",
        {"grouped_forward", "grouped_padding_and_idle", "grouped_shapes"},
    ),
    "a slot's row read as its token": (
        "tokens = rows // k",
        "tokens = rows % N",
        {"grouped_forward", "grouped_padding_and_idle", "grouped_shapes"},
    ),
    "no carry between scan steps": (
        "row += tl.sum(mine, axis=0)",
        "pass",
        {"align_uniform_ragged", "align_many_slots_and_experts"},
    ),
}


@pytest.mark.parametrize("name", list(MISTAKES))
def test_a_typical_mistake_loses_exactly_the_points_of_the_checks_that_catch_it(exercise, name):
    old, new, catching = MISTAKES[name]
    master = (EX04 / "ex04.py").read_text()
    assert_loses_exactly(exercise, with_mistake(master, old, new), catching, seed="test-04")


def test_other_correct_answers_keep_full_marks(exercise):
    """Only what the contracts fix is compared: the experts of a row in another order (weights moving with
    them), and the slots inside each expert's run in decreasing instead of increasing order."""
    master = (EX04 / "ex04.py").read_text()
    for old, new in (
        ("return topk_idx, topk_weight\n", "return topk_idx.flip(-1), topk_weight.flip(-1)\n"),
        (
            "place = row + tl.cumsum(mine, axis=0) - mine",
            "place = 2 * start + my_count - 1 - (row + tl.cumsum(mine, axis=0) - mine)",
        ),
    ):
        assert master.count(old) == 1
        master = master.replace(old, new)
    res = run_checks(exercise, master, exercise.checks, seed="test-04-alt")
    assert res.points == exercise.points, [
        (c.name, c.status, c.summary, c.detail) for c in res.checks if c.status != "passed"
    ]


def test_self_check_teaches_and_shows_public_inputs(tmp_path):
    d = tmp_path / EX04.name
    shutil.copytree(EX04, d, ignore=shutil.ignore_patterns("hidden_checks.py", "__pycache__"))
    src = (d / "ex04.py").read_text()
    for old, new, _ in (MISTAKES["weights by s + b"], MISTAKES["forgot to pad"]):
        src = src.replace(old, new)
    (d / "ex04.py").write_text(src)
    log = io.StringIO()
    assert self_check(d, seed=5, out=log, limits=FAST) is False
    text = log.getvalue()
    assert "FAIL  routing: the bias selects, it does not weigh" in text
    assert "Weighting by s + b is the classic mistake" in text and "inputs: logits [12, 16]" in text
    assert "FAIL  permutation: uniform routing, ragged runs" in text and "slots per expert = [" in text
    assert "PASS  permutation: counts per expert" in text
    assert "Public checks: 7 of 11 pass (15 of 26 points)." in text


@pytest.mark.parametrize("solved", [False, True], ids=["stub", "master"])
def test_the_notebook_runs_top_to_bottom(released, tmp_path, solved):
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    d = tmp_path / "ex"
    shutil.copytree(released[0], d)
    if solved:
        shutil.copy(EX04 / "ex04.py", d / "ex04.py")  # a learner who finished
    nb = nbformat.read(d / "ex04.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=180, resources={"metadata": {"path": str(d)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "hidden checks worth 15 more points" in text
    if solved:
        assert "Public checks: 11 of 11 pass" in text and "(not written yet" not in text
        assert "chosen experts: [3, 0]" in text and "counts [3, 2, 3]" in text
        assert "max |grouped - loop| = " in text and "max |blocks - loop over experts| = " in text
    else:
        assert "Public checks: 0 of 11 pass" in text and "(not written yet: ex04.sigmoid_route" in text
        assert "(not written yet: ex04.moe_align" in text
