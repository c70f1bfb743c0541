"""The chat REPL in a real terminal (pexpect): prompt_toolkit line editing and history, a streamed
reply, Ctrl-C in the middle of a long reply, /quit."""
import os
import sys

import pytest

from checkpoints import write_checkpoint

pexpect = pytest.importorskip("pexpect")


@pytest.fixture(scope="module")
def long_context_checkpoint(tmp_path_factory):
    """The tiny model with room for a reply far longer than the test waits (4096 tokens)."""
    path = tmp_path_factory.mktemp("tiny-4k")
    write_checkpoint(path, max_position_embeddings=4096)
    return path


def test_chat_in_a_terminal(long_context_checkpoint, tmp_path):
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config"), "PROMPT_TOOLKIT_NO_CPR": "1",
           "MIXTRAL_OFFLOAD_MODEL": str(long_context_checkpoint)}
    child = pexpect.spawn(sys.executable, ["-m", "mixtral_offload", "chat", "-t", "0", "-n", "100000"],
                          env=env, encoding="utf-8", timeout=40, dimensions=(40, 200))
    try:
        child.expect("/help for commands")
        child.expect(">")  # prompt_toolkit draws the prompt with cursor moves between '>' and the space
        child.sendline("Hi")
        child.expect(r"\x1b\[\?2004l")     # prompt_toolkit has handed the terminal back: the reply streams
        child.expect(r"[^\s\x1b]{3}")      # reply text appears
        child.sendintr()                  # Ctrl-C in the middle of a reply of up to 4000 tokens
        child.expect(r"\[reply interrupted\]")
        child.expect(">")
        child.sendline("/stats")
        child.expect(r"replies: 1, (\d+) tokens generated")
        assert 1 <= int(child.match.group(1)) < 1000
        child.expect(">")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    assert "Traceback" not in child.before
    history = (tmp_path / "config" / "mixtral-offload" / "chat-history").read_text()
    assert "+Hi" in history and "+/stats" in history


def test_ctrl_c_at_the_prompt_exits_0(tiny_checkpoint, tmp_path):
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config"), "PROMPT_TOOLKIT_NO_CPR": "1"}
    child = pexpect.spawn(sys.executable, ["-m", "mixtral_offload", "chat", str(tiny_checkpoint[0])],
                          env=env, encoding="utf-8", timeout=40)
    try:
        child.expect("/help for commands")
        child.expect(">")
        child.sendintr()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    assert "Traceback" not in child.before and "interrupted" not in child.before
