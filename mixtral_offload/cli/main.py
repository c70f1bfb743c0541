"""The `mixtral-offload` command: a click group whose commands parse options and call the library."""
from __future__ import annotations

import json
import sys

import click

from .. import __version__
from ..errors import MixtralOffloadError
from ..validate import TEXT_LIMIT, decode_utf8, read_stream
from .options import MODEL, load_options, sampling_options
from .report import profile_options, start_profiling
from .settings import HELP_NAMES, config_option, raise_config_error


class Group(click.Group):
    """A click group that prints user errors as one line (no traceback) and exits non-zero."""

    def invoke(self, ctx: click.Context):
        raise_config_error(ctx)
        try:
            return super().invoke(ctx)
        except MixtralOffloadError as exc:
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            click.echo("\ninterrupted", err=True)
            ctx.exit(130)


@click.group(cls=Group, context_settings={"help_option_names": sorted(HELP_NAMES)})
@config_option
@click.version_option(__version__, "--version", prog_name="mixtral-offload")
def cli() -> None:
    """Run Mixtral-8x7B-class Mixture-of-Experts models on one consumer machine.

    \b
    Examples:
      mixtral-offload convert ./Mixtral-8x7B-Instruct ./mixtral-int4 --bits 4
      mixtral-offload generate ./mixtral-int4 --prompt "The capital of France is"
      mixtral-offload perplexity ./mixtral-int4 --file wiki.txt --json
    """


@cli.command()
@MODEL
@click.option("--prompt", "-p", required=True, help="Text to continue (BOS is prepended; no chat template).")
@sampling_options(max_new_tokens=128, temperature=0.0)
@profile_options
@load_options
def generate(model, prompt, max_new_tokens, temperature, top_p, top_k, seed, **load_kwargs):
    """Continue a prompt and print only the completion text to stdout.

    \b
    Example:
      mixtral-offload generate ./mixtral-int4 -p "Once upon a time" -n 64 -t 0.7 --seed 1
    """
    from ..offload.loading import load

    runtime = load(model, **load_kwargs)
    start_profiling(runtime)
    record = None
    for record in runtime.generate(prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                                   top_p=top_p, top_k=top_k, seed=seed):
        click.echo(record.text, nl=False)
        sys.stdout.flush()
    click.echo()
    if load_kwargs["log"] is not None and record is not None:
        stats = runtime.cache_stats()
        cache = f", expert cache hit rate {stats.hit_rate:.2f}" if stats is not None else ""
        load_kwargs["log"](f"{record.index + 1} tokens, prompt {record.prompt_tokens} tokens in "
                           f"{record.prompt_seconds:.2f} s, decode {record.tokens_per_second:.2f} tok/s, "
                           f"finish: {record.finish_reason}{cache}")


@cli.command()
@MODEL
@click.option("--file", "-f", "text_file", required=True, type=click.File("rb"),
              help="UTF-8 text to score ('-' reads stdin).")
@click.option("--json", "as_json", is_flag=True,
              help='Print {"perplexity": float, "tokens": int, "nll": [per-token NLL]}.')
@profile_options
@load_options
def perplexity(model, text_file, as_json, **load_kwargs):
    """Teacher-forced perplexity of a text file (BOS prepended, every following token scored).

    \b
    Example:
      mixtral-offload perplexity ./mixtral-int4 --file heldout.txt --json
    """
    from ..offload.loading import load

    runtime = load(model, **load_kwargs)
    start_profiling(runtime)
    source = str(getattr(text_file, "name", "stdin"))  # stdin under a test runner has no name
    result = runtime.perplexity(decode_utf8(read_stream(text_file, TEXT_LIMIT, source), source))
    if as_json:  # every value is finite (the runtime refuses NaN and inf): allow_nan=False only asserts it
        click.echo(json.dumps({"perplexity": result.perplexity, "tokens": result.tokens, "nll": result.nll},
                              allow_nan=False))
    else:
        click.echo(f"perplexity {result.perplexity:.4f} over {result.tokens} tokens")


# Commands defined in other modules are registered below.
from .convert import convert as _convert_command, synth as _synth_command, verify as _verify_command  # noqa: E402

cli.add_command(_convert_command)
cli.add_command(_verify_command)
cli.add_command(_synth_command)
from .chat import chat  # noqa: E402
from .report import report  # noqa: E402

cli.add_command(chat)
cli.add_command(report)

from .bench import bench  # noqa: E402
from .serve import serve  # noqa: E402

cli.add_command(bench)
cli.add_command(serve)
