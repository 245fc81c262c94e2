"""Lesson 09's helpers (glmkit.course.viz_capstone): the model read from its config, the parameter breakdown against
the decoder's own counters and the published shapes, the mHC depth experiment against what a doubly stochastic
mixing guarantees, the Sinkhorn explorer, the two-process run against the one-process run, the results reader."""

from __future__ import annotations

import json

import matplotlib
import pytest
import torch

from glmkit.course import viz_capstone as vc
from glmkit.models.decoder import Decoder
from glmkit.models.presets import get_config

matplotlib.use("Agg")


def test_model_parts_of_glm_5_3_flash():
    cfg = get_config("glm-5.3-flash")
    parts = vc.model_parts(cfg)
    assert len(parts) == 45 + 1 and parts[-1]["layer"] == "MTP 0"
    mixers = [p["mixer"]["label"] for p in parts[:45]]
    assert mixers.count("KDA") == 34 and mixers.count("MLA-DSA") == 11
    assert all(mixers[i] == "MLA-DSA" for i in range(3, 45, 4))
    dsa = parts[3]["mixer"]
    assert dsa["nope"] and "KPool 16" in dsa["detail"] and "top-2048" in dsa["detail"] and dsa["lesson"] == "06"
    assert [p["ffn"]["label"] for p in parts[:4]] == ["dense", "dense", "dense", "MoE"]
    assert "8 of 288 + 1 shared" in parts[3]["ffn"]["detail"] and "clamp 10" in parts[3]["ffn"]["detail"]
    assert {p["residual"]["label"] for p in parts} == {"mHC ×4"}
    assert parts[-1]["mixer"]["label"] == "MLA-DSA" and parts[-1]["ffn"]["label"] == "MoE"


def test_model_parts_plain_model():
    parts = vc.model_parts(get_config("cpu-small"))
    assert all(p["residual"]["lesson"] == "03" and p["ffn"]["label"] == "dense" for p in parts)
    assert all(p["mixer"]["label"] == "attention" for p in parts)


def _meta(name, **kw):
    with torch.device("meta"):
        return Decoder(get_config(name, **kw))


@pytest.mark.parametrize("name", ["glm-5.3-flash", "capstone", "cpu-capstone"])
def test_param_breakdown_adds_up_to_the_decoders_counts(name):
    model = _meta(name)
    rows = {g: (t, a) for g, t, a in vc.param_breakdown(model)}
    assert sum(t for t, _ in rows.values()) == model.num_parameters(include_mtp=True)
    main = {g: v for g, v in rows.items() if g != "MTP layer"}
    assert sum(t for t, _ in main.values()) == model.num_parameters()
    assert sum(a for _, a in main.values()) == model.num_active_parameters(include_embeddings=True)
    cfg = model.config
    moe_layers = cfg.mlp_layer_types.count("sparse")
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size  # gate, up, down
    assert rows["routed experts"][0] == moe_layers * cfg.n_routed_experts * per_expert
    assert rows["routed experts"][1] == moe_layers * cfg.num_experts_per_tok * per_expert
    n, d = cfg.hc_mult, cfg.hidden_size
    per_hc = (2 + n) * n * n * d + (2 + n) * n + 3  # fn, base, scale
    assert rows["mHC"][0] == rows["mHC"][1] == 2 * cfg.num_hidden_layers * per_hc


def test_plot_model_draws_a_cell_per_part():
    import matplotlib.pyplot as plt

    cfg = get_config("capstone")
    ax = vc.plot_model(cfg, title="capstone")
    cells = [p for p in ax.patches if p.get_fill()]
    assert len(cells) == 3 * (cfg.num_hidden_layers + cfg.num_nextn_predict_layers)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(label.startswith("09") for label in labels) and any(label.startswith("07") for label in labels)
    plt.close("all")
    ax = vc.plot_model(get_config("glm-5.3-flash"))  # 46 columns, no text in the cells
    assert not any("KDA" in t.get_text() for t in ax.texts)
    plt.close("all")


def test_depth_norms_mhc_keeps_the_stream_mean_and_a_bounded_gain():
    # no branch: only the stream mixing acts. Rows summing to 1 keep the mean of the streams (the input itself);
    # a doubly stochastic product has row sums 1, so its largest absolute row sum stays 1
    r = vc.depth_norms("mhc", depth=24, branch_gain=0.0, logit_std=2.0)
    assert max(abs(v - 1) for v in r["rms"]) < 1e-3
    assert max(r["gain"]) < 1 + 1e-3 and max(r["stream_rms"]) < 1 + 1e-3
    hc = vc.depth_norms("hc", depth=24, branch_gain=0.0, logit_std=2.0)
    assert hc["gain"][-1] > 100 and hc["stream_rms"][-1] > 10  # unconstrained mixing compounds over depth
    plain = vc.depth_norms("residual", depth=24, branch_gain=0.0)
    assert plain["rms"] == [1.0] * 25 and plain["gain"] == [1.0] * 25


