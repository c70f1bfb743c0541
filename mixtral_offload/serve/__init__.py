"""`mixtral-offload serve`: an OpenAI-compatible HTTP API over one loaded Runtime (see docs/serve.md)."""
