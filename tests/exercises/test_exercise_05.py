"""Exercise 05 (Multi-head Latent Attention: the absorbed form of a naive layer, the absorption folded into the
weights, the split-K latent decode kernel and its merge) in the grading system: the master passes every public and
hidden check and the released stub fails them all with "not implemented yet"; the release ships exactly the
learner's files; a typical mistake loses exactly the points of the checks that catch it (public and hidden), while
another correct answer keeps full marks; the notebook runs top to bottom on the stub and on the master. The kernel
runs under the Triton interpreter, at small shapes. (tests/grading/test_grading.py's validate test also runs every
exercise's master and stub.)"""

from __future__ import annotations

import io
import re
import shutil
from pathlib import Path

import pytest
from exercise_meta import assert_loses_exactly, with_mistake  # tests/exercises/exercise_meta.py

from glmkit.grading.commands import release, self_check
from glmkit.grading.exercise import load_exercise
from glmkit.grading.runner import run_checks

EX05 = Path(__file__).resolve().parents[2] / "exercises" / "05_mla"
FAST = {"total_timeout": 120, "startup_timeout": 60}
KERNELS = ("latent_decode_kernel",)  # written by the learner, reached through latent_decode


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    out = tmp_path_factory.mktemp("release05")
    log = io.StringIO()
    assert release(EX05.parent, out, ["05"], force=True, out=log) == [], log.getvalue()
    return out / EX05.name, log.getvalue()


@pytest.fixture(scope="module")
def exercise():
    return load_exercise(EX05)


def test_points_and_messages_are_consistent(exercise):
    assert sum(c.points for c in exercise.checks) == exercise.points == 38
    assert exercise.public_points == 26 and len(exercise.public) == 11 and len(exercise.hidden) == 6
    assert all(c.message.strip() and c.timeout > 0 for c in exercise.checks)


def test_master_passes_all_checks_and_stub_fails_all_with_not_implemented(released):
    _, log = released  # release validates first: master and stub
    assert "master ex05.py: 38/38 points" in log
    assert "stub: 0/38 points, 17/17 checks say 'not implemented yet'" in log
    assert "verified: no solution code, no hidden check" in log


def test_release_ships_only_stubs(released):
    d, _ = released
    assert sorted(p.name for p in d.iterdir()) == ["checks.py", "ex05.ipynb", "ex05.py", "exercise.toml"]
    stub = (d / "ex05.py").read_text()
    for fn in [*load_exercise(EX05).functions, *KERNELS]:
        assert f'NotImplementedError("ex05.{fn}: not implemented yet' in stub, fn
    assert "BEGIN SOLUTION" not in stub and "tl.dot(" not in stub and "einsum" not in stub
    assert "def naive_attention" in stub and "def visible_keys" in stub and "@triton.jit" in stub  # given


def test_released_stub_self_check_says_not_implemented(released):
    d, _ = released
    log = io.StringIO()
    assert self_check(d, seed=1, out=log, limits=FAST) is False
    text = log.getvalue()
    assert text.count("not implemented yet") == 11
    assert "Public checks: 0 of 11 pass (0 of 26 points)." in text
    assert "hidden checks worth 12 more points (38 in all) are run as well" in text


