"""glmkit.course.viz_speculative (lesson 08): the tokens a round commits agree with a simulation of rounds and with
the closed form, the speed-up model is perf-anchors §7's at n = 1 and inverts correctly; the draft and verify costs of
GLM-4.5 agree with a count from its published shapes and a routing simulation; the costs measured from
``SpeculativeStats`` are the phases' times; the committed-results parser reads what bench_speculative.py writes; the
coloured trace accounts for every generated token; the explorers update from their controls without a frontend."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

import matplotlib
import pytest
import torch

from glmkit.course import viz_speculative as vs
from glmkit.course.viz_mla import weights_read
from glmkit.data.tokenizer import ByteTokenizer
from glmkit.models.decoder import Decoder
from glmkit.models.presets import get_config
from glmkit.speculative import Round, SpeculativeStats, generate_speculative

matplotlib.use("Agg")
ROOT = Path(__file__).resolve().parents[2]


def small_model(seed=0, vocab=3, gain=3.0, **fields):
    """A 2-layer cpu-small with one MTP module, scaled up so that drafts are sometimes right and sometimes not."""
    torch.manual_seed(seed)
    model = Decoder(
        get_config("cpu-small", num_hidden_layers=2, num_nextn_predict_layers=1, vocab_size=vocab, **fields)
    )
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(gain)
    return model.eval()


# -- the model --------------------------------------------------------------------------------------------------
def test_tokens_per_round_matches_a_simulation_of_rounds_and_the_closed_form():
    rng = random.Random(0)
    for alphas in ([0.8, 0.6, 0.3], [0.9] * 4, [0.5], [1.0, 0.0, 1.0]):
        n, rounds, total = len(alphas), 40000, 0
        for _ in range(rounds):
            a = 0
            while a < n and rng.random() < alphas[a]:
                a += 1
            total += a + 1  # the accepted drafts and the main model's own token
        assert vs.tokens_per_round(alphas, n) == pytest.approx(total / rounds, abs=0.03)
    for alpha, n in ((0.7, 3), (0.95, 5), (0.2, 1)):
        assert vs.tokens_per_round(alpha, n) == pytest.approx((1 - alpha ** (n + 1)) / (1 - alpha))
    assert vs.tokens_per_round([0.9, 0.8, 0.7], 2) == pytest.approx(1 + 0.9 + 0.72)  # extra positions ignored
    assert vs.tokens_per_round(0.5, 0) == 1.0


def test_speedup_is_perf_anchors_model_and_acceptance_for_inverts_it():
    assert vs.speedup(0.85, 1, 0.08) == pytest.approx(1.85 / 1.08)  # perf-anchors §7's example: ≈ 1.7×
    assert vs.speedup(0.85, 1, 0.08) == pytest.approx(1.71, abs=0.01)
    assert vs.speedup(0.0, 3, 0.1, 0.2) == pytest.approx(1 / 1.5)  # never accepted: slower than plain
    assert vs.speedup(0.5, 2, 0.1, -0.2, 0.1) == pytest.approx(1.75 / 1.1)  # a measured v may be negative
    for target, n, c, v in ((1.5, 1, 0.05, 0.0), (2.5, 3, 0.04, 0.3), (1.2, 2, 0.3, 0.0)):
        alpha = vs.acceptance_for(target, n, c, v)
        assert 0 < alpha < 1 and vs.speedup(alpha, n, c, v) == pytest.approx(target, rel=1e-9)
    assert vs.acceptance_for(4.0, 3, 0.01) is None  # 4 tokens per round at most, and drafts cost something
    with pytest.raises(ValueError, match="acceptance"):
        vs.tokens_per_round([0.5, 1.5], 2)
    with pytest.raises(ValueError, match="2 draft positions"):
        vs.tokens_per_round([0.5], 2)
    with pytest.raises(ValueError, match="draft_cost"):
        vs.speedup(0.5, 1, -0.1)
    with pytest.raises(ValueError, match="cost something"):
        vs.speedup(0.5, 1, 0.0, -1.0)


# -- costs on the published configs -----------------------------------------------------------------------------
def test_draft_cost_of_glm_4_5_from_its_published_shapes():
    """One MTP draft reads the MTP layer (an MoE decoder layer: attention with biases, 8 of 160 routed experts, the
    shared expert, the router), eh_proj and the LM head again: counted here from glm-lineage §4.1's table."""
    d, heads, kv, hd, vocab, inter, E, k = 5120, 96, 8, 128, 151552, 1536, 160, 8
    attention = d * heads * hd + heads * hd + 2 * (d * kv * hd + kv * hd) + heads * hd * d + 2 * hd  # + q/k norms
    ffn = (k + 1) * 3 * d * inter + E * d  # routed + shared experts, router
    params = attention + ffn + 2 * d * d + vocab * d + 5 * d  # eh_proj, LM head, five RMSNorm gains
    assert vs.draft_cost("GLM-4.5") * weights_read("GLM-4.5", 1) / 2 == pytest.approx(params, rel=1e-3)
    assert 0.03 < vs.draft_cost("GLM-4.5") < 0.04 and 0.03 < vs.draft_cost("GLM-5") < 0.05


