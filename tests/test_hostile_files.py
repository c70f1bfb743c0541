"""Issue 17's reproductions against the model files: config.json, manifest, tokenizer.model, special
files, checkpoint indexes, file checksums, NaN weights at convert and verify, disk errors, and a file
cut short under a running process. Each must end in one MixtralOffloadError line, never a traceback."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from checkpoints import write_checkpoint
from mixtral_offload.cli.main import cli
from mixtral_offload.config import ModelArgs
from mixtral_offload.demo import DEMO_DIR
from mixtral_offload.errors import MixtralOffloadError
from mixtral_offload.offload.loading import load
from mixtral_offload.offload.store.checkpoint import Checkpoint
from mixtral_offload.offload.store.convert import convert, write_dense
from mixtral_offload.offload.store.pool import ExpertPool, pack_header
from mixtral_offload.offload.store.synthetic import write_synthetic
from mixtral_offload.offload.store.verify import verify_model_dir
from mixtral_offload.offload.tokenizer import Tokenizer

TINY = ModelArgs(vocab_size=8192, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
                 torch_dtype="float16")


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("synth") / "model"
    write_synthetic(path, TINY, tokenizer=DEMO_DIR / "tokenizer.model", progress=False)
    return path


@pytest.fixture(scope="module")
def small_hf(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf-small")
    write_checkpoint(path, num_hidden_layers=1, hidden_size=64, intermediate_size=64, shard_size="200KB")
    return path


@pytest.fixture
def model(synth_dir, tmp_path):
    """A fresh copy of the tiny synthetic model (with file checksums) to damage."""
    return Path(shutil.copytree(synth_dir, tmp_path / "model"))


def one_line_error(call, *args, **kwargs) -> str:
    with pytest.raises(MixtralOffloadError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message
    return message


def resign(model_dir: Path, manifest: dict) -> None:
    """Write manifest.json and make the pool header vouch for it."""
    raw = json.dumps(manifest).encode()
    (model_dir / "manifest.json").write_bytes(raw)
    with open(model_dir / "experts.pool", "r+b") as f:
        f.write(pack_header((model_dir / "experts.pool").stat().st_size, raw))


def edit_config(model_dir: Path, **changes) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    config.update(changes)
    (model_dir / "config.json").write_text(json.dumps(config))


# -- 4: config.json ------------------------------------------------------------------------------------
@pytest.mark.parametrize("changes, needle", [
    ({"num_key_value_heads": 0}, "num_key_value_heads must be between 1"),
    ({"rms_norm_eps": "1e-5"}, "rms_norm_eps must be a number"),
    ({"rope_theta": "1e6"}, "rope_theta must be a number"),
    ({"eos_token_id": []}, "eos_token_id is an empty list"),
    ({"max_position_embeddings": -1}, "max_position_embeddings must be between 1"),
    ({"num_experts_per_tok": 8}, "num_experts_per_tok (8) must be between 1 and num_local_experts (4)"),
    ({"rope_theta": 0}, "rope_theta must be > 0"),
    ({"rms_norm_eps": -1}, "rms_norm_eps must be > 0"),
    ({"tie_word_embeddings": "no"}, "tie_word_embeddings must be true or false"),
    ({"num_attention_heads": 3, "num_key_value_heads": 1, "head_dim": None}, "not a multiple of num_attention_heads"),
    ({"num_attention_heads": 3}, "num_attention_heads (3) is not a multiple of num_key_value_heads (2)"),
    ({"eos_token_id": 9000}, "eos_token_id (9000) is outside the vocabulary"),
    ({"hidden_size": 1.5}, "hidden_size must be an integer"),
])
def test_bad_config_fields_are_one_line_errors(model, changes, needle):
    edit_config(model, **changes)
    assert needle in one_line_error(ModelArgs.from_file, model / "config.json")
    assert needle in one_line_error(verify_model_dir, model, progress=False)


@pytest.mark.parametrize("text, needle", [
    ('{"vocab_size": 1' + "0" * 5000 + "}", "an integer of 5001 digits"),
    ("[" * 100000 + "]" * 100000, "not valid JSON"),
    ('{"rope_theta": NaN}', "NaN is not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
], ids=["5000-digits", "deep-nesting", "nan", "not-an-object"])
def test_malformed_config_json(model, text, needle):
    (model / "config.json").write_text(text)
    assert needle in one_line_error(load, model)


def test_integer_rope_theta_of_2_to_the_64_computes(model):  # found by the fuzz campaign
    edit_config(model, rope_theta=2**64)
    args = ModelArgs.from_file(model / "config.json")
    assert args.rope_theta == 2.0**64 and isinstance(args.rope_theta, float)


def test_a_changed_config_fails_the_checksum(model):
    edit_config(model, num_experts_per_tok=1)  # valid, but not what the model was converted with
    assert "changed since conversion" in one_line_error(load, model)


# -- 5: manifest with a huge integer ----------------------------------------------------------------------
def test_manifest_with_a_5000_digit_integer(model):
    manifest = json.loads((model / "manifest.json").read_text())
    raw = json.dumps(manifest).replace(f'"crc32": {manifest["blocks"][0]["crc32"]}', '"crc32": ' + "9" * 5000, 1)
    (model / "manifest.json").write_text(raw)
    with open(model / "experts.pool", "r+b") as f:  # the header vouches for the new manifest
        f.write(pack_header((model / "experts.pool").stat().st_size, raw.encode()))
    assert "an integer of 5000 digits" in one_line_error(verify_model_dir, model, progress=False)


# -- 6: damaged tokenizer.model ---------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(12))
def test_damaged_tokenizer_is_a_one_line_error_or_loads(tmp_path, seed):
    data = bytearray((DEMO_DIR / "tokenizer.model").read_bytes())
    rng = np.random.default_rng(seed)
    if seed % 3 == 0:
        data = data[:int(rng.integers(0, len(data)))]
    else:
        for offset in rng.integers(0, len(data), 1 + seed):
            data[offset] = int(rng.integers(0, 256))
    path = tmp_path / "tokenizer.model"
    path.write_bytes(bytes(data))
    try:
        Tokenizer(path).decode(list(range(50)))
    except MixtralOffloadError as exc:
        assert "\n" not in str(exc)


def test_tokenizer_with_more_pieces_than_the_vocab_is_refused_at_synth(tmp_path):
    args = ModelArgs(**{**TINY.__dict__, "vocab_size": 4096})
    message = one_line_error(write_synthetic, tmp_path / "m", args, tokenizer=DEMO_DIR / "tokenizer.model",
                             progress=False)
    assert "8192 pieces, more than the model's vocab_size 4096" in message and not (tmp_path / "m").exists()


# -- 11: special files ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["config.json", "manifest.json", "experts.pool", "tokenizer.model"])
def test_device_in_place_of_a_model_file(model, name):
    (model / name).unlink()
    (model / name).symlink_to("/dev/zero")
    assert "not a regular file (a character device)" in one_line_error(load, model)


FIFO_SCRIPT = """
import sys
from mixtral_offload.errors import MixtralOffloadError
from mixtral_offload.offload.loading import load
for path in sys.argv[1:]:
    try:
        load(path)
    except MixtralOffloadError as exc:
        print(exc)
