#!/usr/bin/env python3
"""Train, save and evaluate the embedded demo Mixtral model (dev-only).

Needs torch, sentencepiece, safetensors and ``transformers>=5`` (dev-only
dependencies; the runtime itself does not use transformers). Run
``scripts/demo_corpus.py`` first: it writes ``runs/demo/corpus/train.txt``,
``runs/demo/heldout.txt`` and ``runs/demo/tokenizer.model``.

  python scripts/train_demo.py train [--steps N] [--max-minutes M]
  python scripts/train_demo.py eval  [--ckpt runs/demo/hf]
  python scripts/train_demo.py bench            # time a few steps

``train`` writes ``runs/demo/hf/`` as a complete HF Mixtral checkpoint in the
original per-expert layout (``model.layers.N.block_sparse_moe.gate.weight``,
``...experts.E.w1/w2/w3.weight``), float32 safetensors, plus
``tokenizer.model``. transformers 5 keeps experts fused in memory
(``mlp.experts.gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]);
``to_original_layout`` splits them (w1 = first I rows of gate_up, w3 = the
last I rows, w2 = down_proj[e]). transformers 5 reads that layout back.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import time

import numpy as np
import torch

OUT = "runs/demo"
DOC_SEP = "\n\f\n"
SEQ = 256

CONFIG = dict(
    vocab_size=8192,
    hidden_size=256,
    intermediate_size=640,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=32,
    hidden_act="silu",
    max_position_embeddings=1024,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    num_local_experts=8,
    num_experts_per_tok=2,
    router_aux_loss_coef=0.02,
    output_router_logits=True,
    router_jitter_noise=0.0,
    tie_word_embeddings=False,
    sliding_window=None,
    bos_token_id=1,
    eos_token_id=2,
    initializer_range=0.02,
)


def make_config(vocab: int):
    from transformers import MixtralConfig
    kw = dict(CONFIG)
    kw["vocab_size"] = vocab
    theta = kw.pop("rope_theta")
    cfg = MixtralConfig(**kw, rope_parameters={"rope_type": "default", "rope_theta": theta})
    return cfg


def load_sp(path: str):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=path)
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2), "special ids"
    return sp


def train_stream(sp, out: str) -> np.ndarray:
    """Token stream of the training split: doc ids + </s> per document."""
    cache = os.path.join(out, "corpus", "train_ids.npy")
    src = os.path.join(out, "corpus", "train.txt")
    if os.path.exists(cache) and os.path.getmtime(cache) > os.path.getmtime(src):
        return np.load(cache)
    with open(src, encoding="utf-8") as fh:
        docs = fh.read().split(DOC_SEP)
    ids: list[int] = []
    for d in docs:
        d = d.strip()
        if d:
            ids += sp.encode(d) + [sp.eos_id()]
    arr = np.asarray(ids, dtype=np.int16 if sp.get_piece_size() < 32768 else np.int32)
    np.save(cache, arr)
    return arr


def heldout_ids(sp, out: str) -> list[int]:
    with open(os.path.join(out, "heldout.txt"), encoding="utf-8") as fh:
        return sp.encode(fh.read())


def count_params(cfg) -> tuple[int, int]:
    """(total, active per token) parameter counts of a Mixtral config."""
    H, I, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    hd = cfg.head_dim or H // cfg.num_attention_heads
    attn = H * hd * cfg.num_attention_heads * 2 + H * hd * cfg.num_key_value_heads * 2
    expert = 3 * H * I
    router = H * cfg.num_local_experts
    norms = 2 * H
    per_layer_total = attn + router + norms + cfg.num_local_experts * expert
    per_layer_active = attn + router + norms + cfg.num_experts_per_tok * expert
    emb = V * H * (1 if cfg.tie_word_embeddings else 2)
    return L * per_layer_total + emb + H, L * per_layer_active + emb + H


# ---------------------------------------------------------------- saving
_FUSED = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")


def to_original_layout(state: dict, cfg) -> dict:
    """Map a transformers-5 Mixtral state dict to the original Mixtral names."""
    out = {}
    I = cfg.intermediate_size
    for k, v in state.items():
        v = v.detach().to(torch.float32).contiguous()
        m = _FUSED.match(k)
        if m:
            layer, what = m.groups()
            base = f"model.layers.{layer}.block_sparse_moe.experts"
            for e in range(v.shape[0]):
                if what == "gate_up_proj":
                    assert v.shape[1] == 2 * I
                    out[f"{base}.{e}.w1.weight"] = v[e, :I].clone()
                    out[f"{base}.{e}.w3.weight"] = v[e, I:].clone()
                else:
                    out[f"{base}.{e}.w2.weight"] = v[e].clone()
            continue
        k2 = re.sub(r"\.mlp\.gate\.weight$", ".block_sparse_moe.gate.weight", k)
        k2 = k2.replace(".mlp.gate.", ".block_sparse_moe.gate.")
        out[k2] = v.clone()
    return out


def save_checkpoint(model, tok_path: str, dst: str, extra: dict | None = None) -> None:
    from safetensors.torch import save_file
    os.makedirs(dst, exist_ok=True)
    cfg = model.config
    state = to_original_layout(model.state_dict(), cfg)
    bad = [k for k in state if ".mlp." in k or "gate_up_proj" in k]
    assert not bad, bad
    save_file(state, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    os.chmod(os.path.join(dst, "model.safetensors"), 0o644)
    cfg.save_pretrained(dst)
    # older readers (and the runtime's converter) look for rope_theta at top level
    p = os.path.join(dst, "config.json")
    with open(p) as fh:
        j = json.load(fh)
    j["model_type"] = "mixtral"
    j["architectures"] = ["MixtralForCausalLM"]
    j["rope_theta"] = float((j.get("rope_parameters") or {}).get("rope_theta", CONFIG["rope_theta"]))
    j["torch_dtype"] = "float32"
    j.pop("dtype", None)
    j["dtype"] = "float32"
    with open(p, "w") as fh:
        json.dump(j, fh, indent=2, sort_keys=True)
    shutil.copy(tok_path, os.path.join(dst, "tokenizer.model"))
    with open(os.path.join(dst, "generation_config.json"), "w") as fh:
        json.dump({"bos_token_id": 1, "eos_token_id": 2}, fh, indent=2)
    if extra:
        with open(os.path.join(dst, "training_info.json"), "w") as fh:
            json.dump(extra, fh, indent=2)


@torch.no_grad()
def check_roundtrip(model, ckpt: str) -> None:
    """Reload the saved per-expert checkpoint with transformers and compare
    logits with the in-memory model (checks the layout conversion)."""
    from transformers import MixtralForCausalLM
    model.eval()
    x = torch.tensor([[1, 100, 200, 300, 400, 500, 600, 700]]) % model.config.vocab_size
    ref = model(input_ids=x).logits
    got = MixtralForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()(input_ids=x).logits
    diff = float((ref - got).abs().max())
    print(f"round-trip max |logit diff| = {diff:.2e}", flush=True)
    assert diff < 1e-4, diff


# ---------------------------------------------------------------- training
def lr_at(step: int, progress: float, peak: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from peak to
    floor*peak as ``progress`` goes 0 -> 1."""
    if step < warmup:
        return peak * (step + 1) / warmup
    p = min(1.0, max(0.0, progress))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


