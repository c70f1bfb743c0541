"""mixtral-offload: run Mixtral-8x7B-class MoE models on one consumer machine."""

__version__ = "0.1.0"
