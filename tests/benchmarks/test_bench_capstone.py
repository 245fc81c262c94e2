"""bench_capstone's FLOP model against what the model does: the keys KPool selects per query (counted in a real
selection, not from the formula), and the weight FLOPs against the model's own active-parameter count."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_capstone  # noqa: E402

from glmkit.kpool import kpool_topk  # noqa: E402
from glmkit.models.decoder import Decoder  # noqa: E402
from glmkit.models.presets import get_config  # noqa: E402


def test_selected_keys_counts_what_kpool_selects():
    torch.manual_seed(0)
    B, T, H, D, K, topk = 2, 61, 4, 8, 4, 16
    q, k, gate = torch.randn(B, T, H, D), torch.randn(B, T, D), torch.randn(B, T, D)
    w, ape = torch.rand(B, T, H), torch.randn(K, D)
    idx, _ = kpool_topk(q, k, gate, w, ape, topk)
    counted = (idx >= 0).sum(-1)  # [B, T]
    for t in range(T):
        assert counted[:, t].tolist() == [bench_capstone.selected_keys(t, topk, K)] * B, t
    assert bench_capstone.selected_keys(100, 16, None) == 16 and bench_capstone.selected_keys(3, 16, None) == 4


def test_weight_flops_match_the_active_parameters():
    cfg = get_config("cpu-capstone")
    f = bench_capstone.flops_per_token(cfg, 128)
    rows = {c["name"]: c["fwd"] for c in f["components"]}
    with torch.device("meta"):
        model = Decoder(cfg)
    vectors = sum(p.numel() for n, p in model.named_parameters() if p.dim() < 2 and not n.startswith("mtp."))
    main = sum(v for name, v in rows.items() if name not in ("LM head", "MTP layer (block, eh_proj)"))
    main -= rows["KDA chunked recurrence"] + rows["sparse MLA attention"] + rows["KPool pooled scores"]
    assert main == 2 * (model.num_active_parameters() - vectors)
    assert rows["LM head"] == 2 * 2 * cfg.vocab_size * cfg.hidden_size  # run twice: main model and MTP layer
    assert f["train"] == 3 * f["fwd"] and abs(sum(c["share"] for c in f["components"]) - 1) < 1e-9
