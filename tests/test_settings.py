"""Option defaults: flags > environment variables > config file > built-in defaults."""
import click
import pytest
from click.testing import CliRunner

from mixtral_offload.cli.main import cli
from mixtral_offload.cli.settings import build_default_map


class FakeRuntime:
    def __init__(self, path, calls):
        self.path, self.calls = path, calls

    def generate(self, prompt, **sampling):
        self.calls.append({"model": self.path, **sampling})
        return iter([])


@pytest.fixture
def calls(monkeypatch, tmp_path):
    """Settings that `generate` ends up with; the config dir is an empty temporary one."""
    recorded = []
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    for var in ("MIXTRAL_OFFLOAD_MODEL", "MIXTRAL_OFFLOAD_CONFIG", "MIXTRAL_OFFLOAD_MEMORY_BUDGET"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr("mixtral_offload.offload.loading.load", lambda path, **options: FakeRuntime(path, recorded))
    return recorded


def write_config(tmp_path, text):
    path = tmp_path / "xdg" / "mixtral-offload" / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path




def run(*args):
    return CliRunner().invoke(cli, list(args))


CONFIG = """
model = "from-file"
temperature = 0.5
top_p = 0.9
[generate]
top_p = 0.8
"""


def test_built_in_defaults(calls, tmp_path):
    assert run("generate", "m", "-p", "Hi").exit_code == 0
    assert calls[-1] == {"model": "m", "max_new_tokens": 128, "temperature": 0.0, "top_p": 1.0, "top_k": 0,
                         "seed": None}


def test_file_sets_defaults_and_command_table_wins(calls, tmp_path):
    write_config(tmp_path, CONFIG)
    result = run("generate", "-p", "Hi")
    assert result.exit_code == 0, result.output
    assert calls[-1]["model"] == "from-file" and calls[-1]["temperature"] == 0.5 and calls[-1]["top_p"] == 0.8


def test_env_beats_file_and_flags_beat_env(calls, tmp_path, monkeypatch):
    write_config(tmp_path, CONFIG)
    monkeypatch.setenv("MIXTRAL_OFFLOAD_MODEL", "from-env")
    assert run("generate", "-p", "Hi").exit_code == 0
    assert calls[-1]["model"] == "from-env"
    assert run("generate", "from-flag", "-p", "Hi", "-t", "0.1", "--top-p", "0.3").exit_code == 0
    assert calls[-1]["model"] == "from-flag" and calls[-1]["temperature"] == 0.1 and calls[-1]["top_p"] == 0.3


def test_explicit_config_file_and_env(calls, tmp_path, monkeypatch):
    other = tmp_path / "other.toml"
    other.write_text('model = "other"\n[generate]\nseed = 5\n')
    write_config(tmp_path, CONFIG)
    assert run("--config", other, "generate", "-p", "Hi").exit_code == 0
    assert calls[-1]["model"] == "other" and calls[-1]["seed"] == 5 and calls[-1]["temperature"] == 0.0
    monkeypatch.setenv("MIXTRAL_OFFLOAD_CONFIG", str(other))
    assert run("generate", "-p", "Hi").exit_code == 0
    assert calls[-1]["model"] == "other"


def test_chat_table_does_not_leak_into_generate(calls, tmp_path):
    write_config(tmp_path, 'model = "m"\n[chat]\ntemperature = 0.3\n')
    assert run("generate", "-p", "Hi").exit_code == 0
    assert calls[-1]["temperature"] == 0.0
    assert "default: 0.3" in run("chat", "--help").output


@pytest.mark.parametrize("text, needle", [
    ("temprature = 1", "temprature: no command has such an option"),
    ("[chat]\nprompt = 'x'", "[chat] prompt"),
    ("[nope]\nx = 1", "[nope] is not a command"),
    ("model = ", "not valid TOML"),
])
def test_bad_config_is_a_one_line_error(calls, tmp_path, text, needle):
    write_config(tmp_path, text)
    result = run("generate", "m", "-p", "Hi")
    assert result.exit_code == 1 and needle in result.output, result.output
    assert result.output.startswith("Error: ") and len(result.output.strip().splitlines()) == 1


def test_missing_explicit_config_is_an_error(calls, tmp_path):
    result = run("--config", tmp_path / "absent.toml", "generate", "m", "-p", "Hi")
    assert result.exit_code == 1 and "config file not found" in result.output


def test_memory_budget_env_beats_file():
    @click.command()
    @click.argument("model")
    @click.option("--memory-budget")
    def run_model(model, memory_budget):
        pass

    commands = {"run": run_model, "other": click.Command("other", params=[click.Option(["--temperature"])])}
    config = {"memory_budget": "6GiB", "model": "m", "temperature": 0.7, "run": {"memory-budget": "5GiB"}}
    assert build_default_map(config, commands, environ={}) == {
        "run": {"memory_budget": "5GiB", "model": "m"}, "other": {"temperature": 0.7}}
    environ = {"MIXTRAL_OFFLOAD_MEMORY_BUDGET": "4GiB", "MIXTRAL_OFFLOAD_MODEL": "e"}
    assert build_default_map(config, commands, environ=environ)["run"] == {"memory_budget": "4GiB", "model": "e"}
