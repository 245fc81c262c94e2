"""The lesson-01 recipe (word tokens, more [MASK] than [gMASK]) learns to fill blanks: a small model trained
for a few hundred steps fills single held-out words far better than an untrained one and than a fixed guess.

Fast (well under 40 s on 2 CPU cores): the fixed facts of the "stories" corpus ("The sky is blue.",
"A cow says moo.", ...), which a 2-layer model learns in a few hundred steps. The full recipe and its measured
figures are in the cpu-words preset's comment (glmkit/models/glm2021.py).
"""


import torch

from glmkit import blank_infilling as bi
from glmkit.corpus import _FACTS, load_corpus
from glmkit.generate import fill_accuracy, masked_word_examples
from glmkit.models.glm2021 import GLMModel, get_config
from glmkit.tokenizer import WordTokenizer
from glmkit.train import TrainConfig, train


def _fact_lines() -> list[str]:
    facts = set(_FACTS)
    return [ln for ln in load_corpus("stories").split("\n")
            if ln and all(s.strip() + "." in facts for s in ln.split(".") if s.strip())]


def test_masked_word_examples_are_whole_words():
    text = "The cat sat on the mat.\nA dog ran.\n"
    for prompt, word in masked_word_examples(text, n=20, seed=1):
        assert prompt.count("[MASK]") == 1 and word.isalnum()
        assert prompt.replace("[MASK]", word) in text


def test_recipe_fills_blanks_better_than_chance():
    lines = _fact_lines()
    train_text, val_text = "\n".join(lines[:500]) + "\n", "\n".join(lines[500:]) + "\n"
    tok = WordTokenizer.fit(train_text)
    torch.manual_seed(0)
    model = GLMModel(get_config("cpu-words", vocab_size=tok.vocab_size, n_layers=4, n_heads=4, d_model=128,
                                d_ff=512, max_seq_len=64))
    untrained = fill_accuracy(model, tok, val_text, n=50, seed=0)
    data = bi.BlankInfillingData(train_text, tok, seq_len=32, batch_size=16, seed=0,
                                 cfg=bi.BlankInfillingConfig(span_prob=0.75, poisson_lambda=1.0))

    train(model, data, TrainConfig(steps=600, batch_size=16, seq_len=32, lr=3e-3, warmup_steps=20, ckpt_every=0),
          progress=False, live_plot=False)
    trained = fill_accuracy(model, tok, val_text, n=50, seed=0)

    # baseline: always answering the commonest masked word of these 50 examples. Measured: 0.26 against a
    # baseline of 0.16 and 0.0 untrained (lambda = 1; with GLM's lambda = 3 the fills run on past the word: 0.0).
    assert trained["accuracy"] > trained["baseline"], (trained["accuracy"], trained["baseline"])
    assert trained["accuracy"] >= untrained["accuracy"] + 0.15
