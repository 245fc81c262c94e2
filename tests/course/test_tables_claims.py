"""glmkit.course.tables and .claims: a table renders as Markdown and as text; a committed benchmark file is read
into its title, settings and sections; a stated result prints its verdict, and a full_only claim is not checked
(and not evaluated) in a fast run."""

from __future__ import annotations

import pytest

from glmkit.course import claims, tables


def test_table_markdown_and_text():
    t = tables.table(["model", "loss"], [["a|b", 0.12345], ["c", 2]], fmt=[None, ".2f"])
    assert t._repr_markdown_().splitlines() == ["| model | loss |", "|---|---|", "| a\\|b | 0.12 |", "| c | 2.00 |"]
    assert repr(t).splitlines()[1].split() == ["a|b", "0.12"]
    with pytest.raises(ValueError, match="columns"):
        tables.table(["a"], [[1, 2]])


def test_read_benchmark_sections(tmp_path):
    f = tmp_path / "x_h200.md"
    f.write_text(
        "# Title here\n\n- date: 2026-11-23\n- GPU: H200\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n"
        "## Part two\ntext\n| c |\n|---|\n| 3 |\n"
    )
    b = tables.read_benchmark(str(f))
    assert b.title == "Title here" and b.meta == {"date": "2026-11-23", "GPU": "H200"}
    assert b.tables("") == ["| a | b |\n|---|---|\n| 1 | 2 |"] and b.tables("Part") == ["| c |\n|---|\n| 3 |"]
    with pytest.raises(KeyError, match="no section"):
        b.tables("nothing")


def test_the_committed_benchmarks_read():
    for name, section in (
        ("glm_attention_h200.md", ""),
        ("norm_swiglu_rope_h200.md", "RMSNorm"),
        ("moe_h200.md", "Ratios"),
    ):
        b = tables.read_benchmark(name)
        assert b.tables(section) and "H200" in b.meta.get("GPU", ""), name


def test_claims_verdicts(monkeypatch, capsys):
    monkeypatch.delenv("GLMKIT_FAST", raising=False)
    claims.claim("it holds", True)
    assert claims.RECORDED[-1].holds is True
    claims.claim("it fails", lambda: False, "3 > 2")
    assert claims.RECORDED[-1].holds is False
    out = capsys.readouterr().out
    assert "[holds] it holds" in out and "[DOES NOT HOLD] it fails (3 > 2)" in out
    assert claims.failed_claims(out) == ["[DOES NOT HOLD] it fails (3 > 2)"]
    monkeypatch.setenv("GLMKIT_FAST", "1")

    def boom():
        raise AssertionError("a full_only claim must not be evaluated in a fast run")

    claims.claim("needs a full run", boom, full_only=True)
    assert claims.RECORDED[-1].holds is None
    claims.claim("checked in fast runs too", False)
    assert claims.RECORDED[-1].holds is False
    out = capsys.readouterr().out
    assert "[not checked in a fast run] needs a full run" in out and claims.failed_claims(out)
