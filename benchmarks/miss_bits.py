"""--miss-bits on the demo model: held-out perplexity and bytes read per token by miss rule and cache size.

    python benchmarks/miss_bits.py HELDOUT.txt [--tokens 2048] [--fractions 0.25 0.5] [--dir DIR] [--only TEXT ...] [--json OUT]

The demo ships without float weights or a low-bit copy, so DIR gets model directories made from its
int4 pool: the same dense weights and int4 blocks, plus a low-bit copy (int2 or int3 g64) quantized
from the dequantized int4 weights; and int3 / int2 pools (full copy requantized the same way) for
the all-low-bit rows. Each configuration loads afresh, then reads the first --tokens held-out tokens
teacher-forced one at a time (decode steps: what a miss rule sees at generation; windows of 512
tokens, BOS first), so every rule is judged on decode routing. Prefill (`mixtral-offload
perplexity`) groups many tokens per expert, where a rule that needs every token's gate below a
threshold rarely applies; its figure (after the decode pass, the same tokens) is printed beside.
--only: just the rows whose name contains one of these strings.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mixtral_offload.cache.miss_choice import EVERY_MISS, MissRule  # noqa: E402
from mixtral_offload.demo import demo_model_dir  # noqa: E402
from mixtral_offload.offload.loading import load  # noqa: E402
from mixtral_offload.offload.store.convert import PoolWriters, model_config, staging_dir, write_model_files  # noqa: E402
from mixtral_offload.offload.store.digests import file_digests  # noqa: E402
from mixtral_offload.offload.store.pool import CHECKED_FILES, CONFIG_NAME, DENSE_NAME, TOKENIZER_NAME, ExpertPool  # noqa: E402
from mixtral_offload.quant import QuantSpec, dequantize, quantize  # noqa: E402

WINDOW = 512
GATES = (0.2, 0.3, 0.4, 0.5)  # rank-2 experts whose gate weight is below this read the low-bit copy
ANY_RANK_GATES = (0.6, 0.7)   # experts of any rank whose gate weight is below this read the low-bit copy


def derived_model(out: Path, full_bits: int, miss_bits: int | None) -> Path:
    """The demo with its int4 experts kept (full_bits 4) or requantized, and a low-bit copy from them."""
    if out.exists():
        return out
    demo = demo_model_dir()
    config = json.loads((demo / CONFIG_NAME).read_text())
    specs = {"full": QuantSpec(full_bits, 64)} | ({"miss": QuantSpec(miss_bits, 64)} if miss_bits else {})
    with ExpertPool.open(demo) as pool, staging_dir(out) as tmp:
        write_model_files(tmp, model_config(pool.args, specs, config["torch_dtype"], "rtn from the demo's int4", True),
                          demo / TOKENIZER_NAME)
        shutil.copyfile(demo / DENSE_NAME, tmp / DENSE_NAME)
        writers = PoolWriters(tmp, pool.args, specs)
        try:
            for layer, expert in sorted(pool.blocks):
                int4 = pool.mapped((layer, expert))
                for copy, spec in specs.items():
                    matrices = int4 if spec.bits == 4 else tuple(quantize(dequantize(m), spec) for m in int4)
                    writers.writers[copy].add(layer, expert, matrices)
            writers.finish(file_digests(tmp, CHECKED_FILES))
        finally:
            writers.close()
    return out


def decode_scores(model: Path, ids: list[int], fraction: float | None, miss_bits: str, rule: MissRule | None,
                  prefill: bool = True, **options) -> tuple[dict, list[float]]:
    """Teacher-forced decode over ids in windows: perplexity, what the cache read per token, and each NLL."""
    runtime = load(model, experts_fraction=fraction, miss_bits=miss_bits, max_context=WINDOW, **options)
    cache = runtime.model.experts if fraction else None
    if rule is not None:
        cache.low_bit.rule = rule
    nll, start = [], time.perf_counter()
    for first in range(0, len(ids) - 1, WINDOW - 1):
        window = ids[first:first + WINDOW]
        runtime.reset()
        for position in range(len(window) - 1):
            logits = runtime._forward([window[position]], last_only=True)[-1].float()
            nll.append(float(-torch.log_softmax(logits, -1)[window[position + 1]]))
    row = {"perplexity": math.exp(np.mean(nll)), "tokens": len(nll), "seconds": time.perf_counter() - start}
    if cache is not None:
        stats = cache.stats
        row.update(full_bytes_per_token=stats.bytes_read / len(nll), low_bit_bytes_per_token=stats.low_bit_bytes / len(nll),
                   low_bit_per_token=stats.low_bit / len(nll), hit_rate=stats.hit_rate,
                   low_bit_prefetches_per_token=stats.low_bit_prefetches / len(nll),
                   low_bit_prefetch_waste_per_token=stats.low_bit_prefetch_waste / len(nll),
                   slots=runtime.memory_plan.slots, expert_bytes=cache.source.block_nbytes,
                   low_bit_expert_bytes=cache.low_bit.source.block_nbytes if cache.low_bit else None)
        if prefill:  # the cache warm from the decode pass
            row["prefill_perplexity"] = runtime.perplexity(ids).perplexity
        cache.close()
    return row, nll


def configurations(models: dict, whole: dict, fractions: list[float]) -> list[tuple]:
    """(name, model dir, experts fraction, --miss-bits, rule) of every row: resident int4, int3 and int2, then
    per cache size int4 alone, with each low-bit copy under each gate threshold, --miss-bits most (any rank,
    gate < 0.8) and every miss low-bit (a bound)."""
    configs = [("int4 resident", models[2], None, "off", None)]
    configs += [(f"int{bits} resident", whole[bits], None, "off", None) for bits in (3, 2)]
    for fraction in fractions:
        configs.append((f"int4, {fraction:.0%} cached", models[2], fraction, "off", None))
        for bits in (3, 2):
            configs += [(f"int4 + int{bits} rank-2 misses gate < {gate}, {fraction:.0%} cached", models[bits], fraction,
                         "auto", MissRule(gate)) for gate in GATES]
            configs += [(f"int4 + int{bits} any-rank misses gate < {gate}, {fraction:.0%} cached", models[bits], fraction,
                         "auto", MissRule(gate, min_rank=1)) for gate in ANY_RANK_GATES]
            configs.append((f"int4 + int{bits} most (any rank, gate < 0.8), {fraction:.0%} cached", models[bits],
                            fraction, "most", None))
            configs.append((f"int4 + int{bits} every miss (bound), {fraction:.0%} cached", models[bits], fraction,
                            "auto", EVERY_MISS))
    return configs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("heldout", type=Path)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/bench-miss-bits"))
    parser.add_argument("--only", nargs="+", default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    models = {bits: derived_model(args.dir / f"demo-int4-miss{bits}", 4, bits) for bits in (2, 3)}
    whole = {bits: derived_model(args.dir / f"demo-int{bits}", bits, None) for bits in (2, 3)}
    runtime = load(models[2])
    ids = runtime.tokenizer.encode(args.heldout.read_text(encoding="utf-8"))[:args.tokens + 1]
    del runtime
    rows = []
    for name, model, fraction, miss_bits, rule in configurations(models, whole, args.fractions):
        if args.only and not any(text in name for text in args.only):
            continue
        row = {"name": name, "fraction": fraction, "miss_bits": miss_bits, **decode_scores(model, ids, fraction,
                                                                                           miss_bits, rule)[0]}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        if args.json:
            args.json.write_text(json.dumps({"tokens": args.tokens, "rows": rows}, indent=1))
    for row in rows:
        full, low = row.get("full_bytes_per_token", 0), row.get("low_bit_bytes_per_token", 0)
        prefill = f"{row['prefill_perplexity']:.3f}" if "prefill_perplexity" in row else "-"
        print(f"| {row['name']} | {row['perplexity']:.3f} | {prefill} | {(full + low) / 1e6:.3f} | {low / 1e6:.3f} | "
              f"{row.get('low_bit_per_token', 0):.2f} | {row.get('hit_rate', 1):.2f} |")


if __name__ == "__main__":
    main()
