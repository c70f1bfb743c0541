"""The float path must equal transformers' MixtralForCausalLM on random checkpoints in HF layout."""
import json

import pytest
import torch
from checkpoints import write_checkpoint

from mixtral_offload.offload.loading import load

CONFIGS = {
    "tiny-sharded": dict(shard_size="300KB"),
    "mha-3-experts-top1": dict(num_attention_heads=4, num_key_value_heads=4, num_local_experts=3, num_experts_per_tok=1),
    "head-dim-32-gqa4": dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                             num_local_experts=8, num_experts_per_tok=2, num_hidden_layers=3),
    "top3-single-file": dict(num_local_experts=6, num_experts_per_tok=3),
}
PROMPT = [1, 415, 5565, 302, 4843, 349, 5465, 28723, 330, 1215, 2]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_and_decode_logits_match(tmp_path, name):
    config = dict(CONFIGS[name])
    hf = write_checkpoint(tmp_path, seed=len(name), **config)
    runtime = load(tmp_path, dtype="float32")
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        expected = hf(ids).logits[0]
    assert relative_error(runtime.logits(PROMPT), expected) < 1e-4
    runtime.reset()  # a prefill layer by layer in pieces of 3 tokens
    assert relative_error(runtime._forward(PROMPT, chunk=3), expected) < 1e-4
    # prefill a prefix, then decode one token at a time through the KV cache
    runtime.reset()
    got = [runtime._forward(PROMPT[:4])]
    got += [runtime._forward([token]) for token in PROMPT[4:]]
    assert relative_error(torch.cat(got), expected) < 1e-4


def test_greedy_continuation_equals_transformers(tiny_checkpoint):
    path, hf = tiny_checkpoint
    runtime = load(path)
    prompt = PROMPT[:6]
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
    expected = out[0, len(prompt):].tolist()
    got = [r.token_id for r in runtime.generate(prompt, max_new_tokens=24)]
    # our run stops early only if it hits </s>; transformers was told not to stop
    assert got == expected[:len(got)] and len(got) >= 1


def test_perplexity_matches_transformers(tiny_checkpoint):
    path, hf = tiny_checkpoint
    runtime = load(path)
    text = "The quick brown fox jumps over the lazy dog. " * 3
    ids = runtime.tokenizer.encode(text)
    with torch.no_grad():
        loss = hf(torch.tensor([ids]), labels=torch.tensor([ids])).loss
    result = runtime.perplexity(text)
    assert result.tokens == len(ids) - 1
    assert abs(result.perplexity - float(torch.exp(loss))) / float(torch.exp(loss)) < 1e-4


def test_bfloat16_checkpoint_and_original_config_keys(tmp_path):
    from transformers import MixtralForCausalLM

    write_checkpoint(tmp_path, dtype=torch.bfloat16)
    # the reference reads the bf16 file into float32 itself (a bf16 model cast to float would
    # carry a bf16-rounded RoPE table)
    hf = MixtralForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    config = json.loads((tmp_path / "config.json").read_text())
    # rewrite in the original Mixtral spelling: top-level rope_theta and torch_dtype
    config["rope_theta"] = config.pop("rope_parameters")["rope_theta"]
    config["torch_dtype"] = config.pop("dtype")
    (tmp_path / "config.json").write_text(json.dumps(config))
    runtime = load(tmp_path, dtype="float32")
    with torch.no_grad():
        expected = hf(torch.tensor([PROMPT])).logits[0]
    assert relative_error(runtime.logits(PROMPT), expected) < 1e-4
    runtime.reset()  # a prefill layer by layer in pieces of 3 tokens
    assert relative_error(runtime._forward(PROMPT, chunk=3), expected) < 1e-4


def test_bfloat16_compute_close_to_float32(tiny_checkpoint):
    path, _ = tiny_checkpoint
    fp32 = load(path, dtype="float32").logits(PROMPT)
    bf16 = load(path, dtype="bfloat16").logits(PROMPT)
    assert relative_error(bf16, fp32) < 0.05
