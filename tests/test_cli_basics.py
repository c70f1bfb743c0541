"""The generate and perplexity commands, and one-line errors for bad checkpoints."""
import json
import shutil
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from mixtral_offload.cli.main import cli
from mixtral_offload.offload.loading import load


def run(*args, **kwargs):
    return CliRunner().invoke(cli, [str(a) for a in args], **kwargs)


def test_help_carries_examples():
    assert "Example" in run("--help").output
    for command in cli.commands:
        result = run(command, "--help")
        assert result.exit_code == 0 and "Example" in result.output, command


def test_generate_prints_the_completion(tiny_checkpoint):
    path, _ = tiny_checkpoint
    expected = "".join(r.text for r in load(path).generate("Hello world", max_new_tokens=8))
    result = run("generate", path, "--prompt", "Hello world", "-n", "8")
    assert result.exit_code == 0, result.output
    assert result.output == expected + "\n"


def test_sampling_is_seeded(tiny_checkpoint):
    path, _ = tiny_checkpoint
    args = ("generate", path, "-p", "Hi", "-n", "12", "-t", "1.0", "--top-p", "0.9", "--seed", "7")
    assert run(*args).output == run(*args).output


def test_perplexity_json(tiny_checkpoint, tmp_path):
    path, _ = tiny_checkpoint
    text = tmp_path / "t.txt"
    text.write_text("A short text to score, with some words in it.")
    result = run("perplexity", path, "--file", text, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["tokens"] == len(data["nll"]) > 5
    assert abs(data["perplexity"] - torch.tensor(data["nll"]).mean().exp().item()) < 1e-3 * data["perplexity"]


def test_context_limit_is_a_clear_error(tiny_checkpoint):
    path, _ = tiny_checkpoint
    result = run("generate", path, "-p", "word " * 40, "--max-context", "16")
    assert result.exit_code != 0 and "context" in result.output


@pytest.fixture
def broken(tiny_checkpoint, tmp_path):
    source, _ = tiny_checkpoint
    target = tmp_path / "ckpt"
    shutil.copytree(source, target)
    return target


def shards(path):
    return sorted(path.glob("model-*.safetensors"))



CASES = {
    "missing shard": (lambda p: shards(p)[-1].unlink(), "missing"),
    "missing tokenizer": (lambda p: (p / "tokenizer.model").unlink(), "tokenizer.model"),
    "not mixtral": (lambda p: (p / "config.json").write_text(json.dumps(
        {**json.loads((p / "config.json").read_text()), "model_type": "llama"})), "not 'mixtral'"),
    "garbage shard": (lambda p: shards(p)[0].write_bytes(b"\x00garbage" * 10), "safetensors"),
    "bad json": (lambda p: (p / "config.json").write_text("{not json"), "config.json"),
}


def wrong_shape(path):
    for shard in shards(path):
        tensors = load_file(shard)
        if "model.layers.0.self_attn.q_proj.weight" in tensors:
            tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 3)
            save_file(tensors, shard, metadata={"format": "pt"})


CASES["wrong shape"] = (wrong_shape, "q_proj")


@pytest.mark.parametrize("case", list(CASES))
def test_bad_checkpoint_gives_one_line_error(broken, case):
    damage, needle = CASES[case]
    damage(broken)
    result = run("generate", broken, "-p", "Hi", "-n", "2")
    assert result.exit_code == 1
    assert needle in result.output
    assert result.output.startswith("Error: ") and len(result.output.strip().splitlines()) == 1
    assert "Traceback" not in result.output


def test_real_process_error_has_no_traceback(broken):
    (broken / "tokenizer.model").unlink()
    proc = subprocess.run([sys.executable, "-m", "mixtral_offload", "generate", str(broken), "-p", "Hi"],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "tokenizer.model" in proc.stderr
