"""Speculative decoding with the model's own multi-token-prediction modules as the drafter, as GLM-4.5 and GLM-5 are
served (vLLM ``method mtp``, SGLang EAGLE with one MTP layer): draft n tokens cheaply, check all of them with one
forward of the main model, keep the longest prefix it agrees with, roll every layer's state back over the rest.

What it implements
    ``generate_speculative(model, prompts, max_new_tokens, draft_tokens=n)`` (also reached as
    ``glmkit.generate.generate(..., draft_tokens=n)``) and ``measure_acceptance`` (acceptance per draft position and
    mean accepted length on held-out text). One round, with committed tokens x_0..x_L (x_L chosen by the main model
    but not yet fed to it; its cache holds positions 0..L−1 and their final-norm outputs h^0):

    1. Draft. MTP depth k = 1..n (module min(k, M), ``Decoder.mtp_module``) at position L−1 reads h^{k−1}_{L−1}
       and t_{L−1+k}, which is x_L for k = 1 and draft d_{k−1} after, and proposes d_k = t_{L+k}. Each depth is a
       causal model over its own inputs (h^{k−1}_i, t_{i+k}), exactly as the MTP loss trains it, so each has its own
       cache (``Decoder.new_mtp_cache``: the block's mixer state) and its own stream of outputs h^k. Its entries at
       the last k−1 positions read drafts: they are speculative, and the next round rolls them back and recomputes
       them from the tokens then known.
    2. Verify. One forward of the main model over [x_L, d_1 … d_n] (n + 1 tokens) gives its own choice at every
       position. Greedy: d_i is accepted while it equals the main model's argmax. Sampling: the standard rejection
       rule (Leviathan et al. 2023; Chen et al. 2023): accept d_i with probability min(1, p(d_i) / q(d_i)), p the main
       model's distribution, q the draft's; at the first rejection draw from norm(max(0, p − q)); with all n accepted
       draw a bonus token from p. Either way every emitted token follows exactly the distribution plain decoding
       samples (``glmkit.generate.token_probs``): greedy output is token-identical to ``generate``.
    3. Roll back. With a drafts accepted the round commits a + 1 tokens; the main cache forgets the n − a rejected
       positions (``Cache.rollback``: KV-like states move their length, recurrent states restore a snapshot, which
       is why every cache here is made with ``max_rollback``), and the main model's h^0 of the kept positions feeds
       depth 1 next round.

    Batches: rows are left-padded as in ``generate``; a round commits the smallest accepted count a over the
    unfinished rows (a row that accepted more keeps a + 1 of its tokens, all of which follow the target
    distribution, and re-drafts the rest), so one ``length`` still describes every cache. That is exact for each
    row, but a batch gains less than its best row: the speed-up is a batch-1 affair.

How it differs from its predecessors in the lineage
    Plain decoding (``glmkit.generate``, every GLM up to GLM-4) runs the whole model once per token, reading every
    weight to produce one token: memory-bound at batch 1. GLM-4.5 ships one MTP layer (an MoE decoder block plus
    enorm/hnorm/eh_proj, DeepSeek-V3's design) trained with the main model; served with 1 draft token (vLLM) or 3
    (SGLang), reusing the one layer for later drafts. GLM-5 trains three MTP steps that share one set of parameters
    (``mtp_depth`` = 3 with one module here) and is served with 3 draft tokens.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from glmkit.generate import GenerationOutput, _check_sampling, _prompt_rows, sample_next, token_probs

TIMED = ("prefill", "draft", "verify", "accept", "rollback")


@dataclass
class Round:
    """One draft-and-verify round: ``start`` = the column of x_L (the token fed first; the prompts are left-padded
    to a common length P, so a row's generated token j sits at column P + j); ``drafts[b]``: row b's n drafts;
    ``accepted[b]``: how many of them row b accepted; ``kept``: drafts committed for every row (the smallest
    accepted count over unfinished rows), followed by the main model's own token."""

    start: int
    drafts: list[list[int]]
    accepted: list[int]
    kept: int


@dataclass
class SpeculativeStats:
    """What the drafter achieved, counted per unfinished row and round.

    ``tested[i]``: how often draft i + 1 was checked (drafts 1..i had all been accepted); ``accepted[i]``: how often
    it was accepted; ``rounds``: row-rounds (one verify forward per round serves every row); ``tokens``: tokens
    committed after the prefill's; ``times``: seconds per phase when timed (``generate_speculative(timing=True)``
    synchronises the device between phases); ``trace``: one ``Round`` per verify forward when asked
    (``generate_speculative(trace=True)``), what a display of drafted, accepted and rejected tokens needs."""

    draft_tokens: int
    tested: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    rounds: int = 0
    forwards: int = 0
    tokens: int = 0
    times: dict[str, float] = field(default_factory=dict)
    trace: list[Round] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.tested = self.tested or [0] * self.draft_tokens
        self.accepted = self.accepted or [0] * self.draft_tokens

    @property
    def acceptance(self) -> list[float]:
        """P(draft i accepted | drafts before it accepted), per draft position i = 1..n (nan if never tested)."""
        return [a / t if t else float("nan") for a, t in zip(self.accepted, self.tested)]

    @property
    def mean_accepted(self) -> float:
        """Drafts accepted per round: the mean accepted length (tokens per main-model forward = 1 + this)."""
        return sum(self.accepted) / self.rounds if self.rounds else float("nan")

    def merge(self, other: SpeculativeStats) -> SpeculativeStats:
        if other.draft_tokens != self.draft_tokens:
            raise ValueError("cannot merge statistics of different draft_tokens")
        times = {k: self.times.get(k, 0.0) + other.times.get(k, 0.0) for k in {*self.times, *other.times}}
        return SpeculativeStats(
            self.draft_tokens,
            [a + b for a, b in zip(self.tested, other.tested)],
            [a + b for a, b in zip(self.accepted, other.accepted)],
            self.rounds + other.rounds,
            self.forwards + other.forwards,
            self.tokens + other.tokens,
            times,
            self.trace + other.trace,
        )

    def as_dict(self) -> dict:
        return {
            "draft_tokens": self.draft_tokens,
            "acceptance": self.acceptance,
            "mean_accepted": self.mean_accepted,
            "tokens_per_forward": 1 + self.mean_accepted,
            "rounds": self.rounds,
            "tokens": self.tokens,
            "times": dict(self.times),
        }


class _Clock:
    """Per-phase wall time, synchronising the device first (only when timing: a sync costs time itself)."""

    def __init__(self, on: bool, device: torch.device, stats: SpeculativeStats):
        self.on, self.device, self.stats = on, device, stats
        self.t = time.perf_counter()

    def lap(self, phase: str) -> None:
        if self.on:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            now = time.perf_counter()
            self.stats.times[phase] = self.stats.times.get(phase, 0.0) + now - self.t
            self.t = now


@torch.no_grad()
def generate_speculative(
    model,
    prompts,
    max_new_tokens: int = 32,
    *,
    draft_tokens: int = 1,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] | None = None,
    banned_tokens=None,
    pad_id: int | None = None,
    generator: torch.Generator | None = None,
    timing: bool = False,
    trace: bool = False,
) -> GenerationOutput:
    """``glmkit.generate.generate`` with n = ``draft_tokens`` MTP drafts verified per main-model forward; the same
    arguments and output, plus ``output.speculation`` (``SpeculativeStats``). Needs a ``Decoder`` with MTP modules
    (draft depths beyond ``num_nextn_predict_layers`` reuse the last module, as vLLM serves one MTP layer with 3
    tokens). ``timing``: record where the time goes (prefill, draft, verify, accept, rollback, other), with device
    syncs; ``trace``: keep every round's drafts and acceptances (``SpeculativeStats.trace``)."""
    cfg = model.config
    if not len(getattr(model, "mtp", ())) or getattr(model, "two_d_positions", False):
        raise ValueError(
            "speculative decoding drafts with the model's MTP modules: this model has none "
            "(a Decoder with num_nextn_predict_layers >= 1)"
        )
    n = draft_tokens
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"draft_tokens must be an int >= 1, got {draft_tokens!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    _check_sampling(temperature, top_k, top_p)
    greedy = temperature == 0
    rows = _prompt_rows(prompts)
    if any(not 0 <= t < cfg.vocab_size for r in rows for t in r):
        raise ValueError(f"a prompt holds a token id outside the vocabulary [0, {cfg.vocab_size})")
    stops = set(getattr(cfg, "eos_token_id", ()) if stop_tokens is None else (int(t) for t in stop_tokens))
    pad_id = int(pad_id if pad_id is not None else (getattr(cfg, "pad_token_id", None) or 0))
    B, dev = len(rows), model.device
    banned = None if banned_tokens is None else torch.as_tensor(list(banned_tokens), dtype=torch.int64, device=dev)

    # Columns: the prompts left-padded to P, then room for the tokens and the drafts of the last round.
    P = max(len(r) for r in rows)
    W = P + max_new_tokens + n + 1
    pad = torch.tensor([P - len(r) for r in rows], device=dev)
    col = torch.arange(W, device=dev)[None]
    seq = torch.full((B, W), pad_id, dtype=torch.int64, device=dev)  # committed tokens; drafts beyond column L
    for b, r in enumerate(rows):
        seq[b, P - len(r) : P] = torch.tensor(r, device=dev)
    pos = (col - pad[:, None]).clamp_min(0)  # each row's own positions 0..n-1
    real = col >= pad[:, None]
    padded = bool((pad > 0).any())
    main = model.new_cache(B, W, max_rollback=n)
    depth = [model.new_mtp_cache(k, B, W, max_rollback=n) for k in range(1, n + 1)]
    spec = [0] * n  # speculative entries at the end of each depth's cache
    hid = torch.zeros(n, B, W, cfg.hidden_size, dtype=model.dtype, device=dev)  # hid[k]: h^k per column (h^0: main)

    def logits_of(h):
        out = model.lm_head(h)
        return out if banned is None else out.index_fill(-1, banned, float("-inf"))

    stats = SpeculativeStats(n)
    clock = _Clock(timing, dev, stats)
    t_start = time.perf_counter()

    # Prefill, exactly as generate(): the first token comes from the prompt's last position.
    h = model.hidden_states(seq[:, :P], pos[:, :P], pad, real[:, :P] if padded else None, main)
    hid[0, :, :P] = h
    seq[:, P] = sample_next(logits_of(h[:, -1]), temperature, top_k, top_p, generator)
    out, reasons, steps = [[] for _ in range(B)], ["length"] * B, [0] * B
    active = [True] * B

    def commit(b: int, tokens: list[int]) -> None:
        for t in tokens:
            steps[b] += 1
            if t in stops:
                reasons[b], active[b] = "stop", False
                return
            out[b].append(t)
            if steps[b] == max_new_tokens:
                active[b] = False
                return

    for b, t in enumerate(seq[:, P].tolist()):
        commit(b, [t])
    L = P
    clock.lap("prefill")
    while any(active):
        # 1. Draft: depth k over its new positions [start, L), the last k-1 of them reading drafts.
        qs = []
        for k in range(1, n + 1):
            cache = depth[k - 1]
            cache.rollback(spec[k - 1])
            start = cache.length
            h = model.mtp_hidden(
                k,
                hid[k - 1, :, start:L],
                seq[:, start + k : L + k],  # t_{i+k}: committed up to column L, this round's drafts after it
                pos[:, start:L],
                real[:, start:L] if padded else None,
                cache,
            )
            spec[k - 1] = min(k - 1, L - start)
            if k < n:
                hid[k, :, start:L] = h
            logits = model.mtp_module(k).head(h[:, -1])
            if banned is not None:
                logits = logits.index_fill(-1, banned, float("-inf"))
            if greedy:
                seq[:, L + k] = logits.argmax(-1)
            else:
                q = token_probs(logits, temperature, top_k, top_p)
                qs.append(q)
                seq[:, L + k] = torch.multinomial(q.cpu(), 1, generator=generator).squeeze(-1).to(dev)
        clock.lap("draft")

        # 2. Verify [x_L, d_1..d_n] in one forward of the main model.
        h = model.hidden_states(seq[:, L : L + n + 1], pos[:, L : L + n + 1], pad, None, main)
        logits = logits_of(h)  # [B, n + 1, V]: the main model's choice for columns L+1..L+n+1
        stats.forwards += 1
        clock.lap("verify")

        # 3. Accept the longest agreeing prefix (the smallest over unfinished rows), pick the token after it.
        drafts = seq[:, L + 1 : L + n + 1].clone()  # [B, n] (the column after the kept ones is overwritten below)
        if greedy:
            target = logits.float().argmax(-1)  # [B, n + 1]
            ok = drafts == target[:, :n]
        else:
            p = token_probs(logits, temperature, top_k, top_p)  # [B, n + 1, V]
            q = torch.stack(qs, 1)  # [B, n, V]
            pd = p[:, :n].gather(-1, drafts[..., None]).squeeze(-1)
            qd = q.gather(-1, drafts[..., None]).squeeze(-1)
            u = torch.rand(B, n, generator=generator).to(dev)
            ok = u * qd < pd  # accept with probability min(1, p/q)
        acc = ok.long().cumprod(-1).sum(-1)  # [B] drafts accepted per row
        if greedy:  # the round's one host sync: accepted counts and the main model's tokens
            host = torch.cat([acc[:, None], target], 1).tolist()
            accepted = [r[0] for r in host]
            a = min(accepted[b] for b in range(B) if active[b])
            seq[:, L + a + 1] = target[:, a]  # accepted drafts equal target[:, :a]: commit target[:, :a + 1]
            new = [r[1 : a + 2] for r in host]
        else:
            accepted = acc.tolist()
            a = min(accepted[b] for b in range(B) if active[b])
            # rows that accepted draft a+1 keep it; the others draw from the residual (a < n) or from p (a = n)
            q_ext = torch.cat([q, torch.zeros_like(q[:, :1])], 1)
            resid = (p[:, a] - q_ext[:, a]).clamp_min(0)
            resid = torch.where(resid.sum(-1, keepdim=True) > 0, resid, p[:, a])
            drawn = torch.multinomial(resid.cpu(), 1, generator=generator).squeeze(-1).to(dev)
            if a < n:
                drawn = torch.where(acc > a, drafts[:, a], drawn)
            seq[:, L + a + 1] = drawn
            new = seq[:, L + 1 : L + a + 2].tolist()
        for b in range(B):
            if active[b]:
                m = accepted[b]
                stats.rounds += 1
                for i in range(min(m + 1, n)):
                    stats.tested[i] += 1
                for i in range(m):
                    stats.accepted[i] += 1
                before = steps[b]
                commit(b, new[b])
                stats.tokens += steps[b] - before
        if trace:
            stats.trace.append(Round(L, drafts.tolist(), accepted, a))
        hid[0, :, L : L + a + 1] = h[:, : a + 1]
        clock.lap("accept")

        main.rollback(n - a)
        L += a + 1
        clock.lap("rollback")

    if timing:
        stats.times["other"] = time.perf_counter() - t_start - sum(stats.times.get(k, 0.0) for k in TIMED)
    S = max(steps)
    gen = torch.full((B, S), pad_id, dtype=torch.int64)
    for b in range(B):
        row = out[b] + ([int(seq[b, P + steps[b] - 1])] if reasons[b] == "stop" else [])
        gen[b, : len(row)] = torch.tensor(row, dtype=torch.int64)
    return GenerationOutput(
        tokens=out, stop_reasons=reasons, sequences=torch.cat([seq[:, :P].cpu(), gen], 1).to(dev), speculation=stats
    )


