"""`verify`: every block of a converted model's pool, and of its low-bit copy when it has one, read and crc32-checked."""
from __future__ import annotations

import sys
from pathlib import Path

from ...config import format_size, read_json
from ...errors import MixtralOffloadError
from .pool import CONFIG_NAME, ExpertPool


def model_copies(model_dir: Path) -> list[str]:
    """The expert copies config.json declares: "full", and "miss" for a pool written with --miss-bits."""
    quant = read_json(model_dir / CONFIG_NAME).get("quantization")
    return ["full", "miss"] if isinstance(quant, dict) and "miss" in quant else ["full"]


def verify_model_dir(model_dir: str | Path, progress: bool | None = None) -> str:
    """Open and fully verify a converted model's pool(s); a one-line summary, or MixtralOffloadError."""
    from tqdm import tqdm

    model_dir = Path(model_dir)
    formats, checked = [], 0
    ExpertPool.open(model_dir).close()  # a directory that is no converted model fails here, before config.json
    for copy in model_copies(model_dir):
        with ExpertPool.open(model_dir, copy) as pool:
            total = sum(b.size for b in pool.blocks.values())
            show = sys.stderr.isatty() if progress is None else progress
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"verify {copy}",
                      disable=not show, file=sys.stderr) as bar:
                report = pool.verify(progress=bar.update)
            if not report.ok:
                first = ", ".join(f"({layer}, {expert})" for layer, expert in report.bad[:4])
                raise MixtralOffloadError(f"{pool.name}: {len(report.bad)} of {report.blocks} expert blocks "
                                          f"fail their crc32 check, e.g. (layer, expert) {first}")
            checked += report.bytes_checked
            formats.append(f"int{pool.spec.bits} g{pool.spec.group_size}")
            layers, experts = pool.args.num_hidden_layers, pool.args.num_local_experts
    copies = f" + a low-bit copy {formats[1]}" if len(formats) > 1 else ""
    return (f"ok: {layers * experts} expert blocks ({layers} layers x {experts} experts){copies}, "
            f"{format_size(checked)} checked, {formats[0]}")