def test_verify_cost_is_the_experts_the_extra_tokens_visit():
    """GLM-4.5: a verify of n + 1 tokens reads the routed experts they visit (simulated: uniform top-8 of 160 per
    layer and token), the rest once. Dense GLM-4-9B: nothing extra."""
    assert [vs.verify_cost("GLM-4-9B", n) for n in (1, 3)] == [0.0, 0.0]
    d, inter, E, k, moe_layers = 5120, 1536, 160, 8, 89
    expert_bytes = 2 * 3 * d * inter
    one = weights_read("GLM-4.5", 1)
    g = torch.Generator().manual_seed(0)
    for n in (1, 3):
        seen = [torch.rand(n + 1, E, generator=g).topk(k, -1).indices.unique().numel() for _ in range(2000)]
        extra = moe_layers * (sum(seen) / len(seen) - k) * expert_bytes
        assert vs.verify_cost("GLM-4.5", n) == pytest.approx(extra / one, rel=0.02)
    assert vs.verify_cost("GLM-4.5", 1) < vs.verify_cost("GLM-4.5", 3) < 3


# -- measured costs ---------------------------------------------------------------------------------------------
def test_costs_from_stats_are_the_phases_per_round_in_plain_steps():
    s = SpeculativeStats(2, tested=[10, 6], accepted=[6, 3], rounds=10)
    s.times = {"prefill": 5.0, "draft": 0.6, "verify": 1.5, "accept": 0.1, "rollback": 0.05, "other": 0.05}
    c = vs.costs_from_stats(s, step_s=0.1)
    assert c == pytest.approx({"c": 0.3, "v": 0.5, "o": 0.2})
    with pytest.raises(ValueError, match="timing=True"):
        vs.costs_from_stats(SpeculativeStats(1), 0.1)
    model = small_model(1)
    out = generate_speculative(model, [[0, 1, 2, 1]], 12, draft_tokens=2, stop_tokens=(), timing=True)
    measured = vs.costs_from_stats(out.speculation, step_s=1e-3)
    assert measured["c"] > 0 and measured["o"] > 0 and measured["v"] > -1


def test_time_forward_times_each_length():
    model = small_model(2, vocab=20)
    ts = vs.time_forward(model, [1, 4], context=8, repeats=2)
    assert len(ts) == 2 and all(t > 0 for t in ts)


# -- the committed GPU results -------------------------------------------------------------------------------------
def _bench_module():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location(
            "bench_speculative_for_test", ROOT / "benchmarks" / "bench_speculative.py"
        )
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.pop(0)
    return mod


def test_gpu_points_read_what_bench_speculative_writes(tmp_path):
    """The benchmark's own table writers on a tiny CPU model: the parser gets back its acceptance, tokens per forward
    and speed-ups, and c, v, o from its time shares; an absent file is None."""
    bench = _bench_module()
    bench.DEV, bench.NEW, bench.DRAFTS = "cpu", 10, [1, 2]
    model = small_model(3)
    prompts = [[0, 1, 2, 1], [2, 2, 0]]
    logs = []
    res = bench.decode_runs(model, prompts, "eager", logs.append)
    rows = bench.decode_table(res, {"generate": "2/2"}, "## Decoding (eager), batch 1")
    where = bench.run_where(model, prompts, logs.append)
    text = "\n".join(["# Speculative decoding", "", "- date: today", "", *rows, "", *where, "", *bench.targets(res)])
    path = tmp_path / "speculative_h200.md"
    path.write_text(text)
    points = vs.gpu_points(str(path))
    assert [p["n"] for p in points] == [1, 2]
    for p in points:
        tps, _, stats = res[f"n={p['n']}"]
        assert p["acceptance"] == pytest.approx(stats.acceptance, abs=0.006)
        assert p["tokens_per_forward"] == pytest.approx(1 + stats.mean_accepted, abs=0.006)
        assert p["speedup"] == pytest.approx(tps / res["generate"][0], abs=0.006)
        assert p["speedup_lean"] == pytest.approx(tps / res["lean"][0], abs=0.006)
        assert p["c"] > 0 and p["o"] >= 0 and p["v"] > -1
    assert vs.gpu_points(str(tmp_path / "absent.md")) is None


