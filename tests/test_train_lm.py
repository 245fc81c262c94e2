"""Next-token training of the dense and MoE GLM models: LMData is a function of the step and keeps its held-out
split apart, the loss falls on the built-in corpus, resume after a kill equals an uninterrupted run to the bit
(the MoE routing bias included), the aux-loss-free bias update balances a skewed router only when it is on,
and the sequence-wise balance loss reaches the router when its alpha is > 0."""

from __future__ import annotations

import json
import math

import pytest
import torch

from glmkit.blank_infilling import BlankInfillingData
from glmkit.checkpoint import latest_checkpoint, load_pretrained
from glmkit.lm_data import LMBatch, LMData
from glmkit.models import GLMModel
from glmkit.models import get_config as glm2021_config
from glmkit.models import glm_moe
from glmkit.models.glm_dense import GLMDenseConfig, GLMDenseModel, get_config
from glmkit.moe import MoE
from glmkit.tokenizer import ByteTokenizer
from glmkit.train import NEXT_TOKEN, History, TrainConfig, default_data, train


def quiet(**kw):
    return dict(progress=False, live_plot=False, device="cpu", **kw)


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Parameters and persistent buffers (the MoE routing bias) equal to the bit."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def small_dense(seed: int, dropout: float = 0.0) -> GLMDenseModel:
    torch.manual_seed(seed)
    return GLMDenseModel(get_config("cpu-small", n_layers=2, hidden_size=64, n_heads=2, n_kv_heads=1,
                                    intermediate_size=160, max_seq_len=64, dropout=dropout))


def small_moe(seed: int, **overrides) -> glm_moe.GLMMoEModel:
    torch.manual_seed(seed)
    kw = dict(n_layers=2, hidden_size=64, n_heads=2, n_kv_heads=1, intermediate_size=128,
              moe_intermediate_size=32, max_seq_len=64)
    kw.update(overrides)
    return glm_moe.GLMMoEModel(glm_moe.get_config("cpu-moe", **kw))


def random_lines(n_lines: int, alphabet: str, width: int) -> str:
    idx = torch.randint(0, len(alphabet), (n_lines, width))
    return "".join("".join(alphabet[i] for i in row) + "\n" for row in idx.tolist())


# ----------------------------------------------------------------------------------------------------
# LMData
# ----------------------------------------------------------------------------------------------------
def test_lm_data_is_a_function_of_the_step():
    a = LMData(batch_size=4, seq_len=24, seed=3)
    b = LMData(batch_size=4, seq_len=24, seed=3)
    for step in (0, 1, 17):
        x, y = a.batch(step), b.batch(step)
        assert isinstance(x, LMBatch) and x.input_ids.dtype == torch.int64 and x.input_ids.shape == (4, 24)
        assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.targets, y.targets)
    assert not torch.equal(a.batch(0).input_ids, a.batch(1).input_ids)
    assert not torch.equal(a.batch(0).input_ids, LMData(batch_size=4, seq_len=24, seed=4).batch(0).input_ids)

    # each row is a window of the token stream at starts(step); the targets are the inputs shifted by one
    batch, starts = a.batch(5), a.starts(5)
    tokens = torch.from_numpy(a.tokens)
    for row, s in enumerate(starts.tolist()):
        assert torch.equal(batch.input_ids[row], tokens[s: s + 24])
        assert torch.equal(batch.targets[row], tokens[s + 1: s + 25])
    assert batch.n_tokens == 4 * 24


def test_train_and_held_out_splits_are_disjoint():
    # 30 lines of lower case, then 10 of upper case: val_fraction 0.25 cuts exactly between them.
    text = random_lines(30, "abcdefghij ", 40) + random_lines(10, "ABCDEFGHIJ ", 40)
    tok = ByteTokenizer()
    lower, upper = set(tok.encode("abcdefghij \n")), set(tok.encode("ABCDEFGHIJ \n"))
    train_data = LMData(text, batch_size=8, seq_len=32, seed=1, val_fraction=0.25)
    val_data = LMData(text, batch_size=8, seq_len=32, seed=1, split="val", val_fraction=0.25)
    for step in range(20):
        tb, vb = train_data.batch(step), val_data.batch(step)
        assert set(tb.input_ids.flatten().tolist()) | set(tb.targets.flatten().tolist()) <= lower
        assert set(vb.input_ids.flatten().tolist()) | set(vb.targets.flatten().tolist()) <= upper

    # On the built-in corpus the two splits partition the text: train is the head, val the tail.
    from glmkit.corpus import load_corpus

    full = tok.encode(load_corpus("stories"))
    tr, va = LMData(batch_size=1, seq_len=16), LMData(batch_size=1, seq_len=16, split="val")
    assert tr.tokens.tolist() + va.tokens.tolist() == full
    assert 0.04 < len(va.tokens) / len(full) < 0.06


