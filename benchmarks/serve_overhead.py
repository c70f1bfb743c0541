"""What `mixtral-offload serve` adds to a request: time to first token and decode tokens/s over HTTP
(a streamed /v1/completions read with httpx) against the same request through the Python API.

    python benchmarks/serve_overhead.py [MODEL] [--tokens 64] [--repeats 6]   # MODEL: the demo model if omitted

The paths run in turn on the same prompts (greedy, so they make the same tokens): the Python API in
this process, called from the main thread and from one long-lived other thread (the server generates
on a thread of its own, and which thread calls the kernels changed decode speed on a loaded machine),
and the server in a child process loaded with the same options. Each path has a runtime of its own,
so each sees the same sequence of prompts and reuses the same KV prefix; each round uses a new prompt
and rotates which path goes first.
Per path: TTFT from the call to the first visible text, decode tokens/s between the first and the
last visible text (tokens whose text is empty mid-character make no SSE chunk, so they are left out
on both paths alike), and the CPU time per token of the process that generates (this one for the
API, the server for HTTP; the HTTP client's own CPU is not counted), which a loaded machine's
scheduling disturbs less than wall time. Prints a markdown table of medians and the load average.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mixtral_offload  # first: sets the OpenMP wait policy before torch loads
import psutil

REPO = Path(__file__).resolve().parent.parent
API_MAIN, API_THREAD, HTTP = "Python API, main thread", "Python API, other thread", "HTTP (SSE)"
TOPICS = ["lists", "dictionaries", "the with statement", "generators", "exceptions", "modules", "decorators",
          "string formatting", "file objects", "classes", "iterators", "the import system"]


def prompt(round_index: int) -> str:
    topic = TOPICS[round_index % len(TOPICS)]
    return (f"Section {round_index + 1}: {topic}. This section of the tutorial describes {topic} in more "
            f"detail, with examples of how they are used in ordinary programs, and")


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def timed_api(runtime, ids: list[int], tokens: int) -> tuple[float, list[float], float]:
    """(start, arrival time of each token with visible text, CPU seconds of this process) via Runtime.generate."""
    cpu, start, arrivals = cpu_seconds(psutil.Process()), time.perf_counter(), []
    for record in runtime.generate(ids, max_new_tokens=tokens, temperature=0):
        if record.text:
            arrivals.append(time.perf_counter())
    return start, arrivals, cpu_seconds(psutil.Process()) - cpu


def timed_http(http, url: str, server: psutil.Process, ids: list[int], tokens: int) -> tuple[float, list[float], float]:
    """(start, arrival time of each SSE chunk with text, CPU seconds of the server) of a streamed /v1/completions."""
    body = {"model": "bench", "prompt": ids, "max_tokens": tokens, "temperature": 0, "stream": True}
    cpu, start, arrivals = cpu_seconds(server), time.perf_counter(), []
    with http.stream("POST", url + "/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                arrivals.append(time.perf_counter())
    return start, arrivals, cpu_seconds(server) - cpu


def figures(start: float, arrivals: list[float], cpu: float) -> tuple[float, float, float]:
    """(TTFT seconds, decode tokens/s, CPU seconds per generated token)."""
    return arrivals[0] - start, (len(arrivals) - 1) / (arrivals[-1] - arrivals[0]), cpu / len(arrivals)


def start_server(model: str, options: list[str], log_path: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(log_path, "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "mixtral_offload", "serve", model, "--port", "0", *options],
                                  stdout=log, stderr=subprocess.STDOUT, env=env)
    while not (match := re.search(r"on (http://\S+/v1)", log_path.read_text())):
        if server.poll() is not None:
            sys.exit(f"the server exited:\n{log_path.read_text()}")
        time.sleep(0.2)
    return server, match.group(1)


def main() -> None:
    import httpx

    from mixtral_offload.demo import DEMO_DIR

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=str(DEMO_DIR))
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per request")
    parser.add_argument("--repeats", type=int, default=6, help="rounds (each path once per round)")
    parser.add_argument("--memory-budget", default=None, help="passed to both the server and load()")
    args = parser.parse_args()

    load = os.getloadavg()
    budget = ["--memory-budget", args.memory_budget] if args.memory_budget else []
    runtimes = [mixtral_offload.load(args.model, memory_budget=args.memory_budget) for _ in range(2)]
    log_path = Path(tempfile.mkdtemp()) / "server.log"
    server, url = start_server(args.model, budget, log_path)
    try:
        with httpx.Client(timeout=600) as http, ThreadPoolExecutor(1) as other_thread:
            paths = {API_MAIN: lambda ids: timed_api(runtimes[0], ids, args.tokens),
                     API_THREAD: lambda ids: other_thread.submit(timed_api, runtimes[1], ids, args.tokens).result(),
                     HTTP: lambda ids: timed_http(http, url, psutil.Process(server.pid), ids, args.tokens)}
            results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in paths}
            for path in paths.values():  # warm-up: compile and touch everything once
                path(runtimes[0].tokenizer.encode(prompt(args.repeats)))
            for round_index in range(args.repeats):
                ids = runtimes[0].tokenizer.encode(prompt(round_index))
                shift = round_index % len(paths)
                for name in list(paths)[shift:] + list(paths)[:shift]:
                    results[name].append(figures(*paths[name](ids)))
    finally:
        server.terminate()
        server.wait()
    load = f"load average before {load[0]:.2f}, after {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)"
    print(f"model {Path(args.model).resolve().name}, {args.tokens} tokens per request, {args.repeats} rounds, {load}\n")
    print("| path | TTFT ms | decode tok/s | decode ms/token | CPU ms/token (generating process, whole request) |")
    print("|---|---|---|---|---|")
    medians = {}
    for name, rows in results.items():
        ttft, speed, cpu = (statistics.median(row[i] for row in rows) for i in range(3))
        medians[name] = (ttft, speed, cpu)
        print(f"| {name} | {ttft * 1e3:.1f} | {speed:.1f} | {1e3 / speed:.2f} | {cpu * 1e3:.2f} |")
    http_ttft, http_speed, http_cpu = medians[HTTP]
    for name in (API_THREAD, API_MAIN):
        api_ttft, api_speed, api_cpu = medians[name]
        print(f"\nHTTP vs {name}: {(http_ttft - api_ttft) * 1e3:+.1f} ms to the first token, "
              f"{(api_speed / http_speed - 1) * 100:+.1f}% wall time and {(http_cpu / api_cpu - 1) * 100:+.1f}% CPU "
              f"time per token.")


if __name__ == "__main__":
    main()
