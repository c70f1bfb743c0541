"""The input fuzzer's surfaces: each turns a random generator into one damaged input, runs the code that
reads it, and names the outcome. Shared by tests/test_fuzz_inputs.py (a few seeded cases per surface)
and scripts/fuzz_campaign.py (thousands, in worker processes that can crash or hang).

Outcomes: clean (a one-line MixtralOffloadError or CLI error), accepted (no error and, for a model,
the same logits and token ids as the pristine model), unchecked (accepted with different results,
in a pool written before file checksums existed, or a GGUF that describes another model: nothing can
notice), traceback (any other exception),
silent-wrong (accepted with different results where a checksum should have caught it); the campaign
adds crash and hang.
"""
from __future__ import annotations

import json
import shutil
import signal
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from click.testing import CliRunner
from fuzz_gguf import GGUFBase, gguf_case, make_gguf_bases
from fuzz_http import http_case

from mixtral_offload.cli.main import cli
from mixtral_offload.config import ModelArgs
from mixtral_offload.demo import DEMO_DIR
from mixtral_offload.errors import MixtralOffloadError
from mixtral_offload.offload.loading import load
from mixtral_offload.offload.store.pool import pack_header
from mixtral_offload.offload.store.synthetic import write_synthetic
from mixtral_offload.offload.store.verify import verify_model_dir
from mixtral_offload.offload.tokenizer import Tokenizer

OUTCOMES = ("clean", "accepted", "unchecked", "traceback", "crash", "hang", "silent-wrong")
CASE_SECONDS = 20  # a case running longer is a hang
PROBE_IDS = [1, 100, 2000, 8000]
PROBE_TEXT = "Hello world: a probe, with ünïcode and digits 123."
TINY = ModelArgs(vocab_size=8192, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128,
                 torch_dtype="float16")
INTERESTING = [0, -1, 1, 2, 3, 7, 64, 255, 256, 4096, 2**31, 2**63, 2**64, -(2**63), 10**40, 10**300, 0.5, -0.0,
               1e-45, 1e308, 1e-300, "", "x", "NaN", "1e6", "float16", [], [1], {}, {"a": 1}, None, True, False]
JSON_CONSTANTS = [b"NaN", b"Infinity", b"-Infinity", b"1" + b"0" * 5000, b"[" * 3000 + b"]" * 3000, b'"\\ud800"']


class Hang(Exception):
    """A case ran past CASE_SECONDS."""


@dataclass
class Base:
    """A pristine tiny model and what it computes, a valid profile and GGUF files: the inputs every case damages."""

    model: Path
    logits: torch.Tensor
    ids: list[int]
    profile: Path
    gguf: dict[str, GGUFBase]   # small GGUF files of several block types and layouts


def make_base(root: Path) -> Base:
    """The base in root, written there unless an earlier call (another worker's parent) did."""
    model, profile = root / "model", root / "profile.json"
    if not model.exists():
        write_synthetic(model, TINY, tokenizer=DEMO_DIR / "tokenizer.model", progress=False)
    if not profile.exists():
        result = CliRunner().invoke(cli, ["generate", str(model), "-p", "Hi", "-n", "3", "--profile", str(profile)])
        assert result.exit_code == 0, result.output
    (root / "gguf").mkdir(exist_ok=True)
    runtime = load(model)
    return Base(model, runtime.logits(PROBE_IDS), runtime.tokenizer.encode(PROBE_TEXT), profile,
                make_gguf_bases(root / "gguf"))


# -- mutators -------------------------------------------------------------------------------------------
def mutate_bytes(data: bytes, rng: np.random.Generator, start: int = 0, end: int | None = None) -> bytes:
    """One of: flip bytes, set interesting bytes, truncate, insert, zero a run, append; in [start, end)."""
    out = bytearray(data)
    end = len(out) if end is None else min(end, len(out))
    if end <= start:
        return bytes(out) + bytes(rng.integers(0, 256, 4, dtype=np.uint8))
    kind = int(rng.integers(0, 6))
    where = int(rng.integers(start, end))
    if kind == 0:
        for offset in rng.integers(start, end, int(rng.integers(1, 9))):
            out[offset] ^= 1 << int(rng.integers(0, 8))
    elif kind == 1:
        for offset in rng.integers(start, end, int(rng.integers(1, 5))):
            out[offset] = int(rng.choice([0x00, 0xff, 0x7f, 0x80, 0x7c, 0x7e, 0xfe]))
    elif kind == 2:
        del out[where:]
    elif kind == 3:
        out[where:where] = bytes(rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8))
    elif kind == 4:
        out[where:where + int(rng.integers(1, 4096))] = bytes(min(4096, end - where))
    else:
        out += bytes(rng.integers(0, 256, int(rng.integers(1, 4096)), dtype=np.uint8))
    return bytes(out)


