"""OpenAI request bodies read into dataclasses; a wrong type or value is a RequestError (OpenAI's error JSON).

Fields this server does not know are ignored, as the OpenAI API ignores them for models that lack them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..offload.generate import TOP_K_MAX
from ..offload.tokenizer import Message
from ..validate import UINT64_MAX

MAX_STOPS = 4                 # stop strings per request, as OpenAI allows
COMPLETION_MAX_TOKENS = 16    # /v1/completions default max_tokens, as OpenAI's; chat defaults to the context
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class RequestError(Exception):
    """A request the server refuses; `body()` is OpenAI's error object."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.kind = message, param, code, status, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Options:
    """Generation settings shared by both endpoints; max_tokens None means up to the context's end."""

    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


@dataclass(frozen=True)
class ChatRequest:
    messages: list[Message]
    options: Options


@dataclass(frozen=True)
class CompletionRequest:
    prompt: str | list[int]  # text (BOS is prepended) or token ids as given
    options: Options


def _type_error(name: str, expected: str, value) -> RequestError:
    return RequestError(f"Invalid type for '{name}': expected {expected}, but got {type(value).__name__} instead.",
                        name, "invalid_type")


def _value_error(name: str, message: str) -> RequestError:
    return RequestError(f"Invalid value for '{name}': {message}", name, "invalid_value")


def _integer(body: dict, name: str, default: int | None, low: int | None = None,
             high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _type_error(name, "an integer", value)
    if low is not None and value < low:
        raise _value_error(name, f"{value} is below the minimum of {low}.")
    if high is not None and value > high:
        raise _value_error(name, f"{value} is above the maximum of {high}.")
    return value


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _type_error(name, "a number", value)
    if value > high or value < low or (low_open and value == low) or not math.isfinite(value):  # a huge int: no float
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise _value_error(name, f"{value} is outside {interval}.")
    return float(value)


def _boolean(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _type_error(name, "a boolean", value)
    return value


def _stops(body: dict) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(stop, str) for stop in stops):
        raise _type_error("stop", "a string or an array of strings", value)
    if len(stops) > MAX_STOPS:
        raise _value_error("stop", f"at most {MAX_STOPS} stop strings, got {len(stops)}.")
    return tuple(stops)


def _options(body: dict, max_tokens_default: int | None, max_tokens_names: tuple[str, ...]) -> Options:
    if _integer(body, "n", 1) != 1:
        raise RequestError("Only n=1 is supported: one model generates one sequence at a time.", "n",
                           "invalid_value")
    max_tokens = max_tokens_default
    for name in reversed(max_tokens_names):  # the first name wins when several are given
        max_tokens = _integer(body, name, max_tokens, low=1)
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise _type_error("stream_options", "an object", stream_options)
    name = "stream_options.include_usage"
    include_usage = _boolean({name: (stream_options or {}).get("include_usage")}, name, False)
    return Options(max_tokens=max_tokens,
                   temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                   top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
                   top_k=_integer(body, "top_k", 0, low=0, high=TOP_K_MAX),
                   seed=_integer(body, "seed", None, low=0, high=UINT64_MAX),
                   stop=_stops(body),
                   stream=_boolean(body, "stream", False),
                   include_usage=include_usage)


def _content(value, name: str) -> str:
    """A message's text: a string, or an array of text parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for index, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(f"'{name}[{index}]': only text parts are supported.", f"{name}[{index}]",
                                   "invalid_value")
            texts.append(part["text"])
        return "".join(texts)
    raise _type_error(name, "a string or an array of text parts", value)


def _message(value, index: int) -> Message:
    name = f"messages[{index}]"
    if not isinstance(value, dict):
        raise _type_error(name, "an object", value)
    role = value.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise RequestError(f"'{name}.role': {role!r} is not one of {', '.join(ROLES)}.", f"{name}.role",
                           "invalid_value")
    return Message(ROLES[role], _content(value.get("content"), f"{name}.content"))


def _require_object(body) -> dict:
    if not isinstance(body, dict):
        raise RequestError("The request body must be a JSON object.", None, "invalid_type")
    return body


def parse_chat(body) -> ChatRequest:
    """A /v1/chat/completions body; max_completion_tokens wins over the older max_tokens."""
    body = _require_object(body)
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise _type_error("messages", "an array", messages)
    if not messages:
        raise _value_error("messages", "at least one message is needed.")
    return ChatRequest([_message(message, index) for index, message in enumerate(messages)],
                       _options(body, None, ("max_completion_tokens", "max_tokens")))


def parse_completion(body, vocab_size: int) -> CompletionRequest:
    """A /v1/completions body with one prompt: a string, token ids, or an array holding one of those."""
    body = _require_object(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
            raise _type_error("prompt", "a string, a non-empty array of token ids, or an array of one of these",
                              prompt)
        if not all(0 <= i < vocab_size for i in prompt):
            raise _value_error("prompt", f"token ids must be in [0, {vocab_size}).")
    elif not isinstance(prompt, str):
        raise _type_error("prompt", "a string or an array of token ids (one prompt per request)", prompt)
    return CompletionRequest(prompt, _options(body, COMPLETION_MAX_TOKENS, ("max_tokens",)))
