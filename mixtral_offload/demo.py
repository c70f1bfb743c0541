"""The demo model shipped inside the package: a small Mixtral trained here, in the pool format."""
from __future__ import annotations

from pathlib import Path

DEMO_DIR = Path(__file__).parent / "demo"
DEMO_DESCRIPTION = ("a 4-layer, 8-expert Mixtral trained here on the Python documentation, int4; "
                    "a toy that writes Python-docs-flavoured English: see docs/demo-model.md")


def demo_model_dir() -> Path | None:
    """The bundled demo model directory, or None when this installation has none."""
    return DEMO_DIR if (DEMO_DIR / "experts.pool").is_file() else None
