"""The embedding table of a converted model on the CPU: rows looked up from the file mapping, pages released."""
import json
import shutil
import struct

import pytest
import torch

from mixtral_offload.config import ModelArgs
from mixtral_offload.errors import MixtralOffloadError
from mixtral_offload.offload.loading import load
from mixtral_offload.offload.model import TensorEmbedding
from mixtral_offload.offload.store.dense import read_dense
from mixtral_offload.offload.mapped_embedding import MappedEmbedding

IDS = [1, 415, 5565, 302, 4843, 349, 5465, 28723, 330, 1215, 264, 1215]


def resident_rss_of_mapping(address: int) -> int:
    """Bytes resident in this process of the mapping that holds `address` (from /proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            first = line.split()[0]
            if "-" in first and len(first.split("-")) == 2 and all(c in "0123456789abcdef-" for c in first):
                low, high = (int(part, 16) for part in first.split("-"))
                inside = low <= address < high
            elif inside and line.startswith("Rss:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no mapping holds the table")


def test_logits_equal_a_resident_table(converted_int4):
    runtime = load(converted_int4, dtype="float32")
    assert isinstance(runtime.model.embed, MappedEmbedding)
    mapped = runtime.logits(IDS)
    args = ModelArgs.from_file(converted_int4 / "config.json")
    runtime.model.embed = TensorEmbedding(read_dense(converted_int4 / "dense.safetensors", args, torch.float32)["embed"])
    assert torch.equal(runtime.logits(IDS), mapped)


def test_looked_up_pages_leave_rss(converted_int4):
    table = load(converted_int4, dtype="float16").model.embed
    rows = table(torch.arange(0, table.shape[0], 7))  # touches every page of the table
    assert resident_rss_of_mapping(table.table.data_ptr()) == 0
    assert rows.shape == (len(range(0, table.shape[0], 7)), table.shape[1]) and rows.dtype == torch.float16
    assert torch.equal(rows[3], table.table[21])


def test_out_of_range_token_is_an_error(converted_int4):
    table = load(converted_int4).model.embed
    with pytest.raises(IndexError):
        table(torch.tensor([table.shape[0]]))


def broken_copy(model_dir, tmp_path, edit):
    """A copy of dense.safetensors whose header or size `edit(header_dict, data_bytes)` changed."""
    raw = (model_dir / "dense.safetensors").read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    header, data = json.loads(raw[8:8 + size]), raw[8 + size:]
    header, data = edit(header, data)
    blob = json.dumps(header).encode()
    out = tmp_path / "dense.safetensors"
    out.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return out


@pytest.mark.parametrize("edit,message", [
    (lambda h, d: (h, d[:16]), "do not fit"),
    (lambda h, d: ({**h, "embed": {**h["embed"], "dtype": "I64"}}, d), "no readable"),
    (lambda h, d: ({**h, "embed": {**h["embed"], "shape": [3, 3]}}, d), "has shape"),
    (lambda h, d: ({k: v for k, v in h.items() if k != "embed"}, d), "no readable"),
])
def test_damaged_headers_are_one_line_errors(converted_int4, tmp_path, edit, message):
    args = ModelArgs.from_file(converted_int4 / "config.json")
    file = broken_copy(converted_int4, tmp_path, edit)
    with pytest.raises(MixtralOffloadError, match=message):
        MappedEmbedding(file, "embed", (args.vocab_size, args.hidden_size), torch.float32)


def test_truncated_file_is_refused_at_load(converted_int4, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(converted_int4, model)
    dense = model / "dense.safetensors"
    dense.write_bytes(dense.read_bytes()[:4])
    with pytest.raises(MixtralOffloadError):
        load(model)