def measure_acceptance(
    model,
    prompts=None,
    draft_tokens: int = 3,
    max_new_tokens: int = 64,
    *,
    n_prompts: int = 8,
    prompt_len: int = 32,
    temperature: float = 0.0,
    seed: int = 0,
    generator: torch.Generator | None = None,
) -> SpeculativeStats:
    """Acceptance per draft position and mean accepted length of the model's MTP drafter, decoding each prompt alone
    (batch 1, the setting speculation serves) for ``max_new_tokens`` tokens without stopping early. ``prompts``:
    token-id lists (or [B, T]); None = ``n_prompts`` windows of ``prompt_len`` tokens of held-out text (the "val"
    split of the built-in corpus, byte tokens, ``glmkit.data.lm_data.LMData``). Returns the merged
    ``SpeculativeStats`` (``.acceptance``, ``.mean_accepted``, ``.as_dict()``)."""
    if prompts is None:
        from glmkit.data.lm_data import LMData

        data = LMData(batch_size=n_prompts, seq_len=prompt_len, seed=seed, split="val")
        if model.config.vocab_size < data.tokenizer.vocab_size:
            raise ValueError(
                f"the held-out text is byte tokens (vocab {data.tokenizer.vocab_size}); this model's vocabulary has "
                f"{model.config.vocab_size}: pass prompts in its own tokens"
            )
        prompts = data.batch(0).input_ids
    stats = SpeculativeStats(draft_tokens)
    for row in _prompt_rows(prompts):
        out = generate_speculative(
            model,
            [row],
            max_new_tokens,
            draft_tokens=draft_tokens,
            temperature=temperature,
            stop_tokens=(),
            generator=generator,
        )
        stats = stats.merge(out.speculation)
    return stats
