"""Exercise 02 (partial RoPE, GQA with a KV cache) in the grading system: the release ships exactly the
learner's files with every function stubbed, and a typical mistake fails with its teaching message.
(tests/grading/test_grading.py's validate test already runs every exercise's master and stub.)"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest

from glmkit.grading.commands import release, self_check
from glmkit.grading.exercise import load_exercise

EX02 = Path(__file__).resolve().parents[2] / "exercises" / "02_rope_and_gqa"
FAST = {"total_timeout": 60, "startup_timeout": 30}


def test_release_of_exercise_02_ships_only_stubs(tmp_path):
    log = io.StringIO()
    assert release(EX02.parent, tmp_path / "out", ["02"], force=True, out=log) == [], log.getvalue()
    d = tmp_path / "out" / EX02.name
    assert sorted(p.name for p in d.iterdir()) == ["checks.py", "ex02.ipynb", "ex02.py", "exercise.toml"]
    stub = (d / "ex02.py").read_text()
    for fn in load_exercise(EX02).functions:
        assert f'NotImplementedError("ex02.{fn}: not implemented yet' in stub
    assert "repeat_interleave" not in stub and "BEGIN SOLUTION" not in stub


@pytest.mark.parametrize(
    "old, new, failing",
    [
        # swapped pairings: the classic porting bug
        (
            'if pairing == "interleaved":\n        x1, x2 = xr[..., 0::2], xr[..., 1::2]',
            'if pairing == "half":\n        x1, x2 = xr[..., 0::2], xr[..., 1::2]',
            "Interleaved pairs",
        ),
        # k/v head h % H_kv instead of h // (H / H_kv)
        ("kf = k.float().repeat_interleave(g, dim=1)", "kf = k.float().repeat(1, g, 1, 1)", "consecutive query heads"),
        # the causal mask ignores q_offset
        ("pos_q = torch.arange(Tq)[:, None] + q_offset", "pos_q = torch.arange(Tq)[:, None]", "absolute position"),
    ],
)
def test_typical_mistakes_fail_with_a_teaching_message(tmp_path, old, new, failing):
    d = tmp_path / EX02.name
    shutil.copytree(EX02, d, ignore=shutil.ignore_patterns("hidden_checks.py", "__pycache__"))
    src = (d / "ex02.py").read_text()
    assert old in src
    if "pairing" in old:  # swap both branches
        src = src.replace('elif pairing == "half":', 'elif pairing == "interleaved":')
    (d / "ex02.py").write_text(src.replace(old, new))
    log = io.StringIO()
    assert self_check(d, seed=5, out=log, limits=FAST) is False
    text = log.getvalue()
    assert "FAIL" in text and failing in text, text
    assert "hidden checks worth 10 more points" in text
