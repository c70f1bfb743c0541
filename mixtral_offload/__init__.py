"""mixtral-offload: run Mixtral-8x7B-class MoE models on one consumer machine.

    import mixtral_offload
    runtime = mixtral_offload.load("path/to/model")
    for record in runtime.generate("The capital of France is", max_new_tokens=20):
        print(record.text, end="", flush=True)
"""

import os

# torch and the Numba kernels each bring an OpenMP runtime; with the default spin-waiting their idle
# threads burn the cores the other one needs. Passive waiting after a short spin measured best on a
# loaded and an idle machine (docs/architecture.md, Threads). Must be set before either library starts
# its threads; an explicit user setting wins.
OPENMP_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "2000"}
OPENMP_SET_HERE = [name for name in OPENMP_DEFAULTS if name not in os.environ]  # other programs must not inherit
for _name in OPENMP_SET_HERE:
    os.environ[_name] = OPENMP_DEFAULTS[_name]

__version__ = "0.1.0"


def load(path, **options):
    """Load a model directory (an HF Mixtral checkpoint or a converted one); see offload.loading.load."""
    from .offload.loading import load as _load

    return _load(path, **options)

