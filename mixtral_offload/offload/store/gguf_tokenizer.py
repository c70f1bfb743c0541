"""The sentencepiece model of a GGUF, rebuilt from its tokenizer.ggml.* metadata (vocabulary 'llama')."""
from __future__ import annotations

import math

from gguf import TokenType
from sentencepiece import sentencepiece_model_pb2 as spm

from .gguf_header import Metadata


def sentencepiece_model(meta: Metadata) -> bytes:
    """A serialized sentencepiece ModelProto from the pieces, scores and types the GGUF carries.

    A GGUF does not carry the normalizer and splitting options; they are set to the Llama/Mistral
    sentencepiece models' (BPE with byte fallback, no normalization, a dummy-prefix space unless
    tokenizer.ggml.add_space_prefix says otherwise, whitespace-only pieces allowed).
    """
    kind = meta.string("tokenizer.ggml.model")
    if kind != "llama":
        raise meta.fail("tokenizer.ggml.model", f"is {kind!r}: only a sentencepiece ('llama') vocabulary is supported")
    tokens = meta.strings("tokenizer.ggml.tokens")
    count = len(tokens)
    scores = meta.floats("tokenizer.ggml.scores", count)
    types = meta.integers("tokenizer.ggml.token_type", count)
    known = {int(t) for t in TokenType}
    for index, (score, token_type) in enumerate(zip(scores, types)):
        if token_type not in known:
            raise meta.fail("tokenizer.ggml.token_type", f"entry {index} is {token_type}, not a token type")
        if not math.isfinite(score):
            raise meta.fail("tokenizer.ggml.scores", f"entry {index} is {score}")
    special = {}
    for role, default, wanted in (("unk", 0, TokenType.UNKNOWN), ("bos", 1, TokenType.CONTROL),
                                  ("eos", 2, TokenType.CONTROL)):
        key = f"tokenizer.ggml.{role}_token_id"
        special[role] = meta.integer(key, 0, count - 1, default=default)
        if types[special[role]] != wanted:
            raise meta.fail(key, f"is token {special[role]} of type {TokenType(types[special[role]]).name}, "
                                 f"expected {wanted.name}")

    proto = spm.ModelProto()
    for token, score, token_type in zip(tokens, scores, types):
        proto.pieces.add(piece=token, score=score, type=token_type)  # the two enums number types alike
    trainer = proto.trainer_spec
    trainer.model_type = spm.TrainerSpec.BPE
    trainer.vocab_size = count
    trainer.byte_fallback = TokenType.BYTE in types
    trainer.allow_whitespace_only_pieces = True
    trainer.unk_id, trainer.bos_id, trainer.eos_id, trainer.pad_id = special["unk"], special["bos"], special["eos"], -1
    trainer.unk_piece, trainer.bos_piece, trainer.eos_piece = (tokens[special[r]] for r in ("unk", "bos", "eos"))
    normalizer = proto.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = meta.boolean("tokenizer.ggml.add_space_prefix", True)
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    return proto.SerializeToString()