def test_lm_data_errors():
    with pytest.raises(ValueError, match="split must be one of"):
        LMData(split="test")
    with pytest.raises(ValueError, match="fewer than one window"):
        LMData("short text\n" * 3, seq_len=64)
    with pytest.raises(ValueError, match="seq_len must be an int >= 1"):
        LMData(seq_len=0)
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        LMData(batch_size=1, seq_len=8).batch(-1)
    with pytest.raises(TypeError, match="LMBatch.targets must be an int64 tensor"):
        LMBatch(torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="both be \\[B, T\\]"):
        LMBatch(torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 4, dtype=torch.int64))


# ----------------------------------------------------------------------------------------------------
# Dense next-token training
# ----------------------------------------------------------------------------------------------------
def test_loss_falls_on_the_builtin_corpus():
    model = GLMDenseModel(get_config("cpu-small"))                  # random init (conftest seeds every test)
    cfg = TrainConfig(steps=30, batch_size=8, seq_len=48, lr=3e-3, warmup_steps=6, eval_every=15, eval_batches=2)
    assert isinstance(default_data(cfg, model=model), LMData)
    val = default_data(cfg, "val", model)
    h = train(model, None, cfg, eval_data=val, **quiet())           # data=None: LMData over "stories"
    assert h.objective == NEXT_TOKEN
    first, last = sum(h.losses[:5]) / 5, sum(h.losses[-5:]) / 5
    assert h.losses[0] > 0.9 * math.log(264)                        # starts near uniform over the bytes
    assert last < 0.75 * first, f"loss did not fall enough: {first:.3f} -> {last:.3f}"
    assert h.eval_steps == [15, 30] and h.eval_losses[1] < h.eval_losses[0] < 0.8 * math.log(264)
    assert not h.aux_losses and not h.max_violation                 # a dense model has no MoE records
    assert "next-token" in h.plot().axes[0].get_title()


def test_lm_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path):
    cfg = TrainConfig(steps=7, batch_size=4, seq_len=32, warmup_steps=2, ckpt_every=3, seed=5)
    data = LMData(batch_size=4, seq_len=32, seed=5)
    full = small_dense(seed=7, dropout=0.1)
    h_full = train(full, data, cfg, out_dir=tmp_path / "full", **quiet())

    class Killed(Exception):
        pass

    def kill_at_5(step, metrics):
        if step == 5:
            raise Killed

    with pytest.raises(Killed):
        train(small_dense(seed=7, dropout=0.1), data, cfg, out_dir=tmp_path / "run", callback=kill_at_5, **quiet())
    assert latest_checkpoint(tmp_path / "run").name == "step-00000003"

    torch.manual_seed(999)
    resumed = small_dense(seed=8, dropout=0.1)                      # other init: the checkpoint must overwrite it
    h = train(resumed, data, cfg, out_dir=tmp_path / "run", **quiet())
    assert h.resumed_from == 3 and h.steps == list(range(1, 8))
    assert h.losses == h_full.losses and same_state(resumed, full)

    loaded = load_pretrained(tmp_path / "run")                     # the training folder is a model folder too
    assert type(loaded) is GLMDenseModel and same_state(loaded, full)
    with pytest.raises(ValueError, match="holds a GLMDenseConfig model, not a GLMMoEConfig one"):
        train(small_moe(seed=0), data, cfg, out_dir=tmp_path / "run", **quiet())


def test_blank_infilling_batches_on_a_dense_model_with_2d_positions():
    cfg2d = GLMDenseConfig(vocab_size=264, hidden_size=32, n_layers=1, n_heads=2, intermediate_size=64,
                           max_seq_len=64, position="learned2d", block="pre", norm="layernorm",
                           activation="gelu", tie_word_embeddings=True)
    torch.manual_seed(0)
    model = GLMDenseModel(cfg2d)
    cfg = TrainConfig(steps=3, batch_size=2, seq_len=48, warmup_steps=1)
    h = train(model, BlankInfillingData(batch_size=2, seq_len=48), cfg, **quiet())
    assert h.objective == "blank_infilling" and all(math.isfinite(x) for x in h.losses)

    with pytest.raises(TypeError, match="needs 2D positions"):
        train(small_dense(0), BlankInfillingData(batch_size=2, seq_len=32),
              TrainConfig(steps=1, batch_size=2, seq_len=32), **quiet())
    tiny = GLMModel(glm2021_config("cpu-tiny", n_layers=1, d_model=32, n_heads=2, d_ff=64, max_seq_len=64))
    with pytest.raises(TypeError, match="an LMBatch .* needs a GLMDenseModel"):
        train(tiny, LMData(batch_size=2, seq_len=32), TrainConfig(steps=1, batch_size=2, seq_len=32), **quiet())
    with pytest.raises(ValueError, match="bias_update_rate must be a number >= 0"):
        TrainConfig(bias_update_rate=-0.1)
    with pytest.warns(UserWarning, match="no MoE layers"):
        train(small_dense(0), LMData(batch_size=1, seq_len=8),
              TrainConfig(steps=1, batch_size=1, seq_len=8, bias_update_rate=0.001), **quiet())


