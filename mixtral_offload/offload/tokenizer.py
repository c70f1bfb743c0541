"""sentencepiece tokenizer and the Mixtral-Instruct chat template (as mistral-common v1 encodes it)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import sentencepiece

from ..errors import MixtralOffloadError
from ..validate import check_utf8, read_regular

TOKENIZER_LIMIT = 64 << 20  # bytes; Mixtral's tokenizer.model is 0.5 MB


@dataclass(frozen=True)
class Message:
    """One chat message; role is 'system', 'user' or 'assistant'."""

    role: str
    content: str
    token_ids: tuple[int, ...] | None = None  # an assistant reply's ids as generated (kept for KV-cache reuse)


class Tokenizer:
    """A sentencepiece model with Mixtral's special ids (<unk> 0, <s> 1, </s> 2 by default)."""

    def __init__(self, path: str | Path):
        data = read_regular(path, TOKENIZER_LIMIT, "tokenizer.model")
        self._load(lambda sp: sp.LoadFromSerializedProto(data), str(path))

    @classmethod
    def from_model_bytes(cls, model: bytes, source: str) -> "Tokenizer":
        """A tokenizer from a serialized sentencepiece model (e.g. rebuilt from a GGUF); source names it in errors."""
        tokenizer = cls.__new__(cls)
        tokenizer._load(lambda sp: sp.LoadFromSerializedProto(model), source)
        return tokenizer

    def _load(self, load, source: str) -> None:
        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            load(self.sp)
            self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
            self.vocab_size = self.sp.GetPieceSize()
            for piece_id in range(self.vocab_size):  # a damaged piece would fail only when decoded
                self.sp.IdToPiece(piece_id)
        except (RuntimeError, OSError, ValueError, UnicodeDecodeError) as exc:
            raise MixtralOffloadError(f"{source}: not a sentencepiece model ({str(exc)[:200]})") from None
        if min(self.bos_id, self.eos_id) < 0 or max(self.bos_id, self.eos_id) >= self.vocab_size:
            raise MixtralOffloadError(f"{source}: the tokenizer has no usable <s> and </s> ids "
                                      f"(bos {self.bos_id}, eos {self.eos_id}, {self.vocab_size} pieces)")

    def encode(self, text: str, bos: bool = True) -> list[int]:
        """Token ids of text, with BOS prepended unless bos=False."""
        ids = self.sp.EncodeAsIds(check_utf8(text, "the text"))
        return [self.bos_id, *ids] if bos else ids

    def decode(self, ids: list[int]) -> str:
        """Text of token ids (special tokens dropped)."""
        return self.sp.DecodeIds([i for i in ids if i not in (self.bos_id, self.eos_id)])

    def encode_chat(self, messages: list[Message]) -> list[int]:
        """Ids of a conversation in the Mixtral-Instruct template, ready for the assistant's next reply.

        `<s>[INST] user [/INST] answer</s>[INST] user [/INST]`; a system message has no slot of its
        own and is put before the first user message, separated by a blank line.
        """
        system = "\n\n".join(m.content for m in messages if m.role == "system")
        turns = [m for m in messages if m.role != "system"]
        if not turns or turns[-1].role != "user":
            raise MixtralOffloadError("a chat must end with a user message")
        ids = [self.bos_id]
        for index, message in enumerate(turns):
            expected = "user" if index % 2 == 0 else "assistant"
            if message.role != expected:
                raise MixtralOffloadError(f"chat turns must alternate user/assistant; turn {index} is {message.role}")
            if message.role == "user":
                content = f"{system}\n\n{message.content}" if system and index == 0 else message.content
                ids += self.sp.EncodeAsIds(check_utf8(f"[INST] {content} [/INST]", "the message"))
            else:
                reply = list(message.token_ids) if message.token_ids is not None else self.sp.EncodeAsIds(message.content)
                ids += reply + [self.eos_id]
        return ids


class StreamDecoder:
    """Turns a growing list of generated ids into text pieces, holding back incomplete UTF-8."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int) -> str:
        """Add one id; return the new text it completes (may be empty)."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # a byte-fallback character still incomplete
            return ""
        piece = text[len(self.emitted):] if text.startswith(self.emitted) else text
        self.emitted = text
        return piece
