"""The models of the GLM lineage, one module per generation.

    glmkit.models.glm2021   GLM (Du et al. 2021): learned 2D positions, pre-LN, tied head (lesson 01)
    glmkit.models.glm_dense ChatGLM-6B → GLM-130B → ChatGLM2/3 → GLM-4 → GLM-4-0414 as one configurable
                            model, loadable from Hugging Face `glm` / `glm4` checkpoints (lessons 02-03)
    glmkit.models.glm_moe   GLM-4.5: the GLM-4 block with MoE FFNs, QK-norm, half-split RoPE and the stored
                            MTP layer; loads/saves `glm4_moe` checkpoints (lesson 04)
"""

from glmkit.models.glm2021 import PRESETS, GLMConfig, GLMModel, get_config  # noqa: F401

__all__ = ["GLMConfig", "GLMModel", "PRESETS", "get_config"]
