"""Benchmark: the capstone (lesson 09; the ``capstone`` preset: GLM-5.3-Flash's architecture at 176M parameters) on
one GPU: training throughput and MFU on our kernels against the torch path, generation speed with and without MTP
speculation, and the FLOPs per token by component.

GPU only; a script, not a test. fp32 weights under bf16 autocast for training (as ``glmkit.train`` runs them), bf16
weights for generation. Sections, in order (each table is written as soon as it is done):

* ``flops``: training FLOPs per token at T = 1024, by component (the FLOP model below), and the parameter counts.
* ``train``: one full training step as ``glmkit.train.train`` takes it (forward of the loss with the MTP loss at
  λ = 0.3 and the indexer's KL loss, backward, gradient clipping, AdamW) on random tokens, B × 1024, timed by
  triton.testing.do_bench (median, after a first call that compiles and autotunes): our kernels (the backend's
  "auto", checked with ``glmkit.backend.audit`` to run every dispatched op on Triton) at B = 8 and B = 32 (the
  training run's batch), the torch path (``glmkit.use_backend("torch")``) at B = 8. Tokens/s, MFU against the H200's
  989 TFLOP/s dense bf16 peak, peak memory (``torch.cuda.max_memory_allocated``).
* ``decode``: batch 1 and batch 32, prompts of 128 random tokens, 64 new tokens each (no stop), greedy: plain
  ``generate()`` and ``generate(draft_tokens=n)`` for n = 1, 3 (the one MTP layer reused for later drafts, as GLM-5
  serves). The model here is untrained, so its drafts are rarely accepted: these rows measure what a round costs;
  the trained model's figures come from the training run (``benchmarks/capstone_h200.py``). One cache holds the
  hybrid's mixed state: KDA's recurrent state, the DSA layers' latents, index keys and KPool gate scores (their
  bytes are listed).
* ``targets``: kernels / torch path >= 2x tokens/s at B = 8; MFU >= 30 % (stretch 35 %).

The FLOP model (training = 3 × forward: the backward costs two forwards). Per token, forward:
  * every weight matrix a token passes through: 2 · numel (routed experts: top-k of E, so 2 · numel · k / E; the
    embedding is a lookup, 0; the LM head counts twice with MTP: the main model's and the MTP layer's);
  * KDA, chunked (C = 64, per head, d_k = d_v = 128): intra-chunk A = (k ⊙ decay) kᵀ, q kᵀ, W = T (β k),
    U = T (β v), the intra-chunk output: 2C(3 d_k + 2 d_v); the triangular solve 2C²/3; the state's read, W S and
    update: 6 d_k d_v;
  * sparse MLA (MQA form over the latent, kv_lora 256 + rope 0): 4 · 256 · n_sel(t) per head, n_sel(t) = the keys
    KPool selects at position t (every visible key while its complete pools fit in top-k / K; then top-k plus the
    tail of the incomplete pool), averaged over t < T;
  * KPool's pooled scores: 2 · d_I · (complete pools at t) per index head (its projections and compress gate are
    weights above).
  Not counted: norms, gates, softmax, mHC's Sinkhorn iterations, the MoE router's top-k, the indexer's KL target and
  the dense scores of its recall diagnostic (``dsa_track_recall``, on in the training run and here).

    python benchmarks/bench_capstone.py           # → benchmarks/results/capstone_h200.md and capstone_h200.json
    python benchmarks/bench_capstone.py --smoke   # cpu-capstone, tiny shapes, any device (CPU: torch path), no file

The .json holds the same figures for lesson 09 (format: benchmarks/README.md, capstone section).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import sys
import time
import traceback

import common  # benchmarks/common.py
import torch
import triton

from glmkit import backend
from glmkit.generate import generate
from glmkit.models.decoder import MTP_AUX, Decoder
from glmkit.models.presets import get_config
from glmkit.train import TrainConfig, make_optimizer

DEV, PRESET, SEQ = "cuda", "capstone", 1024
TRAIN_RUNS = [("triton", 8), ("torch", 8), ("triton", 32)]  # (backend, batch): the ratio is taken at B = 8
DECODE_BATCHES, PROMPT, NEW, DRAFTS = [1, 32], 128, 64, [1, 3]
PEAK_TFLOPS = 989.0  # H200 (as H100 SXM) dense bf16
KDA_CHUNK = 64
MTP_LAMBDA = TrainConfig().mtp_weight
BUDGET_S = 140.0  # the script must end within 150 s: a training run starts before 0.55 of it, decoding before 0.7
# --smoke: the CPU twin, tiny shapes, one timed call, torch path on a CPU
SMOKE = dict(
    PRESET="cpu-capstone",
    SEQ=80,
    TRAIN_RUNS=[("auto", 2), ("torch", 2)],
    DECODE_BATCHES=[1, 2],
    PROMPT=70,
    NEW=4,
    DRAFTS=[1, 2],
    BUDGET_S=1e9,
)
T0 = time.perf_counter()


def fmt(x, spec):
    return "n/a" if x is None else format(x, spec)


def autocast():
    return torch.autocast("cuda", dtype=torch.bfloat16) if DEV == "cuda" else contextlib.nullcontext()


def config():
    """The preset, its positions raised if the shapes here need more (they do not at the real sizes)."""
    base = get_config(PRESET)
    need = max(SEQ, PROMPT + NEW + max(DRAFTS) + 1)
    return base if need <= base.max_position_embeddings else get_config(base, max_position_embeddings=need)


# ---- the FLOP model ----------------------------------------------------------------------------------------------
def selected_keys(t: int, topk: int, pool: int | None) -> int:
    """Keys the DSA layer attends to at position t (0-based): KPool's top-k pools plus the tail, or plain top-k."""
    visible = t + 1
    if pool is None:
        return min(visible, topk)
    if visible // pool <= topk // pool:
        return visible
    return topk // pool * pool + visible % pool


