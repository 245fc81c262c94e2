"""A lesson's stated results, checked in the run that shows them.

A lesson's prose says what the learner should see ("MaxVio falls with the bias update", "the fills are right
more often than the commonest-word guess"). ``claim(text, holds)`` prints that sentence with a verdict, in the
run itself, so a learner (and the tests) can tell a run that shows the result from one that does not:

    [holds] MaxVio falls with the bias update (2.71 -> 0.35)
    [DOES NOT HOLD] MaxVio falls with the bias update (2.71 -> 3.00)
    [not checked in a fast run] ...                  (``full_only=True`` under GLMKIT_FAST=1)

tests/lessons (nbclient) and tests/browser (JupyterLab) fail on any "[DOES NOT HOLD]" line in a lesson's output,
and the browser test's screenshots are therefore of runs whose stated results hold. A claim that a CI-sized run
cannot show (a model trained for 25 steps does not fill blanks) is ``full_only``: it is checked in full runs
only (``GLMKIT_BROWSER_FULL=1`` for the screenshots, ``benchmarks/time_lessons.py`` for the timings).

How it differs from before: results were asserted in prose only, and a stale screenshot could show the
opposite of the text (lesson 04's MaxVio rose in the run its screenshot showed).
"""

from __future__ import annotations

import dataclasses
import html

from glmkit.course import fast_mode

HOLDS, FAILS, SKIPPED = "[holds]", "[DOES NOT HOLD]", "[not checked in a fast run]"


@dataclasses.dataclass
class Claim:
    text: str
    holds: bool | None  # None: not checked (fast run, full_only)
    detail: str = ""

    @property
    def verdict(self) -> str:
        return SKIPPED if self.holds is None else (HOLDS if self.holds else FAILS)

    def __str__(self) -> str:
        return f"{self.verdict} {self.text}" + (f" ({self.detail})" if self.detail else "")

    def _repr_html_(self) -> str:
        colour = {True: "#1a7f37", False: "#cf222e", None: "#777"}[self.holds]
        state = {True: "true", False: "false", None: "unchecked"}[self.holds]
        return (
            f"<div class='glm-claim' data-holds='{state}' style='color:{colour}'><b>{html.escape(self.verdict)}</b> "
            f"{html.escape(self.text)}"
            + (f" <span style='color:#555'>({html.escape(self.detail)})</span>" if self.detail else "")
            + "</div>"
        )

    def __repr__(self) -> str:
        return str(self)


RECORDED: list[Claim] = []  # every claim made in this process, in order (what the tests read)


def claim(text: str, holds, detail: str = "", full_only: bool = False) -> None:
    """Print ``text`` (a stated result of the lesson) with its verdict for this run; the ``Claim`` is appended to
    ``RECORDED`` (nothing is returned, so a claim ending a cell is not displayed twice).
    ``holds``: a bool, or a zero-argument callable (not called in a fast run when ``full_only``)."""
    if full_only and fast_mode():
        c = Claim(text, None, detail)
    else:
        value = holds() if callable(holds) else holds
        c = Claim(text, bool(value), detail)
    RECORDED.append(c)
    print(str(c))


def failed_claims(text: str) -> list[str]:
    """The '[DOES NOT HOLD]' lines of a run's output text (what the lesson tests look for)."""
    return [line.strip() for line in text.splitlines() if FAILS in line]


__all__ = ["Claim", "claim", "failed_claims", "HOLDS", "FAILS", "SKIPPED", "RECORDED"]
