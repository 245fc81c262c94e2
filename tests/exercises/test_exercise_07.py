"""Exercise 07 (the gated delta rule: recurrence, UT transform, chunked forward, decode kernel) in the grading
system: the master passes every public and hidden check and the released stub fails them all with "not implemented
yet"; the release ships exactly the learner's files; a typical mistake loses exactly the points of the checks that
catch it (public and hidden), while another correct answer (the triangular solve instead of the substitution loop,
the recurrence kept in the papers' transposed convention) keeps full marks; the notebook runs top to bottom on the
stub and on the master. The kernel runs under the Triton interpreter, at small shapes.
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

EX07 = Path(__file__).resolve().parents[2] / "exercises" / "07_delta_rule"
FAST = {"total_timeout": 120, "startup_timeout": 60}
RECURRENCE = {"recurrence_deltanet", "recurrence_gated", "recurrence_kda", "recurrence_shapes"}
CHUNKED = {"chunked_whole_chunks", "chunked_ragged_with_state", "chunked_chunk_sizes", "chunked_long_strong"}
KERNEL = {"kernel_gated", "kernel_kda_odd_sizes", "kernel_shapes"}


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    out = tmp_path_factory.mktemp("release07")
    log = io.StringIO()
    assert release(EX07.parent, out, ["07"], force=True, out=log) == [], log.getvalue()
    return out / EX07.name, log.getvalue()


@pytest.fixture(scope="module")
def exercise():
    return load_exercise(EX07)


def test_points_and_messages_are_consistent(exercise):
    assert sum(c.points for c in exercise.checks) == exercise.points == 31
    assert exercise.public_points == 21 and len(exercise.public) == 9 and len(exercise.hidden) == 6
    assert all(c.message.strip() and c.timeout > 0 for c in exercise.checks)


def test_master_passes_all_checks_and_stub_fails_all_with_not_implemented(released):
    _, log = released  # release validates first: master and stub
    assert "master ex07.py: 31/31 points" in log
    assert "stub: 0/31 points, 15/15 checks say 'not implemented yet'" in log
    assert "verified: no solution code, no hidden check" in log


def test_release_ships_only_stubs(released):
    d, _ = released
    assert sorted(p.name for p in d.iterdir()) == ["checks.py", "ex07.ipynb", "ex07.py", "exercise.toml"]
    stub = (d / "ex07.py").read_text()
    for fn in [*load_exercise(EX07).functions, "recurrent_step_kernel"]:
        assert f'NotImplementedError("ex07.{fn}: not implemented yet' in stub, fn
    assert "BEGIN SOLUTION" not in stub and "tl.sum(" not in stub and "cumsum" not in stub
    assert "def recurrent_step" in stub and "@triton.jit" in stub and "next_power_of_2" in stub  # given parts stay


def test_released_stub_self_check_says_not_implemented(released):
    d, _ = released
    log = io.StringIO()
    assert self_check(d, seed=1, out=log, limits=FAST) is False
    text = log.getvalue()
    assert text.count("not implemented yet") == 9
    assert "Public checks: 0 of 9 pass (0 of 21 points)." in text
    assert "hidden checks worth 10 more points (31 in all) are run as well" in text


# (what the master's line is replaced by, in ex07.py) -> the checks that must catch it, and only those
MISTAKES = {
    "no default scale (K^-1/2) in the recurrence": (
        "    scale = K**-0.5 if scale is None else scale\n    if initial_state is None:",
        "    scale = 1.0 if scale is None else scale\n    if initial_state is None:",
        {"recurrence_gated", "recurrence_shapes"},
    ),
    "output read before the token's write": (
        "        state = state + kt[..., :, None] * u[..., None, :]\n"
        '        outputs.append(torch.einsum("bhkv,bhk->bhv", state, qt))',
        '        outputs.append(torch.einsum("bhkv,bhk->bhv", state, qt))\n'
        "        state = state + kt[..., :, None] * u[..., None, :]",
        RECURRENCE,
    ),
    "W without the decay from the chunk's start": (
        "W = T @ (beta[..., None] * k * G[..., None].exp())",
        "W = T @ (beta[..., None] * k)",
        {"ut_gated", "ut_strong_decay", "ut_edges"} | CHUNKED,
    ),
    "the decay between tokens as a ratio of exponentials": (
        "A = beta[..., :, None] * (k @ k.transpose(-1, -2)) * gap.exp()",
        "A = beta[..., :, None] * (k @ k.transpose(-1, -2)) * (G[..., :, None].exp() / G[..., None, :].exp()) * tril",
        {"ut_strong_decay", "chunked_long_strong"},
    ),
    "chunked forward ignores the initial state": (
        "state = q.new_zeros(B, H, K, Vd) if initial_state is None else initial_state.clone()",
        "state = q.new_zeros(B, H, K, Vd)",
        CHUNKED - {"chunked_whole_chunks"},
    ),
    "kernel never stores the state back": (
        "    tl.store(tile_ptr, tile, mask=mk[:, None] & mv[None, :])\n",
        "    pass\n",
        KERNEL,
    ),
}


@pytest.mark.parametrize("name", list(MISTAKES))
def test_a_typical_mistake_loses_exactly_the_points_of_the_checks_that_catch_it(exercise, name):
    old, new, catching = MISTAKES[name]
    master = (EX07 / "ex07.py").read_text()
    assert_loses_exactly(exercise, with_mistake(master, old, new), catching, seed="test-07")


def test_other_correct_answers_keep_full_marks(exercise):
    """A triangular solve instead of the substitution loop, and the recurrence kept as the papers write it: the
    transposed state S = Hᵀ [V, K], read as S k, transposed back at the end."""
    master = (EX07 / "ex07.py").read_text()
    for old, new in (
        (
            "    for r in range(C):\n"
            "        T[..., r, :] = eye[r] - (A[..., r, :, None] * T).sum(-2)  # rows j ≥ r of T are still 0\n",
            "    T = torch.linalg.solve_triangular(eye + A, eye.expand_as(A), upper=False, unitriangular=True)\n",
        ),
        (
            "        state = initial_state.clone()\n    outputs = []",
            "        state = initial_state.clone()\n    state = state.transpose(-1, -2)  # S = Hᵀ\n    outputs = []",
        ),
        (
            "            state = state * (decay[:, :, None, None] if g.dim() == 3 else decay[..., None])",
            "            state = state * (decay[:, :, None, None] if g.dim() == 3 else decay[..., None, :])",
        ),
        (
            'prediction = torch.einsum("bhkv,bhk->bhv", state, kt)',
            'prediction = torch.einsum("bhvk,bhk->bhv", state, kt)',
        ),
        (
            "        state = state + kt[..., :, None] * u[..., None, :]\n"
            '        outputs.append(torch.einsum("bhkv,bhk->bhv", state, qt))\n'
            "    return torch.stack(outputs, dim=1), state\n",
            "        state = state + u[..., :, None] * kt[..., None, :]\n"
            '        outputs.append(torch.einsum("bhvk,bhk->bhv", state, qt))\n'
            "    return torch.stack(outputs, dim=1), state.transpose(-1, -2).contiguous()\n",
        ),
    ):
        assert master.count(old) == 1, old
        master = master.replace(old, new)
    res = run_checks(exercise, master, exercise.checks, seed="test-07-alt")
    assert res.points == exercise.points, [
        (c.name, c.status, c.summary, c.detail) for c in res.checks if c.status != "passed"
    ]


def test_self_check_teaches_and_shows_public_inputs(tmp_path):
    d = tmp_path / EX07.name
    shutil.copytree(EX07, d, ignore=shutil.ignore_patterns("hidden_checks.py", "__pycache__"))
    src = (d / "ex07.py").read_text()
    for key in ("W without the decay from the chunk's start", "kernel never stores the state back"):
        old, new, _ = MISTAKES[key]
        src = src.replace(old, new)
    (d / "ex07.py").write_text(src)
    log = io.StringIO()
    assert self_check(d, seed=5, out=log, limits=FAST) is False
    text = log.getvalue()
    assert "FAIL  UT transform: Gated DeltaNet, several chunks" in text
    assert "the keys scaled by the decay from the chunk's start" in text and "inputs: k [2, 3, 2, 16, 16]" in text
    assert "PASS  UT transform: DeltaNet (G = 0)" in text and "PASS  recurrence: KDA (g [B, T, H, K])" in text
    assert "FAIL  kernel: Gated DeltaNet decode step" in text and "store the tile back" in text
    assert "Public checks: 4 of 9 pass (8 of 21 points)." in text


@pytest.mark.parametrize("solved", [False, True], ids=["stub", "master"])
def test_the_notebook_runs_top_to_bottom(released, tmp_path, solved):
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    d = tmp_path / "ex"
    shutil.copytree(released[0], d)
    if solved:
        shutil.copy(EX07 / "ex07.py", d / "ex07.py")  # a learner who finished
    nb = nbformat.read(d / "ex07.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=240, resources={"metadata": {"path": str(d)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "hidden checks worth 10 more points" in text
    if solved:
        assert "Public checks: 9 of 9 pass" in text and "(not written yet" not in text
        assert "DeltaNet reads x = [5.0" in text and "U − W H0 vs the recurrence's writes" in text
        assert "chunk 64: o " in text and "updated in place: True" in text
    else:
        assert "Public checks: 0 of 9 pass" in text and "(not written yet: ex07.gated_delta_rule_recurrent" in text
        assert "(not written yet: ex07.recurrent_step" in text
