"""glmkit.course.pretrained: the shipped lesson-01 model loads into the lesson's model and fills held-out blanks far
better than the commonest-word guess; train_or_load trains and keeps the result (not in a fast run), and with skip
loads it instead of training; a kept model of another configuration is refused."""

from __future__ import annotations

import json

import pytest
import torch

from glmkit.course import pretrained as pt
from glmkit.generate import fill_accuracy
from glmkit.train import History


def test_the_shipped_lesson01_model_fills_blanks(monkeypatch, tmp_path):
    monkeypatch.setenv("GLMKIT_PRETRAINED_CACHE", str(tmp_path))  # only the shipped one can be found
    _, val_text, tok, _ = pt.lesson01_data(seed=0)
    folder = pt.find("01-blank-infilling")
    assert folder == pt.shipped_dir("01-blank-infilling")
    assert json.loads((folder / "tokenizer.json").read_text())["pieces"] == tok.pieces  # the same vocabulary
    model = pt.lesson01_model(tok, seed=1)
    hist = pt.load_into(model, folder)
    assert len(hist.steps) == pt.LESSON01.steps
    acc = fill_accuracy(model.eval(), tok, val_text, n=40, seed=3)
    assert acc["accuracy"] >= acc["baseline"] + 0.2 and acc["finished"] > 0.5, acc


def test_train_or_load_keeps_and_reloads(monkeypatch, tmp_path):
    monkeypatch.setenv("GLMKIT_PRETRAINED_CACHE", str(tmp_path))
    monkeypatch.delenv("GLMKIT_FAST", raising=False)
    _, _, tok, _ = pt.lesson01_data(seed=0)
    calls = []

    def fit_on(model):
        def fit():
            calls.append(1)
            with torch.no_grad():
                model.embed_tokens.weight.add_(1.0)  # "training"
            return History(steps=[1], losses=[0.5])

        return fit

    trained = pt.lesson01_model(tok, seed=0)
    pt.train_or_load("k", trained, fit_on(trained), skip=True)  # nothing kept yet: trains once
    assert calls == [1] and (tmp_path / "k" / "config.json").is_file()
    fresh = pt.lesson01_model(tok, seed=0)
    hist = pt.train_or_load("k", fresh, fit_on(fresh), skip=True)
    assert calls == [1] and hist.losses == [0.5]
    assert torch.equal(fresh.embed_tokens.weight, trained.embed_tokens.weight)
    monkeypatch.setenv("GLMKIT_FAST", "1")
    pt.train_or_load("fast", pt.lesson01_model(tok), lambda: History(), skip=False)
    assert not (tmp_path / "fast").exists()  # a CI-sized run keeps nothing


def test_another_configuration_is_refused(tmp_path):
    from glmkit.models.glm2021 import GLMModel, get_config

    pt.save("x", GLMModel(get_config("cpu-words", num_hidden_layers=1)), folder=tmp_path / "x")
    with pytest.raises(ValueError, match="another configuration"):
        pt.load_into(GLMModel(get_config("cpu-words")), tmp_path / "x")
