"""Hugging Face ``glm5_next`` (GLM-5.3-Flash: 3:1 KDA : NoPE MLA-DSA with the KPool indexer, MoE with a shared expert
and the clamped SwiGLU, mHC) with transformers as the oracle. transformers has no text-only class: the oracle is
``Glm5NextForConditionalGeneration`` run on text. Tiny random checkpoints it writes load into the one Decoder (its
vision tower skipped with a warning) and give its logits (fp32, relative error <= 1e-4) for prefill, cached decoding
(KDA state + latent + index keys and gate scores in one cache) and greedy generation, with T well above
``index_topk`` so the pooled selection changes the result (checked: a larger k or no tail moves the logits far beyond
the tolerance); save_hf writes what transformers loads (text only, or with the kept vision tower) and load_hf reads
back; a model trained with glmkit exports with the same logits in transformers; the GLM-5.3-Flash preset against
transformers' defaults and the published 320B total / 18B active."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="HF parity tests need transformers>=5.24")

from hf_oracle import cached_decode_errors, sharpen_  # noqa: E402  (tests/hf_oracle.py)
from safetensors.torch import load_file  # noqa: E402

from glmkit import backend  # noqa: E402
from glmkit.generate import generate  # noqa: E402
from glmkit.hf import HFCheckpointError, config_from_hf, load_hf, save_hf  # noqa: E402
from glmkit.mixers.dsa import DSA, DSAState  # noqa: E402
from glmkit.mixers.gdn import DeltaRuleState  # noqa: E402
from glmkit.mixers.kda import KimiDeltaAttention  # noqa: E402
from glmkit.models.decoder import Decoder  # noqa: E402
from glmkit.models.presets import PUBLISHED, get_config  # noqa: E402
from glmkit.testing import rel_err  # noqa: E402
from glmkit.train import TrainConfig, train  # noqa: E402

TOL = 1e-4
V = 128
TOPK, KPOOL = 8, 4  # two pools of 4 + a tail of up to 3 tokens


def tiny_g5n(**overrides):
    """A random transformers Glm5NextForConditionalGeneration: text hidden 64, 4 layers (KDA, KDA, KDA, DSA: the 3:1
    pattern) with 1 dense + 3 MoE FFNs (8 experts top-2 + 1 shared, swiglu_limit 10... sharpened weights make the clamp
    bite), 4 heads; NoPE MLA q_lora 32, kv_lora 32, q·k 16, v 16; KPool indexer 16 heads × 16, top-8 in pools of 4
    (16 heads: an all-negative pool score, a tie at 0, is rare); KDA 2 heads × 16; mHC with 4 streams; a one-block
    vision tower. Weights at unit fan-in scale and a random routing bias."""
    text = dict(
        vocab_size=V,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=0,
        v_head_dim=16,
        index_n_heads=16,
        index_head_dim=16,
        index_topk=TOPK,
        index_kpool=KPOOL,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        linear_num_heads=2,
        linear_head_dim=16,
        hc_mult=4,
        swiglu_limit=3.0,
        mlp_layer_types=["dense", "sparse", "sparse", "sparse"],
        max_position_embeddings=256,
        pad_token_id=0,
        eos_token_id=[1, 2],
    )
    text.update(overrides)
    vision = dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=32, out_hidden_size=64)
    cfg = transformers.Glm5NextConfig(text_config=text, vision_config=vision)
    model = sharpen_(transformers.Glm5NextForConditionalGeneration(cfg).eval())
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.3)
        for name, p in model.named_parameters():  # the safe gate's rate (exp A_log) near 1, as fla's init
            if name.endswith(("A_log", "dt_bias")):
                p.normal_(0.0, 0.3)
    return model


def save_tiny(model, path):
    model.save_pretrained(str(path))
    return path


def load(path, **kw):
    with pytest.warns(UserWarning, match="skipped the vision tower"):
        return load_hf(path, **kw)


CASES = {
    "three_to_one": {},
    "two_dsa_one_dense": dict(
        layer_types=["linear_attention", "indexed_attention", "linear_attention", "indexed_attention"],
        mlp_layer_types=["dense", "dense", "sparse", "sparse"],
        linear_lower_bound=None,  # KDA's softplus gate instead of the safe gate
    ),
    "no_tail_hc2": dict(index_kpool_always_select_tail=False, hc_mult=2, n_group=4, topk_group=2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_prefill_logits_match(case, tmp_path):
    hf = tiny_g5n(**CASES[case])
    ours = load(save_tiny(hf, tmp_path / case))
    kinds = hf.config.text_config.layer_types
    assert ours.config.layer_types == ["kda" if k == "linear_attention" else "dsa" for k in kinds]
    mixers = [type(layer.mixer) for layer in ours.layers]
    assert mixers == [DSA if k == "dsa" else KimiDeltaAttention for k in ours.config.layer_types]
    dsa = next(layer.mixer for layer in ours.layers if isinstance(layer.mixer, DSA))
    assert (dsa.rope_dim, dsa.kpool, dsa.topk) == (0, KPOOL, TOPK)
    assert ours.config.hc_mult == hf.config.text_config.hc_mult
    x = torch.randint(0, V, (3, 23))
    with torch.no_grad():
        err = rel_err(hf(x).logits, ours(x))
    assert err <= TOL, f"{case} prefill: rel err {err:.2e}"


def test_pooling_and_the_tail_matter(tmp_path):
    """The checks above can fail: the same weights with k = T (every pool: dense attention), without the tail or
    with pools of one token give other logits (T = 24 > k = 8)."""
    hf = tiny_g5n()
    path = save_tiny(hf, tmp_path / "m")
    x = torch.randint(0, V, (2, 24))
    with torch.no_grad():
        ref = hf(x).logits
        assert rel_err(ref, load(path)(x)) <= TOL
        errs = []
        for attr, value in (("topk", 24), ("kpool_tail", False)):
            other = load(path)
            for layer in other.layers:
                if isinstance(layer.mixer, DSA):
                    setattr(layer.mixer, attr, value)
            errs.append(rel_err(ref, other(x)))
    assert min(errs) > 1e-2, errs


def test_left_padded_batch(tmp_path):
    """A left-padded batch (pools start at each row's first real token): the real positions' logits match."""
    hf = tiny_g5n()
    ours = load(save_tiny(hf, tmp_path / "m"))
    x = torch.randint(3, V, (2, 22))
    mask = torch.ones(2, 22, dtype=torch.bool)
    mask[0, :5] = False
    with torch.no_grad():
        ref = hf(x, attention_mask=mask.long()).logits
        got = ours(x, attention_mask=mask)
    assert rel_err(ref[mask], got[mask]) <= TOL


def test_cached_decoding(tmp_path):
    """Prefill 9 tokens, then one at a time to 21 (pools complete and tails grow during decoding); the cache holds
    the KDA states, the latents and the index keys with their gate scores."""
    hf = tiny_g5n()
    ours = load(save_tiny(hf, tmp_path / "m"))
    errs = cached_decode_errors(hf, ours, torch.randint(0, V, (2, 21)), prefix=9)
    assert max(errs) <= TOL, f"cached decode: rel errs {[f'{e:.1e}' for e in errs]}"
    cache = ours.new_cache(2, 32)
    assert [type(s) for s in cache.layers] == [DeltaRuleState] * 3 + [DSAState]
    assert cache.layers[3].latent.shape == (2, 32, 32)  # NoPE: c_KV alone
    assert cache.layers[3].index_keys.shape == cache.layers[3].pool_gates.shape == (2, 32, 16)


def test_cached_decoding_on_the_kernel_path(tmp_path):
    """Forced to "triton" on CPU (interpreter): the sparse prefill and split decode kernels over the KPool selection
    (NoPE: one zero rotary column), the delta-rule kernels."""
    hf = tiny_g5n()
    ours = load(save_tiny(hf, tmp_path / "m"))
    with backend.use_backend("triton"), backend.audit() as a:
        errs = cached_decode_errors(hf, ours, torch.randint(0, V, (1, 14)), prefix=10)
    assert max(errs) <= TOL, errs
    assert a.paths("sparse_mla") == {"triton"} and a.paths("sparse_mla_decode") == {"triton"}


def test_greedy_generation_matches_transformers(tmp_path):
    hf = tiny_g5n()
    ours = load(save_tiny(hf, tmp_path / "g"))
    prompt = torch.randint(3, V, (1, 9))
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=14, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert generate(ours, prompt, 14, stop_tokens=()).tokens[0] == ref[0, prompt.shape[1] :].tolist()


def test_vision_tower_kept_or_left_out(tmp_path):
    """keep_vision=True: save_hf writes the tower and its config back, tensor for tensor. Without it, save_hf writes
    the language model alone with a one-block vision_config; transformers loads both, with the same text logits."""
    hf = tiny_g5n()
    path = save_tiny(hf, tmp_path / "m")
    src = load_file(str(path / "model.safetensors"))
    with pytest.warns(UserWarning, match="kept the vision tower"):
        kept = load_hf(path, keep_vision=True)
    out = load_file(str(save_hf(kept, tmp_path / "kept") / "model.safetensors"))
    assert set(out) == set(src) and all(torch.equal(out[k], src[k]) for k in src)
    assert json.loads((tmp_path / "kept" / "config.json").read_text())["vision_config"]["depth"] == 1
    text_only = save_hf(load(path), tmp_path / "text")
    stored = load_file(str(text_only / "model.safetensors"))
    assert not any(k.startswith("model.visual.") for k in stored)
    assert set(stored) == {k for k in src if not k.startswith("model.visual.")}
    x = torch.randint(0, V, (2, 19))
    with torch.no_grad():
        ref = hf(x).logits
        for folder in (tmp_path / "kept", text_only):
            again = transformers.Glm5NextForConditionalGeneration.from_pretrained(str(folder)).eval()
            assert rel_err(ref, again(x).logits) <= TOL, folder


def test_reads_transformers_in_memory_names_and_a_flat_prefix(tmp_path):
    """A checkpoint written from transformers' module names (``attn_hc.fn``, one ``conv1d``, ``forget_gate.``,
    stacked experts) with a flat ``model.layers.`` prefix loads to the same model."""
    from safetensors.torch import save_file

    hf = tiny_g5n()
    path = save_tiny(hf, tmp_path / "m")
    flat = tmp_path / "flat"
    flat.mkdir()
    sd = {
        k.replace("model.language_model.", "model."): v.contiguous()
        for k, v in hf.state_dict().items()
        if not k.startswith("model.visual.")
    }
    assert "model.layers.0.attn_hc.fn" in sd and "model.layers.0.self_attn.conv1d.weight" in sd
    assert "model.layers.1.mlp.experts.gate_up_proj" in sd
    save_file(sd, str(flat / "model.safetensors"), metadata={"format": "pt"})
    (flat / "config.json").write_text((path / "config.json").read_text())
    a, b = load(path), load_hf(flat)
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k


@pytest.mark.filterwarnings("ignore:.*vision tower")
def test_errors_name_the_problem(tmp_path):
    folder = save_tiny(tiny_g5n(), tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    for change, match in (
        (dict(qk_rope_head_dim=8), "glm5_next's MLA is NoPE"),
        (dict(hc_mult=1), "hc_mult=1"),
        (dict(layer_types=["linear_attention"] * 3), "layer_types must list 4"),
        (dict(index_topk=0), "index_topk=0 must be a positive int"),
    ):
        (folder / "config.json").write_text(json.dumps({**cfg, "text_config": {**cfg["text_config"], **change}}))
        with pytest.raises(HFCheckpointError, match=match):
            load_hf(folder)
    text = {k: v for k, v in cfg["text_config"].items() if k != "index_head_dim"}
    (folder / "config.json").write_text(json.dumps({**cfg, "text_config": text}))
    with pytest.raises(HFCheckpointError, match=r"lacks required fields \['index_head_dim'\]"):
        load_hf(folder)
    for changes, match in (
        (dict(hc_mult=1), "hc_mult=1"),
        (dict(layer_types=["kda", "kda", "kda", "attention"]), "layer_types="),
        (dict(swiglu_limit=None), "swiglu_limit=None"),
    ):
        with pytest.raises(HFCheckpointError, match=match):
            save_hf(Decoder(get_config("cpu-capstone", **changes)), tmp_path / "x")


# ---- export of a model trained with glmkit ---------------------------------------------------------------------
def test_trained_capstone_exports_to_transformers(tmp_path):
    """cpu-capstone shrunk (2 KDA + 1 NoPE DSA-KPool + 1 KDA, MoE, mHC, an MTP layer), trained a few steps with
    train() on sequences beyond its index_topk, exported with save_hf: transformers' logits on text equal ours, the
    cached greedy continuation is the same, and load_hf gives back every weight and the MTP layer."""
    torch.manual_seed(0)
    base = get_config("cpu-capstone")
    cfg = get_config(
        base,
        vocab_size=V,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=128,
        extra={**base.extra, "index_topk": 8, "index_kpool": 4, "linear_num_heads": 2, "linear_head_dim": 32},
    )
    ours = Decoder(cfg)
    history = train(ours, cfg=TrainConfig(steps=6, batch_size=2, seq_len=40, warmup_steps=1), progress=False)
    assert history.losses[-1] < history.losses[0] and "dsa_indexer" in history.aux
    ours.eval()
    folder = save_hf(ours, tmp_path / "export")
    written = json.loads((folder / "config.json").read_text())
    assert written["architectures"] == ["Glm5NextForConditionalGeneration"]
    assert written["text_config"]["layer_types"][:4] == ["linear_attention"] * 3 + ["indexed_attention"]
    assert written["text_config"]["num_nextn_predict_layers"] == 1
    hf = transformers.Glm5NextForConditionalGeneration.from_pretrained(str(folder)).eval()
    x = torch.randint(0, V, (2, 37))
    with torch.no_grad():
        assert rel_err(hf(x).logits, ours(x)) <= TOL
        ref = hf.generate(x[:1, :12], max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert generate(ours, x[:1, :12], 10, stop_tokens=()).tokens[0] == ref[0, 12:].tolist()
    back = load_hf(folder)
    assert back.config.num_nextn_predict_layers == 1 and back.config.mtp_layer_type == cfg.mtp_layer_type
    theirs = back.state_dict()
    for k, v in ours.state_dict().items():
        assert torch.equal(v, theirs[k]), k


# ---- GLM-5.3-Flash -----------------------------------------------------------------------------------------------
def test_glm_5_3_flash_preset_matches_transformers_defaults_and_published_size():
    """transformers' Glm5NextTextConfig defaults are GLM-5.3-Flash (checkpoint zai-org/GLM-5.3-Flash): read through
    config_from_hf they give the preset. On the meta device, against the card's 320B total / 18B active: the whole
    checkpoint (language model + MTP layer + vision tower) 321.22B, +0.4 %; active per token (the language model's
    KDA, MLA-DSA with indexers, mHC, dense FFNs, 8 + 1 experts per MoE layer; embedding and head; the dense vision
    tower) 17.84B, −0.9 %. The vision tower's size is transformers' own count at its defaults."""
    from transformers.models.glm5_next.modeling_glm5_next import Glm5NextVisionModel

    from glmkit.models.presets import GLM_5_3_FLASH_VISION

    preset = get_config("glm-5.3-flash")
    hf_text = transformers.Glm5NextTextConfig()
    from_hf = config_from_hf({"model_type": "glm5_next", "text_config": hf_text.to_dict()})
    skip = {"pad_token_id", "bos_token_id", "eos_token_id", "extra", "num_nextn_predict_layers", "mtp_tied"}
    for field, value in preset.to_dict().items():
        if field not in skip and field not in preset.extra:
            assert getattr(from_hf, field) == value, field
    for k, v in preset.extra.items():
        assert from_hf.opt(k) == v, k
    with torch.device("meta"):
        model = Decoder(preset)
        vision = Glm5NextVisionModel._from_config(transformers.Glm5NextConfig().vision_config)
    assert sum(p.numel() for p in vision.parameters()) == GLM_5_3_FLASH_VISION
    total, active = PUBLISHED["glm-5.3-flash"]
    n = model.num_parameters(include_mtp=True) + GLM_5_3_FLASH_VISION
    a = model.num_active_parameters(include_embeddings=True) + GLM_5_3_FLASH_VISION
    assert n == 321_220_269_364 and abs(n / total - 1) < 0.01
    assert a == 17_836_798_974 and abs(a / active - 1) < 0.01
    assert model.num_parameters() == 313_326_816_766  # without the MTP layer: -2.1 %, the convention of glm-5
    kinds = preset.layer_types
    assert kinds.count("kda") == 34 and kinds.count("dsa") == 11 and all(kinds[i] == "dsa" for i in range(3, 45, 4))
    assert preset.mlp_layer_types == ["dense"] * 3 + ["sparse"] * 42 == list(hf_text.mlp_layer_types)
