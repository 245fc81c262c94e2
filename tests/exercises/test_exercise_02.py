"""Exercise 02 (RoPE inside attention, a KV cache, porting a half-split checkpoint) in the grading system: the
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

EX02 = Path(__file__).resolve().parents[2] / "exercises" / "02_rope_and_gqa"
FAST = {"total_timeout": 60, "startup_timeout": 30}


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    out = tmp_path_factory.mktemp("release02")
    log = io.StringIO()
    assert release(EX02.parent, out, ["02"], force=True, out=log) == [], log.getvalue()
    return out / EX02.name, log.getvalue()


@pytest.fixture(scope="module")
def exercise():
    return load_exercise(EX02)


def test_points_and_messages_are_consistent(exercise):
    assert sum(c.points for c in exercise.checks) == exercise.points == 17
    assert exercise.public_points == 11 and len(exercise.public) == 4 and len(exercise.hidden) == 3
    assert all(c.message.strip() and c.timeout > 0 for c in exercise.checks)


def test_master_full_marks_stub_zero_and_release_ships_only_stubs(released):
    d, log = released
    assert "master ex02.py: 17/17 points" in log
    assert "stub: 0/17 points, 7/7 checks say 'not implemented yet'" in log
    assert sorted(p.name for p in d.iterdir()) == ["checks.py", "ex02.ipynb", "ex02.py", "exercise.toml"]
    stub = (d / "ex02.py").read_text()
    for fn in ("rope_attention", "half_to_interleaved"):
        assert f'NotImplementedError("ex02.{fn}: not implemented yet' in stub
    assert "repeat_interleave" not in stub and "BEGIN SOLUTION" not in stub


# name -> (a line of the master, what a learner might write instead, the checks that must catch it)
MISTAKES = {
    "half-split pairs in the layer": (
        "x1, x2 = t[..., 0:rotary_dim:2], t[..., 1:rotary_dim:2]",
        "x1, x2 = t[..., : rotary_dim // 2], t[..., rotary_dim // 2 : rotary_dim]",
        {"prefill", "prefill_positions", "decode", "head_groupings", "theta_and_long_cache"},
    ),
    "the causal mask forgets the cache": (
        "visible = torch.arange(P + T)[None, :] <= P + torch.arange(T)[:, None]",
        "visible = torch.arange(P + T)[None, :] <= torch.arange(T)[:, None]",
        {"decode", "head_groupings", "theta_and_long_cache"},
    ),
    "k/v head h % H_kv": (
        "kk = k.repeat_interleave(H // Hkv, dim=1)\n    vv = v.repeat_interleave(H // Hkv, dim=1)",
        "kk = k.repeat(1, H // Hkv, 1, 1)\n    vv = v.repeat(1, H // Hkv, 1, 1)",
        {"prefill", "prefill_positions", "decode", "head_groupings", "theta_and_long_cache"},
    ),
    "the v rows moved too": (
        "rotary = order[: num_heads + num_kv_heads, :rotary_dim]",
        "rotary = order[:, :rotary_dim]",
        {"port_half_split", "port_shapes"},
    ),
    "the pairs interleaved the wrong way round": (
        "torch.stack((rotary[:, :half], rotary[:, half:]), -1)",
        "torch.stack((rotary[:, half:], rotary[:, :half]), -1)",
        {"port_half_split", "port_shapes"},
    ),
}


@pytest.mark.parametrize("name", list(MISTAKES))
def test_a_typical_mistake_loses_exactly_the_points_of_the_checks_that_catch_it(exercise, name):
    old, new, catching = MISTAKES[name]
    master = (EX02 / "ex02.py").read_text()
    assert_loses_exactly(exercise, with_mistake(master, old, new), catching, seed="test-02")


def test_self_check_teaches_and_shows_public_inputs(tmp_path):
    d = tmp_path / EX02.name
    shutil.copytree(EX02, d, ignore=shutil.ignore_patterns("hidden_checks.py", "__pycache__"))
    old, new, _ = MISTAKES["the causal mask forgets the cache"]
    (d / "ex02.py").write_text((d / "ex02.py").read_text().replace(old, new))
    log = io.StringIO()
    assert self_check(d, seed=5, out=log, limits=FAST) is False
    text = log.getvalue()
    assert "FAIL  attention: decoding through the cache" in text and "absolute index P + t" in text
    assert "a cache of 6 tokens" in text and "PASS  attention: a prefill" in text
    assert "Public checks: 3 of 4 pass (8 of 11 points)." in text
    assert "hidden checks worth 6 more points (17 in all)" in text


@pytest.mark.parametrize("solved", [False, True], ids=["stub", "master"])
def test_the_notebook_runs_top_to_bottom(released, tmp_path, solved):
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    d = tmp_path / "ex"
    shutil.copytree(released[0], d)
    if solved:
        shutil.copy(EX02 / "ex02.py", d / "ex02.py")
    nb = nbformat.read(d / "ex02.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=180, resources={"metadata": {"path": str(d)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "hidden checks worth 6 more points" in text
    if solved:
        assert "Public checks: 4 of 4 pass" in text and "outputs before position 5 unchanged: True" in text
        assert "half-split layer| = " in text and "(not written yet" not in text
    else:
        assert "Public checks: 0 of 4 pass" in text and "(not written yet: ex02.rope_attention" in text
