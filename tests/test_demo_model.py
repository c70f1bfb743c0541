"""The demo model bundled in the package: it loads with no MODEL given, and it learned something."""
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mixtral_offload.cli.main import cli
from mixtral_offload.demo import demo_model_dir
from mixtral_offload.offload.loading import load

SAMPLE = Path(__file__).parent / "data" / "demo_heldout_sample.txt"  # from the held-out split
UNIGRAM = Path(__file__).parent / "data" / "demo_unigram_counts.npz"   # training-split token counts


@pytest.fixture(scope="module")
def demo():
    path = demo_model_dir()
    assert path is not None, "the package ships mixtral_offload/demo"
    return load(path)


def test_perplexity_far_below_a_unigram_model(demo):
    ids = demo.tokenizer.encode(SAMPLE.read_text(encoding="utf-8"))
    model = demo.perplexity(ids).perplexity
    # token frequencies of the training split, add-one smoothed (as in docs/demo-model.md)
    counts = np.load(UNIGRAM)["counts"].astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    unigram = math.exp(-logp[np.asarray(ids[1:])].mean())
    assert model < unigram / 3, (model, unigram)


def test_generate_and_chat_without_a_model_use_the_demo(monkeypatch):
    monkeypatch.delenv("MIXTRAL_OFFLOAD_MODEL", raising=False)
    runner = CliRunner()
    result = runner.invoke(cli, ["generate", "-p", "The list type", "-n", "12"])
    assert result.exit_code == 0, result.output
    assert "bundled demo model" in result.stderr and result.stdout.strip()
    result = runner.invoke(cli, ["chat", "-n", "8", "--seed", "1"], input="What is a list?\n/quit\n")
    assert result.exit_code == 0, result.output
    assert "bundled demo model" in result.stderr


def test_demo_under_a_budget_gives_the_same_tokens(demo):
    prompt = "A dictionary maps keys to"
    expected = [r.token_id for r in demo.generate(prompt, max_new_tokens=16)]
    budgeted = load(demo_model_dir(), memory_budget="2GiB", policy="gate")
    assert [r.token_id for r in budgeted.generate(prompt, max_new_tokens=16)] == expected
