"""The extension contract, exercised from outside the library: a sliding-window attention mixer defined here, in
the test, registered by name, trains with ``train``, generates with the cache through ``generate``, and saves and
loads through ``glmkit.checkpoint`` — without a line changed in the decoder, the trainer, the generator or the
checkpoint code."""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn

from glmkit.cache import KVState
from glmkit.checkpoint import load_pretrained, save_pretrained
from glmkit.generate import generate
from glmkit.mixers import MIXERS, register
from glmkit.models.decoder import Decoder
from glmkit.models.presets import get_config
from glmkit.ops.attention import attention_masked
from glmkit.testing import rel_err
from glmkit.train import TrainConfig, train


@register("toy_window")
class WindowAttention(nn.Module):
    """Causal attention over the last ``toy_window`` positions only (no positions: the window is the order)."""

    options = {"toy_window": 4}

    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.H, self.D, self.W = cfg.num_attention_heads, cfg.head_dim, cfg.opt("toy_window")
        self.qkv = nn.Linear(cfg.hidden_size, 3 * self.H * self.D, bias=False)
        self.o_proj = nn.Linear(self.H * self.D, cfg.hidden_size, bias=False)

    def new_state(self, batch_size, max_len, dtype, device):
        return KVState(batch_size, self.H, max_len, self.D, dtype, device)

    def forward(self, x, step, state):
        B, T, _ = x.shape
        q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.H)
        if state is not None:
            k, v = state.append(k, v, step.offset)
        L = k.shape[2]
        i = torch.arange(step.offset, step.offset + T, device=x.device)[:, None]
        j = torch.arange(L, device=x.device)[None]
        visible = (j <= i) & (j > i - self.W)
        if step.visible is not None:
            visible = visible & step.visible
        out = attention_masked(q, k, v, visible.expand(B, T, L), 1 / math.sqrt(self.D))
        return self.o_proj(rearrange(out, "b h t d -> b t (h d)"))


def _config(**changes):
    return get_config(
        "cpu-small", num_hidden_layers=2, layer_types=["toy_window", "attention"], extra={"toy_window": 3}, **changes
    )


def test_registered_and_configured():
    assert MIXERS["toy_window"] is WindowAttention
    model = Decoder(_config())
    assert isinstance(model.layers[0].mixer, WindowAttention) and model.layers[0].mixer.W == 3
    assert model.config.to_dict()["toy_window"] == 3 and model.config.opt("toy_window") == 3


def test_the_window_is_real():
    layer = Decoder(_config()).layers[0].mixer
    x = torch.randn(1, 9, 128)
    y = x.clone()
    y[0, 2] += 1.0  # position 2 is outside the window of positions >= 5
    from glmkit.mixers import Step

    step = Step(position_ids=torch.arange(9)[None], sep=torch.zeros(1, dtype=torch.long))
    with torch.no_grad():
        a, b = layer(x, step, None), layer(y, step, None)
    assert torch.equal(a[0, 5:], b[0, 5:]) and not torch.allclose(a[0, 2:5], b[0, 2:5])


def test_trains_generates_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = Decoder(_config())
    cfg = TrainConfig(steps=35, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=3)
    history = train(model, cfg=cfg, out_dir=tmp_path / "run", progress=False, max_steps=30)
    assert sum(history.losses[-5:]) < sum(history.losses[:5]) - 2.5  # it learns
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12]]
    cached = generate(model, prompts, 10, stop_tokens=(), use_cache=True)
    uncached = generate(model, prompts, 10, stop_tokens=(), use_cache=False)
    assert cached.tokens == uncached.tokens
    save_pretrained(model, tmp_path / "model")
    again = load_pretrained(tmp_path / "model").eval()
    x = torch.randint(0, 264, (2, 16))
    with torch.no_grad():
        assert rel_err(model.eval()(x), again(x)) == 0.0
    assert again.config.opt("toy_window") == 3
    # resuming the training run (its checkpoints hold the toy mixer's weights and its option) continues it
    more = train(Decoder(_config()), cfg=cfg, out_dir=tmp_path / "run", progress=False)
    assert more.resumed_from == 30 and len(more.losses) == 35
