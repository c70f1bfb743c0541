"""A hard memory limit that counts the page cache, as on a machine with that much RAM (cgroup v1).

As root, a child cgroup of this process's own memory cgroup (from /proc/self/cgroup) gets
memory.limit_in_bytes; the command is started through `sh -c 'echo $$ > cgroup.procs; exec ...'`,
so it is inside before it allocates anything. Afterwards: memory.max_usage_in_bytes,
memory.failcnt and the OOM-kill count of memory.oom_control.
"""
from __future__ import annotations

import itertools
import os
from pathlib import Path

V1_ROOT = Path("/sys/fs/cgroup/memory")
_serial = itertools.count()


def own_memory_cgroup() -> Path | None:
    """This process's cgroup v1 memory directory, or None when there is none (or no permission)."""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if "memory" in controllers.split(","):
                where = V1_ROOT / path.lstrip("/")
                return where if (where / "memory.limit_in_bytes").exists() and os.access(where, os.W_OK) else None
    except OSError:
        pass
    return None


def available() -> bool:
    return own_memory_cgroup() is not None


class MemoryLimit:
    """A fresh child memory cgroup with limit_bytes; `wrap(argv)` runs argv inside it."""

    def __init__(self, limit_bytes: int):
        parent = own_memory_cgroup()
        if parent is None:
            raise RuntimeError("no writable cgroup v1 memory controller")
        self.path = parent / f"bench-{os.getpid()}-{next(_serial)}"
        self.path.mkdir()
        self.limit = limit_bytes
        (self.path / "memory.limit_in_bytes").write_text(str(limit_bytes))
        swap = self.path / "memory.memsw.limit_in_bytes"  # no escape into swap, where the kernel has it
        if swap.exists():
            try:
                swap.write_text(str(limit_bytes))
            except OSError:
                pass

    def wrap(self, argv: list[str]) -> list[str]:
        return ["sh", "-c", f'echo $$ > {self.path}/cgroup.procs && exec "$@"', "sh", *argv]

    def usage(self) -> dict:
        read = lambda name: (self.path / name).read_text()  # noqa: E731
        oom = dict(line.split() for line in read("memory.oom_control").splitlines())
        return {"limit": self.limit, "max_usage": int(read("memory.max_usage_in_bytes")),
                "failcnt": int(read("memory.failcnt")), "oom_kills": int(oom.get("oom_kill", 0))}

    def close(self) -> None:
        try:
            self.path.rmdir()
        except OSError:
            pass
