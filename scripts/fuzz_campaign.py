"""The long fuzz campaign: the surfaces of tests/fuzz_surfaces.py, N cases each, in worker processes
(so a crash or a hang is counted, not fatal), the CLI in processes forked by a warm fork server
(scripts/fuzz_fork.py), and as a cross-check the same CLI cases as real `python -m mixtral_offload`
subprocesses; writes the table into docs/reliability.md.

    python scripts/fuzz_campaign.py --cases 10000 --cli-cases 300 --workers 16
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "scripts")]
WORKER_ENV = {**os.environ, "PYTHONPATH": str(ROOT), "NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
STALL_SECONDS = 90   # a worker silent this long is hung in something SIGALRM cannot interrupt
CLI_SECONDS = 120    # one real CLI process
MARKER = re.compile(r"<!-- campaign -->.*<!-- /campaign -->", re.S)
FORKED, OWN_PROCESS = "CLI (forked process)", "CLI (own process)"


def run_worker(surface: str, start: int, end: int, base_dir: str, deadline: float) -> None:
    """Run cases start..end-1 of one surface until the deadline (time.time()), printing 'start i' before
    and 'done i outcome detail' after each."""
    if surface == FORKED:
        from fuzz_fork import serve_cases

        serve_cases(base_dir, start, end, deadline, CLI_SECONDS)
        return
    import numpy as np
    import torch

    from fuzz_surfaces import SURFACES, make_base

    torch.set_num_threads(1)
    base = make_base(Path(base_dir))
    index = list(SURFACES).index(surface)
    with tempfile.TemporaryDirectory() as work:
        for case in range(start, end):
            if time.time() > deadline:
                return
            print(f"start {case}", flush=True)
            outcome, detail = SURFACES[surface](base, Path(work), np.random.default_rng([index, case]))
            print(f"done {case} {outcome} {json.dumps(detail)}", flush=True)


def run_chunk(surface: str, start: int, end: int, base_dir: str, deadline: float, record) -> float:
    """Drive workers over start..end, restarting after a crash or a stall (the case counts as such);
    the seconds it took."""
    began = time.perf_counter()
    while start < end and time.time() < deadline:
        errors = tempfile.TemporaryFile()  # a pipe could fill and block the worker
        process = subprocess.Popen([sys.executable, __file__, "--worker", surface, "--start", str(start),
                                    "--end", str(end), "--base", base_dir, "--deadline", str(deadline)],
                                   stdout=subprocess.PIPE, stderr=errors, text=True, env=WORKER_ENV)
        stalled = threading.Event()
        timer = None
        current = None
        for line in process.stdout:  # a case silent for STALL_SECONDS is a hang (the worker's start is not timed)
            word, case, *rest = line.rstrip("\n").split(" ", 3) + [""] * (line.count(" ") < 1)
            if word not in ("start", "done"):  # anything else a library printed
                continue
            if timer is not None:
                timer.cancel()
            if word == "start":
                current = int(case)
                timer = threading.Timer(STALL_SECONDS, lambda: (stalled.set(), process.kill()))
                timer.start()
            else:
                record(surface, rest[0], json.loads(rest[1]) if len(rest) > 1 else "", int(case))
                current, start, timer = None, int(case) + 1, None
        if timer is not None:
            timer.cancel()
        process.wait()
        errors.seek(0)
        stderr = errors.read().decode(errors="replace")
        if current is not None:  # died or stalled inside a case
            kind = "hang" if stalled.is_set() else "crash"
            record(surface, kind, f"rc {process.returncode}: {stderr[-300:]}", current)
            start = current + 1
        elif process.returncode != 0:
            raise RuntimeError(f"worker for {surface} failed outside a case: {stderr[-2000:]}")
        else:
            break  # finished, or stopped at the deadline
    return time.perf_counter() - began


def cli_process_case(base_dir: str, case: int, record, seconds: dict, lock) -> None:
    """The real command line in its own process: exit status and stderr as a user sees them."""
    import numpy as np

    from fuzz_fork import cli_process_outcome
    from fuzz_surfaces import cli_args

    args = cli_args(Path(base_dir) / "model", np.random.default_rng([99, case]))
    began = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "mixtral_offload", *args], capture_output=True,
                              timeout=CLI_SECONDS, env=WORKER_ENV, errors="replace")
    except subprocess.TimeoutExpired:
        record(OWN_PROCESS, "hang", " ".join(args), case)
        return
    finally:
        with lock:
            seconds[OWN_PROCESS] += time.perf_counter() - began
    outcome = cli_process_outcome(done.returncode, done.stderr)
    record(OWN_PROCESS, outcome, "" if outcome in ("clean", "accepted") else done.stderr[-300:], case)


def table(counts: dict, seconds: dict) -> str:
    from fuzz_surfaces import OUTCOMES

    head = ["surface", "cases", "clean errors", "accepted", "unchecked", "tracebacks", "crashes", "hangs",
            "silent-wrong", "cases/s per worker"]  # worker-seconds include starting each worker
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for surface, outcome_counts in counts.items():
        total = sum(outcome_counts.values())
        rate = total / seconds[surface] if seconds[surface] else 0.0
        rows.append("| " + " | ".join([surface, str(total), *(str(outcome_counts.get(o, 0)) for o in OUTCOMES),
                                       f"{rate:.1f}"]) + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=1000, help="cases per surface")
    parser.add_argument("--cli-cases", type=int, default=50,
                        help="cases of the CLI as real subprocesses (the fork server's first cases, again)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="worker processes (or real CLI processes) at a time")
    parser.add_argument("--seconds", type=float, default=float("inf"),
                        help="each surface and the real CLI get an equal share of this (the table counts what ran)")
    parser.add_argument("--surfaces", nargs="*", default=None, help="default: all")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "reliability.md")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--start", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--end", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.worker:
        run_worker(options.worker, options.start, options.end, options.base, options.deadline)
        return
    from fuzz_surfaces import OUTCOMES, SURFACES, make_base

    surfaces = options.surfaces or [*SURFACES, FORKED]
    counts = {name: collections.Counter() for name in [*surfaces, OWN_PROCESS]}
    by_case = {FORKED: {}, OWN_PROCESS: {}}   # the two ways of running the CLI, compared case by case
    unchecked = collections.defaultdict(collections.Counter)   # what the unchecked cases changed
    seconds = dict.fromkeys(counts, 0.0)
    failures: list[str] = []
    lock = threading.Lock()

    def record(surface, outcome, detail, case):
        with lock:
            counts[surface][outcome] += 1
            if surface in by_case:
                by_case[surface][case] = outcome
            if outcome == "unchecked":
                unchecked[surface][detail] += 1
            elif outcome not in ("clean", "accepted"):
                failures.append(f"{surface} case {case}: {outcome} {detail}")

    with tempfile.TemporaryDirectory() as base_dir:
        make_base(Path(base_dir))
        share = options.seconds / (len(surfaces) + 1)  # one surface at a time, each with its share of the time
        size = -(-options.cases // options.workers)
        for surface in surfaces:
            deadline = time.time() + share

            def chunk(first, surface=surface, deadline=deadline):
                taken = run_chunk(surface, first, min(first + size, options.cases), base_dir, deadline, record)
                with lock:
                    seconds[surface] += taken

            with ThreadPoolExecutor(options.workers) as pool:
                list(pool.map(chunk, range(0, options.cases, size)))
            print(f"{surface}: {dict(counts[surface])}", flush=True)
        deadline = time.time() + share

        def cli_cases(offset):
            for case in range(offset, options.cli_cases, options.workers):
                if time.time() < deadline:
                    cli_process_case(base_dir, case, record, seconds, lock)

        with ThreadPoolExecutor(options.workers) as pool:
            list(pool.map(cli_cases, range(options.workers)))
    result = table(counts, seconds)
    print(result)
    both = set(by_case[FORKED]) & set(by_case[OWN_PROCESS])
    differ = sorted(case for case in both if by_case[FORKED][case] != by_case[OWN_PROCESS][case])
    print(f"CLI cases run both forked and as subprocesses: {len(both)}, outcomes differ in {len(differ)}: {differ[:20]}")
    print("unchecked, by what changed:", {surface: dict(kinds) for surface, kinds in unchecked.items()})
    print("\n".join(failures[:40]) or "no tracebacks, crashes, hangs or silent-wrong results")
    load = os.getloadavg()[0]
    block = (f"<!-- campaign -->\n{result}\n\n{options.workers} workers on {os.cpu_count()} CPUs, load {load:.1f} at the "
             f"end; outcomes as defined in tests/fuzz_surfaces.py.\n<!-- /campaign -->")
    text = options.doc.read_text() if options.doc.exists() else "<!-- campaign --><!-- /campaign -->\n"
    options.doc.write_text(MARKER.sub(lambda _: block, text))
    sys.exit(1 if any(counts[s][o] for s in counts for o in OUTCOMES[3:]) else 0)


if __name__ == "__main__":
    main()
