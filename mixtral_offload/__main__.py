"""`python -m mixtral_offload` runs the CLI."""
from .cli.main import cli

cli(prog_name="mixtral-offload")
