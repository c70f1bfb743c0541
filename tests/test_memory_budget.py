"""--memory-budget: exact tokens under any budget, and a child process's peak RSS under the budget."""
import os
import re
import subprocess
import sys
import time

import pytest
from checkpoints import mixtral_tokenizer_path

from mixtral_offload.cache.expert_cache import ExpertCache, HostSlots
from mixtral_offload.cache.simulate import prefetch_recall
from mixtral_offload.config import ModelArgs
from mixtral_offload.errors import MixtralOffloadError
from mixtral_offload.offload.loading import load, open_gguf, warm_up_kernels
from mixtral_offload.offload.options import LoadOptions
from mixtral_offload.offload.store.pool import ExpertPool
from mixtral_offload.quant.kernels import expert_kernel
from mixtral_offload.offload.store.synthetic import write_synthetic

PROMPT = "The cache keeps the experts it will need again, and reads the rest from disk."


def tokens(runtime, n=12):
    return [r.token_id for r in runtime.generate(PROMPT, max_new_tokens=n)]


@pytest.mark.parametrize("policy", ["lru", "gate", "lfu"])
@pytest.mark.parametrize("slots,prefetch", [(2, 0), (4, 2), (6, 2), (12, 0), (32, 2)])
@pytest.mark.parametrize("activations", ["float32", "int8"])
def test_cached_runs_give_the_same_tokens(converted_int4, policy, slots, prefetch, activations):
    runtime = load(converted_int4, dtype="float32", activations=activations)
    expected = tokens(runtime)
    pool = runtime.model.experts.source
    kernel = expert_kernel(pool.spec, pool.args.hidden_size, pool.args.intermediate_size, activations)
    cache = ExpertCache(pool, 4, 2, HostSlots(pool, slots, kernel), policy=policy, prefetch=prefetch)
    runtime.model.experts, runtime.model.prefetch_hints = cache, prefetch > 0
    runtime.reset()
    assert tokens(runtime) == expected
    cache.close()
    stats = cache.stats
    assert sum(stats.hits) + sum(stats.misses) > 0
    assert stats.prefetch_hits + stats.prefetch_waste <= stats.prefetches
    if slots == 32:  # everything fits: only the first touch of each expert misses
        assert sum(stats.misses) <= 32 and stats.hit_rate > 0.5


def test_budget_through_load_and_trace(converted_int4):
    expected = tokens(load(converted_int4, dtype="float32"))
    runtime = load(converted_int4, dtype="float32", memory_budget="2GiB", record_trace=True)
    assert isinstance(runtime.model.experts, ExpertCache)
    assert tokens(runtime) == expected
    trace = runtime.model.experts.recorder.to_trace()
    assert trace.num_layers == 4 and trace.top_k == 2
    assert trace.num_tokens == len(runtime.tokenizer.encode(PROMPT)) + 11
    assert trace.predicted_next.shape == (trace.num_tokens, 4, 2)
    assert 0.0 <= prefetch_recall(trace) <= 1.0
    assert runtime.cache_stats().hit_rate > 0


def test_budget_below_minimum_names_the_minimum(converted_int4):
    with pytest.raises(MixtralOffloadError, match=r"below the minimum of [\d.]+ [MG]iB"):
        load(converted_int4, memory_budget="100MB")


def test_budget_needs_a_converted_model(tiny_checkpoint):
    with pytest.raises(MixtralOffloadError, match="convert"):
        load(tiny_checkpoint[0], memory_budget="4GiB")


def peak_rss_of(args):
    """Run a child process; return (exit code, stdout+stderr, its peak RSS in bytes).

    The peak is the kernel's high-water mark of the child's own address space: GNU time's %M when
    /usr/bin/time exists, else VmHWM polled from /proc. (The rusage that wait4 returns is no good
    here: a forked child's maximum RSS starts at its parent's, this 1 GB pytest process's, before exec.)
    """
    if os.path.exists("/usr/bin/time"):
        proc = subprocess.run(["/usr/bin/time", "-f", "peak-rss-kb %M", *args], capture_output=True, text=True)
        lines = proc.stderr.splitlines()
        peak_kb = int(lines[-1].split()[-1])
        return proc.returncode, proc.stdout + "\n".join(lines[:-1]), peak_kb * 1024
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak_kb = 0
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as status:
                peak_kb = max([peak_kb] + [int(l.split()[1]) for l in status if l.startswith("VmHWM")])
        except OSError:
            break
        time.sleep(0.01)
    output = proc.stdout.read()
    return proc.wait(), output, peak_kb * 1024


