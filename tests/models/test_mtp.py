"""Multi-token prediction at depth D: depth k reads the true token t_{i+k} and the previous depth's output; one
module applied recursively (GLM-5) or one per depth (DeepSeek-V3); the per-depth losses against a hand-written
recursion; the MTP loss in training mode only; each depth's cache (chunked, rolled back) equals a full forward;
no host sync (traced whole)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from glmkit.mixers import Step
from glmkit.models.decoder import MTP_AUX, Decoder
from glmkit.models.presets import get_config
from glmkit.testing import rel_err


def model_with(seed: int = 0, **fields) -> Decoder:
    torch.manual_seed(seed)
    return Decoder(get_config("cpu-small", num_hidden_layers=2, **{"num_nextn_predict_layers": 1, **fields}))


def test_shared_or_separate_modules():
    shared, separate = model_with(mtp_depth=3), model_with(num_nextn_predict_layers=3)
    assert shared.mtp_depth == separate.mtp_depth == 3 and model_with().mtp_depth == 1
    assert len(shared.mtp) == 1 and all(shared.mtp_module(k) is shared.mtp[0] for k in (1, 2, 3, 7))
    assert [separate.mtp_module(k) for k in (1, 2, 3, 4)] == [*separate.mtp, separate.mtp[2]]
    one_block = shared.num_parameters(include_mtp=True) - shared.num_parameters()
    assert separate.num_parameters(include_mtp=True) - separate.num_parameters() == 3 * one_block
    for fields, match in [
        (dict(num_nextn_predict_layers=0, mtp_depth=2), "mtp_depth"),
        (dict(num_nextn_predict_layers=3, mtp_depth=2), "mtp_depth"),
        (dict(mtp_depth=-1), "mtp_depth"),
    ]:
        with pytest.raises(ValueError, match=match):
            get_config("cpu-small", **fields)
    with pytest.raises(ValueError, match="depth"):
        shared.mtp_module(0)
    with pytest.raises(ValueError, match="no MTP layer"):
        model_with(num_nextn_predict_layers=0).mtp_module(1)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_depth_k_reads_the_true_token_k_ahead(depth):
    """Logits of depth k at position i depend on tokens 0..i+k only: changing token j moves positions i >= j − k."""
    model = model_with(1, mtp_depth=3).eval()
    x = torch.randint(0, 264, (2, 13))
    j = 8
    with torch.no_grad():
        logits = model.mtp_logits(x, depth=depth)
        assert logits.shape == (2, 13 - depth, 264)
        x2 = x.clone()
        x2[:, j] = (x2[:, j] + 1) % 264
        changed = (model.mtp_logits(x2, depth=depth) - logits).abs().amax(dim=(0, 2))
    assert torch.all(changed[: j - depth] < 1e-5) and torch.all(changed[j - depth :] > 1e-4), changed
    with pytest.raises(ValueError, match="longer than"):
        model.mtp_logits(x[:, :depth], depth=depth)


@pytest.mark.parametrize("separate", [False, True])
def test_losses_follow_the_recursion(separate):
    """mtp_losses against the recursion written out: h^0 the final-norm output; h^k = module_k.hidden(h^{k−1}_{<T−k},
    t_{k..}); loss_k = CE(head(h^k), targets[:, k:])."""
    model = model_with(2, **(dict(num_nextn_predict_layers=3) if separate else dict(mtp_depth=3))).eval()
    B, T = 2, 11
    x = torch.randint(0, 264, (B, T))
    targets = torch.randint(0, 264, (B, T))
    targets[0, 5] = -100
    with torch.no_grad():
        h = model.hidden_states(x)
        ours = model.mtp_losses(x, targets, h)
        want = []
        for k in (1, 2, 3):
            m = model.mtp[k - 1 if separate else 0]
            n = T - k
            step = Step(position_ids=torch.arange(n)[None].expand(B, n), sep=torch.zeros(B, dtype=torch.long))
            h = m.hidden(h[:, :n], x[:, k:], step)
            want.append(F.cross_entropy(m.head(h).flatten(0, 1), targets[:, k:].flatten(), ignore_index=-100))
    assert ours.shape == (3,) and rel_err(torch.stack(want), ours) < 1e-6


def test_the_mtp_loss_is_an_aux_loss_in_training_only():
    model = model_with(3, mtp_depth=2)
    x = torch.randint(0, 264, (2, 16))
    batch = {"input_ids": x[:, :-1], "targets": x[:, 1:]}
    model.train()
    model.loss(batch)
    aux = model.aux_losses()
    assert list(aux) == [MTP_AUX]
    with torch.no_grad():
        want = model.mtp_losses(batch["input_ids"], batch["targets"], model.hidden_states(batch["input_ids"])).mean()
    assert rel_err(want, aux[MTP_AUX].detach()) < 1e-6
    aux[MTP_AUX].backward()
    assert model.mtp[0].eh_proj.weight.grad.abs().sum() > 0 and model.layers[0].mixer.qkv_proj.weight.grad is not None
    model.eval()
    model.loss(batch)
    assert model.aux_losses() == {}  # evaluation scores the main model alone


def test_each_depth_cache_chunked_and_rolled_back_equals_a_full_forward():
    """Depth 2 over positions 0..T−1 in chunks through its cache, with a speculative chunk rolled back and redone."""
    model = model_with(4, mtp_depth=2).eval()
    T = 12
    x = torch.randint(0, 264, (2, T + 2))
    with torch.no_grad():
        h0 = model.hidden_states(x)
        h1 = model.mtp_hidden(1, h0[:, : T + 1], x[:, 1 : T + 2])
        full = model.mtp_hidden(2, h1[:, :T], x[:, 2 : T + 2])
        cache = model.new_mtp_cache(2, 2, 16, max_rollback=3)
        parts = [model.mtp_hidden(2, h1[:, :5], x[:, 2:7], cache=cache)]
        model.mtp_hidden(2, torch.randn(2, 3, 128), torch.randint(0, 264, (2, 3)), cache=cache)  # rejected
        cache.rollback(3)
        parts += [model.mtp_hidden(2, h1[:, 5:9], x[:, 7:11], cache=cache)]
        parts += [model.mtp_hidden(2, h1[:, t : t + 1], x[:, t + 2 : t + 3], cache=cache) for t in range(9, T)]
    assert cache.length == T and rel_err(full, torch.cat(parts, 1)) < 1e-5
    with pytest.raises(ValueError, match="does not fit"):
        model.mtp_hidden(1, h0[:, :3], x[:, 1:4], cache=model.new_cache(2, 8))


def test_mtp_forward_has_no_host_sync():
    torch._dynamo.reset()
    model = model_with(5, mtp_depth=2).eval()
    x = torch.randint(0, 264, (2, 10))
    fn = torch.compile(model.mtp_hidden, fullgraph=True, backend="eager")
    with torch.no_grad():
        h0 = model.hidden_states(x)
        cache = model.new_mtp_cache(1, 2, 16, max_rollback=2)
        out = fn(1, h0[:, :8], x[:, 1:9], cache=cache)
        step = fn(1, h0[:, 8:9], x[:, 9:10], cache=cache)
        assert rel_err(model.mtp_hidden(1, h0[:, :9], x[:, 1:10]), torch.cat([out, step], 1)) < 1e-5
    model.train()
    loss = torch.compile(model.loss, fullgraph=True, backend="eager")({"input_ids": x, "targets": x})
    assert torch.isfinite(loss) and MTP_AUX in model.aux_losses()
