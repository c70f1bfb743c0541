"""Package the trained demo model into mixtral_offload/demo and measure what quantization costs it.

    python scripts/package_demo.py --hf runs/demo/hf --heldout runs/demo/heldout.txt

1. converts the HF checkpoint (from scripts/train_demo.py) to int4 g64 into the package, with or
   without the refinement, whichever scores the lower held-out perplexity;
2. prints a table of held-out perplexity: float32, int8 g64, int4 g64 round-to-nearest and refined,
   int4 g128, with the change against float32;
3. records the int4 model's routing on the held-out text (teacher forced) as a trace for the cache
   benchmarks: benchmarks/traces/demo-heldout.npz.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import mixtral_offload  # noqa: F401  (sets the OpenMP wait policy before torch loads)
from mixtral_offload.cache.simulate import prefetch_recall
from mixtral_offload.offload.store.convert import convert
from mixtral_offload.offload.loading import load

ROOT = Path(__file__).resolve().parent.parent
MAX_CONTEXT = 512  # perplexity windows; the demo model was trained on 256-token sequences
VARIANTS = [  # name, bits, group size, refine
    ("int8 g64", 8, 64, True),
    ("int4 g64 RTN", 4, 64, False),
    ("int4 g64 refined", 4, 64, True),
    ("int4 g128 refined", 4, 128, True),
]


def heldout_ids(runtime, text: str, max_tokens: int) -> list[int]:
    """BOS + the held-out text's ids, cut to max_tokens."""
    return runtime.tokenizer.encode(text)[:max_tokens]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", type=Path, default=ROOT / "runs/demo/hf")
    parser.add_argument("--heldout", type=Path, default=ROOT / "runs/demo/heldout.txt")
    parser.add_argument("--out", type=Path, default=ROOT / "mixtral_offload/demo")
    parser.add_argument("--trace", type=Path, default=ROOT / "benchmarks/traces/demo-heldout.npz")
    parser.add_argument("--max-tokens", type=int, default=16384, help="held-out tokens scored")
    args = parser.parse_args(argv)

    text = args.heldout.read_text(encoding="utf-8")
    reference = load(args.hf, dtype="float32", max_context=MAX_CONTEXT)
    ids = heldout_ids(reference, text, args.max_tokens)
    start = time.perf_counter()
    base = reference.perplexity(ids).perplexity
    rows = [("float32", base, 0.0, time.perf_counter() - start, None)]
    print(f"float32: perplexity {base:.3f} over {len(ids) - 1} tokens", file=sys.stderr)

    candidates = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, bits, group, refine in VARIANTS:
            out = Path(scratch) / name.replace(" ", "-")
            convert(args.hf, out, bits=bits, group_size=group, refine=refine, progress=False)
            runtime = load(out, dtype="float32", max_context=MAX_CONTEXT)
            start = time.perf_counter()
            ppl = runtime.perplexity(ids).perplexity
            pool_mb = (out / "experts.pool").stat().st_size / 1e6
            rows.append((name, ppl, 100 * (ppl / base - 1), time.perf_counter() - start, pool_mb))
            print(f"{name}: perplexity {ppl:.3f} ({rows[-1][2]:+.2f}%), pool {pool_mb:.1f} MB", file=sys.stderr)
            candidates[name] = (ppl, out)

        best = min(("int4 g64 RTN", "int4 g64 refined"), key=lambda name: candidates[name][0])
        chosen = candidates[best][1]
        print(f"packaging {best}", file=sys.stderr)
        if args.out.exists():
            shutil.rmtree(args.out)
        shutil.copytree(chosen, args.out)
        traced = load(chosen, dtype="float32", max_context=MAX_CONTEXT, record_trace=True)
        traced.perplexity(ids)
        trace = traced.model.experts.recorder.to_trace()
        trace.source = f"demo model {best}, teacher-forced on its held-out split"
        args.trace.parent.mkdir(parents=True, exist_ok=True)
        trace.save(args.trace)
        print(f"trace: {trace.num_tokens} tokens -> {args.trace}; prefetch recall {prefetch_recall(trace):.3f}",
              file=sys.stderr)

    size = sum(f.stat().st_size for f in args.out.iterdir()) / 1e6
    print(f"packaged {args.out} ({size:.1f} MB)", file=sys.stderr)
    print("| model | perplexity | change vs float32 | pool MB |")
    print("|---|---|---|---|")
    for name, ppl, change, _, pool_mb in rows:
        pool = "-" if pool_mb is None else f"{pool_mb:.1f}"
        print(f"| {name} | {ppl:.3f} | {change:+.2f}% | {pool} |")
    print(json.dumps({"tokens": len(ids) - 1, "rows": [dict(zip(("model", "perplexity", "change_pct", "seconds",
                                                                   "pool_mb"), r)) for r in rows]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
