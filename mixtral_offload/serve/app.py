"""The HTTP routes: OpenAI's /v1/chat/completions, /v1/completions and /v1/models, and /health.

A route reads and checks the request (a 400 before anything is queued), hands the prompt ids to the
worker and answers from the events the worker sends back: one JSON object, or a stream of SSE chunks.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import socket
import time
from contextlib import AbstractContextManager, asynccontextmanager, nullcontext
from datetime import datetime
from typing import AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import MixtralOffloadError
from .replies import Reply
from .schemas import Options, RequestError, parse_chat, parse_completion
from .streaming import DONE, EventStream, sse, unless_disconnected
from .worker import CANCELLED, Failure, Finish, Job, Worker

STOPPING = "the server is stopping"


class Server:
    """The state the routes share: the runtime, its worker, the model's name and the optional API key."""

    def __init__(self, runtime, model_name: str, log: Callable[[str], None], api_key: str | None = None,
                 session: AbstractContextManager = nullcontext()):
        self.runtime, self.model_name, self.log, self.api_key = runtime, model_name, log, api_key
        self.session = session  # entered while serving: the --profile recording
        self.created = int(time.time())
        self.worker: Worker | None = None
        self.loop: asyncio.AbstractEventLoop | None = None  # uvicorn's, once serving

    def run(self, sock: socket.socket) -> None:
        """Serve on a listening socket until Ctrl-C or SIGTERM, which first cut the generations short."""
        import uvicorn

        server = self

        class Uvicorn(uvicorn.Server):
            def handle_exit(self, sig, frame) -> None:
                if server.loop is not None:  # a signal handler must not take the jobs' locks itself
                    server.loop.call_soon_threadsafe(server.worker.cancel_all)
                super().handle_exit(sig, frame)

        Uvicorn(uvicorn.Config(self.app(), log_level="warning", access_log=False)).run(sockets=[sock])

    @asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        with self.session:
            self.worker = Worker(self.runtime, self.log)
            self.loop = asyncio.get_running_loop()
            try:
                yield
            finally:
                self.loop = None
                self.worker.stop()

    def app(self) -> Starlette:
        routes = [Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                  Route("/v1/completions", self.completions, methods=["POST"]),
                  Route("/v1/models", self.models, methods=["GET"]),
                  Route("/health", self.health, methods=["GET"])]
        handlers = {RequestError: self.refuse, HTTPException: self.http_error}
        return Starlette(routes=routes, exception_handlers=handlers, lifespan=self.lifespan)

    # -- routes -----------------------------------------------------------------------------------
    async def chat_completions(self, request: Request) -> Response:
        self.authorize(request)
        parsed = parse_chat(await read_json(request))
        try:
            ids = self.runtime.tokenizer.encode_chat(parsed.messages)
        except MixtralOffloadError as exc:
            raise RequestError(str(exc), "messages", "invalid_value") from None
        return await self.generate(request, Reply(self.model_name, chat=True), ids, parsed.options)

    async def completions(self, request: Request) -> Response:
        self.authorize(request)
        parsed = parse_completion(await read_json(request), self.runtime.tokenizer.vocab_size)
        prompt = parsed.prompt
        ids = self.runtime.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        return await self.generate(request, Reply(self.model_name, chat=False), ids, parsed.options)

    async def models(self, request: Request) -> Response:
        self.authorize(request)
        self.log_request(request, 200, self.model_name)
        return JSONResponse({"object": "list", "data": [{"id": self.model_name, "object": "model",
                                                         "created": self.created, "owned_by": "mixtral-offload"}]})

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    # -- generation -------------------------------------------------------------------------------
    async def generate(self, request: Request, reply: Reply, ids: list[int], options: Options) -> Response:
        context = self.runtime.max_context
        if len(ids) >= context:
            raise RequestError(f"This model's maximum context length is {context} tokens, but the prompt has "
                               f"{len(ids)} tokens: shorten it (or restart the server with a larger "
                               f"--max-context).", "messages" if reply.chat else "prompt", "context_length_exceeded")
        sampling = dict(max_new_tokens=options.max_tokens or context - len(ids), temperature=options.temperature,
                        top_p=options.top_p, top_k=options.top_k, seed=options.seed)
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        job = Job(f"{request.method} {request.url.path} {reply.id}", ids, sampling, options.stop,
                  lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        self.worker.submit(job)
        if options.stream:
            return EventStream(stream(reply, events, options.include_usage), job.cancel)
        try:
            result = await unless_disconnected(request.receive, lambda: collect(events))
        finally:
            job.cancel()  # the client went away (or the reply is complete: then it changes nothing)
        if result is None:
            return Response(status_code=499)  # nobody reads it
        text, end = result
        if isinstance(end, Failure):
            return error_response(end.message, 500, "server_error")
        if end.reason == CANCELLED:
            return error_response(STOPPING, 503, "server_error")
        return JSONResponse(reply.whole(text, end))

    # -- checks and errors ------------------------------------------------------------------------
    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, key = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            raise RequestError("Incorrect API key provided: send it as 'Authorization: Bearer KEY' (the server's "
                               "--api-key).", None, "invalid_api_key", status=401)

    async def refuse(self, request: Request, exc: RequestError) -> Response:
        self.log_request(request, exc.status, exc.message)
        return JSONResponse(exc.body(), exc.status)

    async def http_error(self, request: Request, exc: HTTPException) -> Response:
        self.log_request(request, exc.status_code, exc.detail)
        return error_response(exc.detail, exc.status_code, "invalid_request_error")

    def log_request(self, request: Request, status: int, detail: str) -> None:
        stamp = datetime.now().isoformat(sep=" ", timespec="seconds")
        self.log(f"{stamp} {request.method} {request.url.path}: {status} {detail}")


def error_response(message: str, status: int, kind: str) -> JSONResponse:
    return JSONResponse(RequestError(message, status=status, kind=kind).body(), status)


async def read_json(request: Request):
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nested too deep
        raise RequestError(f"We could not parse the JSON body of your request ({exc}).", None,
                           "invalid_json") from None


async def collect(events: asyncio.Queue) -> tuple[str, Finish | Failure]:
    """The whole reply text and the job's last event."""
    pieces = []
    while isinstance(event := await events.get(), str):
        pieces.append(event)
    return "".join(pieces), event


async def stream(reply: Reply, events: asyncio.Queue, include_usage: bool) -> AsyncIterator[bytes]:
    """The SSE events of a streamed reply: role chunk (chat), text chunks, the finish chunk, usage, [DONE]."""
    if reply.chat:
        yield sse(reply.chunk(None, role=True, with_usage=include_usage))
    while isinstance(event := await events.get(), str):
        yield sse(reply.chunk(event, with_usage=include_usage))
    if isinstance(event, Failure) or event.reason == CANCELLED:
        message = event.message if isinstance(event, Failure) else STOPPING
        yield sse(RequestError(message, status=500, kind="server_error").body())
        return
    yield sse(reply.chunk(None, event.reason, with_usage=include_usage))
    if include_usage:
        yield sse(reply.usage_chunk(event))
    yield DONE
