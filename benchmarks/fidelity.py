"""Expert-format fidelity: per-token |dNLL| of a random Mixtral against its float self, teacher-forced.

    python benchmarks/fidelity.py [--seeds 0 1 2] [--hidden 256] [--intermediate 512] [--init-std 0.02] [--json]

For each seed a random MixtralForCausalLM (transformers, float32) reads a fixed English text
(Mixtral's tokenizer from mistral-common); then each format replaces every expert weight by its
quantize -> dequantize round trip (this runtime's int4/int3/int2, and llama.cpp's Q4_0 through the
gguf package's own quantizer) and the same transformers model reads the text again. In the "experts"
rows the dense weights stay float, so the differences are the expert formats' alone. The "whole
model" rows quantize what each runtime quantizes by default: llama.cpp Q4_0 every matrix but the router
(benchmarks/to_gguf.py, llama-quantize --pure); this runtime the experts, int8 g64 attention and output
weights (--dense auto) and a float16 embedding. That the runtime computes exactly what the dequantized
weights define is tested separately (tests/test_convert.py).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mixtral_offload.quant import QuantSpec, dequantize, packed_nbytes, quantize  # noqa: E402

TEXT = ("The old lighthouse keeper climbed the stairs every evening, counting the steps as his father had "
        "taught him. Ships passed far out at sea, their lights moving slowly along the horizon, and the wind "
        "carried the smell of salt and rain across the rocks. In the morning he wrote down the weather, the "
        "ships he had seen, and the small repairs the lamp would need before winter came again. The village "
        "below kept its own hours: bread at dawn, nets mended by noon, and long talk at the harbour wall when "
        "the boats came home. Nobody asked the keeper about the light; it was simply there, every night, as "
        "certain as the tide.")
OURS = {"int4 g64": QuantSpec(4, 64), "int3 g64": QuantSpec(3, 64), "int3 g128": QuantSpec(3, 128),
        "int2 g32": QuantSpec(2, 32), "int2 g64": QuantSpec(2, 64)}
Q4_0_BITS = 4.5  # 32 weights in 16 bytes of nibbles and a float16 scale


def q4_0_roundtrip(w: np.ndarray) -> np.ndarray:
    from gguf import quants
    from gguf.constants import GGMLQuantizationType

    return quants.dequantize(quants.quantize(w, GGMLQuantizationType.Q4_0), GGMLQuantizationType.Q4_0)


def ours(spec: QuantSpec, refine: bool = True):
    return lambda w: dequantize(quantize(w, spec, refine=refine))


def float16_roundtrip(w: np.ndarray) -> np.ndarray:
    return w.astype(np.float16).astype(np.float32)


def formats() -> dict[str, tuple[float, dict]]:
    """name -> (expert bits per weight, {"experts" | "attention" | "embedding": float32 [rows, cols] -> round trip})."""
    table = {f"experts {name}": (8 * packed_nbytes(spec, (1, 4096)) / 4096, {"experts": ours(spec)})
             for name, spec in OURS.items()}
    table["experts llama.cpp Q4_0"] = (Q4_0_BITS, {"experts": q4_0_roundtrip})
    table["whole model llama.cpp Q4_0"] = (Q4_0_BITS, dict.fromkeys(("experts", "attention", "embedding"),
                                                                     q4_0_roundtrip))
    dense = ours(QuantSpec(8, 64), refine=False)
    for name in ("int4 g64", "int3 g64"):
        table[f"whole model {name}"] = (8 * packed_nbytes(OURS[name], (1, 4096)) / 4096,
                                        {"experts": ours(OURS[name]), "attention": dense, "embedding": float16_roundtrip})
    return table


def token_nll(model, ids: torch.Tensor) -> np.ndarray:
    """Per-token NLL of ids[1:] given the prefix (teacher-forced)."""
    with torch.no_grad():
        logits = model(ids[None]).logits[0, :-1].float()
    return torch.nn.functional.cross_entropy(logits, ids[1:], reduction="none").numpy()


def random_model(seed: int, args) -> torch.nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.intermediate,
                           num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=2,
                           num_local_experts=args.experts, num_experts_per_tok=2, max_position_embeddings=1024,
                           initializer_range=args.init_std)
    return MixtralForCausalLM(config).eval()


def weight_groups(model) -> dict[str, list[torch.Tensor]]:
    """The [rows = out, cols = in] weights a format may quantize, by kind (router and norms stay float).

    Expert weights are stacked per layer ([E, 2I, D] gate+up, [E, D, I] down) and go in one expert at a time;
    a row is quantized on its own in every format here, so gate and up together equal w1 and w3 apart.
    """
    layers = model.model.layers
    experts = [p[e] for layer in layers for p in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj)
               for e in range(p.shape[0])]
    attention = [getattr(layer.self_attn, n).weight for layer in layers for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    return {"experts": experts, "attention": attention + [model.lm_head.weight],
            "embedding": [model.model.embed_tokens.weight]}


def measure(args) -> dict:
    import mistral_common
    import sentencepiece

    vocab = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"  # Mixtral v0.1's
    tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(vocab))
    ids = torch.tensor([1] + tokenizer.encode(TEXT))
    rows = {name: {"bits_per_weight": round(bits, 3), "mean_abs_dnll": [], "corr": []}
            for name, (bits, _) in formats().items()}
    for seed in args.seeds:
        model = random_model(seed, args)
        reference = token_nll(model, ids)
        groups = weight_groups(model)
        originals = {kind: [w.detach().clone() for w in weights] for kind, weights in groups.items()}
        for name, (_, roundtrips) in formats().items():
            with torch.no_grad():
                for kind, weights in groups.items():
                    for weight, original in zip(weights, originals[kind]):
                        weight.copy_(torch.from_numpy(roundtrips[kind](original.numpy())) if kind in roundtrips
                                     else original)
            nll = token_nll(model, ids)
            rows[name]["mean_abs_dnll"].append(round(float(np.abs(nll - reference).mean()), 4))
            rows[name]["corr"].append(round(float(np.corrcoef(nll, reference)[0, 1]), 4))
        print(f"seed {seed}: float NLL {reference.mean():.3f} over {len(reference)} tokens", file=sys.stderr)
    return {"geometry": {"hidden": args.hidden, "intermediate": args.intermediate, "layers": args.layers,
                         "experts": args.experts, "init_std": args.init_std, "tokens": int(len(ids) - 1)},
            "seeds": list(args.seeds), "formats": rows}


def format_table(result: dict) -> str:
    lines = ["| format | expert bits/weight | mean abs dNLL per seed | mean | corr (min) |", "|---|---|---|---|---|"]
    for name, row in sorted(result["formats"].items(), key=lambda item: np.mean(item[1]["mean_abs_dnll"])):
        per_seed = " / ".join(f"{v:.3f}" for v in row["mean_abs_dnll"])
        lines.append(f"| {name} | {row['bits_per_weight']:.3g} | {per_seed} | {np.mean(row['mean_abs_dnll']):.3f} | "
                     f"{min(row['corr']):.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--init-std", type=float, default=0.02)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = measure(args)
    print(json.dumps(result, indent=2) if args.json else format_table(result))


if __name__ == "__main__":
    main()