# (what the master's line is replaced by, in ex05.py) -> the checks that must catch it, and only those
MISTAKES = {
    "kv_b rows read as all keys, then all values": (
        "    return per_head[:, :nope], per_head[:, nope:]\n",
        "    kw = kv_b_weight.shape[-1]\n"
        "    return kv_b_weight[: num_heads * nope].view(num_heads, nope, kw), "
        "kv_b_weight[num_heads * nope :].view(num_heads, v_dim, kw)\n",
        {
            "absorbed_layer",
            "absorbed_layer_real_dims",
            "fold_other_layers",
            "fold_output",
            "fold_query",
            "split_layout",
        },
    ),
    "the RoPE part left out of the scores": (
        'scores = torch.einsum("bhtr,blr->bhtl", q_lat.float(), c) + torch.einsum("bhtp,blp->bhtl", q_rot.float(), k)',
        'scores = torch.einsum("bhtr,blr->bhtl", q_lat.float(), c)',
        {"absorbed_layer", "absorbed_layer_real_dims", "latent_chunk_ragged", "latent_decode_token", "latent_edges"},
    ),
    "lengths ignored": (
        "keep = visible_keys(T, c.shape[1], lengths, B)[:, None]",
        "keep = visible_keys(T, c.shape[1], None, B)[:, None]",
        {"latent_chunk_ragged", "latent_edges"},
    ),
    "q_b rows read as all nope rows, then all rope rows": (
        "    w_q_nope, w_q_rot = q_heads[:, :nope], q_heads[:, nope:]\n",
        "    Q = q_b_weight.shape[-1]\n"
        "    w_q_nope = q_b_weight[: num_heads * nope].view(num_heads, nope, Q)\n"
        "    w_q_rot = q_b_weight[num_heads * nope :].view(num_heads, rope, Q)\n",
        {"fold_other_layers", "fold_query"},
    ),
    "o_proj columns read head-minor": (
        "o_heads = o_weight.view(o_weight.shape[0], num_heads, v_dim)",
        "o_heads = o_weight.view(o_weight.shape[0], v_dim, num_heads).transpose(1, 2)",
        {"fold_other_layers", "fold_output"},
    ),
    "no rescale of the running sums": (
        "        l_i = l_i * alpha + tl.sum(p, 1)\n        acc = acc * alpha[:, None] + tl.dot(p, c)\n",
        "        l_i = l_i + tl.sum(p, 1)\n        acc = acc + tl.dot(p, c)\n",
        {"kernel_many_splits", "kernel_odd_sizes", "kernel_one_split", "kernel_ragged", "kernel_split_k"},
    ),
    "log-sum-exp without the max": (
        'lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))',
        'lse = tl.where(empty, float("-inf"), tl.log(tl.where(empty, 1.0, l_i)))',
        {"kernel_many_splits", "kernel_odd_sizes", "kernel_split_k"},
    ),
    "splits averaged": (
        "w = torch.exp(lse - top)  # [B, S, H]; 0 for an empty split",
        "w = torch.isfinite(lse).float()",
        {"combine", "combine_edges", "kernel_many_splits", "kernel_odd_sizes", "kernel_split_k"},
    ),
    "no guard for rows whose splits are all empty": (
        "    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)\n",
        "",
        {"combine_edges"},
    ),
}


@pytest.mark.parametrize("name", list(MISTAKES))
def test_a_typical_mistake_loses_exactly_the_points_of_the_checks_that_catch_it(exercise, name):
    old, new, catching = MISTAKES[name]
    master = (EX05 / "ex05.py").read_text()
    assert_loses_exactly(exercise, with_mistake(master, old, new), catching, seed="test-05")


def test_other_correct_answers_keep_full_marks(exercise):
    """Only what the contracts fix is compared: split_kv_b may return copies instead of views, and combine_splits may
    weigh the splits with a softmax over their log-sum-exps instead of writing out the max."""
    master = (EX05 / "ex05.py").read_text()
    for old, new in (
        (
            "    return per_head[:, :nope], per_head[:, nope:]\n",
            "    return per_head[:, :nope].clone(), per_head[:, nope:].contiguous().clone()\n",
        ),
        (
            "    return o / torch.where(total == 0, torch.ones_like(total), total)[..., None]\n",
            "    return (lse.softmax(dim=1).nan_to_num(0.0)[..., None] * o_part).sum(dim=1)\n",
        ),
    ):
        assert master.count(old) == 1
        master = master.replace(old, new)
    res = run_checks(exercise, master, exercise.checks, seed="test-05-alt")
    assert res.points == exercise.points, [
        (c.name, c.status, c.summary, c.detail) for c in res.checks if c.status != "passed"
    ]


