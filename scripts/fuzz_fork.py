"""A fork server for the fuzz campaign's command-line cases: one process imports torch, numba and the CLI
and warms the kernels once, then forks a child per case that runs the click entry point with the case's
argv (stdout and stderr to files, stdin from /dev/null). Each case still runs in its own process: a
signal is a crash, a child past its time is a hang, and the exit status and stderr are judged as for a
real `python -m mixtral_offload` process.
"""
from __future__ import annotations

import json
import os
import select
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path


def cli_process_outcome(returncode: int | None, stderr: str) -> str:
    """A CLI process's outcome: killed for running too long a hang, a signal a crash, 0 accepted, one
    'Error' line without a traceback clean, anything else a traceback."""
    if returncode is None:
        return "hang"
    if returncode < 0:
        return "crash"
    if returncode == 0:
        return "accepted"
    errors = [line for line in stderr.splitlines() if line.startswith("Error")]
    return "clean" if len(errors) == 1 and "Traceback" not in stderr else "traceback"


def _child(argv: list[str], stdout: Path, stderr: Path) -> None:
    """In the forked child: the CLI as `python -m mixtral_offload ARGV` would run it; never returns."""
    code = 1
    try:
        for signum in (signal.SIGINT, signal.SIGALRM, signal.SIGTERM):
            signal.signal(signum, signal.SIG_DFL if signum != signal.SIGINT else signal.default_int_handler)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(os.open(stdout, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), 1)
        os.dup2(os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), 2)
        from mixtral_offload.cli.main import cli

        try:
            cli.main(args=argv, prog_name="mixtral-offload")
            code = 0
        except SystemExit as exc:  # how the interpreter turns SystemExit into a status
            if exc.code is None or isinstance(exc.code, int):
                code = exc.code or 0
            else:
                print(exc.code, file=sys.stderr)
        except BaseException:  # the interpreter prints an uncaught exception and exits 1
            traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code & 0xff)


def run_forked(argv: list[str], seconds: float) -> tuple[str, str]:
    """(outcome, detail) of one CLI run in a forked child; the child is killed after `seconds`."""
    with tempfile.TemporaryDirectory() as directory:
        stdout, stderr = Path(directory) / "stdout", Path(directory) / "stderr"
        pid = os.fork()
        if pid == 0:
            _child(argv, stdout, stderr)
        with os.fdopen(os.pidfd_open(pid), "rb") as pidfd:
            finished = select.select([pidfd], [], [], seconds)[0]
        if not finished:
            os.kill(pid, signal.SIGKILL)
        status = os.waitpid(pid, 0)[1]
        returncode = os.waitstatus_to_exitcode(status) if finished else None
        errors = stderr.read_text(errors="replace") if stderr.exists() else ""
    outcome = cli_process_outcome(returncode, errors)
    return outcome, "" if outcome in ("clean", "accepted") else f"{' '.join(argv)}: {errors[-300:]}"


def serve_cases(base_dir: str, start: int, end: int, deadline: float, seconds: float) -> None:
    """Warm up, then run CLI cases start..end-1 (the argv of tests/fuzz_surfaces.cli_args, seeded as the
    real-subprocess cases) until the deadline, printing 'start i' and 'done i outcome detail'."""
    os.environ["NUMBA_THREADING_LAYER"] = "workqueue"  # Numba's GNU OpenMP pool refuses to run in a forked child
    import numpy as np
    import torch
    from click.testing import CliRunner
    from fuzz_surfaces import cli_args

    from mixtral_offload.cli.main import cli

    torch.set_num_threads(1)
    model = Path(base_dir) / "model"
    warm = CliRunner().invoke(cli, ["generate", str(model), "-p", "Hi", "-n", "2", "-t", "0.5", "--seed", "1"])
    if warm.exit_code != 0:
        raise RuntimeError(f"the fork server's warm-up run failed: {warm.output}")
    for case in range(start, end):
        if time.time() > deadline:
            return
        print(f"start {case}", flush=True)
        outcome, detail = run_forked(cli_args(model, np.random.default_rng([99, case])), seconds)
        print(f"done {case} {outcome} {json.dumps(detail)}", flush=True)
