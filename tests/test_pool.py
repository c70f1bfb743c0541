"""ExpertPool: views, one-read block copies, page release, verify, and every way a pool can be damaged
(explicit cases and hypothesis fuzzing of the manifest and header: MixtralOffloadError or success, never a crash)."""
from __future__ import annotations

import json
import os
import shutil
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import psutil
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from checkpoints import mixtral_tokenizer_path
from mixtral_offload.cli.main import cli
from mixtral_offload.config import ModelArgs
from mixtral_offload.errors import MixtralOffloadError
from mixtral_offload.cache.reader import read_extents
from mixtral_offload.offload.loading import load
from mixtral_offload.offload.store.pool import PAGE, ExpertPool, pack_header
from mixtral_offload.offload.store.synthetic import write_synthetic
from mixtral_offload.quant.quantize import dequantize

SMALL = ModelArgs(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256)


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("synth") / "model"
    write_synthetic(path, SMALL, bits=4, group_size=64, tokenizer=mixtral_tokenizer_path(), progress=False)
    return path


@pytest.fixture
def damaged(pool_dir, tmp_path):
    """A fresh copy of the pool directory to damage."""
    copy = tmp_path / "model"
    shutil.copytree(pool_dir, copy)
    return copy


def rewrite_manifest(model_dir: Path, manifest: dict | bytes, resign: bool = True) -> None:
    """Replace manifest.json; with resign, make the pool header vouch for the new manifest."""
    raw = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
    (model_dir / "manifest.json").write_bytes(raw)
    if resign:
        pool = model_dir / "experts.pool"
        with open(pool, "r+b") as f:
            f.write(pack_header(pool.stat().st_size, raw))


def open_error(model_dir: Path) -> str:
    with pytest.raises(MixtralOffloadError) as info:
        ExpertPool.open(model_dir)
    message = str(info.value)
    assert "\n" not in message
    return message


# -- access ------------------------------------------------------------------------------------------
def test_views_buffers_and_release_agree(pool_dir):
    with ExpertPool.open(pool_dir) as pool:
        assert pool.verify().ok and len(pool.blocks) == 8
        buffer = np.empty(pool.block_nbytes + 100, np.uint8)
        for layer, expert in [(0, 0), (1, 3)]:
            mapped = pool.mapped((layer, expert))
            assert read_extents(pool, (layer, expert), buffer) == pool.block_nbytes
            for a, b in zip(mapped, pool.views(buffer, (layer, expert))):
                assert not a.codes.flags.writeable
                np.testing.assert_array_equal(dequantize(a), dequantize(b))
            before = [dequantize(m) for m in mapped]
            pool.release((layer, expert), drop_cache=True)
            for old, m in zip(before, pool.mapped((layer, expert))):
                np.testing.assert_array_equal(old, dequantize(m))
        with pytest.raises(ValueError):
            pool.views(np.empty(10, np.uint8), (0, 0))
        with pytest.raises(IndexError):
            pool.mapped((2, 0))


def test_release_returns_mapped_pages(tmp_path):
    args = ModelArgs(vocab_size=256, hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, num_local_experts=8)
    write_synthetic(tmp_path / "m", args, bits=8, progress=False)  # ~26 MB of experts
    process = psutil.Process()
    with ExpertPool.open(tmp_path / "m") as pool:
        start = process.memory_info().rss
        for key in pool.blocks:
            for qm in pool.mapped(key):
                int(qm.codes.sum())
        touched = process.memory_info().rss
        for key in pool.blocks:
            pool.release(key)
        released = process.memory_info().rss
    assert touched - start > 20e6 and touched - released > 20e6, (start, touched, released)


def reference_expert_forward(w1, w3, w2, x: np.ndarray) -> np.ndarray:
    """w2 (silu(w1 x) * w3 x) for x [T, D] float32 via the plain dequantizer: [T, D] float32."""
    gate = x @ dequantize(w1).T
    up = x @ dequantize(w3).T
    return (gate / (1.0 + np.exp(-gate)) * up) @ dequantize(w2).T


def test_pool_experts_kernel_matches_reference(pool_dir):
    from mixtral_offload.offload.experts import PoolExperts
    from mixtral_offload.offload.model import group_tokens
    from mixtral_offload.quant.kernels import expert_forward, expert_kernel

    x = torch.randn(5, SMALL.hidden_size, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[0, 1], [1, 3], [2, 0], [3, 2], [1, 0]])
    weights = torch.full((5, 2), 0.5)
    with ExpertPool.open(pool_dir) as pool:
        kernel = expert_kernel(pool.spec, SMALL.hidden_size, SMALL.intermediate_size, "float32")
        routing = group_tokens(ids, weights)
        out = torch.zeros_like(x)
        for group, y in PoolExperts(pool, kernel, release_pages=True).run(1, x, routing):
            out[group.rows] += y * 0.5
        expected = torch.zeros_like(x)
        for t in range(5):
            for k in range(2):
                y = reference_expert_forward(*pool.mapped((1, int(ids[t, k]))), x[t:t + 1].numpy())
                expected[t] += 0.5 * torch.from_numpy(y[0])
        assert (out - expected).abs().max() <= 1e-4 * expected.abs().max()
        w = pool.mapped((0, 2))
        xs = x.numpy()
        np.testing.assert_allclose(expert_forward(*w, xs), reference_expert_forward(*w, xs), rtol=1e-4, atol=1e-6)


