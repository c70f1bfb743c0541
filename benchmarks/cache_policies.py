"""Expert-cache hit rates by eviction policy, partition and cache size, against Belady's OPT.

    python benchmarks/cache_policies.py [--tokens 2000] [--seed 0] [--hint-recall 0.6] [--json]
    python benchmarks/cache_policies.py --trace run.npz [--prefetch trace|0.8]

Sizes are 25/37.5/50/75% of all layers x experts (256 for Mixtral-8x7B). Without --trace the trace
is synthetic, calibrated to the Mixtral paper's one-token repetition rates, with next-layer hints
whose top-k holds each true expert with probability --hint-recall.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time

from mixtral_offload.cache.simulate import format_table, hit_rate_table, prefetch_recall
from mixtral_offload.cache.traces import RoutingTrace, repetition_rates, synthetic_trace
from mixtral_offload.errors import MixtralOffloadError

FRACTIONS = (0.25, 0.375, 0.5, 0.75)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2000, help="tokens of synthetic trace (default 2000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trace", help="a recorded RoutingTrace .npz instead of the synthetic one")
    parser.add_argument("--prefetch", default=None, help="'trace' or a recall in [0, 1] (default: none)")
    parser.add_argument("--hint-recall", type=float, default=0.6,
                        help="synthetic trace: recall of the next-layer hint's top-k (default 0.6)")
    parser.add_argument("--half-life", type=float, default=None, help="gate policy half-life in requests")
    parser.add_argument("--wait-weight", type=float, default=None, help="predictive policy wait weight")
    parser.add_argument("--policies", default="lru,lfu,gate,predictive,density,opt")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    try:
        if args.trace:
            trace = RoutingTrace.load(args.trace)
        else:
            trace = synthetic_trace(args.tokens, seed=args.seed, predict_recall=args.hint_recall)
        prefetch = args.prefetch
        if prefetch is not None and prefetch != "trace":
            prefetch = float(prefetch)
        total = trace.num_layers * trace.num_experts
        capacities = [round(f * total) for f in FRACTIONS]
        options = {}
        if args.half_life:
            options["gate"] = {"half_life": args.half_life}
        if args.wait_weight is not None:
            options["predictive"] = {"wait_weight": args.wait_weight}
        start = time.perf_counter()
        rows = hit_rate_table(
            trace, capacities, policies=args.policies.split(","), prefetch=prefetch, seed=args.seed,
            policy_options=options,
        )
        seconds = time.perf_counter() - start
    except (MixtralOffloadError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    rates = repetition_rates(trace)
    info = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} {platform.processor() or platform.system()}, python {platform.python_version()}",
        "trace": trace.source or args.trace,
        "tokens": trace.num_tokens,
        "layers": trace.num_layers,
        "experts": trace.num_experts,
        "top_k": trace.top_k,
        "first_choice_repetition_mean": round(float(rates.first.mean()), 4),
        "either_choice_repetition_mean": round(float(rates.either.mean()), 4),
        "hint_recall": round(prefetch_recall(trace), 4) if trace.predicted_next is not None else None,
        "prefetch": prefetch,
        "seconds": round(seconds, 1),
    }
    if args.json:
        print(json.dumps({"info": info, "rows": [row.as_dict() for row in rows]}, indent=1))
    else:
        print(", ".join(f"{k}={v}" for k, v in info.items()))
        print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
