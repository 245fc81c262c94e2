"""Exercise 09 (mHC: Sinkhorn-Knopp in glm5_next's order, the weights of one hyper-connection, the hyper-connection
around a branch, the residual path of a decoder, the pre-mix kernel) in the grading system: the master passes every
public and hidden check and the released stub fails them all with "not implemented yet"; the release ships exactly
the learner's files; a typical mistake loses exactly the points of the checks that catch it (public and hidden),
while other correct answers (matmuls instead of einsums) keep full marks; the notebook runs top to bottom on the stub
and on the master. The kernel runs under the Triton interpreter, at small shapes, and natively with -m gpu.
(tests/grading/test_grading.py's validate test also runs every exercise's master and stub.)"""

from __future__ import annotations

import importlib.util
import io
import shutil
from pathlib import Path

import pytest
import torch
from exercise_meta import assert_loses_exactly  # tests/exercises/exercise_meta.py

from glmkit.grading.commands import release, self_check
from glmkit.grading.exercise import load_exercise
from glmkit.grading.runner import run_checks

EX09 = Path(__file__).resolve().parents[2] / "exercises" / "09_mhc"
FAST = {"total_timeout": 120, "startup_timeout": 60}
SINKHORN = {"sinkhorn_matches", "sinkhorn_edges"}
WEIGHTS = {"hc_weights_random"}
FORWARD = {"hc_forward_random", "hc_stack_public", "hc_odd_streams_and_eps", "hc_stack_deep"}
KERNEL = {"premix_kernel_odd", "premix_kernel_shapes"}


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    out = tmp_path_factory.mktemp("release09")
    log = io.StringIO()
    assert release(EX09.parent, out, ["09"], force=True, out=log) == [], log.getvalue()
    return out / EX09.name, log.getvalue()


@pytest.fixture(scope="module")
def exercise():
    return load_exercise(EX09)


def test_points_and_messages_are_consistent(exercise):
    assert sum(c.points for c in exercise.checks) == exercise.points == 22
    assert exercise.public_points == 14 and len(exercise.public) == 6 and len(exercise.hidden) == 4
    assert all(c.message.strip() and c.timeout > 0 for c in exercise.checks)


def test_master_passes_all_checks_and_stub_fails_all_with_not_implemented(released):
    _, log = released  # release validates first: master and stub
    assert "master ex09.py: 22/22 points" in log
    assert "stub: 0/22 points, 10/10 checks say 'not implemented yet'" in log
    assert "verified: no solution code, no hidden check" in log


def test_release_ships_only_stubs(released):
    d, _ = released
    assert sorted(p.name for p in d.iterdir()) == ["checks.py", "ex09.ipynb", "ex09.py", "exercise.toml"]
    stub = (d / "ex09.py").read_text()
    for fn in [*load_exercise(EX09).functions, "premix_kernel"]:
        assert f'NotImplementedError("ex09.{fn}: not implemented yet' in stub, fn
    assert (
        "BEGIN SOLUTION" not in stub
        and "keepdim=True) + eps" not in stub
        and "acc +=" not in stub
        and "premix_kernel[" not in stub
    )
    assert "def branch" in stub and "@triton.jit" in stub and "out = torch.empty(shape" in stub  # given parts stay


def test_released_stub_self_check_says_not_implemented(released):
    d, _ = released
    log = io.StringIO()
    assert self_check(d, seed=1, out=log, limits=FAST) is False
    text = log.getvalue()
    assert text.count("not implemented yet") == 6
    assert "Public checks: 0 of 6 pass (0 of 14 points)." in text
    assert "hidden checks worth 8 more points (22 in all) are run as well" in text


