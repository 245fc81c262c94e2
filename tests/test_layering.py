"""The folder tree's layering holds at import time: the library never imports the course tooling or the grader (nor
matplotlib/ipywidgets), and the grader never imports the model code."""

from __future__ import annotations

import json
import subprocess
import sys

LIBRARY = (
    "glmkit.models.decoder",
    "glmkit.models.glm2021",
    "glmkit.train",
    "glmkit.generate",
    "glmkit.hf",
    "glmkit.checkpoint",
    "glmkit.data.lm_data",
    "glmkit.data.blank_infilling",
    "glmkit.data.hf_tokenizer",
)


def _loaded_after(*modules: str) -> set[str]:
    code = "import json, sys\n" + "".join(f"import {m}\n" for m in modules) + "print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_import_glmkit_loads_only_the_backend():
    assert {m for m in _loaded_after("glmkit") if m.startswith("glmkit")} == {"glmkit", "glmkit.backend"}


def test_the_library_does_not_import_course_tooling_or_the_grader():
    loaded = _loaded_after(*LIBRARY)
    offending = sorted(
        m for m in loaded if m.startswith(("glmkit.course", "glmkit.grading", "matplotlib", "ipywidgets", "IPython"))
    )
    assert not offending, offending


def test_the_grader_does_not_import_the_model_code():
    loaded = _loaded_after("glmkit.grading", "glmkit.grading.commands")
    glmkit = {m for m in loaded if m.startswith("glmkit")}
    allowed = {"glmkit", "glmkit.backend", "glmkit.testing"}
    assert {m for m in glmkit if not m.startswith("glmkit.grading")} <= allowed, sorted(glmkit)