def test_depth_norms_with_branches():
    res = {k: [vc.depth_norms(k, depth=32, seed=s) for s in range(2)] for k in vc.KINDS}
    assert vc.depth_norms("mhc", depth=32, seed=1) == res["mhc"][1]  # reproducible
    for k in ("residual", "mhc"):
        for r in res[k]:  # branches add roughly independent vectors: growth like sqrt(depth), no blow-up
            assert 1.5 < r["stream_rms"][-1] < 8
    assert all(r["stream_rms"][-1] > 20 for r in res["hc"])
    ax = vc.plot_depth_norms(res)
    assert len(ax.lines) == 3
    with pytest.raises(ValueError, match="kind"):
        vc.depth_norms("dense")


def test_sinkhorn_explorer():
    ex = vc.SinkhornExplorer(n=4, rounds=0, scale=4.0, seed=3)
    assert torch.allclose(ex.last["row_sums"], torch.ones(4, dtype=torch.float64))
    assert (ex.last["col_sums"] - 1).abs().max() > 0.1 and ex.last["sigma_max"] > 1.05
    ex.rounds.value = 20
    assert (ex.last["col_sums"] - 1).abs().max() < 1e-5 and (ex.last["row_sums"] - 1).abs().max() < 1e-3
    assert ex.last["sigma_max"] <= 1 + 1e-3
    assert "sinkhorn-explorer" in ex.widget._dom_classes


def test_toy_indexer_shapes_seed_and_smoothing():
    ind = vc.toy_indexer(40, pool=8, hidden=16, heads=2, dim=8, smooth=4, seed=1)
    shapes = {name: tuple(t.shape) for name, t in ind.items()}
    assert shapes == {"x": (1, 40, 16), "q": (1, 40, 2, 8), "k": (1, 40, 8), "w": (1, 40, 2),
                      "gate_weight": (8, 16), "ape": (8, 8)}  # fmt: skip
    again = vc.toy_indexer(40, pool=8, hidden=16, heads=2, dim=8, smooth=4, seed=1)
    assert all(torch.equal(ind[n], again[n]) for n in ind)
    assert torch.allclose(ind["k"].mean(-1), torch.zeros(1, 40), atol=1e-5)  # LayerNorm'd keys

    def neighbour_corr(x):
        return float(torch.nn.functional.cosine_similarity(x[0, 1:], x[0, :-1], dim=-1).mean())

    smooth = vc.toy_indexer(400, smooth=8)["x"]
    iid = vc.toy_indexer(400, smooth=1)["x"]
    assert neighbour_corr(smooth) > 0.7 and abs(neighbour_corr(iid)) < 0.1
    assert 0.8 < float(smooth.std()) < 1.2 and 0.8 < float(iid.std()) < 1.2  # unit variance either way
    with pytest.raises(ValueError):
        vc.toy_indexer(0)


def test_kpool_query_against_its_definition():
    ind = vc.toy_indexer(100, pool=8, hidden=16, heads=2, dim=8, seed=2)
    v = vc.kpool_query(ind, topk=16, t=61)
    assert v["token_scores"].shape == (62,) and v["pool"] == 8 and v["t"] == 61
    assert torch.equal(v["dense"], v["token_scores"].topk(16).indices.sort().values)
    scores = v["pool_scores"]
    assert scores.shape == (13,)  # ceil(100 / 8) pools
    assert not scores[:7].isnan().any() and scores[7:].isnan().all()  # pools 0-6 end by token 55 <= 61
    assert set(v["pools"].tolist()) == set(scores[:7].topk(2).indices.tolist())  # 16 / 8 = 2 pools
    assert v["tail"].tolist() == list(range(56, 62))  # 62 = 7 * 8 + 6
    want = sorted({p * 8 + j for p in v["pools"].tolist() for j in range(8)} | set(range(56, 62)))
    assert v["kpool"].tolist() == want
    with pytest.raises(ValueError, match="t must be"):
        vc.kpool_query(ind, topk=16, t=100)


def test_kpool_with_pools_of_one_token_is_the_dense_indexer():
    ind = vc.toy_indexer(60, pool=1, hidden=16, heads=2, dim=8, seed=3)
    v = vc.kpool_query(ind, topk=10, t=50)
    assert torch.equal(v["kpool"], v["dense"]) and len(v["tail"]) == 0
    o = vc.kpool_overlap(ind, topk=10)
    assert o["overlap"] == pytest.approx(1.0) and o["queries"] == 50  # t + 1 >= 11
    assert o["chance"] == pytest.approx(float((10 / torch.arange(11, 61)).mean()), rel=1e-5)


