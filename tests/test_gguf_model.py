"""A GGUF file run as the model: logits equal transformers on the gguf.quants-dequantized weights,
with and without an expert cache, and the commands take the file."""
import json

import gguf
import numpy as np
import pytest
import torch
from checkpoints import write_checkpoint
from click.testing import CliRunner
from gguf_files import write_gguf
from safetensors.torch import save_file

from mixtral_offload.cache.reader import BlockReader, aligned_buffer
from mixtral_offload.cache.source import page_rounded
from mixtral_offload.cli.main import cli
from mixtral_offload.errors import MixtralOffloadError
from mixtral_offload.offload.loading import load
from mixtral_offload.offload.store.checkpoint import dense_shapes, hf_dense_name, hf_expert_name
from mixtral_offload.offload.store.gguf import GGUFModel
from mixtral_offload.offload.store.gguf_experts import GGUFExperts

SHAPES = dict(vocab_size=300, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_local_experts=4)
IDS = [1, 15, 120, 7, 299, 42, 42, 3, 250, 18, 77, 5]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-model")
    write_checkpoint(root / "hf", **SHAPES)
    made = {}

    def get(qtype="f32", layout="merged", expert_qtype=None):
        key = (qtype, layout, expert_qtype)
        if key not in made:
            name = f"{qtype}-{layout}-{expert_qtype.name if expert_qtype else 'same'}.gguf"
            made[key] = write_gguf(root / "hf", root / name, qtype, layout, expert_qtype=expert_qtype)
        return made[key]

    get.root = root
    return get


def reference_logits(path, root) -> torch.Tensor:
    """transformers' MixtralForCausalLM on the file's weights as gguf.quants dequantizes them."""
    from transformers import MixtralForCausalLM

    model = GGUFModel.open(path)
    out = root / f"{path.stem}-dequantized"
    out.mkdir(exist_ok=True)
    tensors = {hf_dense_name(name): model.dense_tensor(name, torch.float32) for name in dense_shapes(model.args)}
    for (layer, expert, part), extent in model.experts.items():
        raw = np.asarray(model.reader.data[extent.offset:extent.offset + extent.nbytes])
        weight = gguf.quants.dequantize(raw.reshape(extent.shape[0], -1), extent.qtype)
        tensors[hf_expert_name(layer, expert, part)] = torch.from_numpy(np.array(weight, np.float32))
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / "model.safetensors")
    (out / "config.json").write_text((root / "hf" / "config.json").read_text())
    hf = MixtralForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(torch.tensor([IDS])).logits[0].float()


def relative(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("qtype,layout,expert_qtype", [
    ("f32", "merged", None), ("f16", "merged", None), ("q8_0", "merged", None), ("q4_0", "merged", None),
    ("q4_0", "per-expert", None), ("q8_0", "merged", gguf.GGMLQuantizationType.Q4_K),
    ("q8_0", "merged", gguf.GGMLQuantizationType.Q6_K), ("q8_0", "per-expert", gguf.GGMLQuantizationType.Q5_K)])
def test_logits_equal_transformers_on_the_dequantized_weights(files, qtype, layout, expert_qtype):
    path = files(qtype, layout, expert_qtype)
    expected = reference_logits(path, files.root)
    exact = dict(dtype="float32", activations="float32", dense="stored")
    got = load(path, **exact).logits(IDS)
    assert relative(got, expected) < 1e-4
    cached = load(path, **exact, experts_fraction=0.25).logits(IDS)  # misses read the file's three extents
    assert relative(cached, expected) < 1e-4


def test_expert_reads_are_o_direct_and_equal_the_mapping(files):
    """Each matrix lies in the slot at its file offset modulo the page, so the reader's whole pages go O_DIRECT."""
    source = GGUFExperts(GGUFModel.open(files("q4_0", "merged")))
    buffer = aligned_buffer(page_rounded(source.block_nbytes))
    with BlockReader(source.fileno()) as reader:
        if reader.direct_fd is None:
            pytest.skip("this file system refuses O_DIRECT")
        got = reader.read(source.extents((1, 2)), buffer)
        direct = reader.direct_bytes
    assert got == sum(extent.nbytes for extent in source.extents((1, 2)))
    assert direct >= got - 2 * 3 * 4096  # all but each matrix's unaligned head and tail
    for slot, mapped in zip(source.views(buffer, (1, 2)), source.mapped((1, 2))):
        assert np.array_equal(slot.data, mapped.data)


def test_default_settings_stay_close(files):
    """int8 activations and int8 dense weights (the defaults) against the exact path, teacher-forced."""
    path = files("q8_0", "merged", gguf.GGMLQuantizationType.Q4_K)
    exact = load(path, dtype="float32", activations="float32", dense="stored").logits(IDS)
    fast = load(path, memory_budget="2GiB").logits(IDS)
    assert relative(fast, exact) < 0.05
    assert (fast.argmax(-1) == exact.argmax(-1)).float().mean() > 0.8


def test_commands_take_a_gguf(files, tmp_path):
    path = str(files("q4_0"))
    text = tmp_path / "text.txt"
    text.write_text("Hello there, general Kenobi.")
    runner = CliRunner()
    result = runner.invoke(cli, ["generate", path, "-p", "Hello", "-n", "3", "-m", "2GiB"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["verify", path])
    assert result.exit_code == 0 and "no checksums" in result.output, result.output
    result = runner.invoke(cli, ["perplexity", path, "--file", str(text), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["tokens"] > 1


def test_a_file_that_is_not_a_gguf_is_one_line(tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"not a gguf at all")
    with pytest.raises(MixtralOffloadError, match="not a GGUF"):
        load(bogus)


def test_convert_takes_a_gguf(files, tmp_path):
    """convert: the GGUF's dequantized weights through this runtime's quantizer; int8 keeps them close."""
    path = files("q8_0", "merged", gguf.GGMLQuantizationType.Q4_K)
    out = tmp_path / "from-gguf"
    result = CliRunner().invoke(cli, ["convert", str(path), str(out), "--bits", "8", "-q"])
    assert result.exit_code == 0, result.output
    exact = dict(dtype="float32", activations="float32", dense="stored")
    converted, original = load(out, **exact), load(path, **exact)
    assert converted.tokenizer.encode("Hello there") == original.tokenizer.encode("Hello there")
    assert relative(converted.logits(IDS), original.logits(IDS)) < 0.02
