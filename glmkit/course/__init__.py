"""The course's tooling, apart from the library (``glmkit`` never imports it): lesson helpers here; plots and
widgets in ``viz``, ``viz_positions``, ``viz_moe``; the machine check in ``doctor``; parameter counting in
``counting``; the generations no checkpoint needs (LayerNorm, GeGLU, 2D RoPE, DeepNorm) in ``lineage``.

Lesson helpers, the plumbing every lesson shares so notebooks stay short:

    fast_mode()         True when GLMKIT_FAST=1: CI and the browser tests shrink every lesson with it.
                        The default (unset) is the full lesson, whose run time the lesson header states.
    pick(full, fast)    the full-run value, or the CI-sized one in fast mode.
    start("01")         prints a banner (mode, device, backend) and returns a LessonClock; time sections
                        with ``with clock.section("training"):`` and print the totals with ``clock.done()``.
    lesson_map()        the course map as data (one dict per lesson), ``lesson_map_html()`` as a table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import html
import os
import platform
import time
from collections.abc import Iterator

FAST_ENV = "GLMKIT_FAST"


def fast_mode() -> bool:
    """True when the environment asks for a CI-sized run (GLMKIT_FAST=1, or true/yes/on)."""
    return os.environ.get(FAST_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def pick(full, fast):
    """``full`` in a normal run, ``fast`` under GLMKIT_FAST=1 (e.g. ``steps = pick(400, 40)``)."""
    return fast if fast_mode() else full


# ----------------------------------------------------------------------------------------------------
# The lesson clock


class LessonClock:
    """Wall-clock time per section of a lesson, so a learner can compare with the stated run time."""

    def __init__(self, lesson: str):
        self.lesson = lesson
        self.t0 = time.perf_counter()
        self.sections: list[tuple[str, float]] = []

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.sections.append((name, time.perf_counter() - t))

    def elapsed(self) -> float:
        """Seconds since the lesson started."""
        return time.perf_counter() - self.t0

    def done(self) -> float:
        """Print the time of each timed section and the total; return the total in seconds."""
        total = self.elapsed()
        for name, sec in self.sections:
            print(f"  {name:<40s} {sec:7.1f} s")
        mode = "fast (GLMKIT_FAST=1)" if fast_mode() else "full"
        print(f"lesson {self.lesson} ran in {total:.0f} s ({mode} run, {_device_line()})")
        return total


def _device_line() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"GPU: {torch.cuda.get_device_name(0)}"
        return f"CPU: {os.cpu_count()} cores, torch threads={torch.get_num_threads()}"
    except Exception:  # pragma: no cover - torch missing: the doctor explains
        return f"CPU: {os.cpu_count()} cores"


def start(lesson: str) -> LessonClock:
    """Print the lesson banner (run mode, device, kernel backend) and start the lesson clock."""
    mode = "FAST (GLMKIT_FAST=1: CI-sized run)" if fast_mode() else "full run"
    line = f"lesson {lesson} · {mode} · {_device_line()} · Python {platform.python_version()}"
    try:
        from glmkit import backend

        line += "\n" + backend.describe()
    except Exception:  # pragma: no cover
        pass
    print(line)
    return LessonClock(lesson)


# ----------------------------------------------------------------------------------------------------
# The course map


@dataclasses.dataclass(frozen=True)
class Lesson:
    number: str
    title: str
    models: str  # which GLM generation(s) the lesson follows
    builds: str  # what glmkit gains
    kernel: str  # the Triton kernel of the lesson
    notebook: str  # lessons/<notebook>, once it exists

    def available(self, root: str | os.PathLike | None = None) -> bool:
        """True when the notebook exists in lessons/ (of ``root``, default: this checkout)."""
        base = os.path.join(root or _repo_root(), "lessons")
        return os.path.exists(os.path.join(base, self.notebook))


def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


LESSONS: tuple[Lesson, ...] = (
    Lesson(
        "00",
        "Setup and a Triton primer",
        "—",
        "the doctor, the course tools, how exercises are checked",
        "a fused scale-and-add and a row softmax (program ids, blocks, masks)",
        "00_setup_and_triton_primer.ipynb",
    ),
    Lesson(
        "01",
        "Autoregressive blank infilling",
        "GLM (2021)",
        "tokenizer, corpus, span sampling, Part A/B with 2D positions, the GLM mask, the GLM-2021 model, "
        "training, filling blanks, [gMASK] generation",
        "flash attention forward under the GLM mask (skips fully masked blocks)",
        "01_blank_infilling.ipynb",
    ),
    Lesson(
        "02",
        "Attention and positions through the generations",
        "GLM → ChatGLM-6B → ChatGLM2/3 → GLM-4",
        "2D RoPE, partial RoPE in both pairings, MHA/MQA/GQA with a KV cache, QK-norm",
        "tiled flash attention, step by step (forward and backward)",
        "02_attention_and_positions.ipynb",
    ),
    Lesson(
        "03",
        "The GLM block",
        "GLM-130B → ChatGLM2/3 → GLM-4 → GLM-4-0414",
        "DeepNorm, pre-norm and sandwich norms, GeLU → GeGLU → SwiGLU, a dense GLM-4-style model, HF parity",
        "fused RMSNorm and SwiGLU (forward and backward)",
        "03_the_glm_block.ipynb",
    ),
    Lesson(
        "04",
        "Mixture of Experts",
        "GLM-4.5",
        "sigmoid router with selection bias, shared expert, aux-loss-free balancing, HF parity",
        "token permutation and a gathering grouped GEMM",
        "04_mixture_of_experts.ipynb",
    ),
    Lesson(
        "05",
        "Multi-head latent attention",
        "GLM-5",
        "MLA: low-rank KV compression, decoupled RoPE, the absorbed decode path",
        "MLA decode attention",
        "05_latent_attention.ipynb",
    ),
    Lesson(
        "06",
        "DeepSeek sparse attention (DSA)",
        "GLM-5",
        "the lightning indexer, top-k token selection, the indexer's KL warm-up",
        "indexer scores and sparse attention over selected tokens",
        "06_sparse_attention.ipynb",
    ),
    Lesson(
        "07",
        "DeltaNet → Gated DeltaNet → KDA, and the hybrid",
        "GLM-5.3-Flash",
        "the delta rule, recurrent and chunkwise (WY) forms, gating, KDA, a linear/full hybrid stack",
        "chunkwise gated delta rule",
        "07_deltanet_hybrid.ipynb",
    ),
    Lesson(
        "08",
        "Multi-token prediction and speculative decoding",
        "GLM-4.5 / GLM-5",
        "the MTP module, its loss weight, speculative decoding with it",
        "MTP draft-and-verify step",
        "08_multi_token_prediction.ipynb",
    ),
    Lesson(
        "09",
        "Capstone: the full hybrid model on GPU",
        "all of it",
        "assembling the hybrid GLM, training and generating on a GPU, scaling out with torchrun",
        "—",
        "09_capstone.ipynb",
    ),
)


def lesson_map() -> list[dict]:
    """The course map: one dict per lesson (number, title, models, builds, kernel, notebook, available)."""
    return [dict(dataclasses.asdict(l), available=l.available()) for l in LESSONS]


def lesson_map_html() -> str:
    """The course map as an HTML table (lessons not written yet are shown in grey)."""
    head = "".join(
        f"<th style='text-align:left'>{h}</th>"
        for h in ("#", "lesson", "GLM generation", "what glmkit gains", "Triton kernel")
    )
    rows = []
    for l in lesson_map():
        style = "" if l["available"] else " style='color:#888'"
        cells = (l["number"], l["title"], l["models"], l["builds"], l["kernel"])
        rows.append(
            f"<tr{style}>" + "".join(f"<td style='text-align:left'>{html.escape(c)}</td>" for c in cells) + "</tr>"
        )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


__all__ = ["fast_mode", "pick", "start", "LessonClock", "Lesson", "LESSONS", "lesson_map", "lesson_map_html"]
