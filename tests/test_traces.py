"""Routing traces: storage, recording, request order, and the calibrated synthetic generator."""

import numpy as np
import pytest

from mixtral_offload.cache.traces import (
    RoutingTrace,
    TraceRecorder,
    repetition_rates,
    request_sequence,
    synthetic_trace,
    target_repetition_rates,
)
from mixtral_offload.errors import MixtralOffloadError


def test_save_load_roundtrip(tmp_path):
    trace = synthetic_trace(50, num_layers=4, seed=3, with_probs=True, predict_recall=0.8)
    path = tmp_path / "run.trace"  # no .npz suffix: the name is kept as given
    trace.save(path)
    back = RoutingTrace.load(path)
    assert back.expert_ids.dtype == np.int16 and back.gates.dtype == np.float32
    np.testing.assert_array_equal(back.expert_ids, trace.expert_ids)
    np.testing.assert_array_equal(back.gates, trace.gates)
    np.testing.assert_array_equal(back.probs, trace.probs)
    np.testing.assert_array_equal(back.predicted_next, trace.predicted_next)
    np.testing.assert_allclose(back.hint_probs, trace.hint_probs, atol=1e-3)  # stored as float16
    assert (back.num_layers, back.num_experts, back.top_k, back.source) == (4, 8, 2, trace.source)


def test_save_load_without_optional_arrays(tmp_path):
    trace = RoutingTrace(np.zeros((3, 2, 2), np.int16) + [0, 1], np.full((3, 2, 2), 0.5), 4, source="hand")
    trace.save(tmp_path / "t.npz")
    back = RoutingTrace.load(tmp_path / "t.npz")
    assert back.probs is None and back.predicted_next is None and back.hint_probs is None and back.source == "hand"


