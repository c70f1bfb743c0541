"""The converter streams: its peak RSS, measured in a child process, does not grow with the checkpoint."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import torch

from checkpoints import write_checkpoint

from mixtral_offload.demo import demo_model_dir

REPO = Path(__file__).resolve().parents[1]
CHILD = """
import re, sys
from mixtral_offload.offload.store.convert import convert
convert(sys.argv[1], sys.argv[2], bits=4, group_size=64, progress=False)
# VmHWM is this address space's peak; ru_maxrss would carry the parent's peak over fork+exec
print(int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024)
"""


def converter_peak_rss(hf_dir: Path, out_dir: Path) -> int:
    done = subprocess.run([sys.executable, "-c", CHILD, str(hf_dir), str(out_dir)], cwd=REPO, check=True,
                          capture_output=True, text=True, timeout=120)
    return int(done.stdout.split()[-1])


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def test_converter_peak_rss_is_flat_in_model_size(tmp_path):
    small, large = tmp_path / "small", tmp_path / "large"
    common = dict(dtype=torch.bfloat16, vocab_size=8192, shard_size="50MB")  # the demo tokenizer's vocabulary
    write_checkpoint(small, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_local_experts=4, **common)
    write_checkpoint(large, hidden_size=256, intermediate_size=2048, num_hidden_layers=8, num_local_experts=8, **common)
    for checkpoint in (small, large):  # convert refuses a tokenizer with more pieces than the vocabulary
        shutil.copyfile(demo_model_dir() / "tokenizer.model", checkpoint / "tokenizer.model")
    growth = checkpoint_bytes(large) - checkpoint_bytes(small)
    assert growth > 150e6
    rss_small = converter_peak_rss(small, tmp_path / "small-int4")
    rss_large = converter_peak_rss(large, tmp_path / "large-int4")
    print(f"peak RSS {rss_small / 2**20:.0f} MiB -> {rss_large / 2**20:.0f} MiB for "
          f"+{growth / 2**20:.0f} MiB of checkpoint")
    assert rss_large - rss_small < 0.15 * growth
