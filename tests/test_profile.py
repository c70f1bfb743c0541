"""Profiles: per-token times against wall time, the JSON schema, the Chrome trace, the report command."""
import json
import time

import pytest
from click.testing import CliRunner

from mixtral_offload.cli.main import cli
from mixtral_offload.offload.loading import load
from mixtral_offload.profile_report import VERSION, build_profile, read_profile, summary_tables
from mixtral_offload.profiling import Profiler

SPANS = {"attention", "router", "experts", "lm_head", "sampling", "output"}


def run(*args, **kwargs):
    return CliRunner().invoke(cli, [str(a) for a in args], **kwargs)


def test_per_token_times_add_up_to_the_wall_time(tiny_checkpoint):
    runtime = load(tiny_checkpoint[0])
    list(runtime.generate("warm up", max_new_tokens=2))
    profiler = runtime.model.profiler = Profiler()
    start = time.perf_counter()
    records = list(runtime.generate("The profile of a short generation", max_new_tokens=24))
    wall = time.perf_counter() - start
    profile = build_profile(profiler)
    tokens = profile["tokens"]
    assert len(records) == 24 and [t["kind"] for t in tokens] == ["prefill"] + ["decode"] * 23
    assert abs(sum(t["seconds"] for t in tokens) - wall) < 0.1 * wall
    for token in tokens:
        assert set(token["spans"]) == SPANS
        assert sum(token["spans"].values()) <= token["seconds"] * 1.001
    layers = runtime.args.num_hidden_layers
    assert profile["spans"]["attention"]["count"] == 24 * layers and profile["spans"]["sampling"]["count"] == 24


def synthetic_profile():
    """A profile with the spans and counters an expert cache records, at known values."""
    profiler = Profiler()
    for token in range(4):
        profiler.token("prefill" if token == 0 else "decode")
        for layer in range(2):
            with profiler.span("experts", layer=layer):
                with profiler.span("pool_read", layer=layer, bytes=1000):
                    pass
                with profiler.span("expert_cpu", layer=layer):
                    pass
            profiler.count("cache_hit", 1 + layer, layer=layer)
            profiler.count("cache_miss", 1, layer=layer)
            profiler.count("prefetch_hit", 1, layer=layer)
            profiler.count("prefetch_waste", layer, layer=layer)
        with profiler.span("sampling"):
            time.sleep(0.002)
    return build_profile(profiler, command="generate", model="m")


def test_json_schema_with_cache_counters():
    profile = synthetic_profile()
    assert profile["format"] == "mixtral-offload-profile" and profile["version"] == VERSION
    assert profile["peak_rss_bytes"] > 10 ** 6 and profile["peak_vram_bytes"] is None
    assert [t["bytes"] for t in profile["tokens"]] == [{"pool_read": 2000}] * 4
    assert profile["tokens"][1]["counters"] == {"cache_hit": 3, "cache_miss": 2, "prefetch_hit": 2, "prefetch_waste": 1}
    assert profile["layers"] == [
        {"layer": 0, "cache_hit": 4, "cache_miss": 4, "prefetch_hit": 4, "prefetch_waste": 0, "hit_rate": 0.5},
        {"layer": 1, "cache_hit": 8, "cache_miss": 4, "prefetch_hit": 4, "prefetch_waste": 4, "hit_rate": 8 / 12}]
    assert profile["spans"]["pool_read"] == {"count": 8, "seconds": pytest.approx(
        profile["spans"]["pool_read"]["seconds"]), "bytes": 8000}
    json.dumps(profile)  # serialisable as is