def test_synthetic_model_loads_and_runs(pool_dir):
    runtime = load(pool_dir, dtype="float32")
    logits = runtime.logits(runtime.tokenizer.encode("Hello there"))
    assert torch.isfinite(logits).all() and logits.std() > 0


# -- damage ------------------------------------------------------------------------------------------
def test_flipped_block_byte_is_caught_by_verify(damaged):
    pool = ExpertPool.open(damaged)
    offset = pool.blocks[(1, 2)].offset + 77
    pool.close()
    with open(damaged / "experts.pool", "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x10]))
    assert ExpertPool.open(damaged).verify().bad == [(1, 2)]
    result = CliRunner().invoke(cli, ["verify", str(damaged)])
    assert result.exit_code != 0 and "(1, 2)" in result.output and "Traceback" not in result.output


def test_truncated_pool(damaged):
    pool = damaged / "experts.pool"
    os.truncate(pool, pool.stat().st_size - PAGE)
    assert "truncated" in open_error(damaged)
    os.truncate(pool, 10)
    assert "too short" in open_error(damaged)


def test_flipped_manifest_byte(damaged):
    raw = bytearray((damaged / "manifest.json").read_bytes())
    raw[len(raw) // 2] ^= 0x01
    rewrite_manifest(damaged, bytes(raw), resign=False)
    assert "does not belong" in open_error(damaged)


def test_offset_past_end(damaged):
    manifest = json.loads((damaged / "manifest.json").read_text())
    manifest["blocks"][-1]["offset"] = (damaged / "experts.pool").stat().st_size
    rewrite_manifest(damaged, manifest)
    assert "past the end" in open_error(damaged)


def test_overlapping_blocks(damaged):
    manifest = json.loads((damaged / "manifest.json").read_text())
    manifest["blocks"][1]["offset"] = manifest["blocks"][0]["offset"]
    rewrite_manifest(damaged, manifest)
    assert "overlap" in open_error(damaged)


def test_unknown_format_version(damaged):
    manifest = json.loads((damaged / "manifest.json").read_text())
    manifest["format_version"] = 2
    rewrite_manifest(damaged, manifest)
    assert "format version 2" in open_error(damaged)
    with open(damaged / "experts.pool", "r+b") as f:
        f.seek(8)
        f.write((7).to_bytes(4, "little"))
    assert "pool format version 7" in open_error(damaged)


@pytest.mark.parametrize("change", [{"hidden_size": 128}, {"num_local_experts": 8}, {"num_hidden_layers": 1},
                                    {"quantization": {"bits": 8, "group_size": 64}}, {"quantization": None}])
def test_manifest_disagreeing_with_config(damaged, change):
    config = json.loads((damaged / "config.json").read_text())
    config.update(change)
    (damaged / "config.json").write_text(json.dumps(config))
    message = open_error(damaged)
    assert "config.json" in message
    result = CliRunner().invoke(cli, ["verify", str(damaged)])
    assert result.exit_code != 0 and len(result.output.strip().splitlines()) == 1


def test_missing_files(damaged):
    manifest = (damaged / "manifest.json").read_bytes()
    (damaged / "manifest.json").unlink()
    assert "manifest.json" in open_error(damaged)
    (damaged / "manifest.json").write_bytes(manifest)
    (damaged / "experts.pool").unlink()
    assert "no experts.pool" in open_error(damaged)


# -- fuzzing -----------------------------------------------------------------------------------------
def _paths(value, prefix=()):
    """Every (path) into a JSON value, for picking what to mutate."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, prefix + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value[:3] + value[-1:]):
            yield from _paths(item, prefix + (index if index < 3 else len(value) - 1,))


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.sampled_from([0, 1, 4, 8, 64, 4096, 8192, 2**31, -1])
    | st.floats(allow_nan=True) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=6)


def _set(document, path, value, delete):
    if not path:
        return value
    target = document
    for key in path[:-1]:
        target = target[key]
    if delete:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return document


def _open_and_use(model_dir: Path) -> None:
    try:
        pool = ExpertPool.open(model_dir)
    except MixtralOffloadError:
        return
    with pool:
        for key in pool.blocks:
            for qm in pool.mapped(key):
                int(qm.codes[-1, -1]) + float(qm.scales[-1, -1])
        pool.verify()


@pytest.fixture(scope="module")
def fuzz_dir(pool_dir, tmp_path_factory):
    copy = tmp_path_factory.mktemp("fuzz") / "model"
    shutil.copytree(pool_dir, copy)
    return copy


@settings(max_examples=1200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_manifest_structure(fuzz_dir, data):
    original = (fuzz_dir / "manifest.json").read_bytes()
    manifest = json.loads(original)
    paths = list(_paths(manifest))
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        delete = bool(path) and data.draw(st.booleans())
        try:
            manifest = _set(manifest, path, data.draw(JSON_VALUES), delete)
        except (KeyError, IndexError, TypeError):
            pass  # an earlier mutation removed this path
    try:
        rewrite_manifest(fuzz_dir, manifest)
        _open_and_use(fuzz_dir)
    finally:
        rewrite_manifest(fuzz_dir, original)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4),
       target=st.sampled_from(["manifest-resigned", "manifest", "header"]), truncate=st.integers(0, 40))
def test_fuzz_bytes_of_manifest_and_header(fuzz_dir, edits, target, truncate):
    manifest_path, pool_path = fuzz_dir / "manifest.json", fuzz_dir / "experts.pool"
    original = manifest_path.read_bytes()
    with open(pool_path, "rb") as f:
        header = f.read(PAGE)
    size = pool_path.stat().st_size
    try:
        if target == "header":
            raw = bytearray(header)
            for position, value in edits:
                raw[position % 48] = value
            with open(pool_path, "r+b") as f:
                f.write(raw)
            if truncate == 1:
                os.truncate(pool_path, size - PAGE)
        else:
            raw = bytearray(original)
            for position, value in edits:
                raw[position % len(raw)] = value
            if truncate > 30:
                raw = raw[:len(raw) * (truncate - 30) // 10]
            rewrite_manifest(fuzz_dir, bytes(raw), resign=target == "manifest-resigned")
            if target == "manifest" and bytes(raw) != original:
                with pytest.raises(MixtralOffloadError):
                    ExpertPool.open(fuzz_dir)
        _open_and_use(fuzz_dir)
    finally:
        os.truncate(pool_path, size)
        with open(pool_path, "r+b") as f:
            f.write(header)
        manifest_path.write_bytes(original)
    assert zlib.crc32(manifest_path.read_bytes()) == zlib.crc32(original)


# -- synth CLI -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", ["8", "3", "2"])
def test_cli_synth_then_verify(tmp_path, bits):
    runner = CliRunner()
    out = tmp_path / "s"
    result = runner.invoke(cli, ["synth", str(out), "--layers", "2", "--hidden", "128", "--intermediate", "256",
                                 "--experts", "4", "--heads", "4", "--kv-heads", "2", "--vocab", "500", "--bits", bits])
    assert result.exit_code == 0, result.output
    assert "ok: 8 expert blocks" in runner.invoke(cli, ["verify", str(out)]).output
    with ExpertPool.open(out) as pool:
        w1, _, w2 = pool.mapped((1, 3))
        assert pool.spec.bits == int(bits) and w1.codes.shape == (256, 128 * int(bits) // 8)
        assert 0.01 < dequantize(w2).std() < 0.04  # the synthetic weights' std, WEIGHT_STD = 0.02
    result = runner.invoke(cli, ["synth", str(out)])
    assert result.exit_code != 0 and "already exists" in result.output


def mapped_rss(address: int) -> int:
    """Resident bytes of this process's mapping that starts at address (/proc/self/smaps)."""
    lines = Path("/proc/self/smaps").read_text().splitlines()
    for i, line in enumerate(lines):
        if line.split("-", 1)[0] == f"{address:x}":
            return next(int(rest.split()[1]) * 1024 for rest in lines[i + 1:] if rest.startswith("Rss:"))
    raise AssertionError(f"no mapping at {address:#x}")


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads /proc/self/smaps")
@pytest.mark.parametrize("release_pages,available", [(False, None), (True, None), (False, 1 << 20)])
def test_pool_experts_map_the_pool_in_unless_pages_are_released(tmp_path, monkeypatch, release_pages, available):
    """Experts computed where they lie: the whole pool is mapped in on a background thread at once (no page
    fault per 64 KiB in the first prompt); with release_pages nothing is, since RSS must stay flat, nor
    when the pool is larger than the memory available."""
    from mixtral_offload.offload import experts as experts_module
    from mixtral_offload.offload.experts import PoolExperts

    if available is not None:
        monkeypatch.setattr(experts_module.psutil, "virtual_memory", lambda: SimpleNamespace(available=available))

    args = ModelArgs(vocab_size=256, hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, num_local_experts=8)
    write_synthetic(tmp_path / "m", args, bits=8, progress=False)  # ~26 MB of experts
    with ExpertPool.open(tmp_path / "m") as pool:
        address = np.frombuffer(pool._map, np.uint8).ctypes.data
        assert mapped_rss(address) < 1 << 20
        experts = PoolExperts(pool, kernel=None, release_pages=release_pages)
        if release_pages or available is not None:
            assert experts.populating is None and mapped_rss(address) < 1 << 20
            return
        experts.populating.join(timeout=60)
        if mapped_rss(address) < pool.file_bytes - PAGE:
            assert not pool.populate_mapped(), "the thread did not map in a pool this kernel can populate"
