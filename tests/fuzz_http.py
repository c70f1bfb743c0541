"""The HTTP surface of the input fuzzer: damaged requests to the OpenAI-compatible server, in process
through its ASGI app (starlette's TestClient runs the lifespan and the generation worker).

clean: a 4xx whose body is OpenAI's error object; accepted: a 200 with a well-formed completion (or
stream of chunks ending in [DONE]); traceback: a 5xx, an exception out of the app, or a malformed
reply. Every CHECK_EVERY cases the server must still answer a valid request.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mixtral_offload.offload.loading import load
from mixtral_offload.serve.app import Server

CHECK_EVERY = 10
MAX_CONTEXT = 32   # bounds every generation: a huge max_tokens stops at the context's end
VALID_CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
VALID_COMPLETION = {"model": "tiny", "prompt": "Hello", "max_tokens": 3}
FIELDS = ["max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed", "n", "stop", "stream",
          "stream_options", "messages", "prompt", "model", "user", "logprobs", "response_format", "tools"]
VALUES = [0, -1, 1, 2, 3, 4, 5, 2**31, 2**63, 2**64, -(2**63), 10**400, 0.5, -0.0, 1.5, 2.0, 2.0000001, 1e-45, 1e308,
          float("nan"), float("inf"), float("-inf"), "", "x", "\ud800", "\x00", "a" * 5000, "ab " * 400_000, True,
          False, None, [], [1],
          ["a", "b"], list("abcde"), [""], [1, 2**70], [[1, 2]], [[]], {}, {"include_usage": True},
          {"include_usage": 1}, {"a": 1}]
ROLES = ["user", "system", "assistant", "developer", "tool", "function", "", "USER", None, 5, ["user"]]
CONTENTS = ["Hi", "", "\ud800x", "\x00", "a\ufffdb", "Ω" * 3000, None, 5, [], [{"type": "text", "text": "Hi"}],
            [{"type": "image_url"}], [{"type": "text", "text": 5}], ["x"], {"text": "x"}]
PROMPTS = ["", "Hello", "\ud800", [1, 2, 3], [], [0], [-1], [8191], [8192], [2**64], [1.5], [True], ["a", "b"],
           [[1, 2]], [[]], [""], "x" * 3000, list(range(40))]
RAW_BODIES = [b"", b"{", b"null", b"[]", b"42", b'"x"', b"\xff\xfe{}", b'{"messages": "\xff"}', b"[" * 100000,
              b'{"a":' * 50000, b"NaN", b"model=x&prompt=y", b"\x00" * 64, b'{"messages": [{"role": "user", '
              b'"content": "Hi"}], "max_tokens": 1}' * 2, b'{"prompt": "Hi", "max_tokens": 1e999}',
              b'{"prompt": "\\ud800\\udc00x", "max_tokens": 1}', b'{"prompt": "Hi", "max_tokens": 01}']
CONTENT_TYPES = ["application/json", "text/plain", "application/x-www-form-urlencoded", "", "application/json; "
                 "charset=latin-1", "multipart/form-data; boundary=x"]
_state: dict = {}


def client(model: Path):
    """This process's TestClient on a server of the model, started once (lifespan and worker running)."""
    if "client" not in _state:
        from starlette.testclient import TestClient

        server = Server(load(model, max_context=MAX_CONTEXT), "tiny", lambda line: None)
        _state["client"] = TestClient(server.app()).__enter__()
        _state["cases"] = 0
    return _state["client"]


def pick(rng: np.random.Generator, items: list):
    return items[int(rng.integers(0, len(items)))]


