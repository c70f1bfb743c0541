"""--miss-bits on random checkpoints: per-token |dNLL| against the float model, with llama.cpp's K-quants as anchors.

    python benchmarks/miss_bits_random.py [--seeds 0 1 2] [--dir DIR] [--only TEXT ...] [--json OUT]

Per seed a random MixtralForCausalLM (fidelity.py's geometry: D256 I512, 4 layers, 8 experts, init_std
0.02; every row length a multiple of 256, as llama.cpp's K-quants need) is saved, converted by this
runtime (int4 with an int2 and an int3 low-bit copy, and int3 / int2 pools) and read teacher-forced one
token at a time (fidelity.py's text) on the exact paths (float32, --activations float32, --dense
stored), so the only error is the experts' format: resident, and with 25% / 50% of the experts cached
under each miss rule (miss_bits.py's configurations). The anchors: an F32 GGUF of the same checkpoint
quantized by llama.cpp's own quantizer (llama_model_quantize, pure: every matrix Q4_0, Q3_K_S or Q2_K),
whose expert tensors, dequantized by the gguf package, replace the float model's experts in transformers
("experts" rows, comparable to this runtime's), and llama.cpp itself reading the text ("whole model").
--only: just this runtime's rows whose name contains one of these strings, and no anchors.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from checkpoints import mixtral_tokenizer_path, write_checkpoint  # noqa: E402
from fidelity import TEXT, token_nll  # noqa: E402
from gguf_layout import write_gguf  # noqa: E402
from miss_bits import configurations, decode_scores  # noqa: E402
from to_gguf import CheckpointSource  # noqa: E402

from mixtral_offload.offload.store.convert import convert  # noqa: E402

GEOMETRY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=2, num_local_experts=8, max_position_embeddings=1024)
EXACT = dict(dtype="float32", activations="float32", dense="stored")
LLAMA_TYPES = {"Q4_0": 2, "Q3_K_S": 11, "Q2_K": 10}  # llama_ftype
STACKS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")


def llama_quantize(f32: Path, out: Path, ftype: int) -> None:
    import llama_cpp

    if out.exists():
        return
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.pure, params.nthread = ftype, True, 2
    if llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), params) != 0:
        raise RuntimeError(f"llama_model_quantize failed for {out}")


def gguf_experts(path: Path) -> dict[tuple[int, str], tuple[np.ndarray, str]]:
    """(layer, stack) -> the dequantized [E, rows, cols] float32 expert tensor and its block type."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    out = {}
    for tensor in GGUFReader(path).tensors:
        name = tensor.name.split(".")
        if len(name) == 4 and name[2] in STACKS:
            out[(int(name[1]), name[2])] = (dequantize(tensor.data, tensor.tensor_type).astype(np.float32),
                                            tensor.tensor_type.name)
    return out


def experts_replaced_nll(model, path: Path, ids: torch.Tensor) -> tuple[np.ndarray, str]:
    """The float model's NLL with its experts taken from a GGUF (dense weights left float)."""
    stacks = gguf_experts(path)
    originals = []
    with torch.no_grad():
        for index, layer in enumerate(model.model.layers):
            experts = layer.mlp.experts
            originals.append((experts.gate_up_proj.clone(), experts.down_proj.clone()))
            gate, up, down = (torch.from_numpy(stacks[(index, s)][0]) for s in STACKS)
            experts.gate_up_proj.copy_(torch.cat([gate, up], dim=1))
            experts.down_proj.copy_(down)
        nll = token_nll(model, ids)
        for layer, (gate_up, down) in zip(model.model.layers, originals):
            layer.mlp.experts.gate_up_proj.copy_(gate_up)
            layer.mlp.experts.down_proj.copy_(down)
    return nll, "/".join(sorted({kind for _, kind in stacks.values()}))


def llama_cpp_nll(path: Path, ids: list[int]) -> np.ndarray:
    """llama.cpp's own per-token NLL of ids[1:] (F32 KV cache)."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=256, logits_all=True, verbose=False, type_k=0, type_v=0, n_threads=2)
    llm.eval(ids)
    logits = torch.from_numpy(np.array(llm.scores[:len(ids) - 1], np.float32))
    return torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none").numpy()


def seed_rows(seed: int, root: Path, ids: list[int], fractions: list[float], only: list[str] | None = None) -> list[dict]:
    hf = root / f"hf-{seed}"
    if not hf.exists():
        write_checkpoint(hf, seed=seed, init_std=0.02, **GEOMETRY)
    from transformers import MixtralForCausalLM

    model = MixtralForCausalLM.from_pretrained(hf, torch_dtype=torch.float32).eval()
    reference = token_nll(model, torch.tensor(ids))
    models, whole = {}, {}
    for bits in (2, 3):
        models[bits] = root / f"int4-miss{bits}-{seed}"
        whole[bits] = root / f"int{bits}-{seed}"
        for out, full, miss in ((models[bits], 4, bits), (whole[bits], bits, None)):
            if not out.exists():
                convert(hf, out, bits=full, group_size=64, miss_bits=miss, progress=False)
    rows = []
    for name, path, fraction, miss_bits, rule in configurations(models, whole, fractions):
        if only and not any(text in name for text in only):
            continue
        row, nll = decode_scores(path, ids, fraction, miss_bits, rule, prefill=False, **EXACT)
        rows.append({"name": name, "seed": seed, "mean_abs_dnll": float(np.abs(np.array(nll) - reference).mean()), **row})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    if only:
        return rows
    f32 = root / f"f32-{seed}.gguf"
    if not f32.exists():
        write_gguf(CheckpointSource(hf), f32, "f32", f"random-{seed}")
    for name, ftype in LLAMA_TYPES.items():
        quantized = root / f"{name}-{seed}.gguf"
        llama_quantize(f32, quantized, ftype)
        nll, kinds = experts_replaced_nll(model, quantized, torch.tensor(ids))
        rows.append({"name": f"experts llama.cpp {name} ({kinds})", "seed": seed,
                     "mean_abs_dnll": float(np.abs(nll - reference).mean())})
        nll = llama_cpp_nll(quantized, ids)
        rows.append({"name": f"whole model llama.cpp {name}", "seed": seed,
                     "mean_abs_dnll": float(np.abs(nll - reference).mean())})
        print(json.dumps(rows[-2:]), file=sys.stderr, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/bench-miss-bits-random"))
    parser.add_argument("--only", nargs="+", default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    import sentencepiece

    ids = [1] + sentencepiece.SentencePieceProcessor(model_file=str(mixtral_tokenizer_path())).encode(TEXT)
    rows = []
    for seed in args.seeds:
        rows += seed_rows(seed, args.dir, ids, args.fractions, args.only)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
    names = list(dict.fromkeys(row["name"] for row in rows))
    for name in names:
        values = [row["mean_abs_dnll"] for row in rows if row["name"] == name]
        print(f"| {name} | {np.mean(values):.4f} | {' / '.join(f'{v:.4f}' for v in values)} |")


if __name__ == "__main__":
    main()