def test_load_rejects_other_files(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(MixtralOffloadError):
        RoutingTrace.load(bad)
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(MixtralOffloadError):
        RoutingTrace.load(tmp_path / "other.npz")


def test_trace_validates_shapes_and_ids():
    with pytest.raises(MixtralOffloadError):
        RoutingTrace(np.zeros((2, 2, 2)), np.zeros((2, 2, 1)), 8)
    with pytest.raises(MixtralOffloadError):
        RoutingTrace(np.full((2, 2, 2), 8), np.zeros((2, 2, 2)), 8)


def test_recorder_prefill_then_decode():
    layers, experts, k = 3, 8, 2
    rec = TraceRecorder(layers, experts, source="unit")
    rng = np.random.default_rng(0)
    steps = [5, 1, 1, 1]  # a 5-token prompt, then 3 decoded tokens
    expected = []
    for tokens in steps:
        ids = np.stack([rng.permutation(experts)[:k] for _ in range(tokens * layers)]).reshape(tokens, layers, k)
        expected.append(ids)
        for layer in range(layers):
            probs = rng.dirichlet(np.ones(experts), size=tokens)
            hint = None
            if layer + 1 < layers:  # the next layer's experts lead the hint, first choice first
                hint = np.full((tokens, experts), 0.01)
                np.put_along_axis(hint, ids[:, layer + 1], [[0.6, 0.3]], axis=1)
            rec.record(layer, ids[:, layer], np.full((tokens, k), 0.5), probs=probs, hint_probs=hint)
    trace = rec.to_trace()
    assert trace.expert_ids.shape == (8, layers, k)
    assert trace.gates.shape == (8, layers, k)
    assert trace.probs.shape == (8, layers, experts)
    assert trace.predicted_next.shape == (8, layers, k)
    assert trace.hint_probs.shape == (8, layers, experts)
    np.testing.assert_array_equal(trace.expert_ids, np.concatenate(expected))
    assert (trace.predicted_next[:, -1] == -1).all() and (trace.hint_probs[:, -1] == 0).all()
    np.testing.assert_array_equal(trace.predicted_next[:, :-1], trace.expert_ids[:, 1:])
    assert trace.source == "unit"


def test_recorder_refuses_uneven_layers():
    rec = TraceRecorder(2, 8)
    rec.record(0, np.array([[0, 1]]), np.array([[0.6, 0.4]]))
    with pytest.raises(ValueError):
        rec.to_trace()


def test_request_sequence_is_token_major_layer_minor():
    ids = np.array([[[0, 1], [3, 2]], [[4, 5], [7, 6]]])  # within a layer: ascending expert, as the runtime
    gates = np.array([[[0.9, 0.1], [0.8, 0.2]], [[0.7, 0.3], [0.6, 0.4]]])
    seq = request_sequence(RoutingTrace(ids, gates, 8))
    assert seq.keys == [(0, 0), (0, 1), (1, 2), (1, 3), (0, 4), (0, 5), (1, 6), (1, 7)]
    np.testing.assert_allclose(seq.gate, [0.9, 0.1, 0.2, 0.8, 0.7, 0.3, 0.4, 0.6])
    assert len(seq) == 8


def test_repetition_rates_on_hand_made_trace():
    # layer 0: first choice repeats once of 3 steps; the sets overlap at 2 of 3 steps
    ids = np.array([[0, 1], [0, 2], [3, 0], [4, 5]])[:, None, :]
    rates = repetition_rates(RoutingTrace(ids, np.full(ids.shape, 0.5), 8))
    assert rates.first[0] == pytest.approx(1 / 3)
    assert rates.either[0] == pytest.approx(2 / 3)


def test_uniform_routing_has_chance_repetition():
    rng = np.random.default_rng(1)
    ids = np.stack([rng.permutation(8)[:2] for _ in range(20000)])[:, None, :]
    rates = repetition_rates(RoutingTrace(ids, np.full(ids.shape, 0.5), 8))
    assert rates.first[0] == pytest.approx(1 / 8, abs=0.01)
    assert rates.either[0] == pytest.approx(1 - 15 / 28, abs=0.01)  # 46%, the paper's random baseline


def test_synthetic_trace_matches_paper_rates():
    trace = synthetic_trace(3000, seed=0)
    got, want = repetition_rates(trace), target_repetition_rates(32)
    assert np.abs(got.first - want.first).max() < 0.04
    assert np.abs(got.either - want.either).max() < 0.045
    for chunk in np.array_split(np.arange(32), 4):  # averaged over a few layers: within 1.5 points
        assert abs(got.first[chunk].mean() - want.first[chunk].mean()) < 0.015
        assert abs(got.either[chunk].mean() - want.either[chunk].mean()) < 0.015
    # the paper's anchors
    assert want.first[0] == pytest.approx(0.14) and want.first[15] == pytest.approx(0.26)
    assert want.either[31] == pytest.approx(0.50)


def test_synthetic_trace_is_deterministic_and_consistent():
    a = synthetic_trace(200, num_layers=6, seed=5, with_probs=True)
    b = synthetic_trace(200, num_layers=6, seed=5, with_probs=True)
    c = synthetic_trace(200, num_layers=6, seed=6)
    np.testing.assert_array_equal(a.expert_ids, b.expert_ids)
    assert not np.array_equal(a.expert_ids, c.expert_ids)
    assert (a.expert_ids[..., 0] != a.expert_ids[..., 1]).all()
    np.testing.assert_allclose(a.gates.sum(axis=2), 1.0, atol=1e-5)
    assert (a.gates[..., 0] >= a.gates[..., 1]).all()
    np.testing.assert_allclose(a.probs.sum(axis=2), 1.0, atol=1e-5)
    top = np.argsort(-a.probs, axis=2)[..., :2]
    np.testing.assert_array_equal(top, a.expert_ids)
    # gates are the router softmax renormalized over the chosen experts
    chosen = np.take_along_axis(a.probs, a.expert_ids.astype(np.int64), axis=2)
    np.testing.assert_allclose(chosen / chosen.sum(axis=2, keepdims=True), a.gates, atol=1e-5)


def test_synthetic_trace_other_top_k():
    trace = synthetic_trace(100, num_layers=3, num_experts=8, top_k=3, seed=2)
    ids = np.sort(trace.expert_ids, axis=2)
    assert (np.diff(ids, axis=2) > 0).all()  # distinct experts per token and layer
    with pytest.raises(MixtralOffloadError):
        synthetic_trace(10, num_experts=4, top_k=3)
