"""The course map is the one list of lessons: README.md's table is generated from it (and the test fails when they
disagree), a built lesson has its notebook and exercise, the order is 05 MLA · 06 DSA · 07 DeltaNet/KDA · 08 MTP ·
09 capstone, and lesson 00's table and every lesson's "next" pointer read from it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from glmkit.course import course_map as cm

REPO = Path(__file__).resolve().parents[2]


def test_readme_table_is_the_course_map():
    text = (REPO / "README.md").read_text()
    assert cm.readme_with_table(text) == text, (
        "README.md's course table differs: python -m glmkit.course map --write-readme"
    )
    for les in cm.LESSONS:
        assert f"| {les.number} | {les.title} |" in text


def test_order_and_statuses():
    assert [les.number for les in cm.LESSONS] == [f"{i:02d}" for i in range(10)]
    later = {les.number: les.title for les in cm.LESSONS[5:]}
    for number, word in (("05", "MLA"), ("06", "DSA"), ("07", "DeltaNet"), ("08", "MTP"), ("09", "Capstone")):
        assert word in later[number], (number, later[number])
    assert all(les.status in cm.STATUSES for les in cm.LESSONS)
    with pytest.raises(ValueError, match="status"):
        cm.Lesson("10", "x", "", "", "", "10_x.ipynb", status="done")


@pytest.mark.parametrize("les", [les for les in cm.LESSONS if les.built], ids=lambda les: les.number)
def test_a_built_lesson_has_its_notebook_and_exercise(les):
    assert les.available(REPO), f"lesson {les.number} is 'built' but lessons/{les.notebook} does not exist"
    if les.exercise:
        assert (REPO / "exercises" / les.exercise / "exercise.toml").is_file(), les.exercise


def test_lookup_and_html():
    assert cm.lesson(5).number == "05" and cm.next_lesson("04").number == "05" and cm.next_lesson("09") is None
    with pytest.raises(KeyError):
        cm.lesson("12")
    html = cm.lesson_map_html()
    assert html.count("<tr") == len(cm.LESSONS) + 1
    grey = re.findall(r"<tr style='color:#888'>", html)
    assert len(grey) == sum(not les.built for les in cm.LESSONS)


def test_flipping_a_lesson_to_built_changes_the_readme_table():
    # lessons get built: take one that is not yet, or the last one once every lesson is built
    target = next((les for les in cm.LESSONS if not les.built), cm.LESSONS[-1])

    old = cm.LESSONS
    planned, built = (
        tuple(cm.Lesson(**{**les.__dict__, "status": status}) if les is target else les for les in old)
        for status in ("planned", "built")
    )
    row = f"| {target.number} | {target.title} | {target.modules} | {target.kernel} | built"
    try:
        cm.LESSONS = planned
        assert row not in cm.readme_table()
        cm.LESSONS = built
        assert row in cm.readme_table()
    finally:
        cm.LESSONS = old