# name -> ((a master line, what it is replaced by), ...), the checks that must catch it (and only those)
MISTAKES = {
    "Sinkhorn normalises the rows first": (
        (
            (
                "    out = m / (m.sum(dim=-2, keepdim=True) + eps)  # columns first\n",
                "    out = m / (m.sum(dim=-1, keepdim=True) + eps)\n",
            ),
            (
                "        out = out / (out.sum(dim=-1, keepdim=True) + eps)  # rows\n"
                "        out = out / (out.sum(dim=-2, keepdim=True) + eps)  # columns\n",
                "        out = out / (out.sum(dim=-2, keepdim=True) + eps)\n"
                "        out = out / (out.sum(dim=-1, keepdim=True) + eps)\n",
            ),
        ),
        SINKHORN | WEIGHTS | FORWARD,
    ),
    "Sinkhorn without eps in its sums": (
        (
            ("    out = m / (m.sum(dim=-2, keepdim=True) + eps)  #", "    out = m / (m.sum(dim=-2, keepdim=True))  #"),
            ("out / (out.sum(dim=-1, keepdim=True) + eps)", "out / out.sum(dim=-1, keepdim=True)"),
            ("out / (out.sum(dim=-2, keepdim=True) + eps)", "out / out.sum(dim=-2, keepdim=True)"),
        ),
        {"sinkhorn_edges", "hc_weights_random", "hc_odd_streams_and_eps"},  # the public one runs with eps = 1e-2
    ),
    "pre without + eps": (
        (
            (
                "    pre = torch.sigmoid(scale[0] * a_pre + b_pre) + eps\n",
                "    pre = torch.sigmoid(scale[0] * a_pre + b_pre)\n",
            ),
        ),
        {"hc_weights_random", "hc_odd_streams_and_eps"},
    ),
    "post without its factor 2": (
        (("    post = 2.0 * torch.sigmoid(", "    post = torch.sigmoid("),),
        WEIGHTS | FORWARD,
    ),
    "comb not transposed": (
        (('torch.einsum("...ij,...id->...jd", comb, streams)', 'torch.einsum("...ij,...jd->...id", comb, streams)'),),
        FORWARD,
    ),
    "the pre-mix averages the streams": (
        (
            (
                '    x = torch.einsum("...i,...id->...d", pre, streams)  #',
                '    x = torch.einsum("...i,...id->...d", pre, streams) / streams.shape[-2]  #',
            ),
        ),
        FORWARD,
    ),
    "the streams merged by their sum": (
        (("    return streams.mean(dim=-2)\n", "    return streams.sum(dim=-2)\n"),),
        {"hc_stack_public", "hc_stack_deep"},
    ),
    "kernel averages the streams": (
        (("        acc += weight * row.to(tl.float32)\n", "        acc += weight * row.to(tl.float32) / N\n"),),
        KERNEL,
    ),
    "kernel launched for the first block of columns only": (
        (("premix_kernel[(M, triton.cdiv(D, BLOCK_D))]", "premix_kernel[(M,)]"),),
        KERNEL,
    ),
}


def _apply(master: str, edits) -> str:
    for old, new in edits:
        assert master.count(old) == 1, old
        master = master.replace(old, new)
    return master


@pytest.mark.parametrize("name", list(MISTAKES))
def test_a_typical_mistake_loses_exactly_the_points_of_the_checks_that_catch_it(exercise, name):
    edits, catching = MISTAKES[name]
    master = _apply((EX09 / "ex09.py").read_text(), edits)
    assert_loses_exactly(exercise, master, catching, seed="test-09")


def test_other_correct_answers_keep_full_marks(exercise):
    """Matmuls instead of einsums (comb transposed explicitly, the pre-mix as a product with the weights) and an
    explicit softmax: the same numbers up to the order of the sums, full marks."""
    master = _apply(
        (EX09 / "ex09.py").read_text(),
        (
            (
                '    x = torch.einsum("...i,...id->...d", pre, streams)  #',
                "    x = (pre.unsqueeze(-2) @ streams).squeeze(-2)  #",
            ),
            (
                '    mixed = torch.einsum("...ij,...id->...jd", comb, streams)  #',
                "    mixed = comb.transpose(-1, -2) @ streams  #",
            ),
            ("    return streams.mean(dim=-2)\n", "    return streams.sum(dim=-2) / n\n"),
        ),
    )
    res = run_checks(exercise, master, exercise.checks, seed="test-09-alt")
    assert res.points == exercise.points, [
        (c.name, c.status, c.summary, c.detail) for c in res.checks if c.status != "passed"
    ]


