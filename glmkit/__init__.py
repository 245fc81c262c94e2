"""glmkit: the GLM model lineage, built piece by piece — a compact library and the course built on it.

The library (``import glmkit`` loads only ``glmkit.backend``; each module imports what it needs):
    glmkit.ops          kernel-backed ops, 1:1 with the Triton kernels in ``glmkit.kernels``: torch reference,
                        dispatch, autograd (attention, rmsnorm, swiglu, rope, moe_align, moe_experts, ...)
    glmkit.layers       RMSNorm and the SwiGLU MLP;   glmkit.moe  routers, balancing, the MoE layer
    glmkit.mixers       token mixers, one file each, registered by name (attention; MLA, DSA, DeltaNet next)
    glmkit.cache        the one inference-state protocol (KV, latents, recurrent states) and its rollback
    glmkit.models       the one Decoder and its presets (ChatGLM2 → GLM-4 → GLM-4.5 ...), GLM-2021
    glmkit.data         tokenizers, built-in corpora, blank-infilling and next-token batches
    glmkit.train        one training loop;   glmkit.generate  one generator (and GLM's blank filling)
    glmkit.checkpoint   safetensors checkpoints and exact resume;   glmkit.hf  Hugging Face checkpoints
    glmkit.backend      which implementation runs (Triton or torch), overriding and auditing it
    glmkit.testing      relative error, per-dtype tolerances, poisoned allocations
Apart from the library, and never imported by it:
    glmkit.course       the lessons' tooling: plots, widgets, the doctor, lesson helpers, historical variants
    glmkit.grading      the exercise grader (imports nothing of the library but ``glmkit.testing``)
"""

from __future__ import annotations

__version__ = "0.2.0"

from glmkit.backend import get_backend, set_backend, use_backend  # noqa: E402,F401


def _map_kernels_folder() -> None:
    """From a source checkout that was not pip-installed (e.g. ``PYTHONPATH=.`` on a GPU box), the installed
    mapping of ``kernels/`` onto ``glmkit.kernels`` does not exist: set it up by hand."""
    import importlib.util
    import pathlib
    import sys

    if importlib.util.find_spec("glmkit.kernels") is not None:
        return
    folder = pathlib.Path(__file__).resolve().parent.parent / "kernels"
    if not (folder / "__init__.py").is_file():
        return
    spec = importlib.util.spec_from_file_location(
        "glmkit.kernels", folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["glmkit.kernels"] = module
    spec.loader.exec_module(module)


_map_kernels_folder()
