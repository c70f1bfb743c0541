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

CONFIG_ENV = "MIXTRAL_OFFLOAD_CONFIG"
ENV_DEFAULTS = {"model": "MIXTRAL_OFFLOAD_MODEL", "memory_budget": "MIXTRAL_OFFLOAD_MEMORY_BUDGET"}


def default_config_path() -> Path:
    """$XDG_CONFIG_HOME/mixtral-offload/config.toml, else ~/.config/... (the platform's app dir elsewhere)."""
    return Path(click.get_app_dir("mixtral-offload")) / "config.toml"


def read_config(path: str | Path) -> dict:
    """The parsed TOML file; a click error naming the file when it cannot be read."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise click.ClickException(f"{path}: reading a config file needs Python 3.11 or `pip install tomli`")
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise click.ClickException(f"{path}: cannot read the config file ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise click.ClickException(f"{path}: not valid TOML ({exc})") from None


def _key(name: str) -> str:
    return name.replace("-", "_")


def build_default_map(config: dict, commands: dict[str, click.Command], environ=os.environ,
                      source: str = "config") -> dict:
    """click's default_map for a group: {command name: {parameter name: default}}.

    Top-level keys go to every command having that parameter, a `[command]` table to that command
    only; ENV_DEFAULTS variables that are set come last. Unknown keys and tables are errors, so a
    typo does not pass silently.
    """
    params = {name: {p.name for p in command.params} for name, command in commands.items()}
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
                tables[key][_key(option)] = option_value
        else:
            if not any(_key(key) in names for names in params.values()):
                raise click.ClickException(f"{source}: {key}: no command has such an option")
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
    if value is None and not path.is_file():
        config = {}
    else:
        config = read_config(path)
    commands = getattr(ctx.command, "commands", {})
    default_map = build_default_map(config, commands, source=str(path))
    if ctx.default_map:  # one given to cli(default_map=...) by a caller comes first
        for name, defaults in ctx.default_map.items():
            default_map[name] = {**default_map.get(name, {}), **defaults}
    ctx.default_map = default_map
    return value


config_option = click.option(
    "--config", type=click.Path(dir_okay=False), envvar=CONFIG_ENV, expose_value=False, is_eager=True,
    callback=_apply_config,
    help="TOML file of option defaults [default: $XDG_CONFIG_HOME/mixtral-offload/config.toml, else "
         f"~/.config/...; env: {CONFIG_ENV}]. "
         "Top-level keys apply to every command, [chat]-style tables to one; flags and env vars win.")
