"""The KDA mixer (glmkit.mixers.kda): parity with GLM-5.3-Flash's linear-attention layer in transformers
(``glm5_next``), loaded from the tensors of a checkpoint transformers itself wrote, with the safe gate and with the
softplus gate; the hooks give back exactly that checkpoint's names; the chunk reference against fla's
``naive_chunk_kda``; the gate's bound. The state, padding and rollback are tested for both mixers in test_gdn.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from delta_helpers import PARITY_TOL, compare_with_hf, fla_naive, sharpen_

from glmkit.mixers.kda import KimiDeltaAttention
from glmkit.models.decoder import Decoder
from glmkit.models.presets import get_config
from glmkit.ops.delta_rule import chunk_gated_delta_rule_reference
from glmkit.testing import rel_err

LAYER = "layers.0.self_attn."


def glm5_next_layer(tmp_path, lower_bound):
    """A one-layer ``Glm5NextTextModel`` (its layer 0 is KDA), sharpened, saved by transformers and read back:
    (the HF layer, its config, the layer's tensors under their checkpoint names)."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file
    from transformers.models.glm5_next.configuration_glm5_next import Glm5NextTextConfig
    from transformers.models.glm5_next.modeling_glm5_next import Glm5NextTextModel

    hf_cfg = Glm5NextTextConfig(
        hidden_size=64,
        linear_num_heads=2,
        linear_head_dim=16,
        linear_lower_bound=lower_bound,
        num_hidden_layers=1,
        rms_norm_eps=1e-5,
        vocab_size=32,
        pad_token_id=0,
        num_attention_heads=2,
        num_key_value_heads=2,
        n_routed_experts=2,
        num_experts_per_tok=1,
        moe_intermediate_size=8,
        intermediate_size=32,
        index_n_heads=2,
        index_head_dim=16,
        index_topk=32,
        index_kpool=16,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_nope_head_dim=16,
        v_head_dim=16,
    )
    model = Glm5NextTextModel(hf_cfg)
    hf = sharpen_(model.layers[0].self_attn).eval()
    assert type(hf).__name__ == "Glm5NextTextLinearAttention"
    model.save_pretrained(str(tmp_path))
    tensors = load_file(str(tmp_path / "model.safetensors"))
    ckpt = {k[len(LAYER) :]: v for k, v in tensors.items() if k.startswith(LAYER)}
    return transformers, hf, hf_cfg, ckpt


@pytest.mark.parametrize("lower_bound", [-5.0, None])
def test_layer_matches_glm5_next(tmp_path, lower_bound):
    transformers, hf, hf_cfg, ckpt = glm5_next_layer(tmp_path, lower_bound)
    # the names in the file, not transformers' module names (it moves f_a_proj… under forget_gate. on load)
    assert {"q_conv1d.weight", "f_a_proj.weight", "A_log", "dt_bias"} <= set(ckpt), sorted(ckpt)
    extra = dict(linear_num_heads=2, linear_head_dim=16, linear_lower_bound=lower_bound)
    cfg = get_config("cpu-small", hidden_size=64, num_hidden_layers=1, layer_types=["kda"], extra=extra)
    ours = KimiDeltaAttention(cfg, 0)
    ours.load_state_dict(KimiDeltaAttention.hf_to_ours(ckpt, cfg))  # strict: every parameter, nothing extra
    back = KimiDeltaAttention.ours_to_hf(ours.state_dict(), cfg)
    assert sorted(back) == sorted(ckpt) and all(torch.equal(back[k], ckpt[k]) for k in ckpt)

    x = torch.randn(2, 75, 64)
    errs = compare_with_hf(hf, ours, transformers.DynamicCache(config=hf_cfg), x, prefix=69)
    assert max(errs) <= PARITY_TOL, errs


@pytest.mark.parametrize("T, chunk", [(100, 64), (37, 16)])
def test_chunk_reference_matches_fla_naive_kda(T, chunk):
    """``chunk_gated_delta_rule_reference`` with a per-channel gate against fla's ``naive_chunk_kda`` (which
    takes whole chunks only: T is padded with inert tokens, g = β = k = 0, and the output cut back)."""
    naive = fla_naive("kda")
    B, H, K, V = 2, 3, 16, 12
    q, k = torch.randn(B, T, H, K), F.normalize(torch.randn(B, T, H, K), dim=-1)
    v, beta = torch.randn(B, T, H, V), torch.rand(B, T, H)
    g, s0 = F.logsigmoid(torch.randn(B, T, H, K) + 2.0), torch.randn(B, H, K, V)
    pad = (-T) % chunk

    def padded(t):
        return F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))

    o_ref, s_ref = naive.naive_chunk_kda(
        *map(padded, (q, k, v, g, beta)), initial_state=s0, output_final_state=True, chunk_size=chunk
    )
    o, s = chunk_gated_delta_rule_reference(q, k, v, g, beta, None, s0, True, chunk_size=chunk)
    assert rel_err(o_ref[:, :T], o) <= 1e-5 and rel_err(s_ref, s) <= 1e-5


def test_safe_gate_is_bounded_and_options_are_checked():
    """g = −5 · sigmoid(·) ∈ (−5, 0) for any input (decay per step ≥ e⁻⁵); the softplus gate is unbounded below."""
    cfg = get_config("cpu-small", num_hidden_layers=1, layer_types=["kda"])
    layer = sharpen_(KimiDeltaAttention(cfg, 0))
    x = 100 * torch.randn(2, 9, 128)
    g, beta = layer.gates(x)
    assert g.shape == (2, 9, 4, 32) and beta.shape == (2, 9, 4)
    assert g.min() >= -5.0 and g.max() <= 0.0 and g.min() < -4.0
    free = sharpen_(KimiDeltaAttention(get_config(cfg, extra={"linear_lower_bound": None}), 0))
    assert free.gates(x)[0].min() < -50.0
    for extra, match in [({"linear_lower_bound": 1.0}, "linear_lower_bound"), ({"linear_head_dim": -1}, "head_dim")]:
        with pytest.raises(ValueError, match=match):
            Decoder(get_config(cfg, extra=extra))
