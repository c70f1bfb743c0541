"""The `serve` command: load a model, then answer OpenAI-compatible HTTP requests until Ctrl-C."""
from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path

import click

from ..errors import MixtralOffloadError
from .options import MODEL, load_options
from .report import profile_options, profile_session


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one); a one-line error when it cannot be had."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return socket.create_server((host, port), family=family)
    except OSError as exc:
        reason = os.strerror(exc.errno) if (exc.errno or 0) > 0 else exc.strerror or str(exc)  # < 0: a resolver error
        raise MixtralOffloadError(f"cannot listen on {host}:{port}: {reason}") from None


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@click.command()
@MODEL
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Only this machine can connect unless you give another one "
                   "(0.0.0.0: every interface; set --api-key then).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="TCP port; 0 picks a free one (printed at start).")
@click.option("--api-key", envvar="MIXTRAL_OFFLOAD_API_KEY", default=None,
              help="Answer /v1 requests only with 'Authorization: Bearer KEY' (others get a 401). "
                   "[env: MIXTRAL_OFFLOAD_API_KEY]")
@profile_options
@load_options
def serve(model, host, port, api_key, **load_kwargs):
    """Serve the model over an OpenAI-compatible HTTP API (chat completions, completions, models).

    One generation runs at a time; requests wait in arrival order. Point any OpenAI client at
    http://HOST:PORT/v1. With --profile, served requests are recorded and the file is written when
    the server stops (Ctrl-C). See docs/serve.md.

    \b
    Examples:
      mixtral-offload serve ./mixtral-int4 --memory-budget 8GiB
      curl -N http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "x", "stream": true, "messages": [{"role": "user", "content": "Hi"}]}'
    """
    from ..offload.loading import load
    from ..serve.app import Server

    sock = listen(host, port)  # before loading: a taken port costs no load; clients wait in the backlog
    click.echo(f"Loading {model} ...", err=True)
    runtime = load(model, **load_kwargs)
    address = sock.getsockname()
    name = Path(model).resolve().name
    server = Server(runtime, name, lambda text: click.echo(text, err=True), api_key, profile_session(runtime))
    if not is_loopback(host) and api_key is None:
        click.echo(f"warning: listening on {host} without --api-key: anyone who can reach it can use it", err=True)
    url_host = f"[{host}]" if ":" in host else host
    click.echo(f"Serving {name} (context {runtime.max_context} tokens) on http://{url_host}:{address[1]}/v1 "
               f"(Ctrl-C stops)", err=True)
    server.run(sock)