"""


def test_fifo_in_place_of_a_model_file_does_not_hang(synth_dir, tmp_path):
    models = []
    for name in ("manifest.json", "dense.safetensors"):
        model = Path(shutil.copytree(synth_dir, tmp_path / name))
        (model / name).unlink()
        os.mkfifo(model / name)
        models.append(str(model))
    # dense.safetensors in an old pool without checksums: the dense reader itself must refuse the FIFO
    manifest = json.loads((tmp_path / "dense.safetensors" / "manifest.json").read_text())
    del manifest["files"]
    resign(tmp_path / "dense.safetensors", manifest)
    done = subprocess.run([sys.executable, "-c", FIFO_SCRIPT, *models], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": os.getcwd()})
    lines = done.stdout.splitlines()
    assert len(lines) == 2 and all("not a regular file (a FIFO)" in line for line in lines), done.stderr[-2000:]


def test_self_looping_pool_symlink(model):
    (model / "experts.pool").unlink()
    (model / "experts.pool").symlink_to("experts.pool")
    assert "points back at itself" in one_line_error(load, model)


# -- 14: checkpoint index naming files outside the directory -------------------------------------------
@pytest.mark.parametrize("shard", ["/etc/passwd", "../outside.safetensors"])
def test_weight_map_outside_the_checkpoint(small_hf, tmp_path, shard):
    path = Path(shutil.copytree(small_hf, tmp_path / "hf"))
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"]["lm_head.weight"] = shard
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "names a file outside" in one_line_error(Checkpoint.open, path)


# -- 3 (files): checksums, NaN weights at verify ------------------------------------------------------------
@pytest.mark.parametrize("name", ["config.json", "dense.safetensors", "tokenizer.model"])
def test_verify_catches_a_changed_file(model, name):
    data = bytearray((model / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (model / name).write_bytes(bytes(data))
    assert f"{name}: changed since conversion" in one_line_error(verify_model_dir, model, progress=False)


def test_verify_reports_checked_files_and_old_pools_without_checksums_still_load(model):
    assert "config.json, dense.safetensors, tokenizer.model match their sha256" in verify_model_dir(model, progress=False)
    old = shutil.copytree(DEMO_DIR, model.parent / "demo")  # written before the manifest held checksums
    assert "no file checksums" in verify_model_dir(old, progress=False)


def test_verify_refuses_nan_scales(model):
    pool = ExpertPool.open(model)
    slot = next(s for s in pool.slots if s.name == "scales")
    block = pool.blocks[(1, 2)]
    pool.close()
    with open(model / "experts.pool", "r+b") as f:
        f.seek(block.offset + slot.offset)
        f.write(np.full(4, np.nan, np.float16).tobytes())
        f.seek(block.offset)
        crc = zlib.crc32(f.read(block.size))
    manifest = json.loads((model / "manifest.json").read_text())  # checksums that vouch for the NaN
    next(b for b in manifest["blocks"] if (b["layer"], b["expert"]) == (1, 2))["crc32"] = crc
    resign(model, manifest)
    assert "1 expert blocks hold NaN or inf scales, e.g. (layer, expert) (1, 2)" in one_line_error(
        verify_model_dir, model, progress=False)


# -- 9: convert refuses non-finite dense weights and a missing or garbage tokenizer ----------------------------
def test_dense_overflowing_float16_is_refused_naming_the_tensor(tmp_path):
    args = ModelArgs(**{**TINY.__dict__, "num_hidden_layers": 1})
    from mixtral_offload.offload.store.checkpoint import dense_shapes

    tensors = [(name, torch.ones(shape, dtype=torch.bfloat16)) for name, shape in dense_shapes(args).items()]
    tensors[1] = (tensors[1][0], torch.full(tensors[1][1].shape, 1e6, dtype=torch.bfloat16))
    message = one_line_error(write_dense, tmp_path / "d.safetensors", args, torch.float16, iter(tensors))
    assert f"dense tensor {tensors[1][0]} holds NaN or inf once stored as torch.float16" in message


@pytest.mark.parametrize("damage, needle", [("missing", "missing; a converted model needs"),
                                            ("garbage", "not a sentencepiece model")])
def test_convert_refuses_a_missing_or_garbage_tokenizer(small_hf, tmp_path, damage, needle):
    hf = Path(shutil.copytree(small_hf, tmp_path / "hf"))
    if damage == "missing":
        (hf / "tokenizer.model").unlink()
    else:
        (hf / "tokenizer.model").write_bytes(b"\x00garbage" * 100)
    assert needle in one_line_error(convert, hf, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_convert_refuses_nan_dense_weights(small_hf, tmp_path):
    from safetensors.torch import load_file, save_file

    hf = Path(shutil.copytree(small_hf, tmp_path / "hf"))
    shard = next(p for p in hf.glob("*.safetensors") if "model.norm.weight" in load_file(p))
    tensors = load_file(shard)
    tensors["model.norm.weight"][3] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    assert "dense tensor norm holds NaN or inf" in one_line_error(convert, hf, tmp_path / "out", progress=False)


# -- 10: disk errors ------------------------------------------------------------------------------------------
def tmpfs(path: Path, options: str) -> bool:
    path.mkdir()
    return os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                                                capture_output=True).returncode == 0


@pytest.mark.parametrize("options, needle", [("size=64k", "No space left on device"),
                                             ("ro,size=64k", "Read-only file system")])
def test_synth_onto_a_full_or_read_only_file_system(tmp_path, options, needle):
    mount = tmp_path / "mnt"
    if not tmpfs(mount, options):
        pytest.skip("mounting a tmpfs needs root")
    try:
        result = CliRunner().invoke(cli, ["synth", str(mount / "m"), "--layers", "2", "--hidden", "64",
                                          "--intermediate", "128", "--heads", "4", "--kv-heads", "2",
                                          "--experts", "4", "--vocab", "512", "-q"])
        assert result.exit_code == 1 and needle in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1 and os.listdir(mount) == []
    finally:
        subprocess.run(["umount", str(mount)], check=True)


# -- 13: a file cut short under a running process -------------------------------------------------------------
CUT_SCRIPT = """
import os, sys
from mixtral_offload.errors import MixtralOffloadError
from mixtral_offload.offload.loading import load
for model, name in zip(sys.argv[1::2], sys.argv[2::2]):
    runtime = load(model, max_context=64)
    tokens = runtime.generate("The", max_new_tokens=40)
    next(tokens)
    os.truncate(os.path.join(model, name), 8192)  # as another process would, mid-generation
    try:
        for _ in tokens:
            pass
    except MixtralOffloadError as exc:
        print("clean:", exc)
"""


def test_file_cut_short_mid_run_is_an_error_not_sigbus(tmp_path):
    args = []
    for name in ("experts.pool", "dense.safetensors"):
        args += [str(shutil.copytree(DEMO_DIR, tmp_path / name)), name]
    done = subprocess.run([sys.executable, "-c", CUT_SCRIPT, *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert done.returncode == 0, f"rc {done.returncode} (-7 is SIGBUS): {done.stderr[-2000:]}"
    lines = done.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("clean:") and "cut short" in line for line in lines), done.stdout