def test_self_check_teaches_and_shows_public_inputs(tmp_path):
    d = tmp_path / EX05.name
    shutil.copytree(EX05, d, ignore=shutil.ignore_patterns("hidden_checks.py", "__pycache__"))
    src = (d / "ex05.py").read_text()
    for name in ("the RoPE part left out of the scores", "no rescale of the running sums"):
        old, new, _ = MISTAKES[name]
        src = src.replace(old, new)
    (d / "ex05.py").write_text(src)
    log = io.StringIO()
    assert self_check(d, seed=5, out=log, limits=FAST) is False
    text = log.getvalue()
    assert "FAIL  latent_attention: one new token over the whole cache" in text
    assert "the RoPE part is a separate dot product" in text and "inputs: q_lat [2, 4, 1, 16]" in text
    assert "FAIL  kernel: one split, every row full" in text and "RESCALE l and acc" in text
    assert "PASS  fold_weights: the query side" in text and "PASS  combine_splits: the log-sum-exp merge" in text
    assert "Public checks: 5 of 11 pass (10 of 26 points)." in text


@pytest.mark.parametrize("solved", [False, True], ids=["stub", "master"])
def test_the_notebook_runs_top_to_bottom(released, tmp_path, solved):
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    d = tmp_path / "ex"
    shutil.copytree(released[0], d)
    if solved:
        shutil.copy(EX05 / "ex05.py", d / "ex05.py")  # a learner who finished
    nb = nbformat.read(d / "ex05.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=180, resources={"metadata": {"path": str(d)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "hidden checks worth 12 more points" in text
    if solved:
        assert "Public checks: 11 of 11 pass" in text and "(not written yet" not in text
        assert "W_UK rows per head: [[0, 1, 2], [5, 6, 7]]   W_UV rows per head: [[3, 4], [8, 9]]" in text
        errors = [float(m) for m in re.findall(r"max \|[^|]+\| = ([0-9.e+-]+)", text)]
        assert len(errors) == 9 and max(errors) < 1e-4, errors  # every comparison the notebook prints
    else:
        assert "Public checks: 0 of 11 pass" in text and "(not written yet: ex05.split_kv_b" in text
        assert "(not written yet: ex05.latent_decode" in text and "(not written yet: ex05.fold_weights" in text


@pytest.mark.gpu
@pytest.mark.parametrize("H,R,P", [(5, 48, 16), (20, 512, 64)], ids=["small", "glm-4.7-flash"])
def test_the_master_kernel_compiles_and_runs_natively(H, R, P):
    """The master's latent_decode_kernel (what a learner writes) compiled for the GPU, not interpreted: ragged
    lengths, one split and several, against glmkit's reference (fp32 inputs; tl.dot may use TF32 on the GPU)."""
    import importlib.util

    import torch

    from glmkit.ops.mla_decode import mla_decode_reference
    from glmkit.testing import rel_err

    spec = importlib.util.spec_from_file_location("ex05_master_gpu", EX05 / "ex05.py")
    ex05 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex05)
    g = torch.Generator().manual_seed(0)
    B, L = 4, 1000
    q_lat, q_rot = torch.randn(B, H, R, generator=g), torch.randn(B, H, P, generator=g)
    c_kv, k_rot = torch.randn(B, L, R, generator=g), torch.randn(B, L, P, generator=g)
    lengths = torch.tensor([L, 777, 16, 1])
    scale = 1 / R**0.5
    want = mla_decode_reference(q_lat[:, None], q_rot[:, None], c_kv, k_rot, scale, lengths)[:, 0]
    args = [t.cuda() for t in (q_lat, q_rot, c_kv, k_rot)]
    for splits in (1, 5):
        got = ex05.latent_decode(*args, scale, lengths.cuda(), splits)
        assert got.is_cuda and rel_err(want, got.cpu()) < 5e-3, (splits, rel_err(want, got.cpu()))
