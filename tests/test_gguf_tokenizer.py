"""The tokenizer rebuilt from a GGUF's metadata must give mistral-common's Mixtral v1 ids."""
import pytest
from checkpoints import write_checkpoint
from gguf_files import write_gguf
from test_tokenizer import CONVERSATIONS, mistral_common_ids

from mixtral_offload.offload.store.gguf import GGUFModel
from mixtral_offload.offload.tokenizer import Message

TEXTS = [
    "Hello world",
    "Écris un poème 🙂 — naïve café, ñandú, Grüße",
    "3.14159 + 1234567890 = 42",
    "a    b\t\tc\n\n\nd   ",
    "  leading and trailing spaces  ",
    "rare characters fall back to bytes: 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ㊙ \x07\x00",
    "日本語のテキストと中文文本",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-vocab")
    write_checkpoint(root / "hf", num_hidden_layers=1, num_local_experts=2, num_experts_per_tok=1)
    return GGUFModel.open(write_gguf(root / "hf", root / "model.gguf", "q8_0")).tokenizer()


def mistral_common_encode(text):
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    return MistralTokenizer.v1().instruct_tokenizer.tokenizer.encode(text, bos=False, eos=False)


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_chat_template_matches_mistral_common(tokenizer, name):
    conversation = CONVERSATIONS[name]
    ours = tokenizer.encode_chat([Message(role, text) for role, text in conversation])
    assert ours == mistral_common_ids(conversation)


@pytest.mark.parametrize("text", TEXTS)
def test_plain_text_matches_mistral_common(tokenizer, text):
    ids = tokenizer.encode(text, bos=False)
    assert ids == mistral_common_encode(text)
    assert tokenizer.decode(ids) == text


def test_special_ids(tokenizer):
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.vocab_size) == (1, 2, 32000)
    assert all(tokenizer.sp.IsByte(i) for i in tokenizer.encode("𝔘", bos=False)[1:])   # byte fallback