def _component(name: str, cfg) -> str | None:
    """The FLOP-table row a parameter belongs to (None: not a matmul weight, or the embedding)."""
    if name == "embed_tokens.weight":
        return None
    if name == "lm_head.weight":
        return "LM head"
    if name.startswith("mtp."):
        return "MTP layer (block, eh_proj)"
    if re.search(r"_hc\.fn$", name):
        return "mHC mixing (fn)"
    m = re.match(r"layers\.(\d+)\.(mixer|mlp)\.(.*)", name)
    if m is None:
        return None
    i, part, rest = int(m.group(1)), m.group(2), m.group(3)
    if part == "mixer":
        if rest.startswith("indexer."):
            return "KPool indexer (projections, compress gate)"
        return "KDA projections" if cfg.layer_types[i] == "kda" else "MLA projections (DSA layers)"
    if rest.startswith("experts."):
        return "MoE routed experts (top-k of E)"
    if rest.startswith("shared_experts."):
        return "MoE shared expert"
    if rest.startswith("gate."):
        return "MoE router"
    return "dense FFN (layer 0)"


def flops_per_token(cfg, T: int) -> dict:
    """Forward FLOPs per token at sequence length T by component (module docstring), and the parameter counts."""
    with torch.device("meta"):
        model = Decoder(cfg)
    rows: dict[str, float] = {}
    routed = cfg.num_experts_per_tok / cfg.n_routed_experts if cfg.n_routed_experts else 1.0
    for name, p in model.named_parameters():
        row = _component(name, cfg)
        if row is None or p.dim() < 2:
            continue
        share = routed if ".experts." in name else 1.0
        rows[row] = rows.get(row, 0.0) + 2.0 * p.numel() * share
    if cfg.num_nextn_predict_layers:
        rows["LM head"] = rows.get("LM head", 0.0) * 2  # the MTP layer's head is the same matrix, run again
    n_kda = cfg.layer_types.count("kda") + (cfg.mtp_layer_type == "kda") * cfg.num_nextn_predict_layers
    n_dsa = cfg.layer_types.count("dsa") + (cfg.mtp_layer_type == "dsa") * cfg.num_nextn_predict_layers
    if n_kda:
        heads, dk, C = cfg.opt("linear_num_heads"), cfg.opt("linear_head_dim"), KDA_CHUNK
        per_head = 2 * C * (3 * dk + 2 * dk) + 2 * C * C / 3 + 6 * dk * dk
        rows["KDA chunked recurrence"] = n_kda * heads * per_head
    if n_dsa:
        topk, pool = cfg.opt("index_topk"), cfg.opt("index_kpool")
        mean_sel = sum(selected_keys(t, topk, pool) for t in range(T)) / T
        latent = cfg.opt("kv_lora_rank") + cfg.opt("qk_rope_head_dim")
        rows["sparse MLA attention"] = (
            n_dsa * cfg.num_attention_heads * 2 * (latent + cfg.opt("kv_lora_rank")) * mean_sel
        )
        pools = sum(((t + 1) // pool if pool else t + 1) for t in range(T)) / T
        rows["KPool pooled scores"] = n_dsa * cfg.opt("index_n_heads") * 2 * cfg.opt("index_head_dim") * pools
    fwd = sum(rows.values())
    return {
        "seq_len": T,
        "components": [
            {"name": k, "fwd": v, "train": 3 * v, "share": v / fwd}
            for k, v in sorted(rows.items(), key=lambda r: -r[1])
        ],
        "fwd": fwd,
        "train": 3 * fwd,
        "params": {
            "total": model.num_parameters(),
            "with_mtp": model.num_parameters(include_mtp=True),
            "active": model.num_active_parameters(),
            "active_with_embeddings": model.num_active_parameters(include_embeddings=True),
        },
    }


def run_flops(log, results):
    f = flops_per_token(config(), SEQ)
    results["flops"] = f
    p = f["params"]
    rows = [
        f"## FLOPs per token at T = {SEQ} (training = 3 × forward; the model in the module docstring)",
        "",
        f"Parameters: {p['total'] / 1e6:.1f}M ({p['with_mtp'] / 1e6:.1f}M with the MTP layer), active "
        f"{p['active'] / 1e6:.1f}M without embedding and head ({p['active_with_embeddings'] / 1e6:.1f}M with them).",
        "",
        "| component | fwd MFLOP/token | train MFLOP/token | share |",
        "|---|---|---|---|",
    ]
    for c in f["components"]:
        rows.append(f"| {c['name']} | {c['fwd'] / 1e6:.2f} | {c['train'] / 1e6:.2f} | {100 * c['share']:.1f} % |")
    rows.append(f"| **total** | {f['fwd'] / 1e6:.2f} | {f['train'] / 1e6:.2f} | 100 % |")
    for r in rows[-len(f["components"]) - 1 :]:
        log(r)
    return rows


# ---- training ----------------------------------------------------------------------------------------------------
def train_step(model, optimizer, batch):
    """One step as glmkit.train.train takes it, without its host syncs (logging) and schedule."""
    with autocast():
        loss = model.loss(batch)
        aux = model.aux_losses()
        total = loss + sum(MTP_LAMBDA * v if name == MTP_AUX else v for name, v in aux.items())
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return total


def run_train(log, results):
    flops = results.get("flops") or flops_per_token(config(), SEQ)
    rows = [
        f"## Training step (loss + MTP + indexer losses, backward, clip, AdamW; fp32 weights, bf16 autocast), "
        f"T = {SEQ}",
        "",
        "| path | B | ms/step | tokens/s | TFLOP/s (model FLOPs) | MFU | peak memory GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    results["train"] = []
    for path, B in TRAIN_RUNS:
        if time.perf_counter() - T0 > BUDGET_S * 0.55:
            log(f"train {path} B={B}: skipped, {time.perf_counter() - T0:.0f} s used")
            rows.append(f"| {path} | {B} | skipped (time) | | | | |")
            continue
        try:
            torch.manual_seed(0)
            model = Decoder(config()).to(DEV).train()
            optimizer = make_optimizer(model, TrainConfig())
            x = torch.randint(0, model.config.vocab_size, (B, SEQ + 1), device=DEV)
            batch = {"input_ids": x[:, :-1], "targets": x[:, 1:]}
            with backend.use_backend(path):
                with backend.audit() as a:
                    train_step(model, optimizer, batch)
                if DEV == "cuda" and path == "triton" and not a.only_triton():
                    log(f"note: not every op ran on the kernels at B={B}: {a}")
                common.sync()
                if DEV == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                ms = common.bench(lambda m=model, o=optimizer, b=batch: train_step(m, o, b), rep=300, warmup=1)
                mem = torch.cuda.max_memory_allocated() / 2**30 if DEV == "cuda" else None
            tok_s = B * SEQ / ms * 1e3
            tflops = tok_s * flops["train"] / 1e12
            row = dict(backend=path, batch=B, seq_len=SEQ, ms=ms, tokens_per_s=tok_s, tflops=tflops,
                       mfu=tflops / PEAK_TFLOPS, peak_mem_gib=mem)  # fmt: skip
            results["train"].append(row)
            rows.append(
                f"| {path} | {B} | {ms:.1f} | {tok_s:,.0f} | {tflops:.1f} | {100 * row['mfu']:.1f} % | "
                f"{fmt(mem, '.1f')} |"
            )
            log(rows[-1])
        except Exception as e:  # noqa: BLE001
            common.reraise_if_smoke()
            log(f"train {path} B={B} failed: {e!r}")
            traceback.print_exc()
            rows.append(f"| {path} | {B} | failed: {type(e).__name__} | | | | |")
        finally:
            model = optimizer = batch = None  # the next run gets the memory back, also after a failure
            if DEV == "cuda":
                torch.cuda.empty_cache()
    return rows


# ---- generation --------------------------------------------------------------------------------------------------
def cache_bytes(model, batch: int, max_len: int) -> dict[str, int]:
    """Bytes of one cache for ``batch`` rows of ``max_len`` positions, by state type (KDA's recurrent state, the DSA
    layers' latents + index keys + KPool gate scores)."""
    cache = model.new_cache(batch, max_len)
    out: dict[str, int] = {}
    for state in cache.layers:
        n = sum(t.numel() * t.element_size() for t in vars(state).values() if isinstance(t, torch.Tensor))
        out[type(state).__name__] = out.get(type(state).__name__, 0) + n
    return out


def decode_speeds(model, prompts_of, batches, new_tokens, drafts, log, warm: bool = True) -> list[dict]:
    """Greedy generation speed of ``model`` (eval, on DEV): for each batch size B, ``prompts_of(B)`` (token-id
    lists), plain ``generate()`` and ``generate(draft_tokens=n)`` for each n, ``new_tokens`` each, no stop tokens.
    Tokens/s counts generated tokens over the wall time of the whole call (prefill included). Rows are dicts; the
    drafted ones carry the acceptance per draft position and whether the tokens equal plain decoding's."""
    out = []
    for B in batches:
        prompts = prompts_of(B)
        plain = None
        for n in [0, *drafts]:
            try:
                kw = dict(stop_tokens=(), draft_tokens=n)
                with torch.no_grad(), autocast():
                    if warm:
                        generate(model, prompts, 4, **kw)  # compile/autotune at these shapes
                    common.sync()
                    t = time.perf_counter()
                    res = generate(model, prompts, new_tokens, **kw)
                    common.sync()
                    dt = time.perf_counter() - t
                row = dict(batch=B, draft_tokens=n, seconds=dt, tokens_per_s=B * new_tokens / dt,
                           ms_per_step=dt / new_tokens * 1e3)  # fmt: skip
                if n == 0:
                    plain = res.tokens
                else:
                    s = res.speculation
                    row.update(acceptance=s.acceptance, mean_accepted=s.mean_accepted, identical=res.tokens == plain)
                out.append(row)
                log(f"decode B={B} n={n}: {row['tokens_per_s']:,.0f} tokens/s")
            except Exception as e:  # noqa: BLE001
                common.reraise_if_smoke()
                log(f"decode B={B} draft_tokens={n} failed: {e!r}")
                traceback.print_exc()
                out.append(dict(batch=B, draft_tokens=n, error=repr(e)))
    return out


def decode_table(rows_in: list[dict]) -> list[str]:
    rows = [
        "| B | draft tokens | tokens/s | ms per step | vs plain | acceptance by draft position | "
        "mean accepted | identical to plain |",
        "|---|---|---|---|---|---|---|---|",
    ]
    plain = {r["batch"]: r.get("tokens_per_s") for r in rows_in if r["draft_tokens"] == 0}
    for r in rows_in:
        if "error" in r:
            rows.append(f"| {r['batch']} | {r['draft_tokens']} | failed: {r['error'][:60]} | | | | | |")
            continue
        base = plain.get(r["batch"])
        acc = ", ".join(f"{a:.2f}" for a in r.get("acceptance", [])) or "–"
        rows.append(
            f"| {r['batch']} | {r['draft_tokens']} | {r['tokens_per_s']:,.0f} | {r['ms_per_step']:.2f} | "
            f"{fmt(base and r['tokens_per_s'] / base, '.2f')} | {acc} | {fmt(r.get('mean_accepted'), '.2f')} | "
            f"{r.get('identical', '–')} |"
        )
    return rows


def run_decode(log, results):
    torch.manual_seed(0)
    model = Decoder(config()).to(DEV).eval()
    if DEV == "cuda":
        model = model.to(torch.bfloat16)
    V = model.config.vocab_size

    def prompts_of(B):
        g = torch.Generator().manual_seed(B)
        return torch.randint(0, V, (B, PROMPT), generator=g).tolist()

    results["decode"] = decode_speeds(model, prompts_of, DECODE_BATCHES, NEW, DRAFTS, log)
    L = PROMPT + NEW + max(DRAFTS) + 1
    results["cache"] = {B: cache_bytes(model, B, L) for B in DECODE_BATCHES}
    rows = [
        f"## Generation, greedy, prompts of {PROMPT} random tokens, {NEW} new tokens, bf16 weights (untrained model: "
        "drafts rarely accepted, so the drafted rows show a round's cost; the trained model's rows: the training run)",
        "",
        *decode_table(results["decode"]),
        "",
        f"One cache per generation holds every layer's state (B rows, {L} positions), bytes by state:",
        "",
        "| B | " + " | ".join(sorted(results["cache"][DECODE_BATCHES[0]])) + " | total MiB |",
        "|---|" + "---|" * (len(results["cache"][DECODE_BATCHES[0]]) + 1),
    ]
    for B, by in results["cache"].items():
        rows.append(
            f"| {B} | "
            + " | ".join(f"{by[k] / 2**20:.2f} MiB" for k in sorted(by))
            + f" | {sum(by.values()) / 2**20:.2f} |"
        )
    return rows


def run_targets(log, results):
    by = {(r["backend"], r["batch"]): r for r in results.get("train", [])}
    ours, ref = by.get((TRAIN_RUNS[0][0], TRAIN_RUNS[0][1])), by.get(("torch", TRAIN_RUNS[1][1]))
    ratio = ours["tokens_per_s"] / ref["tokens_per_s"] if ours and ref else None
    best = max((r["mfu"] for r in results.get("train", []) if r["backend"] != "torch"), default=None)
    targets = [
        dict(name=f"kernels / torch path, tokens/s at B = {TRAIN_RUNS[0][1]}", measured=ratio, target=2.0),
        dict(name="MFU, best kernel run", measured=best, target=0.30, stretch=0.35),
    ]
    for t in targets:
        t["met"] = None if t["measured"] is None else t["measured"] >= t["target"]
    results["targets"] = targets
    rows = ["## Targets (issue 14)", "", "| ratio | measured | target | met |", "|---|---|---|---|"]
    rows.append(f"| {targets[0]['name']} | {fmt(ratio, '.2f')}x | >= 2x | {fmt(targets[0]['met'], '')} |")
    rows.append(
        f"| {targets[1]['name']} | {fmt(best and 100 * best, '.1f')} % | >= 30 % (stretch 35 %) | "
        f"{fmt(targets[1]['met'], '')} |"
    )
    for r in rows[-2:]:
        log(r)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument(
        "--out", default=os.path.join(here, "results", "capstone_h200.md"), help="the .md; the .json beside"
    )
    ap.add_argument("--only", default="flops,train,decode", help="comma-separated sections: flops, train, decode")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="check the script: cpu-capstone, tiny shapes, one timed call, any device (CPU: the torch path), "
        "nothing written",
    )
    args = ap.parse_args()
    global DEV
    if args.smoke:
        common.SMOKE = True
        DEV = common.device()
        globals().update(SMOKE)
    elif not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU (--smoke checks the script on CPU)")

    def log(msg):
        print(msg, flush=True)

    cfg = config()
    gpu = torch.cuda.get_device_name() if DEV == "cuda" else f"CPU ({platform.machine()}, torch path)"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    versions = dict(torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
                    python=platform.python_version())  # fmt: skip
    head = [
        f"# The capstone ({PRESET}: GLM-5.3-Flash's architecture) on one GPU: training MFU, generation, FLOPs",
        "",
        f"- date: {date}",
        f"- GPU: {gpu}; torch {versions['torch']}, triton {versions['triton']}, CUDA {versions['cuda']}, "
        f"Python {versions['python']}",
        f"- model: {cfg.num_hidden_layers} layers ({', '.join(cfg.layer_types)}), d = {cfg.hidden_size}, "
        f"{cfg.n_routed_experts} experts top-{cfg.num_experts_per_tok} + {cfg.n_shared_experts} shared, "
        f"mHC {cfg.hc_mult} streams, {cfg.num_nextn_predict_layers} MTP layer, vocab {cfg.vocab_size}; "
        f"MFU = model FLOPs (FLOP model in benchmarks/bench_capstone.py) / time / {PEAK_TFLOPS:.0f} TFLOP/s",
    ]
    if args.smoke:
        head.append("- SMOKE RUN: cpu-capstone, tiny shapes, one timed call, numbers meaningless")
    log("\n".join(head))
    results = dict(date=date, gpu=gpu, versions=versions, preset=PRESET, seq_len=SEQ, smoke=args.smoke,
                   peak_tflops=PEAK_TFLOPS)  # fmt: skip
    only = set(args.only.split(","))
    sections = []

    def write():
        if args.smoke:
            return
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write("\n".join(head + sections) + "\n")
        with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
            json.dump(results, f, indent=1, default=str)
            f.write("\n")

    for name, run in (("flops", run_flops), ("train", run_train), ("decode", run_decode), ("targets", run_targets)):
        if name not in only | {"targets"}:
            continue
        if name == "decode" and time.perf_counter() - T0 > BUDGET_S * 0.7:
            sections += ["", f"## decode: skipped, {time.perf_counter() - T0:.0f} s used"]
            continue
        try:
            sections += [""] + run(log, results)
        except Exception as e:  # noqa: BLE001
            common.reraise_if_smoke()
            traceback.print_exc()
            sections += ["", f"## {name}: failed: {e!r}"]
        results["elapsed_s"] = time.perf_counter() - T0
        write()
    print("\n" + "\n".join(head + sections))
    log(f"done in {time.perf_counter() - T0:.0f} s")


if __name__ == "__main__":
    main()