# -- the trace ----------------------------------------------------------------------------------------------------
def test_trace_spans_account_for_every_generated_token():
    """Every generated token once, in order (accepted drafts and the main model's own tokens), and every rejected
    draft of every round, where the round proposed it."""
    model = small_model(4)
    for prompt, n, new in (([0, 2, 1], 3, 17), ([1], 1, 9), ([2, 2, 0, 1], 2, 1), ([0, 0], 2, 6)):
        out = generate_speculative(model, [prompt], new, draft_tokens=n, stop_tokens=(), trace=True)
        tokens, trace = out.tokens[0], out.speculation.trace
        spans = vs.trace_spans(tokens, trace)
        assert [t for _, kind, t in spans if kind != "rejected"] == tokens
        assert spans[0] == (-1, "main", tokens[0])
        for r, rnd in enumerate(trace):
            mine = [(kind, t) for rr, kind, t in spans if rr == r]
            accepted = [t for kind, t in mine if kind == "accepted"]
            assert mine and accepted == rnd.drafts[0][: len(accepted)] and len(accepted) <= rnd.kept
            assert [t for kind, t in mine if kind == "rejected"] == rnd.drafts[0][rnd.kept :]
            assert sum(kind == "main" for kind, _ in mine) <= 1
        html = vs.trace_html(ByteTokenizer().decode, prompt, tokens, trace)
        assert html.count("<span class='spec-") == len(spans)
    with pytest.raises(ValueError, match="does not match"):
        vs.trace_spans([1, 2, 0], [Round(4, [[0]], [0], 0), Round(9, [[1]], [0], 0)])


def test_trace_spans_kinds_on_a_chosen_trace():
    """Round 0 accepted 1 of 2 drafts, round 1 both: prefill token, accepted, rejected, main, accepted × 2, bonus."""
    trace = [Round(4, [[7, 8]], [1], 1), Round(6, [[5, 6]], [2], 2)]
    tokens = [3, 7, 9, 5, 6, 4]
    assert vs.trace_spans(tokens, trace) == [
        (-1, "main", 3), (0, "accepted", 7), (0, "rejected", 8), (0, "main", 9),
        (1, "accepted", 5), (1, "accepted", 6), (1, "main", 4),
    ]  # fmt: skip
    assert vs.trace_spans(tokens[:5], trace)[-1] == (1, "accepted", 6)  # cut short by max_new_tokens


# -- pictures and explorers -----------------------------------------------------------------------------------------
def test_plots_draw_their_curves_and_points():
    import matplotlib.pyplot as plt

    ax = vs.plot_speedup_curves(0.05, lambda n: 0.1 * n, points=[dict(alpha=0.6, speedup=1.3, label="x", n=1)],
                                anchors=[dict(alpha=0.875, speedup=1.8, label="DeepSeek-V3")])  # fmt: skip
    assert len(ax.lines) == 3 + 1 + 1 + 1  # three curves, the point, the anchor, the 1× line
    assert ax.get_ylim()[0] == 0 and ax.get_xlim() == (0, 1)
    ax2 = vs.plot_predicted_vs_measured([dict(predicted=1.1, measured=1.2, label="a")])
    assert ax2.get_xlim()[0] == 0 and len(ax2.lines) == 2
    plt.close("all")


def test_speedup_explorer_updates_from_its_controls():
    pytest.importorskip("ipywidgets")
    ex = vs.SpeedupExplorer(alpha=0.8, decay=1.0, n=1, c=0.0, v=0.0)
    assert ex.last["speedup"] == pytest.approx(1.8) and ex.last["best_n"] == vs.SpeedupExplorer.MAX_N
    ex.n.value, ex.c.value = 3, 0.2
    assert ex.last["acceptance"] == pytest.approx([0.8] * 3)
    assert ex.last["speedup"] == pytest.approx(vs.speedup(0.8, 3, 0.2))
    ex.alpha.value = 0.1
    assert ex.last["best_n"] == 1 and ex.last["speedup"] < 1
    assert ex.image.value[:4] == b"\x89PNG"


def test_round_stepper_steps_through_the_rounds():
    pytest.importorskip("ipywidgets")
    model = small_model(6)
    out = generate_speculative(model, [[0, 1, 2]], 15, draft_tokens=3, stop_tokens=(), trace=True)
    trace = out.speculation.trace
    stepper = vs.RoundStepper(lambda ids: "".join("abc"[i] for i in ids), [0, 1, 2], out.tokens[0], trace)
    assert stepper.round.max == len(trace) - 1
    for r in range(len(trace)):
        stepper.round.value = r
        assert stepper.last["round"] == r and stepper.last["drafts"] == trace[r].drafts[0]
        assert stepper.last["accepted"] == min(trace[r].kept, stepper.last["committed"])
        assert 1 <= stepper.last["committed"] <= trace[r].kept + 1
        assert "background:#fff3b0" in stepper.text.value
    with pytest.raises(ValueError, match="trace"):
        vs.RoundStepper(str, [0], [1], [])