def mutate_json(document, rng: np.random.Generator) -> bytes:
    """A JSON document with one node replaced, removed or added, sometimes with raw non-JSON tokens."""
    document = json.loads(json.dumps(document))
    containers = [document]
    for node in containers:  # every container, breadth first
        children = node.values() if isinstance(node, dict) else node
        containers += [child for child in children if isinstance(child, (dict, list))]
    node = containers[int(rng.integers(0, len(containers)))]
    keys = list(node) if isinstance(node, dict) else list(range(len(node)))
    value = INTERESTING[int(rng.integers(0, len(INTERESTING)))]
    action = int(rng.integers(0, 4))
    if keys and action < 2:
        node[keys[int(rng.integers(0, len(keys)))]] = value
    elif keys and action == 2:
        del node[keys[int(rng.integers(0, len(keys)))]]
    elif isinstance(node, dict):
        node[f"k{int(rng.integers(0, 100))}"] = value
    else:
        node.append(value)
    raw = json.dumps(document).encode()
    if rng.random() < 0.15:  # a raw token JSON itself cannot hold
        placeholder = raw.find(b"0")
        if placeholder >= 0:
            raw = raw[:placeholder] + JSON_CONSTANTS[int(rng.integers(0, len(JSON_CONSTANTS)))] + raw[placeholder + 1:]
    return raw


# -- running a case -------------------------------------------------------------------------------------
def _on_alarm(signum, frame):
    raise Hang()


def guarded(call: Callable[[], tuple[str, str]]) -> tuple[str, str]:
    """(outcome, detail) of call(), or of the exception it raised, or 'hang' past CASE_SECONDS."""
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(CASE_SECONDS)
    try:
        return call()
    except MixtralOffloadError as exc:
        return ("clean", "") if "\n" not in str(exc) else ("traceback", f"multi-line error: {exc!r}"[:300])
    except Hang:
        return "hang", ""
    except Exception as exc:  # what the fuzzer hunts: anything but the project's own error
        return "traceback", f"{type(exc).__name__}: {exc}"[:300]
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def model_copy(base: Base, work: Path) -> Path:
    """A fresh copy of the pristine model in work/model."""
    target = work / "model"
    shutil.rmtree(target, ignore_errors=True)
    return Path(shutil.copytree(base.model, target))


def drop_checksums(model: Path) -> None:
    """Make the model look converted before the manifest held file checksums."""
    manifest = json.loads((model / "manifest.json").read_text())
    manifest.pop("files", None)
    resign(model, json.dumps(manifest).encode())


def resign(model: Path, manifest: bytes) -> None:
    (model / "manifest.json").write_bytes(manifest)
    with open(model / "experts.pool", "r+b") as f:
        f.write(pack_header((model / "experts.pool").stat().st_size, manifest))


def run_model(model: Path, base: Base, checked: bool) -> tuple[str, str]:
    """verify, load, compute the probe: the outcome when nothing raised."""
    verify_model_dir(model, progress=False)
    runtime = load(model)
    same = (torch.equal(runtime.logits(PROBE_IDS), base.logits)
            and runtime.tokenizer.encode(PROBE_TEXT) == base.ids)
    return ("accepted" if same else "silent-wrong" if checked else "unchecked"), ""


def parse_tokenizer(path: Path) -> tuple[str, str]:
    """Load a tokenizer.model alone and use it."""
    tokenizer = Tokenizer(path)
    tokenizer.decode(tokenizer.encode(PROBE_TEXT) + list(range(min(300, tokenizer.vocab_size))))
    return "accepted", ""


def file_case(name: str, region: Callable[[Path], tuple[int, int]] | None = None, as_json: bool = False):
    """A surface that damages one model file (bytes in a region, or one JSON node) and runs the model."""
    def case(base: Base, work: Path, rng: np.random.Generator) -> tuple[str, str]:
        model = model_copy(base, work)
        checked = rng.random() < 0.5
        if not checked:
            drop_checksums(model)
        path = model / name
        data = path.read_bytes()
        if as_json and rng.random() < 0.7:
            damaged = mutate_json(json.loads(data), rng)
        else:
            start, end = region(path) if region else (0, len(data))
            damaged = mutate_bytes(data, rng, start, end)
        if name == "manifest.json" and rng.random() < 0.8:  # the pool header vouches for it: the parser runs
            resign(model, damaged)
        else:
            path.write_bytes(damaged)
        if name == "tokenizer.model":  # the parser alone first, then the model
            outcome = guarded(lambda: parse_tokenizer(path))
            if outcome[0] in ("traceback", "hang"):
                return outcome
        return guarded(lambda: run_model(model, base, checked))
    return case


