"""The low-bit copy of every expert (convert/synth --miss-bits): written beside the pool, verified, opened."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from mixtral_offload.cli.main import cli
from mixtral_offload.errors import MixtralOffloadError
from mixtral_offload.offload.store.checkpoint import EXPERT_PARTS, Checkpoint
from mixtral_offload.offload.store.convert import convert
from mixtral_offload.offload.store.pool import COPIES, PAGE, ExpertPool
from mixtral_offload.offload.store.verify import verify_model_dir
from mixtral_offload.quant import QuantSpec, quantize

from checkpoints import write_checkpoint

SYNTH = ["--layers", "2", "--hidden", "256", "--intermediate", "512", "--experts", "4", "--heads", "4",
         "--kv-heads", "2", "--vocab", "500"]


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("miss") / "s"
    result = CliRunner().invoke(cli, ["synth", str(out), *SYNTH, "--miss-bits", "2", "-q"])
    assert result.exit_code == 0, result.output
    return out


def test_synth_writes_and_verify_checks_both_copies(synth_dir):
    result = CliRunner().invoke(cli, ["verify", str(synth_dir), "-q"])
    assert result.exit_code == 0, result.output
    assert "ok: 8 expert blocks (2 layers x 4 experts) + a low-bit copy int2 g64" in result.output
    assert json.loads((synth_dir / "config.json").read_text())["quantization"]["miss"] == {"bits": 2, "group_size": 64}
    with ExpertPool.open(synth_dir) as full, ExpertPool.open(synth_dir, "miss") as miss:
        assert miss.spec == QuantSpec(2, 64) and full.spec == QuantSpec(4, 64)
        assert miss.block_nbytes < 0.6 * full.block_nbytes
        assert all(entry.offset % PAGE == 0 for entry in miss.blocks.values())
        w1, w3, w2 = miss.mapped((1, 2))
        assert w1.shape == (512, 256) and w2.codes.shape == (256, 512 * 2 // 8)
        (extent,) = miss.extents((1, 2))
        buffer = np.zeros(miss.block_nbytes, np.uint8)
        with open(synth_dir / COPIES["miss"][0], "rb") as f:
            f.seek(extent.offset)
            f.readinto(memoryview(buffer))
        for mapped, read in zip((w1, w3, w2), miss.views(buffer, (1, 2))):
            np.testing.assert_array_equal(mapped.codes, read.codes)
            np.testing.assert_array_equal(mapped.zeros, read.zeros)


def test_a_damaged_low_bit_block_fails_verify(synth_dir, tmp_path):
    import shutil

    copy = tmp_path / "damaged"
    shutil.copytree(synth_dir, copy)
    with ExpertPool.open(copy, "miss") as miss:
        offset = miss.blocks[(1, 3)].offset
    with open(copy / COPIES["miss"][0], "r+b") as f:
        f.seek(offset + 100)
        byte = f.read(1)
        f.seek(offset + 100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(MixtralOffloadError, match=r"experts.miss.pool: 1 of 8 expert blocks fail.*\(1, 3\)"):
        verify_model_dir(copy, progress=False)


def test_a_pool_without_a_low_bit_copy_says_so(tmp_path):
    out = tmp_path / "plain"
    assert CliRunner().invoke(cli, ["synth", str(out), *SYNTH, "-q"]).exit_code == 0
    with pytest.raises(MixtralOffloadError, match="no low-bit copy.*--miss-bits"):
        ExpertPool.open(out, "miss")
    assert not (out / COPIES["miss"][0]).exists()


def test_convert_miss_bits_holds_the_low_bit_quantization(tmp_path):
    hf = tmp_path / "hf"
    write_checkpoint(hf, intermediate_size=256, hidden_size=256, num_local_experts=2)
    out = tmp_path / "q"
    convert(hf, out, bits=4, group_size=64, miss_bits=3, progress=False)
    checkpoint = Checkpoint.open(hf)
    with ExpertPool.open(out, "miss") as miss:
        for part, qm in zip(EXPERT_PARTS, miss.mapped((1, 1))):
            expected = quantize(checkpoint.expert_tensor(1, 1, part), QuantSpec(3, 64))
            for name, array in expected.parts().items():
                np.testing.assert_array_equal(getattr(qm, name), array)
    assert "+ a low-bit copy int3 g64" in verify_model_dir(out, progress=False)
