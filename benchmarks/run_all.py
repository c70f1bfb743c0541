"""Side-by-side benchmark of this runtime against transformers, accelerate offload and llama.cpp.

    python benchmarks/run_all.py [--quick] [--no-limits] [--out DIR]

One command: writes the Mixtral-mini model (make_mini.py) and its GGUFs (to_gguf.py) if missing,
checks that llama.cpp's greedy tokens on the F32 GGUF equal transformers' on the same checkpoint,
then measures every system in a fresh child process (2 threads each), without a memory limit and
then under a cgroup v1 memory limit that counts the page cache (cgroup_limit.py) at each system's
baseline RSS plus 50% and 25% of its weights, model files evicted from the page cache first.
Prints markdown tables; the raw results go to $BENCH_DIR/results.json. Needs: pip install
transformers accelerate llama-cpp-python gguf sentencepiece mistral-common (none is a dependency of
mixtral_offload).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cgroup_limit  # noqa: E402
from common import MINI, THREADS, dir_bytes, evict, python_child, run_json_child, save_json, sh, work_dir  # noqa: E402

from mixtral_offload.benchmark import DecodeSpec, machine_info, measure_bandwidth_in_child  # noqa: E402

BYTES_PER_PARAM = {"float32": 4.0, "bfloat16": 2.0, "f32": 4.0, "q8_0": 34 / 32, "q4_0": 18 / 32}


def params() -> tuple[int, int, int]:
    """(active dense params per token without the embedding table, expert params per layer-expert, embedding)."""
    D, I, V, L = MINI["hidden_size"], MINI["intermediate_size"], MINI["vocab_size"], MINI["num_hidden_layers"]
    hd = D // MINI["num_attention_heads"]
    attn = D * D * 2 + 2 * D * MINI["num_key_value_heads"] * hd
    dense = L * (attn + MINI["num_local_experts"] * D + 2 * D) + V * D + D
    return dense, 3 * D * I, V * D


def peer_active_bytes(fmt: str) -> float:
    dense, expert, _ = params()
    active = dense + MINI["num_hidden_layers"] * MINI["num_experts_per_tok"] * expert
    return active * BYTES_PER_PARAM[fmt]


def runtime_argv(spec: DecodeSpec) -> list[str]:
    return [sys.executable, "-m", "mixtral_offload.benchmark", json.dumps(dataclasses.asdict(spec))]


def prepare(root: Path) -> dict[str, Path]:
    sh(python_child("make_mini.py"))
    paths = {"hf": root / "hf-bf16", "int4": root / "int4", "int8": root / "int8"}
    for qtype in ("f32", "q4_0", "q8_0"):
        paths[qtype] = root / f"mini-{qtype}.gguf"
        if not paths[qtype].exists():
            sh(python_child("to_gguf.py", str(paths["hf"]), str(paths[qtype]), "--type", qtype))
    return paths


def correctness(paths: dict[str, Path], tokens: int) -> dict:
    """Greedy tokens and last-prompt logits of llama.cpp on the F32 GGUF vs transformers float32."""
    hf = run_json_child(python_child("peer_child.py", "transformers", str(paths["hf"]), "--dtype", "float32",
                                     "--check-tokens", str(tokens)))
    ll = run_json_child(python_child("peer_child.py", "llamacpp", str(paths["f32"]), "--check-tokens", str(tokens)))
    if "tokens" not in hf or "tokens" not in ll:
        return {"ok": False, "error": hf.get("error") or ll.get("error")}
    import numpy as np

    a, b = np.array(hf["logits"]), np.array(ll["logits"])
    same = next((i for i, (x, y) in enumerate(zip(hf["tokens"], ll["tokens"])) if x != y), len(hf["tokens"]))
    return {"ok": hf["tokens"] == ll["tokens"], "tokens": len(hf["tokens"]), "agreeing_prefix": same,
            "transformers_tokens": hf["tokens"], "llamacpp_tokens": ll["tokens"],
            "logits_max_abs_diff": float(np.abs(a - b).max()), "logits_scale": float(np.abs(a).max())}


def unlimited_configs(paths, quick: bool) -> list[dict]:
    repeats, decode = (1, 16) if quick else (3, 64)
    peer = ["--repeats", str(repeats), "--decode-tokens", str(decode)]
    rt = dict(repeats=repeats, decode_tokens=decode, threads=THREADS)
    hf_bytes = dir_bytes(paths["hf"])
    configs = [
        dict(name="this runtime int4", system="runtime", fmt="int4",
             argv=runtime_argv(DecodeSpec(str(paths["int4"]), label="int4", **rt))),
        dict(name="this runtime int8", system="runtime", fmt="int8",
             argv=runtime_argv(DecodeSpec(str(paths["int8"]), label="int8", **rt))),
        dict(name="this runtime int4, --dense stored", system="runtime", fmt="int4",
             argv=runtime_argv(DecodeSpec(str(paths["int4"]), label="int4 dense stored", dense="stored", **rt))),
        dict(name="this runtime int4, budget for 50% of experts", system="runtime", fmt="int4",
             argv=runtime_argv(DecodeSpec(str(paths["int4"]), label="int4 50%", experts_fraction=0.5, **rt))),
        dict(name="this runtime int4, budget for 25% of experts", system="runtime", fmt="int4",
             argv=runtime_argv(DecodeSpec(str(paths["int4"]), label="int4 25%", experts_fraction=0.25, **rt))),
        dict(name="transformers float32", system="transformers", fmt="float32",
             argv=python_child("peer_child.py", "transformers", str(paths["hf"]), "--dtype", "float32", *peer)),
        dict(name="transformers bfloat16", system="transformers", fmt="bfloat16",
             argv=python_child("peer_child.py", "transformers", str(paths["hf"]), "--dtype", "bfloat16", *peer)),
        dict(name="transformers+accelerate bf16, max_memory half the weights", system="accelerate", fmt="bfloat16",
             argv=python_child("peer_child.py", "transformers", str(paths["hf"]), "--dtype", "bfloat16",
                               "--offload-cpu-bytes", str(hf_bytes // 2), "--offload-dir",
                               str(work_dir() / "offload"), "--repeats", "1", "--decode-tokens", "16")),
        dict(name="llama.cpp Q4_0", system="llamacpp", fmt="q4_0",
             argv=python_child("peer_child.py", "llamacpp", str(paths["q4_0"]), *peer)),
        dict(name="llama.cpp Q8_0", system="llamacpp", fmt="q8_0",
             argv=python_child("peer_child.py", "llamacpp", str(paths["q8_0"]), *peer)),
        dict(name="llama.cpp Q4_0, no repack (weights stay mapped)", system="llamacpp", fmt="q4_0",
             argv=python_child("peer_child.py", "llamacpp", str(paths["q4_0"]), "--no-repack", *peer)),
    ]
    return configs


def run_config(config: dict, bandwidth: float) -> dict:
    print(f"measuring {config['name']} ...", file=sys.stderr, flush=True)
    result = run_json_child(config["argv"])
    active = result.get("active_bytes_per_token") or (
        peer_active_bytes(config["fmt"]) if config["fmt"] in BYTES_PER_PARAM else None)
    result.update(name=config["name"], system=config["system"], fmt=config["fmt"], command=" ".join(config["argv"]))
    if active:
        result.update(active_bytes_per_token=active, floor_tps=bandwidth * 1e9 / active)
    return result


def limited_runs(paths, unlimited: dict[str, dict], fractions=(0.5, 0.25), timeout: int = 420) -> list[dict]:
    """Each system under a cgroup limit of its baseline RSS + fraction x its weights, cold page cache."""
    weights = {"int4": dir_bytes(paths["int4"]), "q4_0": dir_bytes(paths["q4_0"]), "bfloat16": dir_bytes(paths["hf"])}
    peer = ["--repeats", "1", "--decode-tokens", "16"]
    runs = []
    for fraction in fractions:
        rows = []
        base = unlimited["this runtime int4"]
        limit = int(base["baseline_rss"] + fraction * weights["int4"])
        rows.append(dict(name="this runtime int4, --memory-budget = the limit", system="runtime", fmt="int4",
                         limit=limit, files=[paths["int4"]],
                         argv=runtime_argv(DecodeSpec(str(paths["int4"]), label="limit", budget=limit, repeats=1,
                                                      decode_tokens=16))))
        planned = unlimited[f"this runtime int4, budget for {fraction:.0%} of experts"].get("budget")
        if planned:
            # the child sizes its cache for the fraction again (its baseline RSS may differ a little);
            # the cgroup holds it to what the plan asked for in the unlimited run
            rows.append(dict(name=f"this runtime int4, cache for {fraction:.0%} of experts, limit = its budget",
                             system="runtime", fmt="int4", limit=planned, files=[paths["int4"]],
                             argv=runtime_argv(DecodeSpec(str(paths["int4"]), label="limit", experts_fraction=fraction,
                                                          repeats=1, decode_tokens=16))))
            rows.append(dict(name=f"llama.cpp Q4_0 no repack, at that same limit", system="llamacpp", fmt="q4_0",
                             limit=planned, files=[paths["q4_0"]],
                             argv=python_child("peer_child.py", "llamacpp", str(paths["q4_0"]), "--no-repack", *peer)))
        for name, key, extra in (("llama.cpp Q4_0", "llama.cpp Q4_0", []),
                                 ("llama.cpp Q4_0, no repack", "llama.cpp Q4_0, no repack (weights stay mapped)",
                                  ["--no-repack"])):
            limit = int(unlimited[key].get("baseline_rss", 0) + fraction * weights["q4_0"])
            rows.append(dict(name=name, system="llamacpp", fmt="q4_0", limit=limit, files=[paths["q4_0"]],
                             argv=python_child("peer_child.py", "llamacpp", str(paths["q4_0"]), *extra, *peer)))
        acc = unlimited["transformers bfloat16"]
        limit = int(acc.get("baseline_rss", 0) + fraction * weights["bfloat16"])
        rows.append(dict(name="transformers+accelerate bf16, max_memory = fraction of weights", system="accelerate",
                         fmt="bfloat16", limit=limit, files=[paths["hf"], work_dir() / "offload"],
                         argv=python_child("peer_child.py", "transformers", str(paths["hf"]), "--dtype", "bfloat16",
                                           "--offload-cpu-bytes", str(int(fraction * weights["bfloat16"])),
                                           "--offload-dir", str(work_dir() / "offload"), *peer)))
        for row in rows:
            print(f"measuring {row['name']} under {row['limit'] / 2**20:.0f} MiB ...", file=sys.stderr, flush=True)
            evict([p for p in row["files"] if p.exists()])
            cgroup = cgroup_limit.MemoryLimit(row["limit"])
            try:
                result = run_json_child(cgroup.wrap(["timeout", "-s", "KILL", str(timeout), *row["argv"]]))
                result.update(cgroup.usage())
            finally:
                cgroup.close()
            result.update(name=row["name"], system=row["system"], fmt=row["fmt"], fraction=fraction,
                          command=" ".join(row["argv"]),
                          oom_killed=result.get("oom_kills", 0) > 0 and result["exit_code"] != 0)
            runs.append(result)
    return runs


def mib(value) -> str:
    return "-" if value is None else f"{value / 2**20:.0f}"


def short_error(result: dict) -> str:
    """The last line of a failed child's stderr (the user-facing message), or its exit status."""
    error = result.get("error", "")
    return error.split(" | ")[-1].split("MixtralOffloadError: ")[-1][:140] if " | " in error else error


