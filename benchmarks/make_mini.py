"""Write the Mixtral-mini random checkpoint (bf16, HF layout, Mixtral v0.1 tokenizer) and convert it.

    python benchmarks/make_mini.py            # -> $BENCH_DIR/{hf-bf16,int4,int8}

Skips what already exists.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import INIT_STD, MINI, sh, work_dir  # noqa: E402


def write_hf(path: Path) -> None:
    import mistral_common
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(**MINI, initializer_range=INIT_STD, tie_word_embeddings=False)
    model = MixtralForCausalLM(config).to(torch.bfloat16).eval()
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    shutil.copy(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1", tmp / "tokenizer.model")
    tmp.rename(path)


def main() -> None:
    root = work_dir()
    hf = root / "hf-bf16"
    if not hf.exists():
        write_hf(hf)
    for bits in ("4", "8"):
        out = root / f"int{bits}"
        if not out.exists():
            sh([sys.executable, "-m", "mixtral_offload", "convert", str(hf), str(out), "--bits", bits, "-q"])
    print(root)


if __name__ == "__main__":
    main()
