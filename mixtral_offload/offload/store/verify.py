"""`verify`: every pool block's crc32, the sha256 of config.json, dense.safetensors and tokenizer.model
recorded in the manifest, and no NaN or inf in any weight (pool scales and zeros, dense tensors)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from ...errors import MixtralOffloadError
from .digests import check_digests
from .pool import CHECKED_FILES, DENSE_NAME, POOL_NAME, ExpertPool


def nonfinite_dense(path: Path) -> list[str]:
    """Names of dense.safetensors tensors holding NaN or inf (one tensor in memory at a time)."""
    from safetensors import safe_open
    import torch

    bad = []
    try:
        with safe_open(path, framework="pt") as handle:
            for name in handle.keys():
                if not bool(torch.isfinite(handle.get_tensor(name)).all()):
                    bad.append(name)
    except Exception as exc:  # safetensors raises several types for damaged files
        raise MixtralOffloadError(f"{path}: cannot read ({exc})") from None
    return bad


def nonfinite_blocks(pool: ExpertPool) -> list[tuple[int, int]]:
    """(layer, expert) of blocks whose scales or zeros hold NaN or inf."""
    bad = []
    for key in sorted(pool.blocks):
        parts = [array for matrix in pool.mapped(key) for array in matrix.parts().values()
                 if array.dtype.kind == "f"]
        if not all(np.isfinite(array).all() for array in parts):
            bad.append(key)
        pool.release(key)
    return bad


def verify_model_dir(model_dir: str | Path, progress: bool | None = None) -> str:
    """Open and fully verify a converted model; a one-line summary, or MixtralOffloadError."""
    from tqdm import tqdm

    from ...config import format_size

    with ExpertPool.open(model_dir) as pool:
        total = sum(b.size for b in pool.blocks.values())
        show = sys.stderr.isatty() if progress is None else progress
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="verify", disable=not show,
                  file=sys.stderr) as bar:
            report = pool.verify(progress=bar.update)
        if not report.ok:
            first = ", ".join(f"({layer}, {expert})" for layer, expert in report.bad[:4])
            raise MixtralOffloadError(f"{pool.path / POOL_NAME}: {len(report.bad)} of {report.blocks} expert blocks "
                                      f"fail their crc32 check, e.g. (layer, expert) {first}")
        check_digests(pool.path, pool.files, CHECKED_FILES)
        bad_blocks = nonfinite_blocks(pool)
        if bad_blocks:
            raise MixtralOffloadError(f"{pool.path / POOL_NAME}: {len(bad_blocks)} expert blocks hold NaN or inf "
                                      f"scales, e.g. (layer, expert) {bad_blocks[0]}")
        bad_dense = nonfinite_dense(pool.path / DENSE_NAME)
        if bad_dense:
            raise MixtralOffloadError(f"{pool.path / DENSE_NAME}: {len(bad_dense)} tensors hold NaN or inf, "
                                      f"e.g. {bad_dense[0]}")
        files = (f"{', '.join(sorted(pool.files))} match their sha256" if pool.files
                 else "no file checksums (converted before they were recorded)")
        return (f"ok: {report.blocks} expert blocks ({pool.args.num_hidden_layers} layers x "
                f"{pool.args.num_local_experts} experts), {format_size(report.bytes_checked)} checked, "
                f"int{pool.spec.bits} g{pool.spec.group_size}; {files}; no NaN or inf")
