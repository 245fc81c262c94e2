"""Exercise 08 (speculative decoding: greedy and rejection-sampling acceptance, one sampled round, the rollback of a
recurrent layer, a greedy-acceptance kernel) in the grading system: the master passes every public and hidden check
and the released stub fails them all with "not implemented yet"; the release ships exactly the learner's files; a
typical mistake loses exactly the points of the checks that catch it (public and hidden), while another correct
answer (loops instead of tensor ops, re-running the recurrence per row) keeps full marks; the notebook runs top to
bottom on the stub and on the master. The kernel runs under the Triton interpreter, at small shapes, and natively
with -m gpu. (tests/grading/test_grading.py's validate test also runs every exercise's master and stub.)"""

from __future__ import annotations

import importlib.util
import io
import shutil
from pathlib import Path

import pytest
import torch
from exercise_meta import assert_loses_exactly, with_mistake  # tests/exercises/exercise_meta.py

from glmkit.grading.commands import release, self_check
from glmkit.grading.exercise import load_exercise
from glmkit.grading.runner import run_checks

EX08 = Path(__file__).resolve().parents[2] / "exercises" / "08_speculative"
FAST = {"total_timeout": 120, "startup_timeout": 60}
GREEDY = {"greedy_prefix", "greedy_shapes"}
SAMPLE = {"sample_round", "sample_keeps_distribution", "sample_edges"}
ROLLBACK = {"rollback_rows", "rollback_edges"}
KERNEL = {"kernel_greedy", "kernel_shapes"}


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    out = tmp_path_factory.mktemp("release08")
    log = io.StringIO()
    assert release(EX08.parent, out, ["08"], force=True, out=log) == [], log.getvalue()
    return out / EX08.name, log.getvalue()


@pytest.fixture(scope="module")
def exercise():
    return load_exercise(EX08)


def test_points_and_messages_are_consistent(exercise):
    assert sum(c.points for c in exercise.checks) == exercise.points == 29
    assert exercise.public_points == 17 and len(exercise.public) == 7 and len(exercise.hidden) == 6
    assert all(c.message.strip() and c.timeout > 0 for c in exercise.checks)


def test_master_passes_all_checks_and_stub_fails_all_with_not_implemented(released):
    _, log = released  # release validates first: master and stub
    assert "master ex08.py: 29/29 points" in log
    assert "stub: 0/29 points, 13/13 checks say 'not implemented yet'" in log
    assert "verified: no solution code, no hidden check" in log


def test_release_ships_only_stubs(released):
    d, _ = released
    assert sorted(p.name for p in d.iterdir()) == ["checks.py", "ex08.ipynb", "ex08.py", "exercise.toml"]
    stub = (d / "ex08.py").read_text()
    for fn in [*load_exercise(EX08).functions, "greedy_accept_kernel"]:
        assert f'NotImplementedError("ex08.{fn}: not implemented yet' in stub, fn
    assert "BEGIN SOLUTION" not in stub and "cumprod" not in stub and "tl.argmax" not in stub
    assert "def sample_from" in stub and "def gated_delta_step" in stub and "next_power_of_2" not in stub
    assert "@triton.jit" in stub and "accepted = torch.empty(B" in stub  # the given parts stay


def test_released_stub_self_check_says_not_implemented(released):
    d, _ = released
    log = io.StringIO()
    assert self_check(d, seed=1, out=log, limits=FAST) is False
    text = log.getvalue()
    assert text.count("not implemented yet") == 7
    assert "Public checks: 0 of 7 pass (0 of 17 points)." in text
    assert "hidden checks worth 12 more points (29 in all) are run as well" in text


