"""Tiny checks of the demo-model scripts (corpus cleaning, checkpoint layout)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_clean_rst_strips_markup_keeps_text():
    dc = _load("demo_corpus")
    rst = """\
:mod:`os.path` --- Pathnames
============================

.. module:: os.path
   :synopsis: Operations on pathnames.

.. index:: single: path; operations

This module uses :func:`~os.path.join` and ``str`` objects, see :pep:`519`
and `the docs <https://example.invalid>`_.

.. function:: basename(path)

   Return the *base* name of **path**.

   .. versionadded:: 3.4

Example::

   x = 1

   y = 2

After.
"""
    out = dc.clean_rst(rst)
    assert "os.path --- Pathnames" in out
    # `~` targets keep the full dotted name (Sphinx would show the last part)
    assert "This module uses os.path.join and str objects, see PEP 519 and the docs." in out
    assert "basename(path)" in out and "Return the base name of path." in out
    assert "New in version 3.4." in out
    assert "x = 1\n\ny = 2" in out
    assert "Example:" in out and "After." in out
    for junk in ("===", ".. ", ":func:", "``", "synopsis", "single: path"):
        assert junk not in out


def test_original_layout_roundtrip(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    td = _load("train_demo")
    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg).eval()
    state = td.to_original_layout(model.state_dict(), cfg)
    assert state["model.layers.1.block_sparse_moe.experts.3.w1.weight"].shape == (24, 16)
    assert state["model.layers.1.block_sparse_moe.experts.3.w3.weight"].shape == (24, 16)
    assert state["model.layers.1.block_sparse_moe.experts.3.w2.weight"].shape == (16, 24)
    assert "model.layers.0.block_sparse_moe.gate.weight" in state
    assert not [k for k in state if ".mlp." in k]
    tok = tmp_path / "tokenizer.model"
    tok.write_bytes(b"not a real tokenizer")
    td.save_checkpoint(model, str(tok), str(tmp_path / "ckpt"))
    td.check_roundtrip(model, str(tmp_path / "ckpt"))  # asserts equal logits
    assert (tmp_path / "ckpt" / "tokenizer.model").exists()
    total, active = td.count_params(cfg)
    assert total == sum(p.numel() for p in model.parameters())
    assert active < total
