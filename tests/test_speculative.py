"""Speculative decoding with the MTP drafter: greedy output token-identical to plain greedy decoding for every
registered mixer (as the main layers and as the MTP block, alone and in a hybrid), batched and left-padded, with
stops and banned tokens; the rejection rule keeps the sampling distribution exactly (chi-square against the
enumerated target, with the power to reject an always-accept rule); acceptance on held-out text agrees with a
teacher-forced replay; agreement with transformers' ``generate(use_mtp=True)``."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from glmkit.data.lm_data import LMData
from glmkit.generate import generate, token_probs
from glmkit.mixers import MIXERS
from glmkit.models.decoder import Decoder
from glmkit.models.presets import get_config
from glmkit.speculative import generate_speculative, measure_acceptance
from glmkit.train import TrainConfig, train

V = 3  # a tiny vocabulary: random drafts agree with the main model often enough to mix accepts and rejects


def random_model(seed: int = 0, gain: float = 3.0, **fields) -> Decoder:
    """cpu-small sized (each mixer's default options fit it), its matrices scaled up so outputs depend on the input."""
    torch.manual_seed(seed)
    fields = {"num_hidden_layers": 2, "num_nextn_predict_layers": 1, "vocab_size": V, **fields}
    model = Decoder(get_config("cpu-small", **fields)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(gain)
    return model


def same_output(model, prompts, n, **kw):
    ref = generate(model, prompts, **kw)
    out = generate(model, prompts, draft_tokens=n, **kw)
    assert out.tokens == ref.tokens and out.stop_reasons == ref.stop_reasons
    assert torch.equal(out.sequences, ref.sequences)
    return out.speculation


@torch.no_grad()
def assert_drafts_recomputed(model, row: list[int], n: int, new: int) -> None:
    """Batch 1: every round's drafts equal a cache-free recomputation, depth k = 1..n at the last committed position
    over the committed tokens plus the drafts before it. The MTP depths' states (speculative entries rolled back
    every round) only ever change drafts, never tokens: this is the check that they are right."""
    out = generate_speculative(model, [row], new, draft_tokens=n, stop_tokens=(), trace=True)
    seq = row + out.tokens[0]
    assert out.speculation.trace and out.speculation.trace[0].start == len(row)
    for r in out.speculation.trace:
        drafts = []
        for k in range(1, n + 1):
            x = torch.tensor([seq[: r.start + 1] + drafts])
            drafts.append(int(model.mtp_logits(x, depth=k)[0, r.start - 1].argmax()))
        assert drafts == r.drafts[0], (r.start, drafts, r.drafts[0])


LAYOUTS = {
    "all": lambda name: dict(layer_types=[name] * 2, mtp_layer_type=name),
    "hybrid": lambda name: dict(layer_types=[name, "attention"]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("mixer", sorted(MIXERS))
def test_greedy_is_token_identical_for_every_mixer(mixer, layout):
    """Rejected drafts roll back every layer's state (main and MTP depths): a main-model state left wrong would
    change a later token, an MTP state a later draft. Batched prompts of odd lengths (left padding), one alone; 1
    and 3 draft tokens."""
    if mixer == "attention" and layout == "hybrid":
        pytest.skip("the same model as 'all'")
    tested = accepted = 0
    for seed, gain in ((0, 3.0), (1, 6.0)):
        model = random_model(seed, gain, **LAYOUTS[layout](mixer))
        prompts = [torch.randint(0, V, (t,)).tolist() for t in (3, 9, 1)]
        for n in (1, 3):
            for batch in (prompts, prompts[1:2]):
                s = same_output(model, batch, n, max_new_tokens=17, stop_tokens=())
                tested, accepted = tested + s.tested[0], accepted + s.accepted[0]
        assert_drafts_recomputed(model, prompts[1], 3, 17)
    assert 0 < accepted < tested, f"every draft {'accepted' if accepted else 'rejected'}: the test saw one path only"


def test_stops_banned_tokens_and_lengths_match_generate():
    model = random_model(2)
    prompts = [torch.randint(0, V, (t,)).tolist() for t in (5, 2, 8, 4)]
    for n in (1, 2, 4):
        same_output(model, prompts, n, max_new_tokens=12, stop_tokens=(0,), pad_id=1)
        same_output(model, prompts, n, max_new_tokens=12, banned_tokens=[2], stop_tokens=())
        for m in (1, 2):
            same_output(model, prompts, n, max_new_tokens=m, stop_tokens=())
    stopped = generate(model, prompts, 12, stop_tokens=(0,), draft_tokens=2)
    assert "stop" in stopped.stop_reasons  # the stop path ran


def test_mtp_depths_shared_or_separate_and_more_drafts_than_depths():
    """GLM-5's one module over 3 depths, DeepSeek-V3's 3 modules, and 5 drafts from 3 modules (the last reused)."""
    shared = random_model(3, mtp_depth=3)
    separate = random_model(3, num_nextn_predict_layers=3)
    assert len(shared.mtp) == 1 and len(separate.mtp) == 3
    prompts = [torch.randint(0, V, (t,)).tolist() for t in (4, 7)]
    for model in (shared, separate):
        for n in (2, 3, 5):
            same_output(model, prompts, n, max_new_tokens=15, stop_tokens=())
        assert_drafts_recomputed(model, prompts[1], 5, 15)


def test_timing_and_errors():
    model = random_model(4)
    out = generate_speculative(model, [[1, 2, 0]], 10, draft_tokens=2, stop_tokens=(), timing=True)
    t = out.speculation.times
    assert {"prefill", "draft", "verify", "accept", "rollback", "other"} <= set(t) and min(t.values()) >= -1e-3
    assert out.speculation.tokens == 9  # the prefill gave the first of the 10
    with pytest.raises(ValueError, match="MTP modules"):
        generate(random_model(4, num_nextn_predict_layers=0), [[1]], 4, draft_tokens=1)
    with pytest.raises(ValueError, match="draft_tokens"):
        generate_speculative(model, [[1]], 4, draft_tokens=0)
    with pytest.raises(ValueError, match="use_cache"):
        generate(model, [[1]], 4, draft_tokens=2, use_cache=False)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, [[1]], 4, draft_tokens=2, temperature=-1.0)


# -- sampling: the rejection rule keeps the target distribution ------------------------------------------------
def chi2_quantile(dof: int, z: float) -> float:
    """Wilson–Hilferty: the chi-square quantile of ``dof`` degrees of freedom at the normal quantile z."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


@torch.no_grad()
def target_joint(model, prompt, k, **sampling) -> dict[tuple, float]:
    """P(first k tokens) under plain sampling, enumerated from the main model's conditionals."""
    seqs = list(itertools.product(range(V), repeat=k))
    x = torch.tensor([prompt + list(s) for s in seqs])
    p = token_probs(model(x)[:, len(prompt) - 1 : -1], **sampling)  # [S, k, V]: the distribution of token j
    chosen = p.gather(-1, x[:, len(prompt) :, None]).squeeze(-1)
    return dict(zip(seqs, chosen.prod(-1).tolist()))


@torch.no_grad()
def always_accept_joint(model, prompt, k, **sampling) -> dict[tuple, float]:
    """P(first k tokens) if every draft were accepted (a wrong rule): token 1 from the main model, token j + 1 from
    MTP depth j at the prompt's last position (its inputs: the tokens before, drafts included)."""
    out, P = {}, len(prompt)
    for s in itertools.product(range(V), repeat=k):
        x = torch.tensor([prompt + list(s)])
        prob = token_probs(model(x[:, :P])[:, -1], **sampling)[0, s[0]].item()
        for j in range(1, k):
            prob *= token_probs(model.mtp_logits(x[:, : P + j], depth=j)[:, P - 1], **sampling)[0, s[j]].item()
        out[s] = prob
    return out


@pytest.mark.parametrize("sampling", [dict(temperature=1.0), dict(temperature=0.7, top_k=2)])
def test_rejection_sampling_keeps_the_target_distribution(sampling):
    """4000 rows of one prompt, 3 tokens each with 2 drafts (accepts, residual draws and bonus tokens all occur):
    the empirical joint of the 27 outcomes against the enumerated target, chi-square at p = 0.001. The same
    number of samples from an always-accept rule would exceed the threshold many times over (checked)."""
    model = random_model(5, gain=2.0)
    prompt, k, rows = [0, 2, 1, 1], 3, 4000
    out = generate(
        model,
        [prompt] * rows,
        k,
        stop_tokens=(),
        draft_tokens=2,
        generator=torch.Generator().manual_seed(0),
        **sampling,
    )
    s = out.speculation
    assert 0 < s.accepted[0] < s.tested[0] and s.accepted[1] > 0  # all three outcomes of a round happened
    counts = {}
    for t in out.tokens:
        counts[tuple(t)] = counts.get(tuple(t), 0) + 1
    assert sum(counts.values()) == rows and all(len(t) == k for t in counts)

    def chi2(probs):
        stat, dof, rest_p, rest_n = 0.0, -1, 0.0, 0
        for seq, p in probs.items():
            if p * rows >= 5:
                stat += (counts.get(seq, 0) - p * rows) ** 2 / (p * rows)
                dof += 1
            else:  # pool the rare outcomes into one bin
                rest_p, rest_n = rest_p + p, rest_n + counts.get(seq, 0)
        if rest_p * rows > 0:
            stat += (rest_n - rest_p * rows) ** 2 / (rest_p * rows)
            dof += 1
        return stat, dof

    target = target_joint(model, prompt, k, **sampling)
    assert abs(sum(target.values()) - 1) < 1e-5
    stat, dof = chi2(target)
    limit = chi2_quantile(dof, 3.09)  # p = 0.001
    assert stat < limit, f"chi-square {stat:.1f} over {dof} dof (limit {limit:.1f})"
    wrong = always_accept_joint(model, prompt, k, **sampling)
    power = rows * sum((wrong[q] - p) ** 2 / p for q, p in target.items() if p > 0)  # its expected statistic
    assert power > 5 * limit, f"an always-accept rule would give ~{power:.0f}: the test could not tell"


def test_sampling_is_seeded():
    model = random_model(6)
    kw = dict(temperature=1.0, stop_tokens=(), draft_tokens=2)
    a = generate(model, [[0, 1], [2, 2, 1]], 10, generator=torch.Generator().manual_seed(1), **kw)
    b = generate(model, [[0, 1], [2, 2, 1]], 10, generator=torch.Generator().manual_seed(1), **kw)
    assert a.tokens == b.tokens


# -- a trained drafter: acceptance on held-out text, and transformers --------------------------------------------
@pytest.fixture(scope="module")
def trained():
    """A tiny GLM-4.5-style model (1 dense + 2 MoE layers, one MTP layer, untied head) trained 60 steps with the MTP
    loss on the built-in corpus (~6 s on 2 cores): its MTP head agrees with it most of the time."""
    torch.manual_seed(0)
    cfg = get_config(
        "cpu-moe",
        num_hidden_layers=3,
        hidden_size=64,
        num_attention_heads=4,
        head_dim=16,
        intermediate_size=96,
        moe_intermediate_size=32,
        tie_word_embeddings=False,
        num_nextn_predict_layers=1,
    )
    model = Decoder(cfg)
    tc = TrainConfig(steps=60, batch_size=8, seq_len=64, warmup_steps=5, lr=1e-2)
    history = train(model, LMData(batch_size=8, seq_len=64), tc, progress=False, device="cpu")
    assert history.aux["mtp"][-1] < 0.7 * history.aux["mtp"][0]
    return model.eval()


@torch.no_grad()
def replay(model, row: list[int], new: int, n: int) -> tuple[list[int], list[int]]:
    """Greedy speculative decoding redone with full forwards and no cache: the round at committed length L drafts
    d_k = argmax of MTP depth k at position L−1 over the sequence so far plus d_1..d_{k−1}, and accepts the prefix
    equal to plain greedy decoding. Returns (tested, accepted) per draft position."""
    seq = row + generate(model, [row], new + n + 1, stop_tokens=()).tokens[0]  # greedy, past the end
    tested, accepted, L = [0] * n, [0] * n, len(row)
    while L - len(row) + 1 < new:
        drafts = []
        for k in range(1, n + 1):
            x = torch.tensor([seq[: L + 1] + drafts])
            drafts.append(int(model.mtp_logits(x, depth=k)[0, L - 1].argmax()))
        m = 0
        while m < n and drafts[m] == seq[L + 1 + m]:
            m += 1
        for i in range(min(m + 1, n)):
            tested[i] += 1
        for i in range(m):
            accepted[i] += 1
        L += m + 1
    return tested, accepted


@pytest.mark.parametrize("n", [1, 3])
def test_acceptance_on_held_out_text_matches_a_replay_without_cache(trained, n):
    """The drafts of every depth, cached and rolled back round after round, are the ones a cache-free recomputation
    makes: the acceptance counts agree position by position (a wrong MTP state would change drafts, not tokens)."""
    prompts = LMData(batch_size=3, seq_len=20, seed=1, split="val").batch(0).input_ids
    stats = measure_acceptance(trained, prompts, draft_tokens=n, max_new_tokens=40)
    tested, accepted = [0] * n, [0] * n
    for row in prompts.tolist():
        t, a = replay(trained, row, 40, n)
        tested, accepted = [x + y for x, y in zip(tested, t)], [x + y for x, y in zip(accepted, a)]
    assert (stats.tested, stats.accepted) == (tested, accepted)
    assert stats.acceptance[0] > 0.5 and stats.tokens == 3 * 39


def test_measure_acceptance_defaults_to_held_out_text(trained):
    deep = measure_acceptance(trained, draft_tokens=2, max_new_tokens=24, n_prompts=2)
    assert len(deep.acceptance) == 2 and 0 < deep.mean_accepted <= 2
    assert deep.as_dict()["tokens_per_forward"] == 1 + deep.mean_accepted
    with pytest.raises(ValueError, match="byte tokens"):
        measure_acceptance(random_model(0), draft_tokens=1)


def test_greedy_agrees_with_transformers_generate_use_mtp(trained, tmp_path, monkeypatch):
    """transformers 5.24 drafts with its MtpModel (one token per MTP layer) in ``generate(use_mtp=True)``: the same
    checkpoint gives the same tokens as ours with 1, 2 and 3 drafts, and as plain greedy generation."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.glm4_moe import modeling_glm4_moe

    from glmkit.hf import save_hf

    folder = save_hf(trained, tmp_path / "m")
    n = trained.config.num_hidden_layers  # MtpModel finds layer N through these patterns (92/46 in real files)
    monkeypatch.setattr(
        modeling_glm4_moe.Glm4MoeForCausalLM, "_keys_to_ignore_on_load_unexpected", [rf"model\.layers\.{n}\..*"]
    )
    hf = transformers.Glm4MoeForCausalLM.from_pretrained(str(folder)).eval()
    x = LMData(batch_size=1, seq_len=24, seed=2, split="val").batch(0).input_ids
    kw = dict(max_new_tokens=40, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        theirs = hf.generate(x, use_mtp=True, **kw)[0, x.shape[1] :].tolist()
        plain = hf.generate(x, **kw)[0, x.shape[1] :].tolist()
    assert theirs == plain
    for n_draft in (1, 2, 3):
        out = generate(trained, x, 40, stop_tokens=(), draft_tokens=n_draft)
        assert out.tokens[0] == theirs, n_draft
        assert out.speculation.acceptance[0] > 0.5


# -- CUDA (pytest -m gpu on the H200) -----------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("mixer", sorted(MIXERS))
def test_gpu_speculative_decoding_on_cuda(mixer):
    """On the GPU (fp32, TF32 off, the torch path so that the plain and the verify forwards round alike): greedy
    tokens identical for 1 and 3 drafts, batched and left-padded; seeded sampling repeats itself."""
    from glmkit import backend

    model = random_model(7, **LAYOUTS["all"](mixer)).cuda()
    prompts = [torch.randint(0, V, (t,)).tolist() for t in (5, 11, 2)]
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with backend.use_backend("torch"):
            for n in (1, 3):
                same_output(model, prompts, n, max_new_tokens=24, stop_tokens=())
            kw = dict(temperature=1.0, stop_tokens=(), draft_tokens=2)
            a = generate(model, prompts, 16, generator=torch.Generator().manual_seed(3), **kw)
            b = generate(model, prompts, 16, generator=torch.Generator().manual_seed(3), **kw)
            assert a.tokens == b.tokens and a.sequences.device.type == "cuda"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
