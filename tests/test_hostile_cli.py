"""Issue 17's reproductions through the commands: padded vocabularies, perplexity windows, invalid
UTF-8, sampling arguments, NaN weights under every flag, config TOML, a second Ctrl-C in chat,
--ram-budget, --profile and `report` on damaged profiles. Each ends in one line or the sensible
behaviour, never a traceback."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mixtral_offload.cli.chat import Conversation, run_repl
from mixtral_offload.cli.main import cli
from mixtral_offload.config import ModelArgs
from mixtral_offload.demo import DEMO_DIR
from mixtral_offload.offload.loading import load
from mixtral_offload.offload.store.pool import ExpertPool
from mixtral_offload.offload.store.synthetic import write_synthetic

TEXT = ("The module provides functions for working with files and directories. Each function takes a path "
        "and returns a value; errors raise an exception that names the file. ") * 4


def run(*args, **kwargs):
    return CliRunner().invoke(cli, [str(a) for a in args], **kwargs)


def one_line_failure(result, needle: str) -> None:
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: ") and needle in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


@pytest.fixture(scope="module")
def demo():
    return load(DEMO_DIR, max_context=64)


@pytest.fixture(scope="module")
def nan_model(tmp_path_factory):
    """The demo model with the w2 scales of layer 1's experts set to NaN."""
    path = Path(shutil.copytree(DEMO_DIR, tmp_path_factory.mktemp("nan") / "demo"))
    pool = ExpertPool.open(path)
    slot = next(s for s in pool.slots if s.matrix == "w2" and s.name == "scales")
    blocks = [b for (layer, _), b in pool.blocks.items() if layer == 1]
    pool.close()
    with open(path / "experts.pool", "r+b") as f:
        for block in blocks:
            f.seek(block.offset + slot.offset)
            f.write(np.full(slot.shape, np.nan, np.float16).tobytes())
    return path


# -- 1: a tokenizer with fewer pieces than vocab_size -------------------------------------------------------
def test_padded_vocab_never_samples_an_undecodable_id(tmp_path):
    args = ModelArgs(vocab_size=9000, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                     max_position_embeddings=256, torch_dtype="float16")
    write_synthetic(tmp_path / "m", args, tokenizer=DEMO_DIR / "tokenizer.model", progress=False)
    runtime = load(tmp_path / "m")
    assert runtime.model.forward(torch.tensor([1]))[-1].shape[0] == 9000  # the model scores the padding too
    ids = [r.token_id for r in runtime.generate("Hi", max_new_tokens=60, temperature=50.0, seed=0)]
    assert len(ids) >= 30 and max(ids) < 8192  # near-uniform sampling: ~9% would land in the padding
    result = run("generate", tmp_path / "m", "-p", "Hi", "-n", "10", "-t", "50", "--seed", "1")
    assert result.exit_code == 0, result.output


# -- 2: perplexity windows of max_context tokens -------------------------------------------------------------
def test_perplexity_windows_hold_max_context_tokens(demo, tmp_path):
    ids = demo.tokenizer.encode(TEXT)
    assert 64 < len(ids) < 127  # two windows of 64
    result = demo.perplexity(TEXT)
    assert result.tokens == len(ids) - 1
    first = torch.log_softmax(demo.logits(ids[:64]), -1)  # window 1: ids[0:64], scoring ids[1:64]
    second = torch.log_softmax(demo.logits(ids[63:]), -1)  # window 2 starts at the last scored input
    reference = [-first[i, ids[i + 1]].item() for i in range(63)] + [
        -second[i, ids[63 + i + 1]].item() for i in range(len(ids) - 64)]
    np.testing.assert_allclose(result.nll, reference, rtol=1e-4, atol=1e-4)
    (tmp_path / "t.txt").write_text(TEXT)
    cli_result = run("perplexity", DEMO_DIR, "--max-context", "100", "-f", tmp_path / "t.txt", "--json")
    assert cli_result.exit_code == 0 and json.loads(cli_result.output)["tokens"] == len(ids) - 1, cli_result.output


# -- 3: invalid UTF-8 ------------------------------------------------------------------------------------------
def test_perplexity_on_invalid_utf8_names_the_byte(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"good text \xff more")
    one_line_failure(run("perplexity", DEMO_DIR, "-f", tmp_path / "bad.txt"), "byte 0xff at offset 10")
    one_line_failure(run("perplexity", DEMO_DIR, "-f", "-", input=b"\x00\x01\xfe\xff"), "byte 0xfe at offset 2")


def test_generate_with_an_undecodable_argv_byte():
    one_line_failure(run("generate", DEMO_DIR, "-p", "a\udcffb"), "byte 0xff at offset 1")


def test_chat_keeps_the_conversation_after_an_invalid_byte():
    result = run("chat", DEMO_DIR, "-n", "3", "--seed", "1", input=b"Hello\na\xffb\n/stats\n")
    assert result.exit_code == 0, result.output
    assert "error: input: not valid UTF-8: byte 0xff at offset 1" in result.output
    assert "replies: 1, 3 tokens generated" in result.output and "1 turns kept" in result.output


# -- 7: sampling arguments and NaN logits --------------------------------------------------------------------------
@pytest.mark.parametrize("args, needle", [
    (["-t", "nan"], "temperature must be a finite number"),
    (["-t", "inf"], "temperature must be a finite number"),
    (["--seed", str(2**64)], "seed must be between 0 and 18446744073709551615"),
    (["--seed", "-1"], "seed must be between 0"),
    (["--ram-budget", "abc"], "cannot read size 'abc'"),
])
def test_bad_sampling_and_budget_arguments(args, needle):
    one_line_failure(run("generate", DEMO_DIR, "-p", "Hi", "-n", "2", *args), needle)