def test_history_of_an_older_checkpoint_loads_with_empty_moe_records():
    old = {"steps": [1, 2], "losses": [5.0, 4.5], "lrs": [1e-3, 1e-3], "grad_norms": [1.0, 0.9],
           "eval_steps": [], "eval_losses": [], "elapsed_s": 0.5, "resumed_from": None}
    h = History.from_dict(old)
    assert h.objective == "blank_infilling" and h.max_violation == [] and h.expert_loads == []
    assert "blank-infilling" in h.plot().axes[0].get_title()
    with pytest.raises(ValueError, match="no expert-load records"):
        h.plot_load()


# ----------------------------------------------------------------------------------------------------
# MoE: bias update, balance loss, load records, resume
# ----------------------------------------------------------------------------------------------------
def biases(model) -> torch.Tensor:
    return torch.stack([m.gate.e_score_correction_bias.clone() for m in model.moe_layers()])


def skew_router(model, experts: tuple[int, ...] = (0, 1), seed: int = 123) -> None:
    """Tilt every router toward ``experts``: add to their rows the mean direction u of the layer's inputs
    on a probe batch, scaled so the mean logit rises by 1 (score ≈ σ(1) ≈ 0.73 against ≈ 0.5)."""
    inputs = {}
    hooks = [moe.register_forward_pre_hook(lambda mod, args, i=i: inputs.__setitem__(i, args[0].detach()))
             for i, moe in enumerate(model.moe_layers())]
    with torch.no_grad():
        model(LMData(batch_size=8, seq_len=32, seed=seed).batch(0).input_ids)
    for hook in hooks:
        hook.remove()
    with torch.no_grad():
        for i, moe in enumerate(model.moe_layers()):
            x = inputs[i].reshape(-1, inputs[i].shape[-1])
            u = x.mean(0) / x.mean(0).norm()
            moe.gate.weight[list(experts)] += u / (x @ u).mean()


def test_bias_update_balances_a_skewed_router_only_when_on():
    cfg = dict(steps=30, batch_size=8, seq_len=32, lr=1e-4, warmup_steps=5, log_every=10)
    runs = {}
    for gamma in (0.0, 0.02):
        model = small_moe(seed=0)
        skew_router(model)
        assert torch.count_nonzero(biases(model)) == 0
        h = train(model, LMData(batch_size=8, seq_len=32, seed=0), TrainConfig(bias_update_rate=gamma, **cfg),
                  **quiet())
        runs[gamma] = (h, biases(model))

    h0, b0 = runs[0.0]
    h1, b1 = runs[0.02]
    E = b1.shape[1]
    assert len(h0.max_violation) == len(h1.max_violation) == 30
    assert h0.max_violation[0] == h1.max_violation[0] > 0.6 * (E / 2 - 1)   # most slots on experts 0, 1
    assert torch.count_nonzero(b0) == 0                                       # γ = 0: the bias never moves
    # γ > 0: each step adds ±γ (or 0) per expert, so b/γ is a whole number; the favoured experts went down
    steps = b1 / 0.02
    assert torch.allclose(steps, steps.round(), atol=1e-3) and bool((steps.abs() <= 30).all())
    assert bool((b1[:, :2] < 0).all()) and bool((b1[:, 2:].mean(1) > 0).all())
    late0, late1 = sum(h0.max_violation[-10:]) / 10, sum(h1.max_violation[-10:]) / 10
    assert late1 < 0.5 * late0, f"MaxVio over the last 10 steps: γ=0 {late0:.2f}, γ=0.02 {late1:.2f}"

    # Load snapshots every log_every steps: one row of shares per MoE layer, each summing to 1.
    assert h1.load_steps == [10, 20, 30] and len(h1.expert_loads[0]) == len(biases(small_moe(0)))
    shares = torch.tensor(h1.expert_loads)
    assert shares.shape[-1] == E and torch.allclose(shares.sum(-1), torch.ones(shares.shape[:-1]))

    d = json.loads(json.dumps(h1.to_dict()))                                  # checkpoints store it as JSON
    assert History.from_dict(d) == h1
    fig = h0.plot_load(label="γ = 0")
    h1.plot_load(ax=fig.axes[0], label="γ = 0.02")
    assert len(fig.axes[0].get_legend().get_texts()) == 2


