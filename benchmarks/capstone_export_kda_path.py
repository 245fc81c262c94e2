"""Why the H200 export check of the capstone differed from transformers by 6e-3 in fp32: which KDA transformers ran.

transformers 5.24's glm5_next binds ``chunk_kda`` at import time: fla's Triton kernel when the ``fla`` package imports,
its torch reference otherwise (``integrations.hub_kernels.use_kernel_func_from_hub_with_fallback``). The first H200
run had fla-core on the path (for the side-by-side benchmarks), so transformers' KDA layers ran fla's kernel, whose
dots do not follow torch's "TF32 off". This script exports the ``capstone`` preset (random weights at unit fan-in
scale, a random routing bias) with ``save_hf`` and compares transformers' logits with ours (torch path, fp32) at
T = 1024, the export check's window, once with fla blocked and once with fla allowed, each in a fresh process.

    PYTHONPATH=. python benchmarks/capstone_export_kda_path.py            # both, on CUDA if there is one
    PYTHONPATH=. python benchmarks/capstone_export_kda_path.py --one torch   # one process, fla blocked
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def one(kda: str, seq_len: int) -> dict:
    if kda == "torch":
        sys.modules["fla"] = None  # transformers' import of fla fails: its torch reference is bound
    import torch
    import transformers

    sys.path.insert(0, os.path.join(HERE, "..", "tests"))
    from hf_oracle import sharpen_

    from glmkit import backend
    from glmkit.hf import save_hf
    from glmkit.models.decoder import Decoder
    from glmkit.models.presets import get_config
    from glmkit.testing import rel_err

    transformers.logging.set_verbosity_error()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    cfg = get_config("capstone")
    ours = sharpen_(Decoder(cfg)).eval()
    with torch.no_grad():
        for name, b in ours.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.05)
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(ours, tmp)
        hf = transformers.Glm5NextForConditionalGeneration.from_pretrained(tmp, dtype=torch.float32).eval()
    import transformers.models.glm5_next.modeling_glm5_next as g5n

    seen, todo = [], [g5n.chunk_kimi_delta_attention]  # the functions behind the bound wrapper(s)
    while todo and len(seen) < 50:
        f = todo.pop()
        seen.append(f)
        cells = [c.cell_contents for c in (getattr(f, "__closure__", None) or ()) if callable(c.cell_contents)]
        todo += [g for g in cells + [getattr(f, "__wrapped__", None)] if g is not None and g not in seen]
    fla = [f for f in seen if str(getattr(f, "__module__", "")).startswith("fla")]
    impl = f"{fla[0].__module__}.{fla[0].__name__}" if fla else "torch reference"
    x = torch.randint(3, cfg.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(1)).to(device)
    ours, hf = ours.to(device), hf.to(device)
    with torch.no_grad(), backend.use_backend("torch"):
        theirs, mine = hf(x).logits.float(), ours(x).float()
    return {
        "kda_in_transformers": impl,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "seq_len": seq_len,
        "rel_err": float(rel_err(mine, theirs)),
        "max_abs_diff": float((mine - theirs).abs().max()),
        "logit_scale": float(theirs.abs().max()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--one", choices=("torch", "fla"), help="one process: fla blocked (torch) or allowed (fla)")
    ap.add_argument("--seq-len", type=int, default=1024)
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(args.one, args.seq_len)), flush=True)
        return
    for kda in ("torch", "fla"):
        p = subprocess.run(
            [sys.executable, __file__, "--one", kda, "--seq-len", str(args.seq_len)], capture_output=True, text=True
        )
        line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
        print(kda, line[7:] if line else f"failed: {p.stderr[-1500:]}", flush=True)


if __name__ == "__main__":
    main()
