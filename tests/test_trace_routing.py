"""--routing-trace: the model routes exactly as the trace says (the cache's own recorder is the witness),
hints come from the trace's guesses, and a bad trace is one line of error."""
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mixtral_offload.cache.traces import RoutingTrace, synthetic_trace
from mixtral_offload.cli.main import cli
from mixtral_offload.config import ModelArgs
from mixtral_offload.errors import MixtralOffloadError
from mixtral_offload.offload.loading import load
from mixtral_offload.offload.trace_routing import TraceRouting

IDS = [1, 17, 230, 41, 9, 77, 305, 12, 64, 140, 33, 250, 8, 19, 101]  # 6 prompt tokens, then 9 one by one


def feed(runtime):
    runtime._forward(IDS[:6])
    for token in IDS[6:]:
        runtime._forward([token])


def trace_file(tmp_path, layers, tokens=10, seed=5):
    trace = synthetic_trace(tokens, num_layers=layers, num_experts=8, top_k=2, seed=seed, predict_recall=0.6)
    path = tmp_path / f"trace-{layers}.npz"
    trace.save(path)
    return path, RoutingTrace.load(path)


@pytest.mark.parametrize("trace_layers", [4, 3])
def test_the_model_routes_as_the_trace_says(converted_int4, tmp_path, trace_layers):
    path, trace = trace_file(tmp_path, trace_layers)
    runtime = load(converted_int4, dtype="float32", memory_budget="2GiB", record_trace=True, routing_trace=str(path))
    feed(runtime)
    recorded = runtime.model.experts.recorder.to_trace()
    rows = np.arange(len(IDS)) % trace.num_tokens          # position p routes as trace token p mod 10
    layers = np.arange(4) % trace_layers                    # model layer l as trace layer l mod L_t
    expected_ids = trace.expert_ids[rows][:, layers]
    np.testing.assert_array_equal(recorded.expert_ids, expected_ids)
    np.testing.assert_array_equal(recorded.gates, trace.gates[rows][:, layers])
    # the hint for layer l + 1 is the trace's guess made at trace layer (l + 1) mod L_t - 1; none at the wrap
    for layer in range(3):
        nxt = (layer + 1) % trace_layers
        want = np.zeros((len(IDS), 8), np.float32) if nxt == 0 else trace.hint_probs[rows, nxt - 1]
        np.testing.assert_array_equal(recorded.hint_probs[:, layer], want)
    # the cache was asked for exactly those experts: per forward and layer, each distinct expert once
    forwards = [slice(0, 6)] + [slice(t, t + 1) for t in range(6, len(IDS))]
    requests = sum(len(np.unique(expected_ids[f, layer])) for f in forwards for layer in range(4))
    stats = runtime.cache_stats()
    assert sum(stats.hits) + sum(stats.misses) == requests


def test_routing_override_alone():
    trace = synthetic_trace(5, num_layers=2, num_experts=8, top_k=2, seed=1)
    routing = TraceRouting(trace, ModelArgs(num_hidden_layers=4, num_local_experts=8, num_experts_per_tok=2))
    probs = torch.full((3, 8), 1 / 8)
    ids, weights = routing.route(3, 4, probs)             # layer 3 -> trace layer 1; positions 4, 5, 6 -> 4, 0, 1
    np.testing.assert_array_equal(ids.numpy(), trace.expert_ids[[4, 0, 1], 1])
    np.testing.assert_array_equal(weights.numpy(), trace.gates[[4, 0, 1], 1])
    guess = torch.rand(3, 8)
    assert routing.hint(2, 0, guess) is guess             # a trace without guesses leaves the router's


def test_bad_trace_is_one_line(converted_int4, tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(MixtralOffloadError, match="cannot read routing trace"):
        load(converted_int4, memory_budget="2GiB", routing_trace=str(bad))
    result = CliRunner().invoke(cli, ["bench", "decode", str(converted_int4), "--routing-trace", str(bad)])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert result.output.strip().count("\n") == 0 and "cannot read routing trace" in result.output
    np.save(tmp_path / "array.npy", np.zeros(3))
    with pytest.raises(MixtralOffloadError, match="not a trace archive"):
        RoutingTrace.load(tmp_path / "array.npy")
    with pytest.raises(MixtralOffloadError, match="not a regular file"):
        RoutingTrace.load(tmp_path)
    other = tmp_path / "four.npz"
    synthetic_trace(4, num_layers=2, num_experts=4, top_k=2, seed=0).save(other)
    with pytest.raises(MixtralOffloadError, match="4 experts, top 2; the model has 8 experts"):
        load(converted_int4, memory_budget="2GiB", routing_trace=str(other))


def test_damaged_trace_files_are_refused_in_one_line(tmp_path):
    """Bytes changed, zeroed or cut off anywhere in a trace file: it loads, or one MixtralOffloadError."""
    good = tmp_path / "good.npz"
    synthetic_trace(20, num_layers=3, seed=0, predict_recall=0.6, with_probs=True).save(good)
    data, rng, refused = good.read_bytes(), np.random.default_rng(0), 0
    for case in range(300):
        damaged = bytearray(data)
        where = int(rng.integers(len(data)))
        if case % 3 == 0:
            damaged[where] = int(rng.integers(256))
        elif case % 3 == 1:
            damaged = damaged[:where]
        else:
            damaged[where:where + 8] = bytes(8)
        (tmp_path / "bad.npz").write_bytes(bytes(damaged))
        try:
            RoutingTrace.load(tmp_path / "bad.npz")
        except MixtralOffloadError as exc:
            assert "\n" not in str(exc)
            refused += 1
    assert refused > 200
