"""`bench`: kernel speed, and this runtime's decode/prompt speed per configuration (parse and call only)."""
from __future__ import annotations

import json

import click

from ..offload.options import CHOICES, LoadOptions
from .convert import BITS


@click.group()
def bench() -> None:
    """Measure kernels and decoding on this machine (peers: python benchmarks/run_all.py).

    \b
    Examples:
      mixtral-offload bench kernels --json
      mixtral-offload bench decode ./mixtral-int4 --experts-fraction 0.5 --experts-fraction 0.25
    """


@bench.command()
@click.option("--threads", "-t", type=click.IntRange(1), multiple=True, default=(1, 2), show_default=True)
@click.option("--bits", type=click.Choice(BITS), multiple=True, default=("4", "8"), show_default=True)
@click.option("--group-size", type=click.Choice(["32", "64", "128"]), default="64", show_default=True)
@click.option("--tokens", type=click.IntRange(1), multiple=True, default=(1,), show_default=True,
              help="Rows of x per call (1: batch-1 matvec).")
@click.option("--repeats", type=click.IntRange(1), default=15, show_default=True)
@click.option("--no-torch", is_flag=True, help="Skip the torch dense reference rows.")
@click.option("--gguf", is_flag=True, help="Add rows for llama.cpp's GGUF block types (Q4_0 .. Q6_K, F16, BF16, F32).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (schema: quant/bench.py).")
def kernels(threads, bits, group_size, tokens, repeats, no_torch, gguf, as_json):
    """Quantized matvec on Mixtral's expert shapes: ms, GB/s and the fraction of measured read bandwidth.

    \b
    Example:
      mixtral-offload bench kernels --threads 2 --json
    """
    from ..quant.bench import format_kernel_bench, run_kernel_bench

    result = run_kernel_bench(threads=tuple(threads), bits=tuple(int(b) for b in bits), group_size=int(group_size),
                              tokens=tuple(tokens), repeats=repeats, torch_dense=not no_torch, gguf=gguf)
    click.echo(json.dumps(result, indent=2) if as_json else format_kernel_bench(result))


@bench.command()
@click.argument("model", type=click.Path(exists=True))
@click.option("--budget", "-m", "budgets", multiple=True, metavar="SIZE",
              help="A --memory-budget to measure (repeatable: --budget 2GiB --budget 1GiB).")
@click.option("--experts-fraction", "fractions", multiple=True, type=click.FloatRange(0, 1, min_open=True),
              metavar="F", help="A budget sized by the memory plan so the cache holds this fraction of the "
                                "experts (repeatable: --experts-fraction 0.5 --experts-fraction 0.25).")
@click.option("--no-resident", is_flag=True, help="Skip the configuration without a budget.")
@click.option("--prompt-tokens", type=click.IntRange(2), default=256, show_default=True,
              help="Length of the prompt-speed run.")
@click.option("--decode-prompt-tokens", type=click.IntRange(2), default=16, show_default=True,
              help="Prompt before the decode-speed run.")
@click.option("--decode-tokens", type=click.IntRange(1), default=64, show_default=True)
@click.option("--repeats", type=click.IntRange(1), default=3, show_default=True, help="Speeds are medians.")
@click.option("--threads", "-t", type=click.IntRange(1), default=2, show_default=True)
@click.option("--dtype", type=click.Choice(CHOICES["dtype"]), default="auto", show_default=True)
@click.option("--policy", type=click.Choice(CHOICES["policy"]), default=LoadOptions.policy, show_default=True)
@click.option("--prefetch/--no-prefetch", default=True, show_default=True)
@click.option("--activations", type=click.Choice(CHOICES["activations"]), multiple=True, default=("int8",),
              show_default=True, help="The CPU kernels' input (see generate --help); give it twice to "
                                      "measure both side by side: --activations int8 --activations float32.")
@click.option("--dense", type=click.Choice(CHOICES["dense"]), default="auto", show_default=True,
              help="Attention and output weights: auto, stored or int8 (see generate --help).")
@click.option("--miss-bits", type=click.Choice(CHOICES["miss_bits"]), default="auto", show_default=True,
              help="Which cache misses read the pool's low-bit copy (see generate --help).")
@click.option("--bandwidth-gbs", type=click.FloatRange(0, min_open=True), default=None,
              help="Memory read bandwidth for the floor [default: measured now at --threads].")
@click.option("--routing-trace", type=click.Path(), default=None,
              help="Route by this routing trace (cache/traces.py format: recorded with a trained model, or "
                   "synthetic) instead of the router's choice; the router still runs. Mapping onto the "
                   "model's layers: docs/cache.md, 'Routing by a trace'.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (schema: benchmark.py).")
def decode(model, budgets, fractions, no_resident, prompt_tokens, decode_prompt_tokens, decode_tokens, repeats,
           threads, dtype, policy, prefetch, activations, dense, miss_bits, bandwidth_gbs, routing_trace, as_json):
    """Decode and prompt tokens/s of MODEL, each configuration in a fresh child process.

    Reports medians of --repeats, the child's peak RSS, and with a budget the cache hit rate and
    the bytes read per decoded token; beside them the bandwidth floor (active bytes per token /
    measured read bandwidth).

    \b
    Examples:
      mixtral-offload bench decode ./mini-int4
      mixtral-offload bench decode ./mini-int4 --no-resident --experts-fraction 0.5 --experts-fraction 0.25
      mixtral-offload bench decode ./mixtral-int4 --budget 8GiB --decode-tokens 8 --repeats 1
      mixtral-offload bench decode ./mixtral-int4 --budget 8GiB --routing-trace demo-heldout.npz
    """
    from ..benchmark import DecodeSpec, decode_report, format_decode_report
    from ..cache.traces import RoutingTrace

    if routing_trace is not None:
        RoutingTrace.load(routing_trace)  # a bad file is one error here, not one per child
    common = dict(model=model, prompt_tokens=prompt_tokens, decode_prompt_tokens=decode_prompt_tokens,
                  decode_tokens=decode_tokens, repeats=repeats, threads=threads, dtype=dtype, policy=policy,
                  prefetch=prefetch, dense=dense, miss_bits=miss_bits, routing_trace=routing_trace)
    specs = []
    for mode in dict.fromkeys(activations):
        suffix = f" ({mode})" if len(set(activations)) > 1 else ""
        common["activations"] = mode
        specs += [] if no_resident else [DecodeSpec(label="resident" + suffix, **common)]
        specs += [DecodeSpec(label=f"budget {b}{suffix}", budget=b, **common) for b in budgets]
        specs += [DecodeSpec(label=f"{f:.0%} of experts{suffix}", experts_fraction=f, **common) for f in fractions]
    if not specs:
        raise click.UsageError("nothing to measure: drop --no-resident or give --budget/--experts-fraction")
    log = None if as_json else (lambda text: click.echo(text, err=True))
    report = decode_report(specs, bandwidth_gbs=bandwidth_gbs, log=log)
    click.echo(json.dumps(report, indent=2) if as_json else format_decode_report(report))
