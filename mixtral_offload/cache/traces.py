"""Routing traces: which experts each token chose at each layer, recorded or synthetic.

Shape legend: T = tokens, L = layers, k = experts chosen per token (top_k), E = experts per layer,
m = experts predicted for the next layer, R = requests (T * L * k).
"""

from __future__ import annotations

import json
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mixtral_offload.errors import MixtralOffloadError
from mixtral_offload.validate import regular_file_size

TRACE_FORMAT_VERSION = 1

Key = tuple[int, int]  # (layer, expert)


@dataclass
class RoutingTrace:
    """The routing decisions of one run, token by token and layer by layer.

    `hint_probs[t, l]` holds layer l + 1's router probabilities guessed while layer l ran (layer l + 1's
    router applied to the hidden state entering layer l's MoE block: the runtime's prefetch hint) and
    `predicted_next[t, l]` the experts guessed from them; the last layer's rows are 0 and -1.
    """

    expert_ids: np.ndarray  # [T, L, k] int16, first choice first
    gates: np.ndarray  # [T, L, k] float32, the weights the chosen experts' outputs were mixed with
    num_experts: int
    probs: np.ndarray | None = None  # [T, L, E] float32, full router softmax
    predicted_next: np.ndarray | None = None  # [T, L, m] int16, -1 where there is no guess
    hint_probs: np.ndarray | None = None  # [T, L, E] float32, 0 where there is no guess
    source: str = ""

    def __post_init__(self) -> None:
        ids = np.asarray(self.expert_ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_experts):  # before the cast can wrap a value
            raise MixtralOffloadError(f"trace expert ids must lie in [0, {self.num_experts})")
        self.expert_ids = ids.astype(np.int16)
        self.gates = np.asarray(self.gates, dtype=np.float32)
        if self.expert_ids.ndim != 3:
            raise MixtralOffloadError(f"trace expert_ids must be [tokens, layers, k], got shape {self.expert_ids.shape}")
        if self.gates.shape != self.expert_ids.shape:
            raise MixtralOffloadError(f"trace gates shape {self.gates.shape} != expert_ids shape {self.expert_ids.shape}")
        want = self.expert_ids.shape[:2] + (self.num_experts,)
        self.probs = _probabilities("probs", self.probs, want)
        self.hint_probs = _probabilities("hint_probs", self.hint_probs, want)
        if self.predicted_next is not None:
            self.predicted_next = np.asarray(self.predicted_next, dtype=np.int16)
            if self.predicted_next.ndim != 3 or self.predicted_next.shape[:2] != self.expert_ids.shape[:2]:
                raise MixtralOffloadError(
                    f"trace predicted_next shape {self.predicted_next.shape} does not match [tokens, layers, m]"
                )
            if self.predicted_next.size and self.predicted_next.max() >= self.num_experts:
                raise MixtralOffloadError(f"trace predicted expert ids must lie in [0, {self.num_experts})")

    @property
    def num_tokens(self) -> int:
        return self.expert_ids.shape[0]

    @property
    def num_layers(self) -> int:
        return self.expert_ids.shape[1]

    @property
    def top_k(self) -> int:
        return self.expert_ids.shape[2]

    def save(self, path: str | Path) -> None:
        """Write the trace as a compressed .npz with its metadata as a JSON string."""
        meta = {
            "format_version": TRACE_FORMAT_VERSION,
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "source": self.source,
        }
        arrays = {"expert_ids": self.expert_ids, "gates": self.gates, "meta": np.array(json.dumps(meta))}
        if self.probs is not None:
            arrays["probs"] = self.probs
        if self.predicted_next is not None:
            arrays["predicted_next"] = self.predicted_next
        if self.hint_probs is not None:
            arrays["hint_probs"] = self.hint_probs.astype(np.float16)  # half the file; loaded back as float32
        with open(path, "wb") as f:  # an open file keeps numpy from appending ".npz" to the name
            np.savez_compressed(f, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> RoutingTrace:
        """Read a trace written by `save`; a file that is not one raises MixtralOffloadError."""
        regular_file_size(path, "routing trace")  # a FIFO or a directory is refused before the open
        try:
            data = np.load(path, allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise ValueError("a single array, not a trace archive")
            with data:
                meta = json.loads(str(data["meta"]))
                arrays = {name: data[name] for name in data.files if name != "meta"}
        except (OSError, ValueError, KeyError, EOFError, NotImplementedError, zipfile.BadZipFile, zlib.error) as e:
            raise MixtralOffloadError(f"cannot read routing trace {path}: {e}") from e
        if not isinstance(meta, dict) or meta.get("format_version") != TRACE_FORMAT_VERSION:
            version = meta.get("format_version") if isinstance(meta, dict) else None
            raise MixtralOffloadError(f"routing trace {path}: unknown format version {version}")
        if "expert_ids" not in arrays or "gates" not in arrays:
            raise MixtralOffloadError(f"routing trace {path} lacks expert_ids or gates")
        for name in ("num_layers", "num_experts", "top_k"):
            if type(meta.get(name)) is not int or not 0 < meta[name] <= 1 << 15:
                raise MixtralOffloadError(f"routing trace {path}: metadata {name} must be a positive integer")
        if any(not isinstance(a, np.ndarray) or a.dtype.kind not in "iuf" for a in arrays.values()) \
                or arrays["expert_ids"].dtype.kind not in "iu":
            raise MixtralOffloadError(f"routing trace {path}: arrays must hold numbers (expert ids integers)")
        trace = cls(
            expert_ids=arrays["expert_ids"],
            gates=arrays["gates"],
            num_experts=meta["num_experts"],
            probs=arrays.get("probs"),
            predicted_next=arrays.get("predicted_next"),
            hint_probs=arrays.get("hint_probs"),
            source=str(meta.get("source", "")),
        )
        if trace.num_layers != meta["num_layers"] or trace.top_k != meta["top_k"]:
            raise MixtralOffloadError(f"routing trace {path}: metadata does not match the arrays' shapes")
        return trace


def _probabilities(name: str, array: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | None:
    """A trace's [T, L, E] probability array as float32, checked against `shape`; None stays None."""
    if array is None:
        return None
    array = np.asarray(array, dtype=np.float32)
    if array.shape != shape:
        raise MixtralOffloadError(f"trace {name} shape {array.shape} != {shape}")
    return array


class TraceRecorder:
    """Collects routing decisions as the runtime makes them; `to_trace()` assembles a RoutingTrace.

    The runtime calls `record` once per MoE layer per forward, with all T tokens of that forward
    (T = prompt length in prefill, 1 in decode). Layers must be recorded in the same token order.
    """

    def __init__(self, num_layers: int, num_experts: int, source: str = "") -> None:
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.source = source
        self._ids: list[list[np.ndarray]] = [[] for _ in range(num_layers)]
        self._gates: list[list[np.ndarray]] = [[] for _ in range(num_layers)]
        self._probs: list[list[np.ndarray]] = [[] for _ in range(num_layers)]
        self._hints: list[list[np.ndarray]] = [[] for _ in range(num_layers)]

    def record(
        self,
        layer: int,
        expert_ids: np.ndarray,  # [T, k]
        gates: np.ndarray,  # [T, k]
        probs: np.ndarray | None = None,  # [T, E]
        hint_probs: np.ndarray | None = None,  # [T, E], layer + 1's router probabilities guessed at this layer
    ) -> None:
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} outside [0, {self.num_layers})")
        expert_ids = np.asarray(expert_ids).reshape(-1, np.shape(expert_ids)[-1])
        gates = np.asarray(gates, dtype=np.float32).reshape(expert_ids.shape)
        self._ids[layer].append(expert_ids.astype(np.int16))
        self._gates[layer].append(gates)
        if probs is not None:
            self._probs[layer].append(np.asarray(probs, dtype=np.float32).reshape(expert_ids.shape[0], -1))
        if hint_probs is not None:
            self._hints[layer].append(np.asarray(hint_probs, dtype=np.float32).reshape(expert_ids.shape[0], -1))

    def to_trace(self) -> RoutingTrace:
        counts = [sum(len(a) for a in chunks) for chunks in self._ids]
        if len(set(counts)) != 1:
            raise ValueError(f"layers recorded different token counts: {counts}")
        ids = np.stack([_concat(chunks) for chunks in self._ids], axis=1)
        gates = np.stack([_concat(chunks) for chunks in self._gates], axis=1)
        probs = None
        if any(self._probs):
            if any(sum(len(a) for a in chunks) != counts[0] for chunks in self._probs):
                raise ValueError("router probabilities were recorded for some forwards and not others")
            probs = np.stack([_concat(chunks) for chunks in self._probs], axis=1)
        hints = predicted = None
        if any(self._hints):
            # every layer but the last must have hints for every token; the last has none
            hints = np.zeros(ids.shape[:2] + (self.num_experts,), dtype=np.float32)
            for layer, chunks in enumerate(self._hints):
                if chunks:
                    rows = _concat(chunks)
                    if len(rows) != counts[0]:
                        raise ValueError(f"layer {layer}: hints recorded for some forwards and not others")
                    hints[:, layer] = rows
            predicted = top_guesses(hints, ids.shape[2])
        return RoutingTrace(ids, gates, self.num_experts, probs=probs, predicted_next=predicted, hint_probs=hints,
                            source=self.source)


def top_guesses(hint_probs: np.ndarray, count: int) -> np.ndarray:
    """The `count` most probable experts of each hint [..., E], most probable first; -1 where a row is all 0."""
    order = np.argsort(-hint_probs, axis=-1, kind="stable")[..., :count].astype(np.int16)
    return np.where(hint_probs.any(axis=-1, keepdims=True), order, np.int16(-1))


def _concat(chunks: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(chunks, axis=0)


# --- the order in which a runtime touches the cache ---


@dataclass
class RequestSequence:
    """Cache requests in the order a runtime makes them: token-major, layer-minor, and within a layer
    the k experts in ascending id (the order ExpertCache.run touches its policy in)."""

    layer: np.ndarray  # [R] int
    expert: np.ndarray  # [R] int
    gate: np.ndarray  # [R] float32
    num_layers: int
    top_k: int
    keys: list[Key] = field(default_factory=list)  # [R] (layer, expert)

    def __len__(self) -> int:
        return len(self.layer)


def request_sequence(trace: RoutingTrace) -> RequestSequence:
    """The (layer, expert) keys of `trace` in runtime order, with the gate each request carried."""
    T, L, k = trace.expert_ids.shape
    order = np.argsort(trace.expert_ids, axis=2, kind="stable")
    layer = np.broadcast_to(np.arange(L)[None, :, None], (T, L, k)).reshape(-1)
    expert = np.take_along_axis(trace.expert_ids, order, axis=2).astype(np.int64).reshape(-1)
    gate = np.take_along_axis(trace.gates, order, axis=2).reshape(-1)
    keys = list(zip(layer.tolist(), expert.tolist()))
    return RequestSequence(layer, expert, gate, L, k, keys)


# --- repetition statistics (Mixtral paper, table of expert assignment repetitions) ---


@dataclass
class RepetitionRates:
    """Per layer: how often token t + 1 repeats token t's routing."""

    first: np.ndarray  # [L] first choice at t + 1 == first choice at t
    either: np.ndarray  # [L] the k chosen at t + 1 share at least one expert with the k at t


def repetition_rates(trace: RoutingTrace) -> RepetitionRates:
    """Measure a trace's one-token expert repetition rates per layer."""
    ids = trace.expert_ids
    if trace.num_tokens < 2:
        raise MixtralOffloadError("repetition rates need a trace of at least 2 tokens")
    first = (ids[1:, :, 0] == ids[:-1, :, 0]).mean(axis=0)
    shared = (ids[1:, :, :, None] == ids[:-1, :, None, :]).any(axis=(2, 3))  # [T-1, L]
    return RepetitionRates(first=first, either=shared.mean(axis=0))


# Targets at layers 0, 15, 31 of 32 (midpoints of the paper's ranges across its datasets).
_ANCHOR_POSITIONS = np.array([0.0, 15.0 / 31.0, 1.0])
_ANCHOR_FIRST = np.array([0.14, 0.26, 0.23])
_ANCHOR_EITHER = np.array([0.455, 0.64, 0.50])


def target_repetition_rates(num_layers: int) -> RepetitionRates:
    """The paper's repetition rates, interpolated linearly across `num_layers` layers."""
    position = np.linspace(0.0, 1.0, num_layers) if num_layers > 1 else np.zeros(1)
    return RepetitionRates(
        first=np.interp(position, _ANCHOR_POSITIONS, _ANCHOR_FIRST),
        either=np.interp(position, _ANCHOR_POSITIONS, _ANCHOR_EITHER),
    )


def synthetic_trace(
    num_tokens: int,
    num_layers: int = 32,
    num_experts: int = 8,
    top_k: int = 2,
    seed: int = 0,
    skew: float = 0.3,
    with_probs: bool = False,
    predict_recall: float | None = None,
) -> RoutingTrace:
    """A routing trace with Mixtral's one-token repetition rates and mild expert popularity skew.

    Per layer, each token's routing is a Markov step from the previous token's: with probability
    `first` it keeps the first choice; with probability `either - first` it keeps one of the previous
    experts in another rank; otherwise it picks experts the previous token did not use. Fresh picks
    follow per-layer popularities exp(skew * N(0, 1)). Ranks beyond the second are always fresh.
    Gates come from router logits in which the chosen experts lead; they carry no reuse signal
    beyond the rank (the first choice is the one repeated most). `predict_recall` adds guesses for
    the next layer that contain each true expert with that probability, and hint probabilities in which
    those guesses lead (derived from the guesses: beyond their order the values carry no information).
    """
    if num_experts < 2 * top_k or top_k < 1:
        raise MixtralOffloadError(f"synthetic traces need num_experts >= 2 * top_k, got {num_experts}, {top_k}")
    if num_tokens < 1:
        raise MixtralOffloadError("synthetic traces need at least one token")
    rng = np.random.default_rng(seed)
    L, E, k = num_layers, num_experts, top_k
    target = target_repetition_rates(L)
    p_first = target.first
    p_other = np.clip(target.either - target.first, 0.0, 1.0) if k > 1 else np.zeros(L)
    log_pop = skew * rng.standard_normal((L, E))
    rows = np.arange(L)

    ids = np.empty((num_tokens, L, k), dtype=np.int16)
    for t in range(num_tokens):
        noisy = log_pop + rng.gumbel(size=(L, E))  # Gumbel-max: argmax samples from the popularity
        if t == 0:
            ids[0] = np.argsort(-noisy, axis=1)[:, :k]
            continue
        prev = ids[t - 1].astype(np.int64)
        excl_prev = noisy.copy()
        excl_prev[rows[:, None], prev] = -np.inf
        fresh = np.argsort(-excl_prev, axis=1)  # [L, E] best picks avoiding all previous experts
        chosen = fresh[:, :k].copy()
        u = rng.random(L)
        keep_first = u < p_first
        keep_other = ~keep_first & (u < p_first + p_other)
        if k == 1:
            chosen[keep_first, 0] = prev[keep_first, 0]
        else:
            excl_first = noisy.copy()
            excl_first[rows, prev[:, 0]] = -np.inf
            after_first = np.argsort(-excl_first, axis=1)[:, : k - 1]
            chosen[keep_first, 0] = prev[keep_first, 0]
            chosen[keep_first, 1:] = after_first[keep_first]
            # keep one previous expert in a rank other than (first -> first), uniformly among three
            how = rng.integers(0, 3, size=L)
            a = keep_other & (how == 0)  # previous second becomes first
            chosen[a, 0] = prev[a, 1]
            b = keep_other & (how == 1)  # previous first becomes second
            chosen[b, 1] = prev[b, 0]
            c = keep_other & (how == 2)  # previous second stays second
            chosen[c, 1] = prev[c, 1]
        ids[t] = chosen

    # Router logits: the chosen experts lead, in rank order; the rest are noise below them.
    logits, chosen_logits = _leading_logits(ids, E, rng)
    gates = _softmax(chosen_logits)
    probs = _softmax(logits) if with_probs else None
    predicted = hints = None
    if predict_recall is not None:
        predicted = noisy_predictions(ids, E, predict_recall, rng)
        hints = np.zeros((num_tokens, L, E), dtype=np.float32)
        hints[:, :-1] = _softmax(_leading_logits(predicted[:, :-1], E, rng)[0])
    source = f"synthetic(seed={seed}, skew={skew}, calibrated=mixtral-paper)"
    return RoutingTrace(ids, gates, E, probs=probs, predicted_next=predicted, hint_probs=hints, source=source)


def _leading_logits(ids: np.ndarray, num_experts: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Router logits [T, L, E] in which the experts `ids` [T, L, k] lead in rank order (the rest are
    Gaussian noise below them), and the leading logits alone [T, L, k]."""
    logits = rng.standard_normal(ids.shape[:2] + (num_experts,)).astype(np.float32)
    steps = np.abs(rng.normal(0.0, 1.0, size=ids.shape)).astype(np.float32)
    steps[..., 0] *= 1.5
    leading = logits.max(axis=2)[..., None] + np.cumsum(steps[..., ::-1], axis=2)[..., ::-1] + 1e-3
    np.put_along_axis(logits, ids.astype(np.int64), leading, axis=2)
    return logits, leading


def _softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(axis=-1, keepdims=True))
    return (z / z.sum(axis=-1, keepdims=True)).astype(np.float32)


def noisy_predictions(ids: np.ndarray, num_experts: int, recall: float, rng: np.random.Generator) -> np.ndarray:
    """Guesses for layer l + 1 at each layer l: each true expert kept with probability `recall`,
    otherwise replaced by a wrong one."""
    T, L, k = ids.shape
    nxt = ids[:, 1:].astype(np.int64)  # [T, L-1, k]
    noise = rng.random((T, L - 1, num_experts))
    np.put_along_axis(noise, nxt, np.inf, axis=2)
    wrong = np.argsort(noise, axis=2)[..., :k]  # distinct experts not among the true ones
    keep = rng.random((T, L - 1, k)) < recall
    predicted = np.full((T, L, k), -1, dtype=np.int16)
    predicted[:, :-1] = np.where(keep, nxt, wrong)
    return predicted
