"""OpenAI response objects as plain dicts: completions, chat completions, their stream chunks, usage."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from .worker import Finish


def usage(finish: Finish) -> dict:
    return {"prompt_tokens": finish.prompt_tokens, "completion_tokens": finish.completion_tokens,
            "total_tokens": finish.prompt_tokens + finish.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": finish.cached_tokens}}


@dataclass(frozen=True)
class Reply:
    """What every object of one response shares: id, creation time, model, endpoint kind."""

    model: str
    chat: bool  # /v1/chat/completions, else /v1/completions
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        if not self.id:
            object.__setattr__(self, "id", ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex[:24])

    def _object(self, kind: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def whole(self, text: str, finish: Finish) -> dict:
        """The non-streamed response."""
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish.reason}
            body = self._object("chat.completion", [choice])
        else:
            body = self._object("text_completion", [{"index": 0, "text": text, "logprobs": None,
                                                     "finish_reason": finish.reason}])
        return {**body, "usage": usage(finish)}

    def chunk(self, text: str | None, finish_reason: str | None = None, role: bool = False,
              with_usage: bool = False) -> dict:
        """A stream chunk: a text piece, the first (role) chunk of a chat, or the last one with a finish reason.

        With stream_options.include_usage every chunk carries "usage": null, and a final chunk with no
        choices carries the usage (see `usage_chunk`).
        """
        if self.chat:
            delta = ({"role": "assistant", "content": ""} if role else
                     {"content": text} if text is not None else {})
            body = self._object("chat.completion.chunk", [{"index": 0, "delta": delta, "logprobs": None,
                                                           "finish_reason": finish_reason}])
        else:
            body = self._object("text_completion", [{"index": 0, "text": text or "", "logprobs": None,
                                                     "finish_reason": finish_reason}])
        return {**body, "usage": None} if with_usage else body

    def usage_chunk(self, finish: Finish) -> dict:
        return {**self._object("chat.completion.chunk" if self.chat else "text_completion", []),
                "usage": usage(finish)}
