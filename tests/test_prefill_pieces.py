"""A prompt fed layer by layer in pieces: the logits of one forward per piece, each expert read once."""
from collections import Counter

import torch
from test_prompt_reads import LoggingExperts, LoggingSlots

from mixtral_offload.cache.expert_cache import ExpertCache
from mixtral_offload.offload.loading import load
from mixtral_offload.quant.kernels import expert_kernel

IDS = [1, 415, 5565, 302, 4843, 349, 5465, 28723, 330, 1215, 2, 871, 3067, 754, 272, 8765, 28725, 1346, 369,
       28705, 1094, 1188, 9034, 28723]  # 24 tokens: 3 pieces of 8
PIECE = 8


def piece_by_piece(runtime):
    """Chunk-major: one forward per piece, each through every layer; logits of every prompt position."""
    runtime.reset()
    return torch.cat([runtime._forward(IDS[a:a + PIECE]) for a in range(0, len(IDS), PIECE)])


def layer_by_layer(runtime):
    """Layer-major: every piece through layer l before layer l + 1."""
    runtime.reset()
    return runtime._forward(IDS, chunk=PIECE)


def test_layer_major_pieces_give_the_logits_and_cache_of_one_forward_per_piece(converted_int4):
    runtime = load(converted_int4, dtype="float32")
    expected = piece_by_piece(runtime)
    expected_next = runtime._forward([28705])
    keys, values = (cache[:, :, :len(IDS) + 1].clone() for cache in (runtime.model.k_cache, runtime.model.v_cache))
    assert torch.equal(layer_by_layer(runtime), expected)
    assert torch.equal(runtime._forward([28705]), expected_next)
    assert torch.equal(runtime.model.k_cache[:, :, :len(IDS) + 1], keys)
    assert torch.equal(runtime.model.v_cache[:, :, :len(IDS) + 1], values)


def test_layer_major_pieces_read_each_expert_once_under_a_budget(converted_int4):
    runtime = load(converted_int4, dtype="float32")
    logged = runtime.model.experts = LoggingExperts(runtime.model.experts)
    expected = piece_by_piece(runtime)
    pool = logged.backend.source
    kernel = expert_kernel(pool.spec, pool.args.hidden_size, pool.args.intermediate_size, "int8")
    reads = {}
    for name, feed in (("pieces", piece_by_piece), ("layers", layer_by_layer)):
        slots = LoggingSlots(pool, 12, kernel)  # 12 of the 32 experts: a layer and a half
        cache = ExpertCache(pool, 4, 2, slots, policy="gate", prefetch=2)
        runtime.model.experts, runtime.model.prefetch_hints = cache, True
        assert torch.equal(feed(runtime)[-1], expected[-1])
        cache.close()
        reads[name] = Counter(slots.fills)
    needed = set(logged.used)
    assert max(reads["layers"].values()) == 1 and set(reads["layers"]) >= needed  # every needed expert, once
    # 26 needed; one guessed expert no piece used is read too unless its read is dropped before it begins
    assert len(needed) == 26 and len(reads["layers"]) in (26, 27)
    assert sum(reads["pieces"].values()) >= 2 * len(needed)  # one forward per piece reads most experts per piece