def test_kpool_overlap_and_plot():
    import matplotlib.pyplot as plt

    ind = vc.toy_indexer(120, pool=8, hidden=16, heads=2, dim=8, seed=4)
    o = vc.kpool_overlap(ind, topk=16)
    assert 0 <= o["overlap"] <= 1 and 0 < o["chance"] < 1 and o["queries"] == 120 - 24 + 1
    with pytest.raises(ValueError, match="no query chooses"):
        vc.kpool_overlap(vc.toy_indexer(20, pool=8), topk=16)
    v = vc.kpool_query(ind, topk=16, t=100)
    axes = vc.plot_kpool_query(v)
    assert len(axes[1].patches) >= 12  # a bar per candidate pool (12 complete by t = 100) and the shading
    assert "best 2 pools" in axes[1].get_title() and "tail (5 tokens)" in axes[1].get_title()
    plt.close("all")


def _history(steps=20, layers=3, experts=8):
    from glmkit.train import History

    h = History(steps=list(range(1, steps + 1)), losses=[9.0 - 0.1 * i for i in range(steps)])
    h.eval_steps, h.eval_losses = [10, 20], [8.5, 7.5]
    h.aux = {"mtp": [9.2 - 0.1 * i for i in range(steps)]}
    h.stats = {"dsa_recall": [0.5 + 0.01 * i for i in range(steps)]}
    h.max_violation = [1.0] * steps
    h.load_steps = [10, 20]
    h.expert_loads = [[[1 / experts] * experts] * layers] * 2
    return h


def test_plot_history_and_expert_load():
    import matplotlib.pyplot as plt

    h = _history()
    axes = vc.plot_history(h, vocab_size=8192)
    assert len(axes[0].lines) == 4 and axes[0].get_ylim()[0] == 0  # train, held-out, MTP, ln V
    assert axes[0].lines[-1].get_ydata()[0] == pytest.approx(9.0109, abs=1e-3)
    ax = vc.plot_expert_load(h, moe_layers=[1, 2, 3])
    assert [t.get_text() for t in ax.get_yticklabels()] == ["1", "2", "3"]
    plt.close("all")


# the formats of benchmarks/README.md's "The capstone" section
BENCH = {
    "date": "2026-12-03",
    "gpu": "NVIDIA H200",
    "train": [
        {"backend": "triton", "batch": 8, "seq_len": 1024, "ms": 100.0, "tokens_per_s": 81920.0, "tflops": 250.0,
         "mfu": 0.25, "peak_mem_gib": 30.0},
        {"backend": "triton", "batch": 32, "seq_len": 1024, "ms": 300.0, "tokens_per_s": 109226.7, "tflops": 330.0,
         "mfu": 0.33, "peak_mem_gib": 90.0},
        {"backend": "torch", "batch": 8, "seq_len": 1024, "ms": 250.0, "tokens_per_s": 32768.0, "tflops": 100.0,
         "mfu": 0.1, "peak_mem_gib": 60.0},
    ],
}  # fmt: skip


def test_h200_results(tmp_path):
    assert vc.h200_results(tmp_path) is None
    (tmp_path / "capstone_h200.json").write_text(json.dumps(BENCH))
    got = vc.h200_results(tmp_path)
    assert got["bench"] == BENCH and got["md"] is None and got["run_dir"] is None and got["history"] is None
    run = tmp_path / "capstone_run_h200"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"time_budget_s": 220}))
    (run / "history.json").write_text(json.dumps(_history().to_dict()))
    (run / "samples.txt").write_text("def f():\n")
    got = vc.h200_results(tmp_path)
    assert got["run"] == {"time_budget_s": 220} and got["samples"] == "def f():\n"
    assert got["history"].losses == _history().losses and got["files"] == ["history.json", "run.json", "samples.txt"]


def test_train_rows_and_anchors():
    rows = vc.train_rows(BENCH)
    assert rows[0][0] == "our kernels" and rows[2][0] == "torch path" and rows[1][6] == pytest.approx(33.0)
    anchors = {name: measured for name, measured, _ in vc.against_anchors(BENCH)}
    assert anchors["MFU, our kernels (best batch)"] == "33.0% at B = 32"
    assert anchors["speed-up over the torch path (same batch)"] == "2.50×"  # B = 8: 81920 / 32768
    empty = vc.against_anchors({"train": []})
    assert all(measured == "not measured" for _, measured, _ in empty)


TINY = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
            intermediate_size=96, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
            num_nextn_predict_layers=1, hc_mult=2, max_position_embeddings=64)  # fmt: skip


def test_torchrun_two_processes_match_one(tmp_path):
    from glmkit.cli import run_train

    train = dict(steps=3, batch_size=4, seq_len=16, lr=3e-3, warmup_steps=1, ckpt_every=0, bias_update_rate=0.01)
    cfg = {"preset": "cpu-moe", "model": TINY, "data": {"corpus": "stories"}, "train": train}
    one = run_train({**cfg, "out_dir": str(tmp_path / "one")}, progress=False)
    done = vc.torchrun({**cfg, "out_dir": str(tmp_path / "two"), "parallel": "ddp"}, 2, tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    two = vc.final_losses(tmp_path / "two")
    assert len(two) == 3
    assert max(abs(a - b) / a for a, b in zip(one.losses, two)) < 1e-5
