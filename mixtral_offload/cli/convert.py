"""`convert`, `verify` and `synth`: build and check converted model directories (parse and call only)."""
from __future__ import annotations

import click

from ..config import format_size


@click.command()
@click.argument("hf_dir", type=click.Path(file_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--bits", type=click.Choice(["4", "8"]), default="4", show_default=True, help="Bits per expert weight.")
@click.option("--group-size", type=click.Choice(["32", "64", "128"]), default="64", show_default=True,
              help="Input columns sharing one scale (and zero).")
@click.option("--dense-dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default="float16",
              show_default=True, help="Storage dtype of the dense (non-expert) weights.")
@click.option("--no-refine", is_flag=True, help="Plain round-to-nearest; skip the error-minimizing refinement.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def convert(hf_dir, out_dir, bits, group_size, dense_dtype, no_refine, quiet):
    """Convert an HF Mixtral checkpoint into a model directory with a quantized expert pool.

    Streams one tensor at a time and writes atomically: OUT_DIR appears only when complete.

    \b
    Example:
      mixtral-offload convert ./Mixtral-8x7B-Instruct-v0.1 ./mixtral-int4 --bits 4 --group-size 64
    """
    from ..offload.store.convert import convert as run_convert

    result = run_convert(hf_dir, out_dir, bits=int(bits), group_size=int(group_size), dense_dtype=dense_dtype,
                         refine=not no_refine, progress=False if quiet else None)
    if not quiet:
        click.echo(f"wrote {result.path}: pool {format_size(result.pool_bytes)}, dense {format_size(result.dense_bytes)} "
                   f"from {format_size(result.input_bytes)} in {result.seconds:.1f} s "
                   f"({result.input_bytes / 1e6 / max(result.seconds, 1e-9):.1f} MB/s)")


@click.command()
@click.argument("model_dir", type=click.Path(file_okay=False))
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def verify(model_dir, quiet):
    """Check a converted model's pool: header, manifest, config agreement and every block's checksum.

    \b
    Example:
      mixtral-offload verify ./mixtral-int4
    """
    from ..offload.store.verify import verify_model_dir

    click.echo(verify_model_dir(model_dir, progress=False if quiet else None))


@click.command()
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--layers", type=click.IntRange(1), default=32, show_default=True)
@click.option("--hidden", type=click.IntRange(1), default=4096, show_default=True)
@click.option("--intermediate", type=click.IntRange(1), default=14336, show_default=True)
@click.option("--experts", type=click.IntRange(1), default=8, show_default=True)
@click.option("--top-k", type=click.IntRange(1), default=2, show_default=True)
@click.option("--heads", type=click.IntRange(1), default=32, show_default=True)
@click.option("--kv-heads", type=click.IntRange(1), default=8, show_default=True)
@click.option("--vocab", type=click.IntRange(1), default=32000, show_default=True)
@click.option("--bits", type=click.Choice(["4", "8"]), default="4", show_default=True)
@click.option("--group-size", type=click.Choice(["32", "64", "128"]), default="64", show_default=True)
@click.option("--tokenizer", type=click.Path(dir_okay=False, exists=True), default=None,
              help="A tokenizer.model to copy in (needed to generate from the result).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def synth(out_dir, layers, hidden, intermediate, experts, top_k, heads, kv_heads, vocab, bits, group_size,
          tokenizer, seed, quiet):
    """Write a model directory of random quantized experts at any geometry, with no source checkpoint.

    The defaults are full Mixtral-8x7B (~24 GB pool at 4 bits): for testing at scale, not for text.

    \b
    Examples:
      mixtral-offload synth ./synth-8x7b --bits 4 --tokenizer ./tokenizer.model
      mixtral-offload synth ./synth-small --layers 4 --hidden 512 --intermediate 1792 --heads 8 --kv-heads 2
    """
    from ..config import ModelArgs
    from ..offload.store.synthetic import write_synthetic

    args = ModelArgs(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                     num_attention_heads=heads, num_key_value_heads=kv_heads, num_local_experts=experts,
                     num_experts_per_tok=top_k, torch_dtype="float16")
    result = write_synthetic(out_dir, args, bits=int(bits), group_size=int(group_size), tokenizer=tokenizer,
                             seed=seed, progress=False if quiet else None)
    if not quiet:
        click.echo(f"wrote {result.path}: pool {format_size(result.pool_bytes)}, dense {format_size(result.dense_bytes)} "
                   f"in {result.seconds:.1f} s")
