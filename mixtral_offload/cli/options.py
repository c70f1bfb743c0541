"""Arguments and options shared by the commands that load a model."""
from __future__ import annotations

import click

from ..demo import DEMO_DESCRIPTION, demo_model_dir
from ..offload.options import CHOICES, LoadOptions


def _model_or_demo(ctx: click.Context, param: click.Parameter, model: str | None) -> str:
    if model is not None:
        return model
    demo = demo_model_dir()
    if demo is None:
        raise click.UsageError("no MODEL given (argument, MIXTRAL_OFFLOAD_MODEL or the config file), "
                               "and this installation has no bundled demo model")
    click.echo(f"No MODEL given: using the bundled demo model ({DEMO_DESCRIPTION}).", err=True)
    return str(demo)


MODEL = click.argument("model", envvar="MIXTRAL_OFFLOAD_MODEL", required=False, callback=_model_or_demo,
                       type=click.Path())


def _log_callback(ctx: click.Context, param: click.Parameter, verbose: bool):
    return (lambda text: click.echo(text, err=True)) if verbose else None


def load_options(command):
    """Options shared by every command that loads a model; they arrive as keyword arguments of load()."""
    options = [
        click.option("--memory-budget", "-m", envvar="MIXTRAL_OFFLOAD_MEMORY_BUDGET", default=None,
                     help="Ceiling of the process's resident memory, e.g. 6GiB or 6000MB (converted models). "
                          "Experts are paged into what is left after the fixed parts; below the minimum "
                          "working set the command says what the minimum is. [env: MIXTRAL_OFFLOAD_MEMORY_BUDGET]"),
        click.option("--ram-budget", default=None,
                     help="With --device cuda: ceiling of host memory (the budget then bounds VRAM)."),
        click.option("--policy", type=click.Choice(CHOICES["policy"]), default=LoadOptions.policy, show_default=True,
                     help="Expert cache eviction: density (fewest expected hits per slot held, from the next "
                          "layer's router hint and learned transitions), predictive, gate-weighted "
                          "recency/frequency, LRU or LFU (docs/cache.md)."),
        click.option("--prefetch/--no-prefetch", default=True, show_default=True,
                     help="Read the next layer's likely experts while this layer computes."),
        click.option("--device", type=click.Choice(CHOICES["device"]), default="auto", show_default=True,
                     help="Where to compute: auto picks CUDA when torch sees a GPU."),
        click.option("--device-format", type=click.Choice(CHOICES["device_format"]), default="dequantize",
                     show_default=True,
                     help="How cached experts are held in VRAM (with --device cuda, converted models). "
                          "dequantize: the pool's int4/int8 blocks, dequantized to the compute dtype on every "
                          "call. nf4: re-quantized at fill to bitsandbytes NF4 (0.56 byte per weight: as small "
                          "as int4 g64 blocks, 1.8x smaller than int8 blocks, 3.6x smaller than float16) and "
                          "computed on the packed weights; re-quantizing the pool's int4 adds error. Needs "
                          "bitsandbytes."),
        click.option("--dtype", type=click.Choice(CHOICES["dtype"]), default="auto",
                     show_default=True, help="Compute dtype of the dense weights; auto: as stored."),
        click.option("--activations", type=click.Choice(CHOICES["activations"]), default="int8", show_default=True,
                     help="How the CPU kernels take their input (converted models): int8 quantizes it per "
                          "group for integer dot products (1.4-1.7x faster decode measured); float32 is exact "
                          "to the dequantized weights."),
        click.option("--dense", type=click.Choice(CHOICES["dense"]), default="auto", show_default=True,
                     help="How the attention and output weights are held: int8 quantizes them at load (per "
                          "group of 64, 0.6% error) and computes them with the CPU kernels, halving their "
                          "memory and bytes per token; stored keeps them in --dtype. auto: int8 for a "
                          "converted model on the CPU, stored otherwise."),
        click.option("--miss-bits", type=click.Choice(CHOICES["miss_bits"]), default="auto", show_default=True,
                     help="Under --memory-budget, let expert cache misses read the pool's low-bit copy (convert "
                          "--miss-bits) into a small buffer and compute it there, evicting nothing. auto: only "
                          "for an expert that is every token's second choice with a gate weight below 0.4, and "
                          "only on a pool that has the copy (none: off); on by default, as it moved the demo "
                          "model's perplexity by 0.2% with 25% of its experts cached (BENCHMARKS.md). 2 or 3: "
                          "the same rule, and the copy must exist at those bits. most: any expert whose gate "
                          "weight is below 0.8 for every token, once the cache's slots are full: 0.6x plain "
                          "int4's bytes at Mixtral width under 3 GiB, +1.3% demo perplexity with an int2 copy, "
                          "+0.1% with int3 (25% cached). off: never."),
        click.option("--max-context", type=int, default=None,
                     help="KV cache length in tokens [default: min(4096, the model's maximum)]."),
        click.option("--verbose", "-v", "log", is_flag=True, callback=_log_callback,
                     help="Print the memory plan and speed figures to stderr."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def sampling_options(max_new_tokens: int, temperature: float):
    """--max-new-tokens, --temperature, --top-p, --top-k and --seed, with a command's own defaults."""
    options = [
        click.option("--max-new-tokens", "-n", type=click.IntRange(1), default=max_new_tokens, show_default=True,
                     help="Most tokens to generate."),
        click.option("--temperature", "-t", type=click.FloatRange(0), default=temperature, show_default=True,
                     help="0 means greedy."),
        click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True,
                     help="Sample from the smallest set of tokens whose probability reaches this."),
        click.option("--top-k", type=click.IntRange(0), default=0, show_default=True, help="0 means no top-k cut."),
        click.option("--seed", type=int, default=None, help="Seed for sampling."),
    ]

    def decorate(command):
        for option in reversed(options):
            command = option(command)
        return command

    return decorate
