"""glmkit.course.viz_mla: the cache figures are what the decoder allocates and what the published configs imply,
the weight bytes of a decode step agree with the decoder's own parameter counts (one token: its active weights; a
huge batch: all of them), the expected number of visited experts matches a simulation, the arithmetic intensity is
what the FLOP counter sees in the absorbed decode, the split-K picture covers every key exactly once, and the
explorer redraws when a control moves."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

import glmkit.kernels  # noqa: F401  (TRITON_INTERPRET=1 without CUDA, before anything imports triton)
from glmkit.course import viz_mla as vm
from glmkit.models.decoder import Decoder
from glmkit.models.presets import get_config
from glmkit.ops.mla_decode import mla_decode_reference


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_cache_per_token_and_layer_is_what_the_published_configs_imply():
    """Values per token and layer from the configs' published fields (glm-lineage §3-§5): GQA 2 · KV heads · 128,
    MLA kv_lora_rank + qk_rope_head_dim = 512 + 64, GLM-5 plus its indexer key of 128."""
    rows = {r[0]: r for r in vm.cache_table(context=1000)}
    assert rows["GLM-4-9B"][3] == 2 * 2 * 128 and rows["GLM-4-9B"][2] == 40
    assert rows["GLM-4.5"][3] == 2 * 8 * 128 and rows["GLM-4.5"][2] == 92
    assert rows["GLM-4.5 as MHA"][3] == 2 * 96 * 128 and rows["GLM-4.5 as MQA"][3] == 2 * 128
    assert rows["GLM-4.7-Flash"][3] == 512 + 64 and rows["GLM-4.7-Flash"][2] == 47
    assert rows["GLM-5"][3] == 512 + 64 + 128 and rows["GLM-5"][2] == 78
    for r in rows.values():
        assert r[4] == 2 * r[3]  # bf16
        assert r[5] * 1024 == r[2] * r[4]  # KiB per token, all layers
        assert r[6] * 2**30 == pytest.approx(1000 * r[2] * r[4])


@pytest.mark.parametrize("preset", ["cpu-small", "cpu-mla", "cpu-dsa"])
def test_cache_bytes_equal_what_the_decoder_allocates(preset):
    cfg = get_config(preset, num_hidden_layers=2)
    model = Decoder(cfg)
    for dtype in (torch.bfloat16, torch.float32):
        assert vm.cache_bytes(cfg, 24, batch=3, dtype=dtype) == model.new_cache(3, 24, dtype=dtype).nbytes
    assert vm.cache_bytes_per_token(cfg, torch.float32) * 24 * 3 == model.new_cache(3, 24).nbytes


def test_expected_experts_matches_a_simulation():
    g = torch.Generator().manual_seed(0)
    for E, k, B in ((160, 8, 1), (160, 8, 32), (64, 4, 8), (256, 8, 128)):
        seen = [
            torch.rand(B, E, generator=g).topk(k, dim=-1).indices.unique().numel() for _ in range(300)
        ]  # distinct experts of B tokens routed uniformly
        assert vm.expected_experts(E, k, B) == pytest.approx(np.mean(seen), rel=0.02), (E, k, B)
    assert vm.expected_experts(160, 8, 1) == pytest.approx(8)
    assert vm.expected_experts(160, 8, 10**6) == pytest.approx(160)


@pytest.mark.parametrize("name", ["GLM-4-9B", "GLM-4.5", "GLM-4.7-Flash", "GLM-5"])
def test_weights_read_spans_active_to_all_parameters(name):
    """One token reads its active weights and the LM head (the embedding row is negligible); a huge batch reads
    every weight but the embedding table: both from the decoder's own counts on the meta device."""
    cfg = vm.model_config(name)
    with torch.device("meta"):
        model = Decoder(cfg)
    emb = model.embed_tokens.weight.numel()
    assert not cfg.tie_word_embeddings
    one = model.num_active_parameters(include_embeddings=True) - emb
    assert vm.weights_read(name, 1) == pytest.approx(2 * one)
    assert vm.weights_read(name, 10**6) == pytest.approx(2 * (model.num_parameters() - emb), rel=1e-6)
    d = vm.decode_bytes(name, 4096, 8)
    assert d["weights"] == pytest.approx(vm.weights_read(name, 8) / 8)
    assert d["cache"] == 4096 * vm.cache_bytes_per_token(cfg)
    assert d["total"] == pytest.approx(d["weights"] + d["cache"]) and 0 < d["cache_share"] < 1


def test_at_long_context_mla_reads_far_less_cache_than_gqa():
    """The lesson's point, on the real configs at 128K: GLM-4.7-Flash's cache per generated token is under a fifth
    of GLM-4.5's, and a 100th of GLM-4.5's MHA what-if."""
    L = 131072
    flash, glm45, mha = (vm.decode_bytes(n, L, 32)["cache"] for n in ("GLM-4.7-Flash", "GLM-4.5", "GLM-4.5 as MHA"))
    assert flash < glm45 / 5 and flash < mha / 80


