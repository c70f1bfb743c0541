"""Chat-template ids must equal mistral-common's MistralTokenizer.v1().encode_chat_completion."""
import pytest
from checkpoints import mixtral_tokenizer_path

from mixtral_offload.errors import MixtralOffloadError
from mixtral_offload.offload.tokenizer import Message, StreamDecoder, Tokenizer

CONVERSATIONS = {
    "single": [("user", "Hello")],
    "multi-turn": [("user", "Hello"), ("assistant", "Hi there!"), ("user", "How are you?")],
    "three-turns-unicode": [("user", "Écris un poème 🙂"), ("assistant", "Voilà:\n  des vers"),
                            ("user", "merci"), ("assistant", "De rien."), ("user", "Encore ?")],
    "system": [("system", "Be brief."), ("user", "Hello"), ("assistant", "Hi"), ("user", "Again")],
}


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(mixtral_tokenizer_path())


def mistral_common_ids(conversation):
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    kinds = {"user": UserMessage, "assistant": AssistantMessage, "system": SystemMessage}
    request = ChatCompletionRequest(messages=[kinds[role](content=text) for role, text in conversation])
    return MistralTokenizer.v1().encode_chat_completion(request).tokens


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_chat_template_matches_mistral_common(tokenizer, name):
    conversation = CONVERSATIONS[name]
    ours = tokenizer.encode_chat([Message(role, text) for role, text in conversation])
    assert ours == mistral_common_ids(conversation)


def test_known_ids(tokenizer):
    assert tokenizer.encode_chat([Message("user", "Hello")]) == [1, 733, 16289, 28793, 22557, 733, 28748, 16289, 28793]
    assert (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)


def test_bad_conversations(tokenizer):
    with pytest.raises(MixtralOffloadError):
        tokenizer.encode_chat([Message("user", "a"), Message("assistant", "b")])
    with pytest.raises(MixtralOffloadError):
        tokenizer.encode_chat([Message("user", "a"), Message("user", "b")])


def test_stream_decoder_rebuilds_text(tokenizer):
    text = "Héllo wörld 🙂, streaming\ntext."
    stream = StreamDecoder(tokenizer)
    pieces = "".join(stream.push(i) for i in tokenizer.encode(text, bos=False))
    assert pieces == text


def test_missing_tokenizer(tmp_path):
    with pytest.raises(MixtralOffloadError, match="tokenizer.model"):
        Tokenizer(tmp_path / "tokenizer.model")