def damaged_request(rng: np.random.Generator) -> tuple[str, str, bytes, dict]:
    """(method, path, body, headers) of one fuzzed request."""
    kind = rng.random()
    headers = {"content-type": pick(rng, CONTENT_TYPES) if rng.random() < 0.2 else "application/json"}
    if kind < 0.05:
        return pick(rng, ["GET", "POST", "DELETE"]), pick(rng, ["/v1/models", "/health", "/v1/nope", "/v1/completions",
                                                                "/v1/chat/completions", "/"]), b"", headers
    path = "/v1/chat/completions" if kind < 0.6 else "/v1/completions"
    if rng.random() < 0.12:
        return "POST", path, pick(rng, RAW_BODIES), headers
    body = json.loads(json.dumps(VALID_CHAT if path.endswith("chat/completions") else VALID_COMPLETION))
    body["stream"] = bool(rng.random() < 0.4)
    for _ in range(int(rng.integers(1, 4))):
        action = rng.random()
        if action < 0.45:
            body[pick(rng, FIELDS)] = pick(rng, VALUES)
        elif action < 0.55:
            body.pop(pick(rng, FIELDS), None)
        elif action < 0.8 and "messages" in body and isinstance(body["messages"], list):
            message = {"role": pick(rng, ROLES), "content": pick(rng, CONTENTS)}
            if rng.random() < 0.2:
                message.pop(pick(rng, ["role", "content"]))
            body["messages"] = [*body["messages"][:int(rng.integers(0, 3))], message][-int(rng.integers(1, 4)):]
            if rng.random() < 0.05:
                body["messages"] *= 3000
        elif action < 0.9:
            body["prompt"] = pick(rng, PROMPTS)
        else:  # a field holding nested arrays, deeper than a JSON parser may recurse
            body[pick(rng, FIELDS)] = "DEEP"
            depth = pick(rng, [10, 500, 5000, 100000])
            return "POST", path, json.dumps(body).encode().replace(b'"DEEP"', b"[" * depth + b"]" * depth), headers
    return "POST", path, json.dumps(body).encode(), headers


def is_error_body(reply) -> bool:
    try:
        error = reply.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return (isinstance(error, dict) and isinstance(error.get("message"), str) and isinstance(error.get("type"), str)
            and "param" in error and "code" in error)


def valid_completion(data: dict, chat: bool, chunk: bool) -> bool:
    """The fields an OpenAI client reads from a completion, a chat completion, or one of their chunks."""
    kind = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
    if not (isinstance(data, dict) and data.get("object") == kind and isinstance(data.get("id"), str)
            and isinstance(data.get("choices"), list)):
        return False
    for choice in data["choices"]:
        if chat:
            text = choice["delta"].get("content", "") if chunk else choice["message"]["content"]
        else:
            text = choice["text"]
        if not isinstance(text, str) or choice["finish_reason"] not in (None, "stop", "length"):
            return False
    return chunk or data["choices"][0]["finish_reason"] in ("stop", "length")


def valid_stream(text: str, chat: bool) -> bool:
    events = [line[len("data: "):] for line in text.split("\n\n") if line]
    if not events or events[-1] != "[DONE]" or any(not line for line in events):
        return False
    return all(valid_completion(json.loads(event), chat, chunk=True) for event in events[:-1])


def outcome_of(reply, path: str) -> tuple[str, str]:
    """clean, accepted or traceback for one reply."""
    detail = f"{reply.status_code} {reply.text[:200]!r}"
    if 400 <= reply.status_code < 500:
        return ("clean", "") if is_error_body(reply) else ("traceback", "an error without OpenAI's error body: " + detail)
    if reply.status_code != 200:
        return "traceback", detail
    if path in ("/v1/models", "/health"):
        return "accepted", ""
    chat = path.endswith("chat/completions")
    try:
        if reply.headers.get("content-type", "").startswith("text/event-stream"):
            ok = valid_stream(reply.text, chat)
        else:
            ok = valid_completion(reply.json(), chat, chunk=False)
    except (ValueError, KeyError, TypeError, AttributeError):
        ok = False
    return ("accepted", "") if ok else ("traceback", "a malformed completion: " + detail)


def http_case(model: Path, rng: np.random.Generator) -> tuple[str, str]:
    from fuzz_surfaces import guarded

    method, path, body, headers = damaged_request(rng)

    def run() -> tuple[str, str]:
        http = client(model)
        outcome = outcome_of(http.request(method, path, content=body, headers=headers), path)
        _state["cases"] += 1
        if outcome[0] != "traceback" and _state["cases"] % CHECK_EVERY == 0:
            check = http.post("/v1/chat/completions", json=VALID_CHAT)
            if outcome_of(check, "/v1/chat/completions") != ("accepted", ""):
                return "traceback", f"no longer answers a valid request: {check.status_code} {check.text[:200]!r}"
        return outcome

    outcome, detail = guarded(run)
    return outcome, detail if outcome in ("clean", "accepted") else f"{method} {path} {body[:200]!r}: {detail}"