def test_generate_writes_json_and_chrome_profiles(tiny_checkpoint, tmp_path):
    path, _ = tiny_checkpoint
    plain = run("generate", path, "-p", "Hello", "-n", "6")
    result = run("generate", path, "-p", "Hello", "-n", "6", "--profile", tmp_path / "p.json")
    assert result.exit_code == 0 and result.stdout == plain.stdout  # profiling does not change the output
    profile = json.loads((tmp_path / "p.json").read_text())
    assert profile["command"] == "generate" and profile["model"] == str(path)
    assert len(profile["tokens"]) == 6 and profile["wall_seconds"] >= profile["busy_seconds"] > 0

    result = run("generate", path, "-p", "Hello", "-n", "6", "--profile", tmp_path / "p.trace",
                 "--profile-format", "chrome")
    assert result.exit_code == 0, result.output
    trace = json.loads((tmp_path / "p.trace").read_text())
    check_trace_event_format(trace)
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X" and e.get("cat") == "span"]
    assert {e["name"] for e in spans} == SPANS and all("layer" in e["args"] for e in spans if e["name"] == "router")
    assert len([e for e in trace["traceEvents"] if e.get("cat") == "forward"]) == 6
    again = read_profile(tmp_path / "p.trace")  # the report reads the trace back
    assert [t["kind"] for t in again["tokens"]] == [t["kind"] for t in profile["tokens"]]
    assert again["spans"].keys() == SPANS


def check_trace_event_format(trace):
    """The Trace Event Format's JSON object form: required keys and their types."""
    assert isinstance(trace, dict) and isinstance(trace["traceEvents"], list) and trace["traceEvents"]
    for event in trace["traceEvents"]:
        assert isinstance(event["name"], str) and event["ph"] in {"X", "i", "C", "M"}, event
        assert isinstance(event["pid"], int) and isinstance(event["tid"], int), event
        assert isinstance(event["ts"], (int, float)) and event["ts"] >= 0, event
        assert isinstance(event.get("args", {}), dict), event
        if event["ph"] == "X":
            assert isinstance(event["dur"], (int, float)) and event["dur"] >= 0, event
        if event["ph"] == "C":
            assert all(isinstance(v, (int, float)) for v in event["args"].values()), event
        if event["ph"] == "i":
            assert event.get("s", "t") in {"g", "p", "t"}
    json.dumps(trace, allow_nan=False)


def test_chrome_trace_round_trips_counters(tmp_path):
    from mixtral_offload.profile_report import chrome_trace, profile_from_chrome

    profile = synthetic_profile()
    trace = chrome_trace(profile)
    check_trace_event_format(trace)
    back = profile_from_chrome(json.loads(json.dumps(trace)))
    assert back["layers"] == profile["layers"]
    assert [t["bytes"] for t in back["tokens"]] == [t["bytes"] for t in profile["tokens"]]


def test_report_prints_tables_and_draws_a_png(tmp_path):
    from mixtral_offload.profile_report import write_profile

    write_profile(synthetic_profile(), tmp_path / "p.json")
    result = run("report", tmp_path / "p.json", "--plot", tmp_path / "p.png")
    assert result.exit_code == 0, result.output
    for needle in ("decode speed", "bytes read per token", "2.0 KiB", "pool_read", "sampling", "hit rate",
                   "50.0%", "66.7%", "prefetch waste", "peak RSS"):
        assert needle in result.output, needle
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_of_a_real_run_and_bad_files(tiny_checkpoint, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("Some text to score for a profile.")
    result = run("perplexity", tiny_checkpoint[0], "--file", text, "--profile", tmp_path / "p.json")
    assert result.exit_code == 0, result.output
    assert "no expert cache counters" in summary_tables(read_profile(tmp_path / "p.json"))
    (tmp_path / "bad.json").write_text('{"x": 1}')
    result = run("report", tmp_path / "bad.json")
    assert result.exit_code == 1 and "not a mixtral-offload profile" in result.output


def test_chat_profile_covers_the_session(tiny_checkpoint, tmp_path):
    result = run("chat", tiny_checkpoint[0], "-n", "3", "--profile", tmp_path / "c.json", input="Hi\nHo\n")
    assert result.exit_code == 0, result.output
    profile = read_profile(tmp_path / "c.json")
    assert profile["command"] == "chat"
    assert [t["kind"] for t in profile["tokens"]].count("prefill") == 2
