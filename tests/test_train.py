"""Training: the schedule, reproducibility (same seed, same losses, bitwise on CPU), resume after a kill
equal to the bit to an uninterrupted run, the loss falling on the built-in corpus, the plots, errors."""

from __future__ import annotations

import math

import pytest
import torch

from glmkit.blank_infilling import BlankInfillingData
from glmkit.checkpoint import latest_checkpoint
from glmkit.models import GLMModel, get_config
from glmkit.train import History, LivePlot, TrainConfig, lr_at, train

SEQ = 48


def tiny(dropout: float = 0.1, seed: int = 0) -> GLMModel:
    torch.manual_seed(seed)
    return GLMModel(get_config("cpu-tiny", n_layers=2, d_model=32, n_heads=2, d_ff=64, max_seq_len=64,
                               dropout=dropout))


def data(seed: int = 0, batch_size: int = 4, seq_len: int = SEQ) -> BlankInfillingData:
    return BlankInfillingData(batch_size=batch_size, seq_len=seq_len, seed=seed)


def quiet(**kw):
    return dict(progress=False, live_plot=False, device="cpu", **kw)


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


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
    h1 = train(m1, data(3), cfg, **quiet())
    h2 = train(m2, data(3), cfg, **quiet())
    assert h1.losses == h2.losses and same_weights(m1, m2)       # bitwise, dropout included


def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path):
    cfg = TrainConfig(steps=8, batch_size=4, seq_len=SEQ, warmup_steps=2, ckpt_every=3, seed=5)
    full = tiny(seed=7)
    h_full = train(full, data(5), cfg, out_dir=tmp_path / "full", **quiet())

    class Killed(Exception):
        pass

    def kill_at_5(step, metrics):
        if step == 5:
            raise Killed

    killed = tiny(seed=7)
    with pytest.raises(Killed):
        train(killed, data(5), cfg, out_dir=tmp_path / "run", callback=kill_at_5, **quiet())
    assert latest_checkpoint(tmp_path / "run").name == "step-00000003"   # steps 4-5 were lost

    torch.manual_seed(999)                         # a fresh process: other init, other RNG state
    resumed = tiny(seed=8)
    h = train(resumed, data(5), cfg, out_dir=tmp_path / "run", **quiet())
    assert h.resumed_from == 3 and h.steps == list(range(1, 9))
    assert h.losses == h_full.losses
    assert same_weights(resumed, full)

    # Training in pieces with max_steps lands on the same weights too.
    pieces = tiny(seed=7)
    train(pieces, data(5), cfg, out_dir=tmp_path / "pieces", max_steps=4, **quiet())
    h_p = train(tiny(seed=0), data(5), cfg, out_dir=tmp_path / "pieces", max_steps=6, **quiet())
    assert h_p.steps[-1] == 6
    last = tiny(seed=0)
    h_last = train(last, data(5), cfg, out_dir=tmp_path / "pieces", **quiet())
    assert h_last.losses == h_full.losses and same_weights(last, full)


def test_loss_falls_on_the_builtin_corpus():
    torch.manual_seed(0)
    model = GLMModel(get_config("cpu-tiny", n_layers=2, max_seq_len=64))
    cfg = TrainConfig(steps=60, batch_size=8, seq_len=64, lr=3e-3, warmup_steps=10, seed=0)
    h = train(model, data(0, batch_size=8, seq_len=64), cfg, **quiet())
    first, last = sum(h.losses[:10]) / 10, sum(h.losses[-10:]) / 10
    assert h.losses[0] > 0.9 * math.log(264)           # starts near uniform over the vocabulary
    assert last < 0.75 * first, f"loss did not fall enough: {first:.3f} -> {last:.3f}"


def test_default_data_and_evaluation():
    cfg = TrainConfig(steps=2, batch_size=2, seq_len=32, warmup_steps=1, eval_every=1, eval_batches=1)
    h = train(tiny(), None, cfg, eval_data=data(1, batch_size=2, seq_len=32), **quiet())
    assert len(h.losses) == 2 and h.eval_steps == [1, 2] and all(math.isfinite(x) for x in h.eval_losses)


def test_plots_render(monkeypatch):
    h = History(steps=[1, 2, 3], losses=[5.0, 4.0, 3.5], eval_steps=[3], eval_losses=[3.7])
    fig = h.plot()
    assert fig.axes[0].get_xlabel() == "step"

    shown = []

    class Handle:
        def update(self, obj):
            shown.append(obj)

    import IPython.display

    monkeypatch.setattr(IPython.display, "display", lambda obj, display_id=None: shown.append(obj) or Handle())
    plot = LivePlot(min_interval_s=100.0)
    plot.update(h)                                   # throttled: the first draw was just now
    plot.update(h, force=True)
    assert len(shown) == 2 and shown[-1].data[:4] == b"\x89PNG"


def test_errors():
    with pytest.raises(ValueError, match="TrainConfig.steps must be an int >= 1"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="TrainConfig.lr must be a positive number"):
        TrainConfig(lr=-1.0)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        TrainConfig(min_lr_ratio=2.0)
    m = tiny()
    with pytest.raises(ValueError, match="seq_len=128 is longer than the model allows \\(max_seq_len=64\\)"):
        train(m, data(), TrainConfig(seq_len=128), **quiet())
    with pytest.raises(TypeError, match="batch\\(step\\)"):
        train(m, [1, 2, 3], TrainConfig(steps=1, seq_len=32), **quiet())
    with pytest.raises(ValueError, match="live_plot must be"):
        train(m, data(), TrainConfig(steps=1, seq_len=32), progress=False, live_plot="yes")