def test_tiny_temperature_is_greedy(demo):
    greedy = [r.token_id for r in demo.generate("The file", max_new_tokens=6)]
    tiny = [r.token_id for r in demo.generate("The file", max_new_tokens=6, temperature=1e-45, seed=3)]
    assert tiny == greedy


def test_seed_from_the_config_file_must_be_an_integer(tmp_path):
    (tmp_path / "c.toml").write_text("seed = 1e300\n")
    one_line_failure(run("--config", tmp_path / "c.toml", "generate", DEMO_DIR, "-p", "Hi"),
                     "seed must be an integer, got 1e+300")


# -- 8: NaN weights give the same clean error under every flag -------------------------------------------------------
@pytest.mark.parametrize("flags", [[], ["--dense", "stored"], ["--activations", "float32"], ["--json"],
                                   ], ids=["default", "dense-stored", "float32", "json"])
def test_nan_weights_are_one_error_naming_the_layer(nan_model, tmp_path, flags):
    (tmp_path / "t.txt").write_text("the quick brown fox")
    result = run("perplexity", nan_model, "-f", tmp_path / "t.txt", *flags)
    one_line_failure(result, "non-finite values in the forward pass at position 0..")
    assert "first in layer 1 (experts)" in result.output and "NaN" not in result.output.split(":")[0]


def test_nan_weights_with_sampling_and_in_chat(nan_model):
    one_line_failure(run("generate", nan_model, "-p", "Hi", "-t", "0.8", "--seed", "1"),
                     "first in layer 1 (experts)")
    result = run("chat", nan_model, "-n", "3", input="Hello\n/stats\n")
    assert result.exit_code == 0 and "error: non-finite values" in result.output and "replies: 0" in result.output


# -- 12: config TOML ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content, needle", [
    (b"model = 5\n", "model must be a string, got 5"),
    (b"model = [1, 2]\n", "model must be a string"),
    (b"\xff\xfe\x00binary", "not valid UTF-8: byte 0xff at offset 0"),
    (b"a = " + b"[" * 5000, "not valid TOML"),
    (b"[generate]\ntemperature = nan\n", "temperature must be a finite number"),
    (b"[generate]\nmax_new_tokens = 2.5\n", "max_new_tokens must be an integer"),
], ids=["int-model", "list-model", "binary", "deep", "nan", "float-int"])
def test_bad_toml_is_one_line_and_help_still_works(tmp_path, monkeypatch, content, needle):
    (tmp_path / "mixtral-offload").mkdir()
    (tmp_path / "mixtral-offload" / "config.toml").write_bytes(content)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    one_line_failure(run("generate", DEMO_DIR, "-p", "Hi"), needle)
    for args in (["generate", "--help"], ["--help"], ["chat", "-h"]):
        assert run(*args).exit_code == 0, args


def test_config_that_is_a_device():
    one_line_failure(run("--config", "/dev/zero", "generate", DEMO_DIR, "-p", "Hi"), "not a regular file")


# -- 14: a second Ctrl-C, --profile, report -----------------------------------------------------------------------------
def test_second_ctrl_c_asks_before_leaving(demo):
    conversation = Conversation(demo)
    demo.reset()
    inputs = iter(["Hello", KeyboardInterrupt, "n", "/stats", KeyboardInterrupt, "y", "never read"])

    def read():
        item = next(inputs)
        if item is KeyboardInterrupt:
            raise KeyboardInterrupt
        return item

    original = demo.chat

    def reply_then_interrupt(messages, **sampling):
        for index, record in enumerate(original(messages, **sampling)):
            yield record
            if index == 2:
                raise KeyboardInterrupt  # the first Ctrl-C, during the reply

    demo.chat = reply_then_interrupt
    try:
        run_repl(conversation, read, dict(max_new_tokens=20, temperature=0))
    finally:
        del demo.chat
    assert next(inputs) == "never read"  # left after 'y', not before
    assert [m.role for m in conversation.turns] == ["user", "assistant"]


def test_unwritable_profile_is_refused_before_the_run():
    one_line_failure(run("generate", DEMO_DIR, "-p", "Hi", "-n", "2", "--profile", "/proc/nope/x.json"),
                     "/proc/nope is not a writable directory")


@pytest.fixture(scope="module")
def profile_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("profile") / "p.json"
    result = run("generate", DEMO_DIR, "-p", "Hi", "-n", "2", "--profile", path)
    assert result.exit_code == 0 and run("report", path).exit_code == 0, result.output
    return path


@pytest.mark.parametrize("change, needle", [
    ({"wall_seconds": "1.0"}, "wall_seconds must be a number"),
    ({"tokens": {"a": 1}}, "tokens must be a list"),
    ({"layers": [{"layer": "x"}]}, "a layer's index must be an integer"),
    ({"spans": {"x": {"count": None, "seconds": 1, "bytes": 0}}}, "span x count must be a number"),
    ({"version": 10**20}, "version must be between"),
    ({"counters": [7]}, "a counter must be a mapping"),
    ({"counters": [{"name": "lowbit_prefetch", "value": "3"}]}, "counter lowbit_prefetch must be a number"),
])
def test_report_on_wrong_value_types(profile_file, tmp_path, change, needle):
    profile = json.loads(profile_file.read_text())
    profile.update(change)
    (tmp_path / "p.json").write_text(json.dumps(profile))
    one_line_failure(run("report", tmp_path / "p.json"), needle)
