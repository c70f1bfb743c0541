"""sha256 checksums of a converted model's files besides the pool, as recorded in its manifest."""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from ...errors import MixtralOffloadError
from ...validate import int_field, open_regular, regular_file_size, str_field

_CHUNK = 1 << 20


def file_digests(model_dir: Path, names: tuple[str, ...]) -> dict[str, dict]:
    """{name: {"bytes", "sha256"}} of the named files present in model_dir, for the manifest."""
    return {name: {"bytes": regular_file_size(model_dir / name), "sha256": sha256_file(model_dir / name)}
            for name in names if (model_dir / name).exists()}


def sha256_file(path: Path) -> str:
    """The sha256 of a regular file, read in 1 MiB chunks."""
    digest, fd = hashlib.sha256(), open_regular(path)
    try:
        while chunk := os.read(fd, _CHUNK):
            digest.update(chunk)
    finally:
        os.close(fd)
    return digest.hexdigest()


def parse_digests(raw, names: tuple[str, ...], source: str) -> dict[str, dict]:
    """The manifest's 'files' section, every field checked; {} for pools written before it existed."""
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not set(raw) <= set(names):
        raise MixtralOffloadError(f"{source}: 'files' must map some of {', '.join(names)} to checksums")
    digests = {}
    for name, entry in raw.items():
        if not isinstance(entry, dict):
            raise MixtralOffloadError(f"{source}: files.{name} must be an object")
        size = int_field(entry.get("bytes"), f"files.{name}.bytes", 0, 2**63, source)
        sha = str_field(entry.get("sha256"), f"files.{name}.sha256", source)
        if not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise MixtralOffloadError(f"{source}: files.{name}.sha256 is not a sha256 hex digest")
        digests[name] = {"bytes": size, "sha256": sha}
    return digests


def check_digests(model_dir: Path, digests: dict[str, dict], hashed: tuple[str, ...]) -> None:
    """Every recorded file has its recorded size, and those in `hashed` their sha256."""
    for name, entry in digests.items():
        path = model_dir / name
        if not path.exists():
            raise MixtralOffloadError(f"{path}: missing (the manifest records it)")
        size = regular_file_size(path)
        if size != entry["bytes"] or (name in hashed and sha256_file(path) != entry["sha256"]):
            raise MixtralOffloadError(f"{path}: changed since conversion ({'sha256' if size == entry['bytes'] else 'size'} "
                                      f"differs from the manifest): damaged or replaced")
