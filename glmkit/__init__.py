"""glmkit: the GLM model lineage, built piece by piece.

GLM-2021 blank infilling → GLM-130B / ChatGLM → GLM-4 → GLM-4.5 MoE → MLA and DSA (GLM-5) → DeltaNet
hybrids → multi-token prediction. Each lesson in ``lessons/`` teaches one module of this package, and
each module has a plain-torch reference that its Triton kernel (in ``glmkit.kernels``) is tested against.

Modules (lesson in brackets):
    glmkit.tokenizer        byte-level tokenizer with GLM's special tokens                      [01]
    glmkit.corpus           the built-in corpora (no download) and loading your own text         [01]
    glmkit.blank_infilling  GLM's objective: span sampling, Part A / Part B, 2D positions, mask  [01]
    glmkit.attention        attention under the GLM mask: torch reference, kernel dispatch, autograd
    glmkit.models.glm2021   the GLM-2021 transformer and its presets                            [01]
    glmkit.train            training (blank infilling or next token; MoE balancing): progress bar, live
                            loss plot, safetensors checkpoints, exact resume                   [01, 03-04]
    glmkit.lm_data          next-token batches over the built-in corpus (dense and MoE models)  [03-04]
    glmkit.generate         filling blanks and [gMASK] generation (GLM-2021 models)             [01]
    glmkit.rope, norms, mlp positions (2D / partial RoPE), RMSNorm/LayerNorm, GeLU/GeGLU/SwiGLU  [02-03]
    glmkit.models.glm_dense the dense family ChatGLM-6B → GLM-4-0414 as one configurable model  [02-03]
    glmkit.kv_cache, sampling  KV cache and generation for the dense family                     [02-03]
    glmkit.hf, hf_tokenizer Hugging Face checkpoints (glm, glm4, glm4_moe) and tokenizer.json    [03-04]
    glmkit.moe, moe_configs GLM-4.5 mixture of experts: routers, balancing, experts, presets     [04]
    glmkit.models.glm_moe   the GLM-4.5 model: MoE layers, QK-norm, half-split RoPE, MTP layer   [04]
    glmkit.viz, viz_positions, viz_moe  the lessons' plots and explorers                         [01-04]
    glmkit.backend          which implementation runs (Triton kernel or torch), overriding it, auditing it
    glmkit.doctor           `python -m glmkit doctor`: is this machine ready for the course?
    glmkit.grading          graded exercises: validate, release, self-check, isolated autograding
    glmkit.testing          relative error, poisoned buffers, per-dtype tolerances
"""

from __future__ import annotations

__version__ = "0.1.0"

from glmkit.backend import get_backend, set_backend, use_backend  # noqa: E402,F401


def _map_kernels_folder() -> None:
    """From a source checkout that was not pip-installed (e.g. ``PYTHONPATH=.`` on a GPU box), the
    installed mapping of ``kernels/`` onto ``glmkit.kernels`` does not exist: set it up by hand."""
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
