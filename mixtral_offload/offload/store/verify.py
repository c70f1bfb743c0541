"""`verify`: every pool block's crc32 (the low-bit copy's too, when the model has one), the sha256 of
config.json, dense.safetensors and tokenizer.model recorded in the manifest, and no NaN or inf in any
weight (pool scales and zeros, dense tensors)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from ...config import format_size
from ...errors import MixtralOffloadError
from ...validate import read_json_object
from .digests import check_digests
from .pool import CHECKED_FILES, CONFIG_NAME, DENSE_NAME, ExpertPool


def model_copies(model_dir: Path) -> list[str]:
    """The expert copies config.json declares: "full", and "miss" for a pool written with --miss-bits."""
    quant = read_json_object(model_dir / CONFIG_NAME).get("quantization")
    return ["full", "miss"] if isinstance(quant, dict) and "miss" in quant else ["full"]


def nonfinite_dense(path: Path) -> list[str]:
    """Names of dense.safetensors tensors holding NaN or inf (one tensor in memory at a time)."""
    import torch
    from safetensors import safe_open

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


def verify_pool(pool: ExpertPool, progress: bool | None) -> int:
    """Every block's crc32 and finite scales of one pool; the bytes checked."""
    from tqdm import tqdm

    total = sum(b.size for b in pool.blocks.values())
    show = sys.stderr.isatty() if progress is None else progress
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"verify {pool.copy}",
              disable=not show, file=sys.stderr) as bar:
        report = pool.verify(progress=bar.update)
    if not report.ok:
        first = ", ".join(f"({layer}, {expert})" for layer, expert in report.bad[:4])
        raise MixtralOffloadError(f"{pool.name}: {len(report.bad)} of {report.blocks} expert blocks "
                                  f"fail their crc32 check, e.g. (layer, expert) {first}")
    bad_blocks = nonfinite_blocks(pool)
    if bad_blocks:
        raise MixtralOffloadError(f"{pool.name}: {len(bad_blocks)} expert blocks hold NaN or inf scales, "
                                  f"e.g. (layer, expert) {bad_blocks[0]}")
    return report.bytes_checked


def verify_model_dir(model_dir: str | Path, progress: bool | None = None) -> str:
    """Open and fully verify a converted model; a one-line summary, or MixtralOffloadError."""
    model_dir = Path(model_dir)
    ExpertPool.open(model_dir).close()  # a directory that is no converted model fails here, before config.json
    formats, checked = [], 0
    for copy in model_copies(model_dir):
        with ExpertPool.open(model_dir, copy) as pool:
            checked += verify_pool(pool, progress)
            formats.append(f"int{pool.spec.bits} g{pool.spec.group_size}")
            args, files = pool.args, pool.files
    check_digests(model_dir, files, CHECKED_FILES)
    bad_dense = nonfinite_dense(model_dir / DENSE_NAME)
    if bad_dense:
        raise MixtralOffloadError(f"{model_dir / DENSE_NAME}: {len(bad_dense)} tensors hold NaN or inf, "
                                  f"e.g. {bad_dense[0]}")
    copies = f" + a low-bit copy {formats[1]}" if len(formats) > 1 else ""
    described = (f"{', '.join(sorted(files))} match their sha256" if files
                 else "no file checksums (converted before they were recorded)")
    layers, experts = args.num_hidden_layers, args.num_local_experts
    return (f"ok: {layers * experts} expert blocks ({layers} layers x {experts} experts){copies}, "
            f"{format_size(checked)} checked, {formats[0]}; {described}; no NaN or inf")
