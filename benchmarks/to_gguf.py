"""Write the Mixtral-mini HF checkpoint as GGUF (llama.cpp's 'llama' architecture with experts).

    python benchmarks/to_gguf.py HF_DIR OUT.gguf --type f32|f16|q4_0|q8_0

The writer is the tests' (tests/gguf_files.py): llama.cpp's tensor layout and RoPE order, experts
merged per layer, every matrix but the routers quantized (llama-quantize --pure) with gguf.quants.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from gguf_files import QTYPES, write_gguf  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("hf_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--type", choices=list(QTYPES), default="f32")
    args = parser.parse_args()
    write_gguf(args.hf_dir, args.out, args.type, name="mixtral-mini")


if __name__ == "__main__":
    main()
