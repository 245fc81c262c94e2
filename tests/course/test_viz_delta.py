"""glmkit.course.viz_delta (lesson 07's toys, pictures and explorers): the recall tasks mean what they say (the
answer is a variable's latest value; a read of exactly a stored value decodes to it, a zero read to "nothing"), the
memories behave as the lesson states over several seeds, the state sizes add up from each mixer's ``state_bytes``
at GLM-5.3-Flash's shapes, and the explorers update from their controls without a frontend."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch

from glmkit.course import viz_delta as vd
from glmkit.mixers import MIXERS
from glmkit.models.presets import get_config

matplotlib.use("Agg")


def test_variable_store_answers_are_the_latest_values():
    task = vd.variable_store(n_vars=5, updates=3, key_dim=16, n_values=20, seed=3)
    assert task.keys.shape == (15, 16) and task.values.shape == (15, 16) and task.queries.shape == (5, 16)
    latest = {}
    for key, value in zip(task.keys, task.values):  # replay the writes in order
        var = int((task.queries @ key).argmax())
        assert torch.allclose(task.queries[var], key)
        latest[var] = int((task.book @ value).argmax())
    assert sorted(latest) == list(range(5)) and [latest[i] for i in range(5)] == task.answers.tolist()
    counts = np.bincount([int((task.queries @ key).argmax()) for key in task.keys])
    assert counts.tolist() == [3] * 5  # every variable assigned exactly `updates` times


def test_decode_reads_values_and_nothing():
    task = vd.distinct_pairs(6, key_dim=8, n_values=10, seed=0)
    assert task.decode(task.book[[4, 7]]).tolist() == [4, 7]
    assert task.decode(torch.zeros(2, 8)).tolist() == [vd.NOTHING, vd.NOTHING]
    assert task.decode(0.2 * task.book[[1]]).tolist() == [vd.NOTHING]  # closer to 0 than to the value


def test_the_memories_behave_as_the_lesson_states():
    seeds = range(5)
    updated = vd.recall_runs(lambda s: vd.variable_store(8, 4, 32, seed=s), seeds)
    assert np.mean(updated["linear attention"]) <= 0.5 and np.mean(updated["DeltaNet"]) >= 0.9
    once = vd.recall_runs(lambda s: vd.variable_store(8, 1, 32, seed=s), seeds)
    assert once["linear attention"] == once["DeltaNet"] == [1.0] * 5
    many = vd.recall_runs(lambda s: vd.distinct_pairs(128, 32, seed=s), seeds, memories=tuple(vd.COLORS))
    assert np.mean(many["softmax attention"]) == 1.0
    assert np.mean(many["DeltaNet"]) < 0.6 and np.mean(many["linear attention"]) < 0.6
    with pytest.raises(ValueError, match="unknown memory"):
        vd.recall_runs(lambda s: vd.distinct_pairs(4, 8, seed=s), [0], memories=("lstm",))


def test_memory_state_accepts_the_learners_function():
    task = vd.variable_store(4, 2, 16, seed=1)
    calls = []

    def mine(q, k, v, beta, scale, output_final_state):
        calls.append((q.shape, beta.shape, scale))
        from glmkit.ops.delta_rule import delta_rule_reference

        return delta_rule_reference(q, k, v, beta, scale=scale, output_final_state=output_final_state)

    H = vd.memory_state("delta", task, beta=0.5, fn=mine)
    assert calls == [((1, 8, 1, 16), (1, 8, 1), 1.0)] and H.shape == (16, 16)
    assert torch.equal(H, vd.memory_state("delta", task, beta=0.5))
    with pytest.raises(ValueError, match="kind"):
        vd.memory_state("mamba", task)


def test_context_switch_layout():
    cs = vd.context_switch(n_facts=3, n_doc1=4, n_doc2=5, key_dim=8, seed=0)
    assert cs.boundary == 7 and cs.beta[7] == 0 and cs.beta.sum() == len(cs.keys) - 1
    facts, doc2, doc1 = cs.groups.values()
    assert facts.queries[:, cs.doc_channels].abs().max() == 0 and doc2.queries[:, cs.fact_channels].abs().max() == 0
    assert (doc1.answers == vd.NOTHING).all() and len(doc2.answers) == 5


def test_state_sizes_at_glm_5_3_flash_shapes():
    cfg = get_config("glm-5.3-flash")
    hybrid = vd.layer_pattern(45, 4)
    assert hybrid == cfg.layer_types  # the preset's own 3:1 pattern
    assert hybrid.count("kda") == 34 and [i for i, t in enumerate(hybrid) if t == "dsa"] == list(range(3, 45, 4))
    assert set(vd.layer_pattern(8, 1)) == {"dsa"} and set(vd.layer_pattern(8, 0)) == {"kda"}
    # NoPE latent 512 + the indexer's key 128 + KPool's gate scores 128, bf16, per token
    assert MIXERS["dsa"].state_bytes(cfg, 1) == (512 + 128 + 128) * 2
    assert MIXERS["kda"].state_bytes(cfg, 1) == 64 * 128 * 128 * 4 + 3 * 3 * 64 * 128 * 2
    L = 2**20
    want = 34 * MIXERS["kda"].state_bytes(cfg, L) + 11 * MIXERS["dsa"].state_bytes(cfg, L)
    assert vd.stack_state_bytes(cfg, hybrid, L) == want
    ratio = vd.stack_state_bytes(cfg, vd.layer_pattern(45, 1), L) / want
    assert 4.0 < ratio < 45 / 11
    assert vd.human_bytes(1536) == "1.5 KiB" and vd.human_bytes(3 * 2**30) == "3.0 GiB"


def test_pictures_and_explorers():
    pytest.importorskip("ipywidgets")
    assert vd.plot_chunk_schedule(T=10, C=4) is not None
    rec = vd.RecallExplorer(n_vars=6, updates=4, key_dim=32, seeds=3)
    assert rec.result["DeltaNet"][0] > rec.result["linear attention"][0] and rec.image.value[:4] == b"\x89PNG"
    rec.updates.value = 1
    assert rec.result["DeltaNet"] == rec.result["linear attention"] == (1.0, 0.0)
    mem = vd.MemoryExplorer(log2_len=20)
    assert 4.0 < mem.result["all full attention (DSA)"] / mem.result["3 : 1 (GLM-5.3-Flash)"] < 4.1
    mem.ratio.value = "all linear (KDA)"
    fixed = mem.result["all linear (KDA)"]
    mem.log2_len.value = 10
    assert mem.result["all linear (KDA)"] == fixed and "45 linear + 0 full" in mem.status.value