@pytest.mark.parametrize("heads,queries", [(20, 1), (64, 1), (64, 2)])
def test_arithmetic_intensity_is_what_the_flop_counter_sees(heads, queries):
    """FLOPs of the absorbed attention (glmkit's reference, on the meta device) over the cache's bytes."""
    from torch.utils.flop_counter import FlopCounterMode  # imports triton: after glmkit.kernels

    B, L, R, P = 1, 4096, 512, 64
    t = dict(device="meta", dtype=torch.bfloat16)
    q_lat, q_rope = torch.empty(B, queries, heads, R, **t), torch.empty(B, queries, heads, P, **t)
    c_kv, k_rot = torch.empty(B, L, R, **t), torch.empty(B, L, P, **t)
    with FlopCounterMode(display=False) as fc:
        mla_decode_reference(q_lat, q_rope, c_kv, k_rot, 0.1)
    assert vm.arithmetic_intensity(heads, R, P, queries) == pytest.approx(fc.get_total_flops() / (L * (R + P) * 2))


@pytest.mark.parametrize("lengths,chunk,splits", [([70, 3, 0, 64], 16, 5), ([33], 8, 5), ([10, 100], 32, 4)])
def test_split_chunks_cover_each_key_once(lengths, chunk, splits):
    r = vm.split_chunks(lengths, chunk, splits)
    assert r.shape == (len(lengths), splits, 2)
    for b, n in enumerate(lengths):
        covered = np.zeros(chunk * splits, dtype=int)
        for lo, hi in r[b]:
            covered[lo:hi] += 1
        assert (covered[: min(n, chunk * splits)] == 1).all() and (covered[n:] == 0).all()
    ax = vm.plot_splits(lengths, chunk, splits)
    grid = np.asarray(ax.images[0].get_array())
    assert grid.shape == (len(lengths), chunk * splits)
    empty = sum(hi <= lo for row in r for lo, hi in row)
    assert f"{empty} of {len(lengths) * splits} programs read nothing" in ax.get_title()


def test_cache_plot_draws_the_cache_bytes():
    ax = vm.plot_cache_vs_context(["GLM-4.5", "GLM-4.7-Flash"], batch=2)
    for line, name in zip(ax.get_lines(), ["GLM-4.5", "GLM-4.7-Flash"]):
        x, y = line.get_data()
        cfg = vm.model_config(name)
        assert x[-1] * 1000 == pytest.approx(cfg.max_position_embeddings)
        assert y[-1] == pytest.approx(vm.cache_bytes(cfg, cfg.max_position_embeddings, 2) / 2**30)
        assert x[0] == 0 and y[0] == 0
    assert ax.get_ylim()[0] == 0 and ax.get_xlim()[0] == 0
    ax = vm.plot_cache_vs_context(batch=8)  # the MHA what-if passes one H200: the dashed line is drawn
    assert any(abs(line.get_ydata()[0] - vm.H200_BYTES / 2**30) < 1e-9 for line in ax.get_lines())


def test_decode_bars_stack_weights_and_cache():
    names = ["GLM-4-9B", "GLM-4.7-Flash"]
    ax = vm.plot_decode_bytes(8192, 4, names=names, chosen="GLM-4.7-Flash")
    bars = ax.patches
    for i, n in enumerate(names):
        d = vm.decode_bytes(n, 8192, 4)
        assert bars[i].get_width() * 2**30 == pytest.approx(d["weights"])
        assert bars[len(names) + i].get_width() * 2**30 == pytest.approx(d["cache"])
    assert bars[len(names) + 1].get_linewidth() == 2


def test_explorer_redraws_and_reports_what_it_shows():
    pytest.importorskip("ipywidgets")
    ex = vm.CacheExplorer(model="GLM-4.7-Flash", context=32768, batch=32)
    assert "mla-cache-explorer" in ex.widget._dom_classes
    first, png = dict(ex.last), ex.image.value
    assert first["cache_sequence"] == vm.cache_bytes(vm.model_config("GLM-4.7-Flash"), 32768)
    assert first["cache_batch"] == 32 * first["cache_sequence"] and first["fits"]
    ex.model.value = "GLM-4.5 as MHA"
    assert ex.last["cache_sequence"] > 40 * first["cache_sequence"] and ex.image.value != png
    ex.context.value = 131072
    assert not ex.last["fits"] and "does <b>not</b> fit" in ex.status.value
    ex.dtype.value = "fp8"
    assert ex.last["cache_per_token"] * 2 == vm.cache_bytes_per_token(vm.model_config("GLM-4.5 as MHA"))
    ex.model.value, ex.context.value = "GLM-4-9B", 202752  # past GLM-4-9B's 131072 positions
    assert ex.last["over_max_context"] and "⚠" in ex.status.value
    assert ex.updates == 6
    with pytest.raises(ValueError, match="context"):
        vm.CacheExplorer(context=1000)
    with pytest.raises(KeyError, match="unknown model"):
        vm.model_config("GLM-6")


def test_human_bytes():
    assert vm.human_bytes(512) == "512 B" and vm.human_bytes(1536) == "1.5 KiB"
    assert vm.human_bytes(3 * 2**30) == "3.0 GiB" and vm.human_bytes(200 * 2**20) == "200 MiB"
