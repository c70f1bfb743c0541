"""The chat REPL through CliRunner: replies, commands, EOF, context trimming, interrupted replies."""
import re

import pytest
from click.testing import CliRunner

from mixtral_offload.cli.main import cli
from mixtral_offload.cache.expert_cache import CacheStats
from mixtral_offload.cli.chat import Conversation, cache_hit_rate, run_repl
from mixtral_offload.offload.loading import load
from mixtral_offload.offload.tokenizer import Message


def chat(path, *args, input):
    return CliRunner().invoke(cli, ["chat", str(path), "-n", "4", "--seed", "1", *map(str, args)], input=input)


@pytest.fixture(scope="module")
def runtime(tiny_checkpoint):
    return load(tiny_checkpoint[0], max_context=96)


def test_reply_stats_reset_quit(tiny_checkpoint):
    path, _ = tiny_checkpoint
    result = chat(path, input="Hi\n/stats\n/reset\n/stats\n/quit\nnever read\n")
    assert result.exit_code == 0, result.output
    assert result.output.count("4 tokens,") == 1 and "tok/s" in result.output  # one reply, one footer
    assert "replies: 1, 4 tokens generated" in result.output
    assert "1 turns kept" in result.output and "0 turns kept" in result.output
    assert "conversation reset" in result.output


def test_reply_matches_runtime_chat(tiny_checkpoint):
    path, _ = tiny_checkpoint
    runtime = load(path)
    expected = "".join(r.text for r in runtime.chat([Message("system", "Be brief."), Message("user", "Hello")],
                                                   max_new_tokens=4, temperature=0))
    result = chat(path, "-t", "0", "--system", "Be brief.", input="Hello\n")  # EOF ends the chat
    assert result.exit_code == 0, result.output
    assert "> " + expected + "\n" in result.output


def test_help_and_unknown_command(tiny_checkpoint):
    result = chat(tiny_checkpoint[0], input="/help\n/nope\n")
    assert result.exit_code == 0
    assert "/reset" in result.output and "partial reply is kept" in result.output
    assert "unknown command /nope" in result.output


def test_second_turn_reuses_the_cache(runtime):
    conversation = Conversation(runtime, "Be brief.")
    runtime.reset()
    list(conversation.reply("Hi", max_new_tokens=3, temperature=0))
    first_prompt = len(runtime.tokenizer.encode_chat(conversation.messages()[:1] + conversation.turns[:1]))
    counts = []
    runtime.model.forward = counting(runtime.model.forward, counts)
    try:
        list(conversation.reply("And then?", max_new_tokens=3, temperature=0))
    finally:
        del runtime.model.forward
    prompt = runtime.tokenizer.encode_chat(conversation.messages()[:-1])
    generated = len(conversation.turns[1].token_ids)
    # the first prompt and the reply as generated stay cached (all but its last token, never fed back)
    assert counts[0] == len(prompt) - (first_prompt + generated - 1)


def counting(forward, counts):
    def wrapper(tokens, *args):
        counts.append(len(tokens))
        return forward(tokens, *args)
    return wrapper


def test_full_context_drops_oldest_turns(tiny_checkpoint):
    result = chat(tiny_checkpoint[0], "--max-context", "48", input="one two three four five\n" * 4 + "/stats\n")
    assert result.exit_code == 0, result.output
    assert "context full: dropped the oldest" in result.output
    assert int(re.search(r"(\d+) dropped", result.output).group(1)) > 0


def test_too_long_message_is_an_error_not_an_exit(tiny_checkpoint):
    result = chat(tiny_checkpoint[0], "--max-context", "16", input="word " * 40 + "\nHi\n")
    assert result.exit_code == 0, result.output
    assert "error: the message is" in result.output
    assert "tok/s" in result.output  # the next message still gets a reply


def test_interrupted_reply_keeps_partial_text(runtime):
    conversation = Conversation(runtime)
    lines = iter(["Hi", "/stats"])
    seen = []

    def read():
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    original = runtime.chat

    def chat_then_interrupt(messages, **sampling):
        for index, record in enumerate(original(messages, **sampling)):
            seen.append(record.text)
            yield record
            if index == 2:
                raise KeyboardInterrupt

    runtime.chat = chat_then_interrupt
    try:
        run_repl(conversation, read, dict(max_new_tokens=50, temperature=0))
    finally:
        del runtime.chat
    assert [m.role for m in conversation.turns] == ["user", "assistant"]
    assert conversation.turns[1].content == "".join(seen)
    assert conversation.totals.tokens == 3


def test_ctrl_c_at_prompt_exits_cleanly(runtime):
    def read():
        raise KeyboardInterrupt

    run_repl(Conversation(runtime), read, dict(max_new_tokens=2))  # returns, no exception


@pytest.mark.parametrize("stats, rate", [(None, None), (CacheStats(2, hits=[3, 0], misses=[0, 1]), 0.75),
                                         (CacheStats(2), None)])
def test_cache_hit_rate_is_optional(stats, rate):
    class Runtime:
        def cache_stats(self):
            return stats

    assert cache_hit_rate(Runtime()) == rate