# (what the master's line is replaced by, in ex08.py) -> the checks that must catch it, and only those
MISTAKES = {
    "every agreement counted, not the leading ones": (
        "    accepted = agree.cumprod(-1).sum(-1)  # leading agreements only",
        "    accepted = agree.sum(-1)",
        GREEDY,
    ),
    "the next token always from the last position": (
        "    return accepted, choice.gather(1, accepted[:, None]).squeeze(1)  # the token after the accepted drafts",
        "    return accepted, choice[:, -1]",
        GREEDY,
    ),
    "the residual not normalised": (
        "    return torch.where(total > 0, excess / total.clamp_min(torch.finfo(p.dtype).tiny), p)",
        "    return torch.where(total > 0, excess, p)",
        {"residual_random", "residual_edges"} | SAMPLE,
    ),
    "no fallback to p where p = q (0 / 0)": (
        "    return torch.where(total > 0, excess / total.clamp_min(torch.finfo(p.dtype).tiny), p)",
        "    return excess / total",
        {"residual_edges"},
    ),
    "the ratio upside down, min(1, q/p)": (
        "    keep = (u * q_draft < p_draft).long()",
        "    keep = (u * p_draft < q_draft).long()",
        {"rejection_random", "rejection_edges"} | SAMPLE,
    ),
    "a draft with p(d) = 0 accepted when u = 0": (
        "    keep = (u * q_draft < p_draft).long()",
        "    keep = (u * q_draft <= p_draft).long()",
        {"rejection_edges"},
    ),
    "a rejected draft replaced from p instead of the residual": (
        "    dist = torch.where(rejected, residual_distribution(p_at, q_ext[rows, accepted]), p_at)\n",
        "    dist = p_at\n",
        SAMPLE,
    ),
    "the state after the accepted drafts, without x": (
        "    kept = snapshots[torch.arange(q.shape[0], device=q.device), accepted]  # after accepted + 1 tokens",
        "    kept = snapshots[torch.arange(q.shape[0], device=q.device), (accepted - 1).clamp_min(0)]",
        ROLLBACK,
    ),
    "no rollback: the state after every verified token": (
        "    kept = snapshots[torch.arange(q.shape[0], device=q.device), accepted]  # after accepted + 1 tokens",
        "    kept = state",
        ROLLBACK,
    ),
    "kernel keeps counting after a rejection": ("        alive = agree\n", "        alive = alive\n", KERNEL),
    "kernel reads the padding columns as 0": (
        '        row = tl.load(LOGITS + (b * (n + 1) + i) * V + cols, mask=cols < V, other=float("-inf"))',
        "        row = tl.load(LOGITS + (b * (n + 1) + i) * V + cols, mask=cols < V, other=0.0)",
        KERNEL,
    ),
}


@pytest.mark.parametrize("name", list(MISTAKES))
def test_a_typical_mistake_loses_exactly_the_points_of_the_checks_that_catch_it(exercise, name):
    old, new, catching = MISTAKES[name]
    master = (EX08 / "ex08.py").read_text()
    assert_loses_exactly(exercise, with_mistake(master, old, new), catching, seed="test-08")


def test_other_correct_answers_keep_full_marks(exercise):
    """Python loops over rows instead of tensor ops, and the recurrence re-run per row over its kept tokens (slower,
    not what the spec asks for, but the same numbers): full marks."""
    master = (EX08 / "ex08.py").read_text()
    for old, new in (
        (
            "    agree = (drafts == choice[:, :n]).long()\n"
            "    accepted = agree.cumprod(-1).sum(-1)  # leading agreements only\n",
            "    counts = []\n"
            "    for b in range(drafts.shape[0]):\n"
            "        a = 0\n"
            "        while a < n and int(drafts[b, a]) == int(choice[b, a]):\n"
            "            a += 1\n"
            "        counts.append(a)\n"
            "    accepted = torch.tensor(counts, dtype=torch.int64)\n",
        ),
        (
            "    kept = snapshots[torch.arange(q.shape[0], device=q.device), accepted]  # after accepted + 1 tokens\n",
            "    kept = []\n"
            "    for b, a in enumerate(accepted.tolist()):\n"
            "        s = start[b : b + 1]\n"
            "        for t in range(a + 1):\n"
            "            args = [x[b : b + 1, t] for x in (q, k, v, g, beta)]\n"
            "            _, s = gated_delta_step(s, *args)\n"
            "        kept.append(s[0])\n"
            "    kept = torch.stack(kept)\n",
        ),
        ("    outputs, states = [], []\n", "    outputs, states = [], []\n    start = state\n"),
    ):
        assert master.count(old) == 1, old
        master = master.replace(old, new)
    res = run_checks(exercise, master, exercise.checks, seed="test-08-alt")
    assert res.points == exercise.points, [
        (c.name, c.status, c.summary, c.detail) for c in res.checks if c.status != "passed"
    ]


