"""--miss-bits: cache misses computed from the pool's low-bit copy, against references built here."""
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mixtral_offload.cache.expert_cache import ExpertCache, HostSlots
from mixtral_offload.cache.lowbit_misses import LowBitMisses
from mixtral_offload.cache.miss_choice import AUTO, EVERY_MISS, MOST, MissRule, group_ranks, guessed_low_bit
from mixtral_offload.cache.source import page_rounded
from mixtral_offload.cli.main import cli
from mixtral_offload.config import ModelArgs
from mixtral_offload.errors import MixtralOffloadError
from mixtral_offload.offload.loading import load
from mixtral_offload.offload.memory_plan import plan_memory
from mixtral_offload.offload.model import group_tokens
from mixtral_offload.offload.store.pool import ExpertPool
from mixtral_offload.offload.store.synthetic import write_synthetic
from mixtral_offload.profile_report import build_profile, summary_tables
from mixtral_offload.profiling import Profiler
from mixtral_offload.quant import dequantize, expert_forward
from mixtral_offload.quant.kernels import expert_kernel

from checkpoints import mixtral_tokenizer_path

ARGS = ModelArgs(vocab_size=32000, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256)
IDS = [1, 415, 2936, 9060, 285, 1461, 10575, 754, 272, 17898, 3914, 28723, 330, 1215]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Model directories by low-bit copy: None (no copy), 2 and 3, all with the same full copy."""
    root = tmp_path_factory.mktemp("miss-bits")
    out = {}
    for bits in (None, 2, 3):
        out[bits] = root / f"miss{bits}"
        write_synthetic(out[bits], ARGS, tokenizer=mixtral_tokenizer_path(), miss_bits=bits, progress=False)
    return out


def swiglu_reference(w1, w3, w2, x):
    """The NumPy reference of one expert on the dequantized low-bit weights, float64."""
    a, b = x @ dequantize(w1).T.astype(np.float64), x @ dequantize(w3).T.astype(np.float64)
    return (a / (1 + np.exp(-a)) * b) @ dequantize(w2).T.astype(np.float64)


def test_the_rule():
    weights, ranks = np.array([0.2, 0.25], np.float32), np.array([2, 2])
    assert MissRule(0.3).low_bit(weights, ranks)
    assert not MissRule(0.25).low_bit(weights, ranks)          # below, not at, the threshold
    assert not MissRule(0.3).low_bit(weights, np.array([2, 1]))  # one token's first choice: full copy
    assert not MissRule(0.3).low_bit(np.array([0.2, 0.35], np.float32), ranks)
    assert EVERY_MISS.low_bit(np.array([0.9], np.float32), np.array([1]))
    assert AUTO.min_rank == 2 and AUTO.max_gate <= 0.5
    ids = np.array([[3, 1], [1, 0], [2, 3]])
    np.testing.assert_array_equal(group_ranks(ids, np.array([0, 1]), 1), [2, 1])
    np.testing.assert_array_equal(group_ranks(ids, np.array([0, 2]), 3), [1, 2])


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("activations", ["float32", "int8"])
def test_low_bit_misses_compute_the_low_bit_expert(models, bits, activations):
    """Misses through EVERY_MISS fill free slots first (they evict nothing); once the slots are full every
    miss equals the int2/int3 NumPy reference (float32 x) or the checked int8 entry point."""
    full, miss = ExpertPool.open(models[bits]), ExpertPool.open(models[bits], "miss")
    args = full.args
    kernel = expert_kernel(full.spec, args.hidden_size, args.intermediate_size, activations)
    miss_kernel = expert_kernel(miss.spec, args.hidden_size, args.intermediate_size, activations)
    cache = ExpertCache(full, 2, 2, HostSlots(full, 2, kernel), policy="lru",
                        low_bit=LowBitMisses(miss, miss_kernel, EVERY_MISS, buffers=1))
    x = torch.from_numpy(np.random.default_rng(bits).standard_normal((5, args.hidden_size)).astype(np.float32))
    list(cache.run(0, x[:1], group_tokens(torch.tensor([[0, 1]]), torch.full((1, 2), 0.5))))
    assert cache.stats.low_bit == 0 and cache.stats.bytes_read == 2 * full.block_nbytes  # the two free slots
    ids = torch.tensor([[0, 1], [1, 2], [3, 0], [2, 1], [0, 3]])
    routing = group_tokens(ids, torch.full((5, 2), 0.5))
    outputs = dict((group.expert, y) for group, y in cache.run(1, x, routing))
    assert sorted(outputs) == [0, 1, 2, 3] and cache.stats.low_bit == 4 and cache.stats.bytes_read == 2 * full.block_nbytes
    assert cache.stats.low_bit_bytes == 4 * miss.block_nbytes
    for group in routing.groups:
        xs = x.numpy()[group.rows]
        matrices = miss.mapped((1, group.expert))
        if activations == "float32":
            expected = swiglu_reference(*matrices, xs.astype(np.float64))
            np.testing.assert_allclose(outputs[group.expert].numpy(), expected, rtol=1e-5,
                                       atol=1e-5 * np.abs(expected).max())
        else:
            np.testing.assert_array_equal(outputs[group.expert].numpy(), expert_forward(*matrices, xs, activations))
    cache.close()


def test_guesses_are_judged_as_the_routing_will_be():
    guess = np.array([[0.5, 0.3, 0.1, 0.1], [0.2, 0.45, 0.3, 0.05]], np.float32)
    # token 0: 0 (0.625), 1 (0.375); token 1: 1 (0.6), 2 (0.4)
    assert guessed_low_bit(MissRule(0.4), guess, 2) == set()        # 1 is token 1's first choice
    assert guessed_low_bit(MissRule(0.4, min_rank=1), guess, 2) == set()  # 2 is at 0.4, not below
    assert guessed_low_bit(MissRule(0.41), guess, 2) == {2}
    assert guessed_low_bit(EVERY_MISS, guess, 2) == {0, 1, 2}       # 3 is in no token's top 2
    assert guessed_low_bit(MissRule(0.4), guess[:0], 2) == set()


def test_prefetch_reads_the_copy_the_rule_will_use(models):
    """With every miss low-bit and the slots full, the next layer's guesses are read ahead from the
    low-bit copy (no full read at all); used ones are computed from it, the others counted as waste."""
    full, miss = ExpertPool.open(models[2]), ExpertPool.open(models[2], "miss")
    kernel = expert_kernel(miss.spec, ARGS.hidden_size, ARGS.intermediate_size, "int8")
    cache = ExpertCache(full, 2, 2, HostSlots(full, 4, kernel), policy="lru", prefetch=2,
                        low_bit=LowBitMisses(miss, kernel, EVERY_MISS, buffers=2))
    profiler = Profiler()
    cache.set_profiler(profiler)
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((2, ARGS.hidden_size)).astype(np.float32))
    layer0 = group_tokens(torch.tensor([[0, 1]]), torch.full((1, 2), 0.5))
    list(cache.run(0, x, group_tokens(torch.tensor([[0, 1], [2, 3]]), torch.full((2, 2), 0.5))))  # fills the slots
    stats, filled = cache.stats, 4 * full.block_nbytes
    for guessed, ids, used in ((2, 3), [[0, 2], [3, 0]], {2, 3}), ((0, 1), [[1, 3]], {1}):
        probs = torch.full((1, 4), 0.01)
        probs[0, list(guessed)] = torch.tensor([0.5, 0.47])
        cache.hint(1, probs)
        list(cache.run(0, x[:1], layer0))  # hits; starts the low-bit reads of the guesses
        assert stats.prefetches == 0 and set(cache.low_bit.reading) == {(1, e) for e in guessed}
        routing = group_tokens(torch.tensor(ids), torch.full((len(ids), 2), 0.5))
        outputs = [(group.expert, y) for group, y in cache.run(1, x[:len(ids)], routing)]
        assert {e for e, _ in outputs[:len(used)]} == used  # computed first: what was read ahead
        for expert, y in outputs:
            rows = routing.groups[[g.expert for g in routing.groups].index(expert)].rows
            np.testing.assert_array_equal(y.numpy(), expert_forward(*miss.mapped((1, expert)), x.numpy()[rows], "int8"))
    assert (stats.low_bit_prefetches, stats.low_bit_prefetch_hits, stats.low_bit_prefetch_waste) == (4, 3, 1)
    assert stats.low_bit == 5 and stats.bytes_read == filled and stats.misses == [4, 5]
    assert stats.low_bit_bytes == (stats.low_bit + stats.low_bit_prefetch_waste) * miss.block_nbytes
    cache.close()
    profiler.token("decode")
    report = summary_tables(build_profile(profiler, command="test", model="m"))
    assert [line.split() for line in report.splitlines() if "read ahead" in line] == [
        ["low-bit", "copies", "read", "ahead", "4", "(1", "unused)"]]


def test_an_abandoned_layer_leaves_no_buffer_behind(models):
    """A forward pass given up halfway (an interrupt) leaves reads in flight; the next layer still runs."""
    full, miss = ExpertPool.open(models[2]), ExpertPool.open(models[2], "miss")
    kernel = expert_kernel(miss.spec, ARGS.hidden_size, ARGS.intermediate_size, "int8")
    cache = ExpertCache(full, 2, 2, HostSlots(full, 2, kernel), policy="lru",
                        low_bit=LowBitMisses(miss, kernel, EVERY_MISS, buffers=2))
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, ARGS.hidden_size)).astype(np.float32))
    routing = group_tokens(torch.tensor([[0, 1], [2, 3]]), torch.full((2, 2), 0.5))
    next(iter(cache.run(0, x, routing)))  # one of four experts computed, two reads in flight, one queued
    outputs = dict((group.expert, y) for group, y in cache.run(1, x, routing))
    for group in routing.groups:
        np.testing.assert_array_equal(outputs[group.expert].numpy(),
                                      expert_forward(*miss.mapped((1, group.expert)), x.numpy()[group.rows], "int8"))
    assert sorted(cache.low_bit.free) == [0, 1] and not cache.low_bit.reading
    cache.close()


class Reconstructed:
    """An ExpertBackend computing every expert where it lies: from the low-bit copy where `low` says
    (call index, key), from the full copy otherwise."""

    stats, decode_threads = None, None

    def __init__(self, full, miss, low: set):
        self.sources = {False: full, True: miss}
        self.kernels = {k: expert_kernel(s.spec, s.args.hidden_size, s.args.intermediate_size, "int8")
                        for k, s in self.sources.items()}
        self.low, self.calls = low, 0

    def run(self, layer, x, routing):
        call, self.calls = self.calls, self.calls + 1
        for group in routing.groups:
            low = (call, (layer, group.expert)) in self.low
            xs = np.ascontiguousarray(x.float().numpy()[group.rows])
            yield group, torch.from_numpy(self.kernels[low](*self.sources[low].mapped((layer, group.expert)), xs))

    def hint(self, layer, probs):
        pass

    def set_profiler(self, profiler):
        pass


def teacher_forced(runtime) -> np.ndarray:
    """Logits after a 4-token prompt and after each further token, fed one at a time."""
    rows = [runtime._forward(IDS[:4], last_only=True)[-1]]
    rows += [runtime._forward([token], last_only=True)[-1] for token in IDS[4:]]
    return torch.stack(rows).float().numpy()


@pytest.mark.parametrize("miss_bits", ["auto", "most"])
def test_budgeted_run_equals_the_run_it_chose(models, miss_bits):
    """A budgeted run with --miss-bits auto|most equals a run built here that computes the experts the cache
    sent to the low-bit copy from that copy and every other expert from the full copy."""
    runtime = load(models[2], dtype="float32", experts_fraction=0.5, miss_bits=miss_bits)
    cache = runtime.model.experts
    assert cache.low_bit.rule == (AUTO if miss_bits == "auto" else MOST)
    if miss_bits == "auto":  # random routers give gate weights near 1/2: a threshold just below lets second choices through
        cache.low_bit.rule = MissRule(max_gate=0.499)
    calls, low = [0], set()
    run, low_run = cache.run, cache.low_bit.run

    def counting_run(layer, x, routing):
        yield from run(layer, x, routing)
        calls[0] += 1

    def recording_run(key, *rest):
        low.add((calls[0], key))
        return low_run(key, *rest)

    cache.run, cache.low_bit.run = counting_run, recording_run
    budgeted = teacher_forced(runtime)
    assert 0 < len(low) < sum(cache.stats.misses) and cache.stats.low_bit == len(low)
    reference = load(models[2], dtype="float32")
    full, miss = reference.model.experts.source, ExpertPool.open(models[2], "miss")
    outputs = {}
    for name, chosen in (("reconstructed", low), ("full copy only", set())):
        reference.reset()
        reference.model.experts = Reconstructed(full, miss, chosen)
        outputs[name] = teacher_forced(reference)
    scale = np.abs(budgeted).max()
    np.testing.assert_allclose(budgeted, outputs["reconstructed"], rtol=0, atol=1e-5 * scale)
    assert np.abs(budgeted - outputs["full copy only"]).max() > 1e-3 * scale  # the low-bit copy mattered
    cache.close()


def test_memory_plan_counts_the_buffers(models):
    sizes = dict(args=ARGS, dense_bytes=1 << 20, slot_bytes=1 << 20, max_context=64, itemsize=4, chunk=16,
                 prefetch=2, baseline=100 << 20)
    fixed = plan_memory(budget=1 << 30, **sizes).fixed
    budget = fixed + (5 << 20) + (300 << 10)  # five slots and a bit: two 300 KiB buffers cost one slot
    plain, with_buffers = plan_memory(budget=budget, **sizes), plan_memory(budget=budget, **sizes, scratch_bytes=300 << 10)
    assert with_buffers.scratch == 2 * (300 << 10) and with_buffers.fixed == plain.fixed + (600 << 10)
    assert (plain.slots, with_buffers.slots) == (5, 4)
    assert "low-bit miss buffers: 2 x 300.00 KiB" in with_buffers.describe()
    assert "low-bit" not in plain.describe()
    runtime = load(models[3], experts_fraction=0.5, miss_bits="3")
    miss = runtime.model.experts.low_bit.source
    assert runtime.memory_plan.scratch == 2 * page_rounded(miss.block_nbytes)
    assert load(models[3], experts_fraction=0.5, miss_bits="off").memory_plan.scratch == 0  # no buffers
    assert load(models[None], experts_fraction=0.5, miss_bits="auto").model.experts.low_bit is None


@pytest.mark.parametrize("bits,argv,message", [
    (None, ["-m", "2GiB", "--miss-bits", "2"], "has none: convert or synth it with --miss-bits 2"),
    (None, ["-m", "2GiB", "--miss-bits", "most"], "has none: convert or synth it with --miss-bits 2|3"),
    (2, ["-m", "2GiB", "--miss-bits", "3"], "its low-bit copy is int2: use --miss-bits 2 or auto"),
    (2, ["--miss-bits", "2"], "--miss-bits 2 computes expert cache misses with the CPU kernels: give --memory-budget"),
])
def test_cli_refuses_in_one_line(models, bits, argv, message):
    result = CliRunner().invoke(cli, ["generate", str(models[bits]), "-p", "Hi", "-n", "2", *argv])
    assert result.exit_code == 1 and result.exception is not None and not isinstance(result.exception, MixtralOffloadError)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.output


def test_verbose_shows_the_buffers(models):
    result = CliRunner().invoke(cli, ["generate", str(models[2]), "-p", "Hi", "-n", "2", "-m", "2GiB", "--miss-bits", "2",
                                      "-v"])
    assert result.exit_code == 0, result.output
    assert "low-bit miss buffers: 2 x 120.00 KiB" in result.output


def test_profile_and_report_count_low_bit_reads(models, tmp_path):
    from mixtral_offload.cli.report import profiling

    runtime = load(models[2], experts_fraction=0.5, miss_bits="most")  # random routers rarely pass the default rule
    profile = tmp_path / "run.json"
    with profiling(runtime, str(profile)):
        list(runtime.generate("Hello there", max_new_tokens=4))
    result = CliRunner().invoke(cli, ["report", str(profile)])
    assert result.exit_code == 0 and "of which low-bit copy" in result.output, result.output
    from mixtral_offload.profile_report import read_profile

    document = read_profile(profile)
    span = document["spans"]["lowbit_read"]
    counted = sum(row["value"] for row in document["counters"] if row["name"] == "lowbit_read_bytes")
    stats = runtime.cache_stats()
    assert span["count"] == stats.low_bit > 0 and span["bytes"] == counted == stats.low_bit_bytes
    assert stats.low_bit_bytes == stats.low_bit * runtime.model.experts.low_bit.source.block_nbytes
    assert document["spans"]["expert_lowbit"]["count"] == span["count"]