def test_balance_loss_is_added_and_reaches_the_router():
    # Directly: the model's aux loss is a differentiable function of the router weights.
    model = small_moe(seed=1, aux_loss_alpha=0.01)
    model.train()
    b = LMData(batch_size=2, seq_len=16, seed=2).batch(0)
    model.loss(b.input_ids, b.targets)
    aux = model.aux_loss()
    assert aux is not None and aux.item() > 0
    grads = torch.autograd.grad(aux, [m.gate.weight for m in model.moe_layers()])
    assert all(g.abs().sum() > 0 for g in grads)

    # Through train(): one step with and without the balance loss (no clipping, which would couple every
    # gradient). The forward is the same, so the LM losses agree; the balance loss changes the routers and
    # everything upstream of their scores, but not what lies only downstream of the last router: that
    # layer's experts and the final norm.
    cfg = TrainConfig(steps=1, batch_size=2, seq_len=16, warmup_steps=1, grad_clip=0.0, seed=2)
    data = LMData(batch_size=2, seq_len=16, seed=2)
    seen = []
    with_aux, without = small_moe(seed=1, aux_loss_alpha=0.01), small_moe(seed=1, aux_loss_alpha=0.0)
    assert same_state(with_aux, without)
    h_aux = train(with_aux, data, cfg, callback=lambda step, m: seen.append(m), **quiet())
    h_no = train(without, data, cfg, **quiet())
    assert h_aux.losses == h_no.losses and not h_no.aux_losses
    assert len(h_aux.aux_losses) == 1 and 0 < h_aux.aux_losses[0] < 1
    assert seen[0]["aux_loss"] == h_aux.aux_losses[0] and "max_violation" in seen[0]
    for m_aux, m_no in zip(with_aux.moe_layers(), without.moe_layers()):
        assert not torch.equal(m_aux.gate.weight, m_no.gate.weight)
    assert not torch.equal(with_aux.embed_tokens.weight, without.embed_tokens.weight)
    last_aux, last_no = with_aux.moe_layers()[-1], without.moe_layers()[-1]
    assert torch.equal(last_aux.experts.gate_up_proj, last_no.experts.gate_up_proj)
    assert torch.equal(last_aux.experts.down_proj, last_no.experts.down_proj)
    assert torch.equal(with_aux.final_norm.weight, without.final_norm.weight)


def test_moe_resume_is_bitwise_with_the_routing_bias(tmp_path):
    cfg = TrainConfig(steps=6, batch_size=4, seq_len=32, warmup_steps=2, ckpt_every=2, seed=4,
                      bias_update_rate=0.01)
    data = LMData(batch_size=4, seq_len=32, seed=4)
    full = small_moe(seed=3, aux_loss_alpha=0.001)
    h_full = train(full, data, cfg, out_dir=tmp_path / "full", **quiet())
    assert torch.count_nonzero(biases(full)) > 0

    train(small_moe(seed=3, aux_loss_alpha=0.001), data, cfg, out_dir=tmp_path / "run", max_steps=4, **quiet())
    resumed = small_moe(seed=9, aux_loss_alpha=0.001)
    h = train(resumed, data, cfg, out_dir=tmp_path / "run", **quiet())
    assert h.resumed_from == 4 and h.losses == h_full.losses and h.aux_losses == h_full.aux_losses
    assert h.max_violation == h_full.max_violation
    assert torch.equal(biases(resumed), biases(full)) and same_state(resumed, full)

    loaded = load_pretrained(tmp_path / "run")
    assert type(loaded) is glm_moe.GLMMoEModel and same_state(loaded, full)


def test_moe_modules_in_a_plain_dense_model_are_found():
    """Without GLMMoEModel's methods the trainer finds glmkit.moe.MoE modules itself (duck typing)."""
    model = small_dense(seed=2)
    for layer in model.layers:
        layer.mlp = MoE(64, n_experts=4, top_k=2, moe_intermediate_size=32, n_shared_experts=0,
                        aux_loss_alpha=0.01)
    cfg = TrainConfig(steps=3, batch_size=2, seq_len=16, warmup_steps=1, bias_update_rate=0.05, log_every=1)
    h = train(model, LMData(batch_size=2, seq_len=16), cfg, **quiet())
    assert len(h.max_violation) == 3 and len(h.aux_losses) == 3 and h.load_steps == [1, 2, 3]
    bias = torch.stack([layer.mlp.gate.e_score_correction_bias for layer in model.layers])
    assert torch.count_nonzero(bias) > 0
