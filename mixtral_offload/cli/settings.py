"""Option defaults from a TOML file and environment variables, through click's `default_map`.

Precedence: command-line flags > environment variables > the config file > built-in defaults.
Click already puts a flag before an option's own envvar before `default_map` before the default;
`default_map` here holds the file's values with the environment variables of ENV_DEFAULTS laid
over them, so that those variables also win over the file for options that do not declare them.

    # ~/.config/mixtral-offload/config.toml
    model = "~/models/mixtral-int4"      # top-level keys: every command that has the option
    memory_budget = "6GiB"
    [chat]                               # a table: one command only, over the top-level keys
    temperature = 0.3
"""
from __future__ import annotations

import os
from pathlib import Path

import click

from ..errors import MixtralOffloadError
from ..validate import (JSON_LIMIT, UINT64_MAX, bool_field, decode_utf8, float_field, int_field, read_regular,
                        str_field)

CONFIG_ENV = "MIXTRAL_OFFLOAD_CONFIG"
CONFIG_ERROR = "mixtral_offload.config_error"  # ctx.meta key of a config file's held-back error
HELP_NAMES = {"-h", "--help"}
ENV_DEFAULTS = {"model": "MIXTRAL_OFFLOAD_MODEL", "memory_budget": "MIXTRAL_OFFLOAD_MEMORY_BUDGET"}


def default_config_path() -> Path:
    """$XDG_CONFIG_HOME/mixtral-offload/config.toml, else ~/.config/... (the platform's app dir elsewhere)."""
    return Path(click.get_app_dir("mixtral-offload")) / "config.toml"


def read_config(path: str | Path) -> dict:
    """The parsed TOML file (a regular file of at most JSON_LIMIT bytes); a click error naming the file."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise click.ClickException(f"{path}: reading a config file needs Python 3.11 or `pip install tomli`")
    try:
        text = decode_utf8(read_regular(path, JSON_LIMIT, "config file"), str(path))
        return tomllib.loads(text)
    except MixtralOffloadError as exc:
        raise click.ClickException(str(exc)) from None
    except tomllib.TOMLDecodeError as exc:
        raise click.ClickException(f"{path}: not valid TOML ({exc})") from None
    except RecursionError:
        raise click.ClickException(f"{path}: not valid TOML (nested too deeply)") from None


def check_value(param: click.Parameter, value, where: str) -> None:
    """A config value of the type the option takes: a bool for a flag, an integer (not 1e300) for an
    integer option, a finite number for a float option, a string (or a number, for an untyped option)
    for the rest."""
    kind = param.type
    try:
        if getattr(param, "is_flag", False) or isinstance(kind, click.types.BoolParamType):
            bool_field(value, where)
        elif isinstance(kind, click.types.IntParamType):
            int_field(value, where, -UINT64_MAX, UINT64_MAX)
        elif isinstance(kind, click.types.FloatParamType):
            float_field(value, where)
        elif isinstance(kind, click.types.StringParamType) and isinstance(value, (int, float)):
            float_field(value, where)  # an untyped option takes a number as its text
        else:
            str_field(value, where)
    except MixtralOffloadError as exc:
        raise click.ClickException(str(exc)) from None


def _key(name: str) -> str:
    return name.replace("-", "_")


def build_default_map(config: dict, commands: dict[str, click.Command], environ=os.environ,
                      source: str = "config") -> dict:
    """click's default_map for a group: {command name: {parameter name: default}}.

    Top-level keys go to every command having that parameter, a `[command]` table to that command
    only; ENV_DEFAULTS variables that are set come last. Unknown keys and tables are errors, so a
    typo does not pass silently.
    """
    params = {name: {p.name: p for p in command.params} for name, command in commands.items()}
    shared: dict = {}
    tables: dict[str, dict] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            if key not in commands:
                raise click.ClickException(f"{source}: [{key}] is not a command ({', '.join(sorted(commands))})")
            tables[key] = {}
            for option, option_value in value.items():
                if _key(option) not in params[key]:
                    raise click.ClickException(f"{source}: [{key}] {option}: `{key}` has no such option")
                check_value(params[key][_key(option)], option_value, f"{source}: [{key}] {option}")
                tables[key][_key(option)] = option_value
        else:
            if not any(_key(key) in names for names in params.values()):
                raise click.ClickException(f"{source}: {key}: no command has such an option")
            for names in params.values():
                if _key(key) in names:
                    check_value(names[_key(key)], value, f"{source}: {key}")
            shared[_key(key)] = value
    env = {name: environ[var] for name, var in ENV_DEFAULTS.items() if environ.get(var)}
    default_map = {}
    for name, names in params.items():
        defaults = {key: value for key, value in shared.items() if key in names}
        defaults.update(tables.get(name, {}))
        defaults.update({key: value for key, value in env.items() if key in names})
        if defaults:
            default_map[name] = defaults
    return default_map


def _apply_config(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    path = Path(value).expanduser() if value else default_config_path()
    commands = getattr(ctx.command, "commands", {})
    try:
        config = {} if value is None and not path.exists() else read_config(path)
        default_map = build_default_map(config, commands, source=str(path))
    except click.ClickException as exc:  # held back until a command runs: --help still works
        ctx.meta[CONFIG_ERROR] = exc
        default_map = {}
    if ctx.default_map:  # one given to cli(default_map=...) by a caller comes first
        for name, defaults in ctx.default_map.items():
            default_map[name] = {**default_map.get(name, {}), **defaults}
    ctx.default_map = default_map
    return value


def raise_config_error(ctx: click.Context) -> None:
    """Raise the config file's error, unless the command line only asks for help."""
    error = ctx.meta.get(CONFIG_ERROR)
    if error is not None and not HELP_NAMES & set(ctx.args):
        raise error


config_option = click.option(
    "--config", type=click.Path(dir_okay=False), envvar=CONFIG_ENV, expose_value=False, is_eager=True,
    callback=_apply_config,
    help="TOML file of option defaults [default: $XDG_CONFIG_HOME/mixtral-offload/config.toml, else "
         f"~/.config/...; env: {CONFIG_ENV}]. "
         "Top-level keys apply to every command, [chat]-style tables to one; flags and env vars win.")