def batch(stream: np.ndarray, bsz: int, rng: np.random.Generator) -> torch.Tensor:
    """bsz windows of <s> + SEQ-1 consecutive stream tokens (random offsets)."""
    starts = rng.integers(0, len(stream) - SEQ, size=bsz)
    x = np.empty((bsz, SEQ), dtype=np.int64)
    x[:, 0] = 1
    for i, s in enumerate(starts):
        x[i, 1:] = stream[s:s + SEQ - 1]
    return torch.from_numpy(x)


def build_model(vocab: int, seed: int):
    from transformers import MixtralForCausalLM
    torch.manual_seed(seed)
    cfg = make_config(vocab)
    model = MixtralForCausalLM(cfg)
    return model


def cmd_train(a) -> int:
    torch.set_num_threads(a.threads)
    sp = load_sp(os.path.join(a.out, "tokenizer.model"))
    stream = train_stream(sp, a.out)
    if a.init:  # continue from a saved checkpoint (e.g. a per-layer balance fine-tune)
        from transformers import MixtralForCausalLM
        torch.manual_seed(a.seed)
        model = MixtralForCausalLM.from_pretrained(a.init, dtype=torch.float32)
    else:
        model = build_model(sp.get_piece_size(), a.seed)
    cfg = model.config
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    total, active = count_params(cfg)
    real = sum(p.numel() for p in model.parameters())
    print(f"params total={real} (formula {total}) active/token={active} "
          f"train tokens={len(stream)}", flush=True)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    nodecay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": nodecay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95), eps=1e-8)
    rng = np.random.default_rng(a.seed)
    model.train()
    t0 = time.time()
    ema = None
    step = 0
    log = []
    # progress = the larger of the step fraction and the wall-time fraction, so
    # the cosine schedule completes within --max-minutes even on a busy machine
    budget = a.max_minutes * 60 if a.max_minutes else float("inf")
    t_warm = None
    for step in range(a.steps):
        el = time.time() - t0
        if step == a.warmup:
            t_warm = el
        tp = 0.0 if t_warm is None else (el - t_warm) / max(1.0, budget - t_warm)
        progress = max((step - a.warmup) / max(1, a.steps - a.warmup), tp)
        if step >= a.warmup and progress >= 1.0:
            print(f"stopping before step {step}: wall-time budget reached", flush=True)
            step -= 1
            break
        lr = lr_at(step, progress, a.lr, a.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        x = batch(stream, a.batch, rng)
        if a.aux == "pooled":
            outp = model(input_ids=x, labels=x, output_router_logits=True)
            # transformers' loss = lm loss + coef * aux, aux pooled over all layers
            loss = outp.loss
            aux = float(outp.aux_loss.detach()) if outp.aux_loss is not None else float("nan")
            lm = float(loss.detach()) - cfg.router_aux_loss_coef * aux
        else:
            # per-layer balance: mean over layers of the Switch/Mixtral loss
            outp = model(input_ids=x, output_router_logits=True)
            lm_t = torch.nn.functional.cross_entropy(
                outp.logits[:, :-1].reshape(-1, outp.logits.shape[-1]), x[:, 1:].reshape(-1))
            aux_t = sum(load_balancing_loss_func((r,), cfg.num_local_experts, cfg.num_experts_per_tok)
                        for r in outp.router_logits) / len(outp.router_logits)
            coef = a.aux_coef if a.aux_coef is not None else cfg.router_aux_loss_coef
            loss = lm_t + coef * aux_t
            lm, aux = float(lm_t.detach()), float(aux_t.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = lm if ema is None else 0.98 * ema + 0.02 * lm
        el = time.time() - t0
        if step % a.log_every == 0 or step == a.steps - 1:
            rec = dict(step=step, lm_loss=round(lm, 4), ema=round(ema, 4), aux=round(aux, 4),
                       lr=round(lr, 6), elapsed_s=round(el, 1),
                       tok_per_s=round((step + 1) * a.batch * SEQ / el, 1))
            log.append(rec)
            print(json.dumps(rec), flush=True)
    wall = time.time() - t0
    steps_done = step + 1
    info = dict(steps=steps_done, planned_steps=a.steps, batch=a.batch, seq_len=SEQ,
                tokens_seen=steps_done * a.batch * SEQ, wall_s=round(wall, 1),
                final_lm_loss_ema=round(ema, 4), peak_lr=a.lr, warmup=a.warmup,
                threads=a.threads, seed=a.seed, params_total=total,
                params_active_per_token=active, dtype="float32",
                train_stream_tokens=int(len(stream)), log=log)
    info.update(init=a.init, aux=a.aux, aux_coef=a.aux_coef)
    dst = a.save_dir or os.path.join(a.out, "hf")
    save_checkpoint(model, os.path.join(a.out, "tokenizer.model"), dst, info)
    print(json.dumps({k: v for k, v in info.items() if k != "log"}), flush=True)
    print("saved", dst, flush=True)
    check_roundtrip(model, dst)
    return 0


def cmd_bench(a) -> int:
    torch.set_num_threads(a.threads)
    model = build_model(CONFIG["vocab_size"], 0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    stream = rng.integers(3, CONFIG["vocab_size"], size=100_000).astype(np.int64)
    for i in range(a.steps):
        t = time.time()
        x = batch(stream, a.batch, rng)
        out = model(input_ids=x, labels=x, output_router_logits=True)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        dt = time.time() - t
        print(f"step {i} {dt:.2f}s {a.batch * SEQ / dt:.0f} tok/s", flush=True)
    return 0


# ---------------------------------------------------------------- eval
@torch.no_grad()
def model_nll(model, ids: list[int], seq: int = SEQ) -> tuple[float, int]:
    """Sum NLL (nats) over all tokens of ``ids``, scored in non-overlapping
    chunks of seq-1 tokens, each fed as <s> + chunk (teacher forced)."""
    tot, n = 0.0, 0
    step = seq - 1
    chunks = [ids[i:i + step] for i in range(0, len(ids), step)]
    for j in range(0, len(chunks), 8):
        group = chunks[j:j + 8]
        L = max(len(c) for c in group) + 1
        x = torch.zeros((len(group), L), dtype=torch.long)
        mask = torch.zeros((len(group), L), dtype=torch.long)
        for r, c in enumerate(group):
            x[r, 0] = 1
            x[r, 1:len(c) + 1] = torch.tensor(c)
            mask[r, :len(c) + 1] = 1
        logits = model(input_ids=x, attention_mask=mask).logits.float()
        lp = torch.log_softmax(logits[:, :-1], -1)
        tgt = x[:, 1:]
        tok_lp = lp.gather(-1, tgt[..., None])[..., 0]
        m = mask[:, 1:].bool()
        tot -= float(tok_lp[m].sum())
        n += int(m.sum())
    return tot, n


def unigram_nll(train: np.ndarray, ids: list[int], vocab: int) -> float:
    counts = np.bincount(train.astype(np.int64), minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[np.asarray(ids)].sum())


@torch.no_grad()
def greedy(model, sp, prompt: str, n: int = 40) -> str:
    ids = [1] + sp.encode(prompt)
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                         eos_token_id=2, pad_token_id=2)
    return sp.decode(out[0, len(ids):].tolist())


PROMPTS = [
    "The list data type has some more methods.",
    "To open a file for reading,",
    "An exception is raised when",
    "The Python interpreter",
    "This module provides",
]


def cmd_eval(a) -> int:
    from transformers import MixtralForCausalLM
    torch.set_num_threads(a.threads)
    sp = load_sp(os.path.join(a.ckpt, "tokenizer.model"))
    from safetensors import safe_open
    with safe_open(os.path.join(a.ckpt, "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    print("saved keys:", len(keys), "e.g.", [k for k in keys if "experts.0." in k][:3],
          [k for k in keys if "gate" in k][:1])
    model = MixtralForCausalLM.from_pretrained(a.ckpt, dtype=torch.float32)
    model.eval()
    held = heldout_ids(sp, a.out)
    nll, n = model_nll(model, held)
    stream = train_stream(sp, a.out)
    unll = unigram_nll(stream, held, sp.get_piece_size())
    res = dict(heldout_tokens=n, model_ppl=round(math.exp(nll / n), 3),
               model_nll_per_tok=round(nll / n, 4),
               unigram_ppl=round(math.exp(unll / len(held)), 3))
    # expert usage (top-k picks per expert, per layer) on 8 held-out windows
    k, E = model.config.num_experts_per_tok, model.config.num_local_experts
    w = min(SEQ - 1, len(held))
    nwin = max(1, min(8, len(held) // w))
    x = torch.tensor([[1] + held[i * w:(i + 1) * w] for i in range(nwin)])
    with torch.no_grad():
        rl = model(input_ids=x, output_router_logits=True).router_logits
    use = [np.bincount(r.topk(k, -1).indices.flatten().numpy(), minlength=E).tolist() for r in rl]
    res["expert_use_per_layer"] = use
    res["expert_share_min_max"] = [round(min(u) / sum(u), 3) for u in use], \
        [round(max(u) / sum(u), 3) for u in use]
    print(json.dumps(res), flush=True)
    samples = {}
    for p in PROMPTS:
        samples[p] = greedy(model, sp, p)
        print(f"--- {p!r}\n{samples[p]!r}", flush=True)
    res["samples"] = samples
    with open(os.path.join(a.out, "eval.json"), "w") as fh:
        json.dump(res, fh, indent=2)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cmd", choices=["train", "eval", "bench"])
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--ckpt", default=os.path.join(OUT, "hf"))
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--max-minutes", type=float, default=0.0)
    ap.add_argument("--init", help="train: start from this checkpoint dir")
    ap.add_argument("--save-dir", help="train: output dir (default OUT/hf)")
    ap.add_argument("--aux", choices=["pooled", "per-layer"], default="pooled",
                    help="router balance loss: transformers' (pooled over layers) or per layer")
    ap.add_argument("--aux-coef", type=float, default=None,
                    help="per-layer aux coefficient (default: config's)")
    a = ap.parse_args(argv)
    return {"train": cmd_train, "eval": cmd_eval, "bench": cmd_bench}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