def test_self_check_teaches_and_shows_public_inputs(tmp_path):
    d = tmp_path / EX09.name
    shutil.copytree(EX09, d, ignore=shutil.ignore_patterns("hidden_checks.py", "__pycache__"))
    src = (d / "ex09.py").read_text()
    for key in ("comb not transposed", "kernel launched for the first block of columns only"):
        src = _apply(src, MISTAKES[key][0])
    (d / "ex09.py").write_text(src)
    log = io.StringIO()
    assert self_check(d, seed=5, out=log, limits=FAST) is False
    text = log.getvalue()
    assert "FAIL  one hyper-connection: pre-mix, comb, post on random weights" in text
    assert "comb transposed times the streams" in text and "inputs: streams [2, 5, 4, 12]" in text
    assert "FAIL  kernel: the pre-mix at odd sizes, every column written" in text and "out full of NaN" in text
    assert "PASS  Sinkhorn: glm5_next's order, 1, 2 and 20 rounds" in text
    assert "PASS  weights: pre, post, comb on random weights" in text
    assert "Public checks: 3 of 6 pass (6 of 14 points)." in text


@pytest.mark.parametrize("solved", [False, True], ids=["stub", "master"])
def test_the_notebook_runs_top_to_bottom(released, tmp_path, solved):
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    d = tmp_path / "ex"
    shutil.copytree(released[0], d)
    if solved:
        shutil.copy(EX09 / "ex09.py", d / "ex09.py")  # a learner who finished
    nb = nbformat.read(d / "ex09.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=240, resources={"metadata": {"path": str(d)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "hidden checks worth 8 more points" in text
    if solved:
        assert "Public checks: 6 of 6 pass" in text and "(not written yet" not in text
        assert " 1 round(s):      row sums [0.7507, 1.5411, 0.7082], column sums [1.0, 1.0, 1.0]" in text
        assert "20 round(s):      row sums [1.0, 1.0, 1.0], column sums [1.0, 1.0, 1.0]" in text
        assert "comb row sums [1.0, 1.0, 1.0, 1.0], column sums [1.0, 1.0, 1.0, 1.0]" in text
        assert "of the merged output after 6 layers" in text and "kernel vs einsum: rel. error" in text
    else:
        assert "Public checks: 0 of 6 pass" in text and "(not written yet: ex09.sinkhorn" in text
        assert "(not written yet: ex09.premix_kernel" in text or "(not written yet: ex09.premix_triton" in text


@pytest.mark.gpu
def test_the_master_kernel_compiles_and_agrees_on_cuda():
    """The master's kernel natively on the GPU (the grader runs it under the interpreter): the pre-mix in fp32 and
    fp16 at odd sizes, against the same sum in float32 torch, into an output full of NaN."""
    spec = importlib.util.spec_from_file_location("ex09_master", EX09 / "ex09.py")
    ex09 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex09)
    g = torch.Generator().manual_seed(0)
    for shape, n, d, dtype in (
        ((3, 5), 4, 40, torch.float32),
        ((2, 7), 3, 1000, torch.float16),
        ((1,), 1, 1, torch.float32),
    ):
        X = torch.randn(*shape, n, d, generator=g).to(dtype).cuda()
        pre = (torch.rand(*shape, n, generator=g) + 0.1).cuda()
        out = torch.full((*shape, d), float("nan"), dtype=dtype, device="cuda")
        got = ex09.premix_triton(X, pre, out=out)
        want = (pre.unsqueeze(-1) * X.float()).sum(-2).to(dtype)
        tol = 1e-5 if dtype == torch.float32 else 2e-3
        assert ((got.float() - want.float()).norm() / want.float().norm()).item() < tol, (shape, n, d, dtype)