@pytest.fixture(scope="module")
def big_pool(tmp_path_factory):
    """A synthetic int4 model whose pool (~430 MB) is far larger than the room a small budget leaves."""
    out = tmp_path_factory.mktemp("synth") / "model"
    args = ModelArgs(hidden_size=512, intermediate_size=4096, num_hidden_layers=16, num_attention_heads=8,
                     num_key_value_heads=2, max_position_embeddings=1024)
    write_synthetic(out, args, bits=4, tokenizer=mixtral_tokenizer_path(), progress=False)
    with ExpertPool.open(out) as pool:  # compile into Numba's on-disk cache, so the child only loads kernels
        warm_up_kernels(pool, expert_kernel(pool.spec, args.hidden_size, args.intermediate_size, "int8"),
                        dense_activations="int8")
    return out


@pytest.mark.parametrize("dense", ["stored", "int8"])
def test_child_peak_rss_stays_under_budget(big_pool, dense):
    budget_mb = 650
    code, output, peak = peak_rss_of([sys.executable, "-m", "mixtral_offload", "generate", str(big_pool),
                                      "-p", PROMPT, "-n", "6", "--max-context", "512", "-v",
                                      "--memory-budget", f"{budget_mb}MB", "--dense", dense])
    assert code == 0, output
    slots = re.search(r"expert slots: (\d+) x ([\d.]+) MiB", output)
    room = int(slots.group(1)) * float(slots.group(2)) * 2**20
    pool_bytes = (big_pool / "experts.pool").stat().st_size
    assert pool_bytes >= 3 * room, output       # the pool cannot simply all fit
    print(f"dense {dense}: peak RSS {peak / 1e6:.0f} MB, {slots.group(1)} slots, budget {budget_mb} MB")
    assert peak <= budget_mb * 10**6, f"peak RSS {peak / 1e6:.0f} MB over the {budget_mb} MB budget\n{output}"


@pytest.fixture(scope="module")
def big_gguf(tmp_path_factory):
    """A random Q4_0 GGUF of the same geometry: its experts (~450 MB) stay in the file, read on misses."""
    import gguf
    from gguf_files import write_random_gguf

    config = dict(hidden_size=512, intermediate_size=4096, num_hidden_layers=16, num_attention_heads=8,
                  num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000,
                  max_position_embeddings=1024, rms_norm_eps=1e-5, rope_theta=1e6)
    path = write_random_gguf(tmp_path_factory.mktemp("gguf") / "big.gguf", config, mixtral_tokenizer_path(),
                             gguf.GGMLQuantizationType.Q4_0)
    files = open_gguf(path, LoadOptions())  # compile into Numba's on-disk cache, as for big_pool
    warm_up_kernels(files.source, files.kernel, dense_activations="int8")
    return path


def test_child_peak_rss_stays_under_budget_with_gguf_experts(big_gguf):
    budget_mb = 800  # the GGUF's vocabulary metadata raises the baseline by ~130 MB over a pool's
    code, output, peak = peak_rss_of([sys.executable, "-m", "mixtral_offload", "generate", str(big_gguf),
                                      "-p", PROMPT, "-n", "6", "--max-context", "512", "-v",
                                      "--memory-budget", f"{budget_mb}MB"])
    assert code == 0, output
    slots = re.search(r"expert slots: (\d+) x ([\d.]+) MiB", output)
    room = int(slots.group(1)) * float(slots.group(2)) * 2**20
    assert big_gguf.stat().st_size >= 3 * room, output       # the experts cannot simply all fit
    print(f"GGUF: peak RSS {peak / 1e6:.0f} MB, {slots.group(1)} slots, budget {budget_mb} MB")
    assert peak <= budget_mb * 10**6, f"peak RSS {peak / 1e6:.0f} MB over the {budget_mb} MB budget\n{output}"


def test_child_refuses_too_small_budget(big_pool):
    code, output, _ = peak_rss_of([sys.executable, "-m", "mixtral_offload", "generate", str(big_pool),
                                   "-p", "Hi", "--memory-budget", "300MB"])
    assert code == 1 and "below the minimum of" in output and "Traceback" not in output
