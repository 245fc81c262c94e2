"""Helpers of the delta-rule mixer tests (test_gdn.py, test_kda.py, tests/models/test_hybrid.py): fla's naive
references, weights at a scale where the layers do something, and the layer-against-transformers comparison."""

from __future__ import annotations

import importlib
import importlib.util
import types
import zipfile
from pathlib import Path

import pytest
import torch

from glmkit.mixers import Step
from glmkit.testing import rel_err

PARITY_TOL = 1e-4  # fp32, relative (the brief's budget; measured ~5e-7)
FLA_WHEEL = Path(__file__).resolve().parents[2] / ".whl" / "fla_core-0.6.0-py3-none-any.whl"


def fla_naive(module: str) -> types.ModuleType:
    """fla's ``naive.py`` of ``fla.ops.<module>`` (plain torch + einops): from an installed fla, else read straight
    out of the fla-core wheel in .whl/ (not installed: transformers would then route its layers to fla's GPU
    kernels). Skips when neither is here: the wheel is not part of the repository."""
    name = f"fla.ops.{module}.naive"
    if importlib.util.find_spec("fla") is not None:
        return importlib.import_module(name)
    if not FLA_WHEEL.exists():
        pytest.skip(f"fla is not installed and {FLA_WHEEL.name} is not in .whl/")
    source = zipfile.ZipFile(FLA_WHEEL).read(f"fla/ops/{module}/naive.py").decode()
    mod = types.ModuleType(name)
    exec(compile(source, f"{FLA_WHEEL.name}/fla/ops/{module}/naive.py", "exec"), mod.__dict__)
    return mod


def sharpen_(module: torch.nn.Module) -> torch.nn.Module:
    """Weights at unit fan-in scale (HF's 0.02 init would make every layer nearly the identity of its input),
    vectors (norm gains, A_log, dt_bias) drawn around their typical values."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5)
            else:
                p.normal_(1.0 if "norm" in name else 0.0, 0.3)
    return module


def layer_step(B: int, T: int, offset: int = 0, device="cpu") -> Step:
    """The ``Step`` the decoder would pass a layer for T tokens at ``offset``, without padding."""
    pos = torch.arange(offset, offset + T, device=device)[None].expand(B, T)
    return Step(position_ids=pos, sep=torch.zeros(B, dtype=torch.long, device=device), offset=offset)


@torch.no_grad()
def compare_with_hf(hf, ours, hf_cache, x: torch.Tensor, prefix: int) -> list[float]:
    """Relative errors of our layer against the HF layer: the whole sequence without a cache, then a prefill of
    ``prefix`` tokens and one token at a time through both caches."""
    B, T, _ = x.shape
    errs = [rel_err(hf(x), ours(x, layer_step(B, T), None))]
    state = ours.new_state(B, T, x.dtype, x.device)
    errs.append(rel_err(hf(x[:, :prefix], cache=hf_cache), ours(x[:, :prefix], layer_step(B, prefix), state)))
    for t in range(prefix, T):
        errs.append(rel_err(hf(x[:, t : t + 1], cache=hf_cache), ours(x[:, t : t + 1], layer_step(B, 1, t), state)))
    return errs
