"""`--profile FILE` for commands that run a model, and the `report` command that summarises a profile."""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import click


PROFILE_KEY = "mixtral_offload.profile"


def _remember(ctx: click.Context, param: click.Parameter, value):
    if param.name == "profile" and value is not None:  # before the run, not after it
        folder = Path(value).expanduser().absolute().parent
        if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
            raise click.ClickException(f"--profile {value}: {folder} is not a writable directory")
    ctx.meta.setdefault(PROFILE_KEY, {})[param.name] = value


def profile_options(command):
    """--profile FILE and --profile-format for a command that runs the model; call start_profiling after
    loading. The values go to the click context, not to the command's arguments."""
    command = click.option("--profile-format", type=click.Choice(["json", "chrome"]), default="json",
                           show_default=True, expose_value=False, callback=_remember,
                           help="json: the documented schema (docs/profiling.md); chrome: a Trace Event "
                                "Format file for Perfetto or chrome://tracing.")(command)
    command = click.option("--profile", type=click.Path(dir_okay=False, writable=True), default=None,
                           expose_value=False, callback=_remember,
                           help="Record time per forward pass, per layer and per span, and write it to FILE "
                                "(summarise with `mixtral-offload report FILE`).")(command)
    return command


def start_profiling(runtime) -> None:
    """If --profile was given, profile the runtime's model until the command ends, then write the file."""
    click.get_current_context().with_resource(profile_session(runtime))


def profile_session(runtime):
    """The --profile recording of this command as a context manager (doing nothing without --profile)."""
    ctx = click.get_current_context()
    settings = ctx.meta.get(PROFILE_KEY, {})
    model = ctx.params.get("model")
    return profiling(runtime, settings.get("profile"), settings.get("profile_format") or "json",
                     command=ctx.info_name, model=str(model) if model else None)


@contextmanager
def profiling(runtime, path: str | None, fmt: str = "json", **meta) -> Iterator[None]:
    """Attach a Profiler to the runtime's model for the block; write the profile to path when it ends.

    Does nothing when path is None. The file is written even when the block is interrupted.
    """
    if path is None:
        yield
        return
    from ..profile_report import build_profile, write_profile
    from ..profiling import NULL_PROFILER, Profiler

    profiler = Profiler()
    runtime.set_profiler(profiler)
    try:
        yield
    finally:
        end = time.perf_counter()
        runtime.set_profiler(NULL_PROFILER)
        write_profile(build_profile(profiler, end, **meta), path, fmt)
        click.echo(f"profile written to {path}", err=True)


@click.command()
@click.argument("profile_file", metavar="FILE", type=click.Path(exists=True, dir_okay=False))
@click.option("--plot", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Also draw per-token latency and per-layer hit rate to this PNG.")
def report(profile_file, plot):
    """Summarise a profile written with --profile: run figures, time by span, per-layer hit rate.

    Reads either profile format (json or chrome).

    \b
    Examples:
      mixtral-offload generate ./mixtral-int4 -p "Hello" -n 64 --profile run.json
      mixtral-offload report run.json
      mixtral-offload report run.json --plot run.png
    """
    from ..profile_report import plot_profile, read_profile, summary_tables

    profile = read_profile(profile_file)
    click.echo(summary_tables(profile))
    if plot:
        plot_profile(profile, plot)
        click.echo(f"plot written to {plot}", err=True)