def dense_header(path: Path) -> tuple[int, int]:
    return 0, 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]


def dense_body(path: Path) -> tuple[int, int]:
    return dense_header(path)[1], path.stat().st_size


def cli_outcome(result) -> tuple[str, str]:
    """A CLI run: exit 0 accepted; a click or project error clean; an exception a traceback."""
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        return "traceback", f"{type(result.exception).__name__}: {result.exception}"[:300]
    if result.exit_code == 0:
        return "accepted", ""
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    return ("clean", "") if len(errors) == 1 else ("traceback", result.output[-300:])


OPTION_VALUES = ["0", "-1", "1", "nan", "inf", "-inf", "1e-45", "1e308", "18446744073709551616", "abc", "", "0.5",
                 "1" + "0" * 400, "\udcff", "2.5", "-0", "1GiB", "1e400MB", "64", "100000"]
SAMPLING_OPTIONS = ["-t", "--top-p", "--top-k", "--seed", "-n", "--max-context", "--memory-budget", "--ram-budget"]


COUNT_VALUES = ["0", "-1", "1", "2", "nan", "abc", "", "2.5", "1" + "0" * 400]  # -n: no long generations


def cli_args(model: Path, rng: np.random.Generator) -> list[str]:
    """`generate` with one to three fuzzed sampling or budget options."""
    args = ["generate", str(model), "-p", "Hi", "-n", "2", "--max-context", "16"]  # a huge -n stops at 16
    for _ in range(int(rng.integers(1, 4))):
        option = SAMPLING_OPTIONS[int(rng.integers(0, len(SAMPLING_OPTIONS)))]
        values = COUNT_VALUES if option == "-n" else OPTION_VALUES
        args += [option, values[int(rng.integers(0, len(values)))]]
    return args


def cli_case(base: Base, work: Path, rng: np.random.Generator) -> tuple[str, str]:
    return guarded_cli(cli_args(base.model, rng))


TOML_KEYS = ["model", "memory_budget", "temperature", "seed", "top_p", "top_k", "max_new_tokens", "max_context",
             "prefetch", "policy", "dtype", "nope", "[generate]", "[chat]", "[nope]"]
TOML_VALUES = ['"x"', "5", "-1", "1e300", "nan", "inf", "true", "[1, 2]", '{a = 1}', "0.5", '"1GiB"', "18446744073709551616",
               "[" * 300, '"\\ud800"', "2024-01-01", '"""x"""']


def toml_case(base: Base, work: Path, rng: np.random.Generator) -> tuple[str, str]:
    lines = []
    for _ in range(int(rng.integers(1, 5))):
        key = TOML_KEYS[int(rng.integers(0, len(TOML_KEYS)))]
        lines.append(key if key.startswith("[") else f"{key} = {TOML_VALUES[int(rng.integers(0, len(TOML_VALUES)))]}")
    data = "\n".join(lines).encode()
    if rng.random() < 0.3:
        data = mutate_bytes(data, rng)
    (work / "config.toml").write_bytes(data)
    return guarded_cli(["--config", str(work / "config.toml"), "generate", str(base.model), "-p", "Hi", "-n", "1"])


def report_case(base: Base, work: Path, rng: np.random.Generator) -> tuple[str, str]:
    data = base.profile.read_bytes()
    damaged = mutate_json(json.loads(data), rng) if rng.random() < 0.7 else mutate_bytes(data, rng)
    (work / "profile.json").write_bytes(damaged)
    return guarded_cli(["report", str(work / "profile.json")])


def guarded_cli(args: list[str]) -> tuple[str, str]:
    return guarded(lambda: cli_outcome(CliRunner().invoke(cli, args)))


SURFACES: dict[str, Callable[[Base, Path, np.random.Generator], tuple[str, str]]] = {
    "config.json": file_case("config.json", as_json=True),
    "tokenizer.model": file_case("tokenizer.model"),
    "dense header": file_case("dense.safetensors", dense_header),
    "dense body": file_case("dense.safetensors", dense_body),
    "manifest.json": file_case("manifest.json", as_json=True),
    "experts.pool": file_case("experts.pool"),
    "config TOML": toml_case,
    "CLI sampling arguments": cli_case,
    "profile (report)": report_case,
    "GGUF file": lambda base, work, rng: gguf_case(base.gguf, work, rng),
    "HTTP requests": lambda base, work, rng: http_case(base.model, rng),
}
