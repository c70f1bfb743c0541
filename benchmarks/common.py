"""Shared pieces of the peer benchmarks: the Mixtral-mini shape, paths, prompts, and the measuring of a child.

Peers (transformers, accelerate, llama-cpp-python, gguf) are imported only inside the children that
need them; they are not dependencies of mixtral_offload.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# Mixtral-8x7B's layout at a size that fits a small machine (~0.79B parameters).
MINI = dict(vocab_size=32000, hidden_size=1024, intermediate_size=3584, num_hidden_layers=8,
            num_attention_heads=16, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
            max_position_embeddings=4096, rope_theta=1e6, rms_norm_eps=1e-5)
INIT_STD = 0.02
THREADS = 2
HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def work_dir() -> Path:
    """Where models and results go: $BENCH_DIR, else /tmp/mixtral-offload-bench."""
    path = Path(os.environ.get("BENCH_DIR", "/tmp/mixtral-offload-bench"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def prompt_ids(count: int) -> list[int]:
    """The same prompt for every system: BOS, then seeded ordinary token ids (no tokenizer involved)."""
    from mixtral_offload.benchmark import prompt_ids as ids

    return ids(MINI["vocab_size"], count)


def child_env(threads: int = THREADS) -> dict[str, str]:
    from mixtral_offload.benchmark import child_env as env

    return env(threads)


def run_json_child(argv: list[str], threads: int = THREADS, timeout: float | None = None) -> dict:
    """Run a child printing one JSON line last; add exit code, wait4 peak RSS and its stderr tail."""
    from mixtral_offload.benchmark import run_child

    code, out, err, peak = run_child(argv, env=child_env(threads))
    lines = [line for line in out.splitlines() if line.startswith("{")]
    result = json.loads(lines[-1]) if lines else {}
    result.update(exit_code=code, peak_rss=peak)
    if code != 0 or not lines:
        tail = err.strip().splitlines()[-3:]
        result["error"] = f"exit {code}" + (f": {' | '.join(tail)}" if tail else "")
    return result


def evict(paths: list[Path]) -> None:
    """Drop every file under paths from the page cache (posix_fadvise DONTNEED), so a run starts cold."""
    for root in paths:
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for file in files:
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)  # dirty pages (a file just written) are not dropped until written back
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def dir_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def python_child(script: str, *args: str) -> list[str]:
    return [sys.executable, str(HERE / script), *args]


def save_json(name: str, data) -> Path:
    path = work_dir() / name
    path.write_text(json.dumps(data, indent=2))
    return path


def sh(argv: list[str]) -> None:
    print("+", " ".join(map(str, argv)), file=sys.stderr, flush=True)
    subprocess.run(argv, check=True)