def test_self_check_teaches_and_shows_public_inputs(tmp_path):
    d = tmp_path / EX08.name
    shutil.copytree(EX08, d, ignore=shutil.ignore_patterns("hidden_checks.py", "__pycache__"))
    src = (d / "ex08.py").read_text()
    for key in ("the ratio upside down, min(1, q/p)", "kernel reads the padding columns as 0"):
        old, new, _ = MISTAKES[key]
        src = src.replace(old, new)
    (d / "ex08.py").write_text(src)
    log = io.StringIO()
    assert self_check(d, seed=5, out=log, limits=FAST) is False
    text = log.getvalue()
    assert "FAIL  rejection rule: accepted drafts" in text and "u[:, i] · q[:, i, d] < p[:, i, d]" in text
    assert "FAIL  one sampled round keeps the main model's distribution" in text and "chi-square" in text
    assert "FAIL  kernel: greedy acceptance, V not a power of two" in text and "all negative" in text
    assert "PASS  greedy: accepted prefix and next token" in text and "PASS  rollback: each row keeps" in text
    assert "Public checks: 3 of 7 pass (7 of 17 points)." in text


@pytest.mark.parametrize("solved", [False, True], ids=["stub", "master"])
def test_the_notebook_runs_top_to_bottom(released, tmp_path, solved):
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    d = tmp_path / "ex"
    shutil.copytree(released[0], d)
    if solved:
        shutil.copy(EX08 / "ex08.py", d / "ex08.py")  # a learner who finished
    nb = nbformat.read(d / "ex08.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=240, resources={"metadata": {"path": str(d)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "hidden checks worth 12 more points" in text
    if solved:
        assert "Public checks: 7 of 7 pass" in text and "(not written yet" not in text
        assert "accepted   [2, 0, 3, 1]" in text and "next_token [1, 2, 3, 4]" in text
        assert "[[1.0, 0.0, 0.0], [0.1" in text and "row 2: kept 1 draft(s)" in text
        assert "kernel: [[" in text
    else:
        assert "Public checks: 0 of 7 pass" in text and "(not written yet: ex08.greedy_accept" in text
        assert "(not written yet: ex08.verify_with_rollback" in text


@pytest.mark.gpu
def test_the_master_kernel_compiles_and_agrees_on_cuda():
    """The master's kernel natively on the GPU (the grader runs it under the interpreter): the same answers as the
    master's torch rule, on logits that are all negative, V not a power of two."""
    spec = importlib.util.spec_from_file_location("ex08_master", EX08 / "ex08.py")
    ex08 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex08)
    g = torch.Generator().manual_seed(0)
    for B, n, V in ((7, 3, 151), (2, 1, 1000), (3, 5, 64)):
        logits = (torch.randn(B, n + 1, V, generator=g) - 8).cuda()
        drafts = torch.randint(0, V, (B, n), generator=g).cuda()
        drafts[: B // 2] = logits[: B // 2, :n].argmax(-1)
        got = ex08.greedy_accept_triton(drafts, logits)
        want = ex08.greedy_accept(drafts, logits)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), (B, n, V)
