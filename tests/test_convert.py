"""The converter: exactness against transformers on the dequantized weights, quantization error
teacher-forced, atomicity, and the errors a user can hit (through the CLI too)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

from checkpoints import write_checkpoint
from mixtral_offload.cli.main import cli
from mixtral_offload.errors import MixtralOffloadError
from mixtral_offload.offload.store import convert as convert_module
from mixtral_offload.offload.store.checkpoint import EXPERT_PARTS, Checkpoint, hf_dense_name, hf_expert_name
from mixtral_offload.offload.store.convert import convert
from mixtral_offload.offload.loading import load
from mixtral_offload.offload.store.pool import ExpertPool
from mixtral_offload.quant.quantize import dequantize, quantize

REPO = Path(__file__).resolve().parents[1]
GEOMETRY = dict(intermediate_size=128)  # g64 divides both D=64 and I=128
TEXT = ("The old lighthouse keeper climbed the stairs every evening, counting the steps as his father had "
        "taught him. Ships passed far out at sea, their lights moving slowly along the horizon, and the wind "
        "carried the smell of salt and rain across the rocks. In the morning he wrote down the weather, the "
        "ships he had seen, and the small repairs the lamp would need before winter came again.")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    write_checkpoint(path, shard_size="300KB", **GEOMETRY)
    return path


@pytest.fixture(scope="module")
def converted(hf_dir, tmp_path_factory):
    """(bits, refine) -> converted model directory, converted once per module."""
    root, made = tmp_path_factory.mktemp("converted"), {}

    def get(bits: int, refine: bool = True) -> Path:
        if (bits, refine) not in made:
            made[bits, refine] = root / f"int{bits}-{'als' if refine else 'rtn'}"
            convert(hf_dir, made[bits, refine], bits=bits, group_size=64, refine=refine, progress=False)
        return made[bits, refine]
    return get


def transformers_on_dequantized(model_dir: Path, hf_dir: Path, tmp: Path):
    """MixtralForCausalLM (float32) holding dense.safetensors upcast and the pool's experts dequantized."""
    from transformers import MixtralForCausalLM

    state = {}
    with safe_open(model_dir / "dense.safetensors", framework="pt") as handle:
        for name in handle.keys():
            state[hf_dense_name(name)] = handle.get_tensor(name).float()
    with ExpertPool.open(model_dir) as pool:
        for layer in range(pool.args.num_hidden_layers):
            for expert in range(pool.args.num_local_experts):
                for part, qm in zip(EXPERT_PARTS, pool.mapped((layer, expert))):
                    state[hf_expert_name(layer, expert, part)] = torch.from_numpy(dequantize(qm))
    ref_dir = tmp / "dequantized-hf"
    ref_dir.mkdir()
    save_file(state, ref_dir / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(hf_dir / "config.json", ref_dir / "config.json")
    return MixtralForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()


@pytest.mark.parametrize("bits", [4, 8])
def test_logits_equal_transformers_on_dequantized_weights(bits, hf_dir, converted, tmp_path):
    model_dir = converted(bits)
    reference = transformers_on_dequantized(model_dir, hf_dir, tmp_path)
    runtime = load(model_dir, dtype="float32", activations="float32", dense="stored")
    ids = runtime.tokenizer.encode(TEXT)[:48]
    ours = runtime.logits(ids)
    with torch.no_grad():
        theirs = reference(torch.tensor([ids])).logits[0].float()
    assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()


def nll_distance(float_nll: list[float], quant_nll: list[float]) -> tuple[float, float]:
    a, b = np.array(float_nll), np.array(quant_nll)
    return float(np.corrcoef(a, b)[0, 1]), float(np.abs(a - b).mean())


# (bits, refine) -> (min correlation, max mean |dNLL|) on this tiny init_std=0.1 model; figures in docs/pool-format.md
NLL_BOUNDS = {(8, False): (0.999, 0.05), (8, True): (0.999, 0.05), (4, False): (0.85, 0.6), (4, True): (0.85, 0.6)}


def test_quantization_error_teacher_forced(hf_dir, converted):
    """The weight formats' own error: float32 activations, so the int8-x rounding is not counted."""
    float_nll = load(hf_dir, dtype="float32").perplexity(TEXT).nll
    figures = {}
    for (bits, refine), (min_corr, max_mean) in NLL_BOUNDS.items():
        quant = load(converted(bits, refine), dtype="float32", activations="float32", dense="stored")
        corr, mean = nll_distance(float_nll, quant.perplexity(TEXT).nll)
        figures[bits, refine] = corr, mean
        assert corr >= min_corr and mean <= max_mean, (bits, refine, corr, mean)
    print("dNLL figures (bits, refine) -> (corr, mean |dNLL|):", figures)
    assert figures[8, True][1] < figures[4, True][1]


def test_pool_holds_the_quantized_checkpoint(hf_dir, converted):
    checkpoint = Checkpoint.open(hf_dir)
    with ExpertPool.open(converted(4)) as pool:
        for layer, expert in [(0, 0), (1, 3)]:
            for part, qm in zip(EXPERT_PARTS, pool.mapped((layer, expert))):
                expected = quantize(checkpoint.expert_tensor(layer, expert, part), qm.spec, refine=True)
                for name, array in expected.parts().items():
                    np.testing.assert_array_equal(getattr(qm, name), array)
        assert pool.verify().ok
    config = json.loads((converted(4) / "config.json").read_text())
    assert config["quantization"] == {"format_version": 1, "bits": 4, "group_size": 64, "refine": True,
                                      "method": "rtn+als", "dense_dtype": "float16"}
    assert config["torch_dtype"] == "float16"


def test_interrupted_convert_leaves_nothing_and_rerun_succeeds(hf_dir, tmp_path, monkeypatch):
    out = tmp_path / "model"
    calls = {"n": 0}
    real_quantize = convert_module.quantize

    def failing_quantize(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return real_quantize(*args, **kwargs)

    monkeypatch.setattr(convert_module, "quantize", failing_quantize)
    with pytest.raises(KeyboardInterrupt):
        convert(hf_dir, out, bits=8, progress=False)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    monkeypatch.setattr(convert_module, "quantize", real_quantize)
    convert(hf_dir, out, bits=8, progress=False)
    assert ExpertPool.open(out).verify().ok


def test_killed_convert_leaves_nothing_loadable_and_rerun_cleans_up(hf_dir, tmp_path):
    out = tmp_path / "model"
    slow = ("import sys, time\nfrom mixtral_offload.offload.store import convert as c\nq = c.quantize\n"
            "c.quantize = lambda *a, **k: (time.sleep(0.1), q(*a, **k))[1]\n"
            "c.convert(sys.argv[1], sys.argv[2], bits=4, progress=False)\n")
    child = subprocess.Popen([sys.executable, "-c", slow, str(hf_dir), str(out)], cwd=REPO)
    staging = tmp_path / f".model.tmp-{child.pid}"
    deadline = time.time() + 30
    while not (staging / "experts.pool").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert staging.exists() and not out.exists()
    with pytest.raises(MixtralOffloadError):
        load(out)
    convert(hf_dir, out, bits=4, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert ExpertPool.open(out).verify().ok


def test_existing_output_directory_is_refused(hf_dir, tmp_path):
    (tmp_path / "model").mkdir()
    with pytest.raises(MixtralOffloadError, match="already exists"):
        convert(hf_dir, tmp_path / "model", progress=False)


def test_missing_shard_is_reported(hf_dir, tmp_path):
    broken = tmp_path / "hf"
    shutil.copytree(hf_dir, broken)
    shard = sorted(broken.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(MixtralOffloadError, match="missing"):
        convert(broken, tmp_path / "model", progress=False)
    assert not (tmp_path / "model").exists()


def test_group_size_that_does_not_divide_is_refused(tmp_path):
    write_checkpoint(tmp_path / "hf", num_hidden_layers=1)  # intermediate 96: g64 does not divide it
    with pytest.raises(MixtralOffloadError, match="does not divide"):
        convert(tmp_path / "hf", tmp_path / "model", group_size=64, progress=False)
    convert(tmp_path / "hf", tmp_path / "model", group_size=32, progress=False)


# -- through the CLI -----------------------------------------------------------------------------------
def one_line_error(result) -> str:
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and "Traceback" not in result.output, result.output
    return lines[0]


def test_cli_convert_then_verify(hf_dir, tmp_path):
    runner = CliRunner()
    out = tmp_path / "model"
    result = runner.invoke(cli, ["convert", str(hf_dir), str(out), "--bits", "8", "--dense-dtype", "bfloat16",
                                 "--no-refine"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["quantization"]["refine"] is False
    result = runner.invoke(cli, ["verify", str(out)])
    assert result.exit_code == 0 and "ok" in result.output, result.output
    assert "already exists" in one_line_error(runner.invoke(cli, ["convert", str(hf_dir), str(out)]))
    assert "not a directory" in one_line_error(runner.invoke(cli, ["convert", str(tmp_path / "nope"), str(tmp_path / "x")]))
    for command in ("convert", "verify", "synth"):
        assert "Example" in runner.invoke(cli, [command, "--help"]).output


def test_cli_generate_and_perplexity_accept_a_converted_model(converted):
    runner = CliRunner()
    result = runner.invoke(cli, ["generate", str(converted(4)), "-p", "Hello", "-n", "3"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["perplexity", str(converted(4)), "--file", "-", "--json"], input=TEXT)
    assert result.exit_code == 0 and json.loads(result.output)["tokens"] > 10, result.output
