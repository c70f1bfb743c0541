"""How many of a batch's guessed experts the next layer uses, by batch size, on a recorded routing trace.

    python benchmarks/batch_guesses.py [TRACE.npz] [--tokens 1 2 4 10 64]

For consecutive batches of T tokens of the trace: the experts in any token's top-k of the next layer's
guessed router probabilities (what the prompt read-ahead reads, cache/prompt_reads.py), the experts
the next layer then ran, and their overlap: precision (guessed and used / guessed) and recall (/ used).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from mixtral_offload.cache.traces import RoutingTrace

DEMO_TRACE = Path(__file__).resolve().parent / "traces" / "demo-heldout.npz"


def batch_overlap(trace: RoutingTrace, tokens: int) -> dict:
    """Mean guessed, used, precision and recall over every layer and batch of `tokens` consecutive tokens."""
    k, rows = trace.top_k, []
    for layer in range(trace.num_layers - 1):
        for start in range(0, trace.num_tokens - tokens + 1, tokens):
            guess = trace.hint_probs[start:start + tokens, layer]
            guessed = set(np.unique(np.argpartition(-guess, k - 1, axis=1)[:, :k]).tolist())
            used = set(np.unique(trace.expert_ids[start:start + tokens, layer + 1]).tolist())
            both = len(guessed & used)
            rows.append((len(guessed), len(used), both / len(guessed), both / len(used)))
    guessed, used, precision, recall = np.mean(rows, axis=0)
    return {"tokens": tokens, "guessed": guessed, "used": used, "precision": precision, "recall": recall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", type=Path, nargs="?", default=DEMO_TRACE)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 3, 4, 6, 10, 16, 64])
    args = parser.parse_args()
    trace = RoutingTrace.load(args.trace)
    print(f"{args.trace.name}: {trace.num_tokens} tokens, {trace.num_layers} layers, top {trace.top_k} of "
          f"{trace.num_experts}\n| batch tokens | experts guessed | experts used | precision | recall |\n|---|---|---|---|---|")
    for tokens in args.tokens:
        r = batch_overlap(trace, tokens)
        print(f"| {tokens} | {r['guessed']:.2f} | {r['used']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} |")


if __name__ == "__main__":
    main()
