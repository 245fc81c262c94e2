"""Training, one loop for every model: the schedule, reproducibility (bitwise on CPU), resume after a kill equal
to the bit to an uninterrupted run (blank infilling, next token, MoE with its routing bias), the loss falling on
the built-in corpus, named auxiliary losses, the bias update, load records, errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from glmkit.checkpoint import latest_checkpoint, load_pretrained
from glmkit.data.blank_infilling import BlankInfillingData
from glmkit.data.lm_data import LMData
from glmkit.models.decoder import Decoder
from glmkit.models.glm2021 import GLMModel
from glmkit.models.glm2021 import get_config as glm2021_config
from glmkit.models.presets import get_config
from glmkit.train import (
    BLANK_INFILLING,
    NEXT_TOKEN,
    History,
    TrainConfig,
    default_data,
    lr_at,
    mtp_weight_at,
    train,
)

SEQ = 48


def tiny(dropout: float = 0.1, seed: int = 0) -> GLMModel:
    torch.manual_seed(seed)
    return GLMModel(
        glm2021_config(
            "cpu-tiny",
            num_hidden_layers=2,
            hidden_size=32,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
            dropout=dropout,
        )
    )


def small_dense(seed: int = 0) -> Decoder:
    torch.manual_seed(seed)
    return Decoder(
        get_config(
            "cpu-small",
            num_hidden_layers=2,
            hidden_size=64,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=32,
            intermediate_size=96,
        )
    )


def small_moe(seed: int = 0, **kw) -> Decoder:
    torch.manual_seed(seed)
    return Decoder(
        get_config(
            "cpu-moe",
            num_hidden_layers=3,
            hidden_size=64,
            num_attention_heads=2,
            head_dim=32,
            intermediate_size=96,
            moe_intermediate_size=32,
            **kw,
        )
    )


def blanks(seed: int = 0, batch_size: int = 4, seq_len: int = SEQ) -> BlankInfillingData:
    return BlankInfillingData(batch_size=batch_size, seq_len=seq_len, seed=seed)


def quiet(**kw):
    return dict(progress=False, device="cpu", **kw)


def same_state(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class Killed(Exception):
    pass


def kill_at(n):
    def callback(step, metrics, history):
        if step == n:
            raise Killed

    return callback


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(steps=100, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(cfg, s) for s in range(cfg.steps)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(1e-4, rel=0.01) and lr_at(cfg, 100) == pytest.approx(1e-4)
    assert lr_at(TrainConfig(steps=10, warmup_steps=0, lr=1.0), 0) == 1.0


def test_same_seed_gives_identical_runs():
    cfg = TrainConfig(steps=5, batch_size=4, seq_len=SEQ, warmup_steps=2, seed=3)
    m1, m2 = tiny(seed=1), tiny(seed=1)
    h1 = train(m1, blanks(3), cfg, **quiet())
    h2 = train(m2, blanks(3), cfg, **quiet())
    assert h1.losses == h2.losses and same_state(m1, m2)  # bitwise, dropout included
    assert h1.objective == BLANK_INFILLING


def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path):
    cfg = TrainConfig(steps=8, batch_size=4, seq_len=SEQ, warmup_steps=2, ckpt_every=3, seed=5)
    full = tiny(seed=7)
    h_full = train(full, blanks(5), cfg, out_dir=tmp_path / "full", **quiet())
    with pytest.raises(Killed):
        train(tiny(seed=7), blanks(5), cfg, out_dir=tmp_path / "run", callback=kill_at(5), **quiet())
    assert latest_checkpoint(tmp_path / "run").name == "step-00000003"  # steps 4-5 were lost
    torch.manual_seed(999)  # a fresh process: other init, other RNG state
    resumed = tiny(seed=8)
    h = train(resumed, blanks(5), cfg, out_dir=tmp_path / "run", **quiet())
    assert h.resumed_from == 3 and h.steps == list(range(1, 9))
    assert h.losses == h_full.losses and same_state(resumed, full)
    # training in pieces with max_steps lands on the same weights too
    train(tiny(seed=7), blanks(5), cfg, out_dir=tmp_path / "pieces", max_steps=4, **quiet())
    assert train(tiny(seed=0), blanks(5), cfg, out_dir=tmp_path / "pieces", max_steps=6, **quiet()).steps[-1] == 6
    last = tiny(seed=0)
    assert train(last, blanks(5), cfg, out_dir=tmp_path / "pieces", **quiet()).losses == h_full.losses
    assert same_state(last, full)


def test_blank_infilling_loss_falls_on_the_builtin_corpus():
    torch.manual_seed(0)
    model = GLMModel(glm2021_config("cpu-tiny", num_hidden_layers=2, max_position_embeddings=64))
    cfg = TrainConfig(steps=60, batch_size=8, seq_len=64, lr=3e-3, warmup_steps=10, seed=0)
    h = train(model, blanks(0, batch_size=8, seq_len=64), cfg, **quiet())
    first, last = sum(h.losses[:10]) / 10, sum(h.losses[-10:]) / 10
    assert h.losses[0] > 0.9 * math.log(264)  # starts near uniform over the vocabulary
    assert last < 0.75 * first, f"loss did not fall enough: {first:.3f} -> {last:.3f}"


def test_next_token_loss_falls_with_evaluation():
    model = Decoder(get_config("cpu-small"))
    cfg = TrainConfig(steps=30, batch_size=8, seq_len=48, lr=3e-3, warmup_steps=6, eval_every=15, eval_batches=2)
    assert isinstance(default_data(cfg, model=model), LMData)
    assert isinstance(default_data(cfg, model=tiny()), BlankInfillingData)
    h = train(model, None, cfg, eval_data=default_data(cfg, "val", model), **quiet())  # LMData over "stories"
    assert h.objective == NEXT_TOKEN
    first, last = sum(h.losses[:5]) / 5, sum(h.losses[-5:]) / 5
    assert h.losses[0] > 0.9 * math.log(264) and last < 0.75 * first, (first, last)
    assert h.eval_steps == [15, 30] and h.eval_losses[1] < h.eval_losses[0] < 0.8 * math.log(264)
    assert not h.aux and not h.max_violation  # a dense model has no MoE records


def test_lm_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path):
    cfg = TrainConfig(steps=7, batch_size=4, seq_len=32, warmup_steps=2, ckpt_every=3, seed=5)
    data = LMData(batch_size=4, seq_len=32, seed=5)
    full = small_dense(seed=7)
    h_full = train(full, data, cfg, out_dir=tmp_path / "full", **quiet())
    with pytest.raises(Killed):
        train(small_dense(seed=7), data, cfg, out_dir=tmp_path / "run", callback=kill_at(5), **quiet())
    resumed = small_dense(seed=8)  # other init: the checkpoint must overwrite it
    h = train(resumed, data, cfg, out_dir=tmp_path / "run", **quiet())
    assert h.resumed_from == 3 and h.losses == h_full.losses and same_state(resumed, full)
    loaded = load_pretrained(tmp_path / "run")  # the training folder is a model folder too
    assert type(loaded) is Decoder and same_state(loaded, full)
    with pytest.raises(ValueError, match="different model config"):
        train(small_moe(seed=0), data, cfg, out_dir=tmp_path / "run", **quiet())


def test_objective_mismatches_and_config_errors():
    with pytest.raises(ValueError, match="2D"):  # blank-infilling batches need GLM-2021's 2D positions
        train(small_dense(0), blanks(0, 2, 32), TrainConfig(steps=1, batch_size=2, seq_len=32), **quiet())
    with pytest.raises(ValueError, match="TrainConfig.steps must be an int >= 1"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="TrainConfig.lr must be a positive number"):
        TrainConfig(lr=-1.0)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        TrainConfig(min_lr_ratio=2.0)
    with pytest.raises(ValueError, match="bias_update_rate must be a number >= 0"):
        TrainConfig(bias_update_rate=-0.1)
    with pytest.raises(ValueError, match="seq_len=128 is longer than the model allows"):
        train(tiny(), blanks(), TrainConfig(seq_len=128), **quiet())
    with pytest.raises(TypeError, match=r"batch\(step\)"):
        train(tiny(), [1, 2, 3], TrainConfig(steps=1, seq_len=32), **quiet())
    with pytest.raises(TypeError, match="glmkit model"):
        train(torch.nn.Linear(2, 2), blanks(), TrainConfig(steps=1, seq_len=32), **quiet())
    with pytest.warns(UserWarning, match="no MoE layers"):
        train(
            small_dense(0),
            LMData(batch_size=1, seq_len=8),
            TrainConfig(steps=1, batch_size=1, seq_len=8, bias_update_rate=0.001),
            **quiet(),
        )


def test_bad_token_ids_are_caught_at_the_edge():
    class Bad:
        def batch(self, step):
            b = LMData(batch_size=1, seq_len=8).batch(step)
            b.input_ids[0, 0] = 999
            return b

    with pytest.raises(ValueError, match="token id 999"):
        train(small_dense(0), Bad(), TrainConfig(steps=1, batch_size=1, seq_len=8), **quiet())


# -- MoE: bias update, balance loss, load records, resume --------------------------------------------------
def biases(model) -> torch.Tensor:
    return torch.stack([m.gate.e_score_correction_bias.clone() for m in model.moe_layers()])


def skew_router(model, experts: tuple[int, ...] = (0, 1), seed: int = 123) -> None:
    """Tilt every router toward ``experts``: add to their rows the mean direction u of the layer's inputs on a
    probe batch, scaled so the mean logit rises by 1 (score ≈ σ(1) ≈ 0.73 against ≈ 0.5)."""
    inputs = {}
    hooks = [
        moe.register_forward_pre_hook(lambda mod, args, i=i: inputs.__setitem__(i, args[0].detach()))
        for i, moe in enumerate(model.moe_layers())
    ]
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
        h = train(
            model, LMData(batch_size=8, seq_len=32, seed=0), TrainConfig(bias_update_rate=gamma, **cfg), **quiet()
        )
        runs[gamma] = (h, biases(model))
    (h0, b0), (h1, b1) = runs[0.0], runs[0.02]
    E = b1.shape[1]
    assert len(h0.max_violation) == len(h1.max_violation) == 30
    assert h0.max_violation[0] == h1.max_violation[0] > 0.6 * (E / 2 - 1)  # most slots on experts 0, 1
    assert torch.count_nonzero(b0) == 0  # γ = 0: the bias never moves
    steps = b1 / 0.02  # each step adds ±γ (or 0): b/γ is a whole number
    assert torch.allclose(steps, steps.round(), atol=1e-3) and bool((steps.abs() <= 30).all())
    assert bool((b1[:, :2] < 0).all()) and bool((b1[:, 2:].mean(1) > 0).all())
    late0, late1 = sum(h0.max_violation[-10:]) / 10, sum(h1.max_violation[-10:]) / 10
    assert late1 < 0.5 * late0, f"MaxVio over the last 10 steps: γ=0 {late0:.2f}, γ=0.02 {late1:.2f}"
    assert h1.load_steps == [10, 20, 30] and len(h1.expert_loads[0]) == b1.shape[0]
    shares = torch.tensor(h1.expert_loads)
    assert shares.shape[-1] == E and torch.allclose(shares.sum(-1), torch.ones(shares.shape[:-1]))
    assert History.from_dict(json.loads(json.dumps(h1.to_dict()))) == h1  # checkpoints store it as JSON


def test_balance_loss_is_added_and_reaches_the_router():
    """One step with and without the balance loss (no clipping, which would couple every gradient): the same LM
    loss, the routers and everything upstream changed, what lies only downstream of the last router not."""
    cfg = TrainConfig(steps=1, batch_size=2, seq_len=16, warmup_steps=1, grad_clip=0.0, seed=2)
    data = LMData(batch_size=2, seq_len=16, seed=2)
    seen = []
    with_aux, without = small_moe(seed=1, aux_loss_alpha=0.01), small_moe(seed=1, aux_loss_alpha=0.0)
    assert same_state(with_aux, without)
    h_aux = train(with_aux, data, cfg, callback=lambda step, m, h: seen.append(m), **quiet())
    h_no = train(without, data, cfg, **quiet())
    assert h_aux.losses == h_no.losses and not h_no.aux
    assert list(h_aux.aux) == ["MoE"] and 0 < h_aux.aux["MoE"][0] < 1
    assert seen[0]["MoE"] == h_aux.aux["MoE"][0] and "max_violation" in seen[0]
    for m_aux, m_no in zip(with_aux.moe_layers(), without.moe_layers()):
        assert not torch.equal(m_aux.gate.weight, m_no.gate.weight)
    assert not torch.equal(with_aux.embed_tokens.weight, without.embed_tokens.weight)
    last_aux, last_no = with_aux.moe_layers()[-1], without.moe_layers()[-1]
    assert torch.equal(last_aux.experts.gate_up_proj, last_no.experts.gate_up_proj)
    assert torch.equal(with_aux.final_norm.weight, without.final_norm.weight)


def test_moe_resume_is_bitwise_with_the_routing_bias(tmp_path):
    cfg = TrainConfig(steps=6, batch_size=4, seq_len=32, warmup_steps=2, ckpt_every=2, seed=4, bias_update_rate=0.01)
    data = LMData(batch_size=4, seq_len=32, seed=4)
    full = small_moe(seed=3, aux_loss_alpha=0.001)
    h_full = train(full, data, cfg, out_dir=tmp_path / "full", **quiet())
    assert torch.count_nonzero(biases(full)) > 0
    train(small_moe(seed=3, aux_loss_alpha=0.001), data, cfg, out_dir=tmp_path / "run", max_steps=4, **quiet())
    resumed = small_moe(seed=9, aux_loss_alpha=0.001)
    h = train(resumed, data, cfg, out_dir=tmp_path / "run", **quiet())
    assert h.resumed_from == 4 and h.losses == h_full.losses and h.aux == h_full.aux
    assert h.max_violation == h_full.max_violation
    assert torch.equal(biases(resumed), biases(full)) and same_state(resumed, full)
    assert same_state(load_pretrained(tmp_path / "run"), full)


# -- multi-token prediction -------------------------------------------------------------------------------------
def test_mtp_weight_schedule():
    cfg = TrainConfig(steps=30)  # λ = 0.3 for the first 0.67 · 30 = 20.1 steps, then 0.1 (DeepSeek-V3, GLM-4.5)
    assert [mtp_weight_at(cfg, s) for s in range(30)] == [0.3] * 21 + [0.1] * 9
    assert {mtp_weight_at(TrainConfig(steps=30, mtp_weight_switch=1.0), s) for s in range(30)} == {0.3}
    for bad in (dict(mtp_weight=-0.1), dict(mtp_weight_switch=1.5), dict(mtp_weight_final=float("nan"))):
        with pytest.raises(ValueError, match="mtp_weight"):
            TrainConfig(**bad)


def test_mtp_loss_enters_with_the_scheduled_weight():
    """λ = 0 in step 1, then 0.5: the MTP module's own weights (which no other loss reaches) stay put in step 1 and
    move in step 2. ``History.aux["mtp"]`` is the unweighted mean over the depths, here D = 2 with one module."""
    cfg = TrainConfig(
        steps=2,
        batch_size=2,
        seq_len=16,
        warmup_steps=1,
        weight_decay=0.0,
        grad_clip=0.0,
        mtp_weight=0.0,
        mtp_weight_final=0.5,
        mtp_weight_switch=0.5,
    )
    torch.manual_seed(0)
    model = Decoder(get_config(small_dense().config, num_nextn_predict_layers=1, mtp_depth=2))
    data = LMData(batch_size=2, seq_len=16, seed=0)
    b = data.batch(0)
    with torch.no_grad():
        want = model.mtp_losses(b.input_ids, b.targets, model.hidden_states(b.input_ids)).mean().item()
    before = model.mtp[0].eh_proj.weight.detach().clone()
    seen = []
    h = train(
        model, data, cfg, callback=lambda *a: seen.append(model.mtp[0].eh_proj.weight.detach().clone()), **quiet()
    )
    assert torch.equal(seen[0], before) and not torch.equal(seen[1], before)
    assert list(h.aux) == ["mtp"] and len(h.aux["mtp"]) == 2 and abs(h.aux["mtp"][0] - want) < 1e-5