def tables(report: dict) -> str:
    rows = report["unlimited"]
    ref = {r["name"]: r.get("decode_tps") for r in rows}
    q4, bf16 = ref.get("llama.cpp Q4_0"), ref.get("transformers bfloat16")
    out = ["| system | decode tok/s | vs llama.cpp Q4_0 | vs transformers bf16 | prompt tok/s | floor tok/s |"
           " peak RSS MiB | budget MiB | hit rate | cache read/token MiB |", "|---" * 10 + "|"]
    for r in rows:
        if "decode_tps" not in r:
            out.append(f"| {r['name']} | failed: {short_error(r)} ||||||||")
            continue
        ratio = lambda ref_tps: f"{r['decode_tps'] / ref_tps:.2f}x" if ref_tps else "-"  # noqa: E731
        hit = r.get("hit_rate")
        out.append(f"| {r['name']} | {r['decode_tps']:.1f} | {ratio(q4)} | {ratio(bf16)} | {r['prompt_tps']:.0f} | "
                   f"{r.get('floor_tps', 0):.0f} | {mib(r['peak_rss'])} | {mib(r.get('budget'))} | "
                   f"{'-' if hit is None else f'{hit:.2f}'} | "
                   f"{'-' if r.get('cache_bytes_per_token') is None else mib(r['cache_bytes_per_token'])} |")
    if report.get("limited"):
        out += ["", "| limit for | system | limit MiB | decode tok/s | prompt tok/s | disk read/token MiB | hit rate |"
                " cgroup max usage MiB | failcnt | OOM-killed |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in report["limited"]:
            hit = "-" if r.get("hit_rate") is None else f"{r['hit_rate']:.2f} ({r['slots']}/{r['total_experts']} slots)"
            speed = (f"{r['decode_tps']:.2f} | {r['prompt_tps']:.1f} | {mib(r.get('disk_bytes_per_token'))} | {hit}"
                     if "decode_tps" in r else f"- | - | - | - ({short_error(r)})")
            out.append(f"| {r['fraction']:.0%} | {r['name']} | {mib(r['limit'])} | {speed} | {mib(r.get('max_usage'))} "
                       f"| {r.get('failcnt', '-')} | {'yes' if r.get('oom_killed') else 'no'} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 repeat, 16 decode tokens")
    parser.add_argument("--no-limits", action="store_true", help="skip the cgroup-limited runs")
    parser.add_argument("--only", default=None, help="comma-separated substrings of configuration names")
    parser.add_argument("--tables", action="store_true", help="only print the tables of the saved results.json")
    args = parser.parse_args()
    if args.tables:
        print(tables(json.loads((work_dir() / "results.json").read_text())))
        return
    root = work_dir()
    paths = prepare(root)
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine_info(), "threads": THREADS,
              "quick": args.quick}
    report["bandwidth_gbs"] = measure_bandwidth_in_child(THREADS)
    report["check"] = correctness(paths, 16)
    print("correctness:", json.dumps({k: v for k, v in report["check"].items() if "tokens" not in k or k == "tokens"}),
          file=sys.stderr, flush=True)
    configs = unlimited_configs(paths, args.quick)
    if args.only:
        configs = [c for c in configs if any(s in c["name"] for s in args.only.split(","))]
    report["unlimited"] = [run_config(c, report["bandwidth_gbs"]) for c in configs]
    save_json("results.json", report)
    if not args.no_limits and not args.only:
        if cgroup_limit.available():
            report["limited"] = limited_runs(paths, {r["name"]: r for r in report["unlimited"]})
        else:
            report["limited_note"] = "no writable cgroup v1 memory controller: limited runs skipped"
    report["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    save_json("results.json", report)
    text = tables(report)
    (root / "results.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
