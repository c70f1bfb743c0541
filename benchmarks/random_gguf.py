"""A Q4_0 GGUF of random valid blocks at any Mixtral geometry, written one tensor at a time (no float source).

    python benchmarks/random_gguf.py OUT.gguf [--layers 32] [--seed 0]

Both systems run this one file (this runtime reads its experts from it as a BlockSource), so the full
32-layer geometry needs ~26 GB of disk once instead of a pool and a GGUF. Every matrix is Q4_0 (as
llama-quantize --pure): random nibbles, each block's float16 scale drawn so the weights' std is
WEIGHT_STD; norms are ones, routers float32 N(0, WEIGHT_STD). Tensor names, shapes and order:
gguf_layout.tensor_plan.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gguf_layout import Q4_0_BLOCK, tensor_plan  # noqa: E402
from gguf_files import FILE_TYPES, start_writer  # noqa: E402  (on sys.path through gguf_layout)

from mixtral_offload.config import ModelArgs  # noqa: E402

WEIGHT_STD = 0.02
Q4_0_BYTES = 2 + Q4_0_BLOCK // 2  # float16 scale, then 16 bytes of nibbles
Q4_0_RMS = float(np.sqrt(np.mean(np.arange(-8, 8) ** 2)))  # rms of (q - 8) for uniform q in 0..15


def random_q4_0(rows: int, cols: int, bits: np.random.BitGenerator) -> np.ndarray:
    """[rows, cols / 32 * 18] Q4_0 bytes: uniform nibbles, scales of random sign around WEIGHT_STD / Q4_0_RMS.

    A block's codes q - 8 average -0.5; with scales of one sign every row would share that bias, a
    rank-one component that grows layer after layer (hidden states overflowed float16 by 32 layers).
    """
    blocks = rows * cols // Q4_0_BLOCK
    data = bits.random_raw(-(-blocks * Q4_0_BYTES // 8)).view(np.uint8)[:blocks * Q4_0_BYTES].reshape(blocks, -1)
    rng = np.random.Generator(bits)
    signs = rng.integers(0, 2, blocks) * 2 - 1
    scales = (WEIGHT_STD / Q4_0_RMS * signs * rng.uniform(0.5, 1.5, blocks)).astype(np.float16)
    data[:, :2] = scales.view(np.uint8).reshape(blocks, 2)
    return data.reshape(rows, -1)


@dataclasses.dataclass
class _Shapes:
    """A GGUFSource for tensor_plan's names and shapes only (its pieces are never drawn)."""

    config: dict
    tokenizer: Path


def write_random_q4_0(out: Path, args: ModelArgs, tokenizer: Path, seed: int = 0, log=None) -> None:
    """Write a random Q4_0 Mixtral GGUF of args' geometry at out (via out.tmp, renamed when complete)."""
    import gguf

    config = dataclasses.asdict(args)
    plan = list(tensor_plan(_Shapes(config, tokenizer)))
    tmp = out.with_name(out.name + ".tmp")
    writer = start_writer(tmp, config, tokenizer, FILE_TYPES["q4_0"], "mixtral-random-q4_0")
    q4_0 = gguf.GGMLQuantizationType.Q4_0
    for name, shape, quantized, _ in plan:
        raw = q4_0 if quantized else gguf.GGMLQuantizationType.F32
        nbytes = int(np.prod(shape)) // Q4_0_BLOCK * Q4_0_BYTES if quantized else 4 * int(np.prod(shape))
        writer.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    bits = np.random.SFC64(seed)
    for name, shape, quantized, _ in plan:
        if log:
            log(f"gguf {name}")
        if quantized:
            data = random_q4_0(int(np.prod(shape[:-1])), shape[-1], bits)
        elif name.endswith("norm.weight"):
            data = np.ones(shape, np.float32)
        else:  # a router
            data = (np.random.Generator(bits).standard_normal(shape) * WEIGHT_STD).astype(np.float32)
        writer.write_tensor_data(data)
    writer.close()
    tmp.rename(out)


def main() -> None:
    from mixtral_width import tokenizer_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_random_q4_0(args.out, ModelArgs(num_hidden_layers=args.layers), tokenizer_path(), args.seed,
                      log=lambda text: print(text, file=sys.stderr, flush=True))


if __name__ == "__main__":
    main()
