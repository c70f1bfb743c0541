"""The `chat` command: a multi-turn REPL on the Mixtral-Instruct template, streaming each reply."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import click

from ..errors import MixtralOffloadError
from ..validate import decode_utf8
from ..offload.generate import GenerationRecord
from ..offload.tokenizer import Message
from .options import MODEL, load_options, sampling_options
from .report import profile_options, start_profiling

HELP = """\
Commands:
  /help    this text
  /stats   tokens in the context, replies so far, speed, expert cache hit rate
  /reset   forget the conversation (the system message stays)
  /quit    leave (so do /exit, Ctrl-D, and Ctrl-C at the prompt: asked first once there is a conversation)
Ctrl-C during a reply stops it; the partial reply is kept in the conversation.
When the context fills, the oldest turns are dropped (with a notice)."""


@dataclass
class ChatTotals:
    """What /stats reports for the session so far."""

    replies: int = 0
    tokens: int = 0            # generated
    decode_seconds: float = 0.0
    dropped_turns: int = 0


@dataclass
class Conversation:
    """The messages of a chat and the fitting of them into the model's context."""

    runtime: object
    system: str | None = None
    turns: list[Message] = field(default_factory=list)  # alternating user / assistant
    totals: ChatTotals = field(default_factory=ChatTotals)

    def messages(self, user_text: str | None = None) -> list[Message]:
        """System (if any), the turns, and a pending user message."""
        head = [Message("system", self.system)] if self.system else []
        tail = [Message("user", user_text)] if user_text is not None else []
        return head + self.turns + tail

    def fit(self, user_text: str, reply_room: int) -> int:
        """Drop the oldest user/assistant pairs until the prompt plus reply_room fits; return pairs dropped.

        Raises MixtralOffloadError when the new message alone does not fit.
        """
        context = self.runtime.max_context
        room = min(reply_room, context // 2)
        dropped = 0
        while True:
            prompt = len(self.runtime.tokenizer.encode_chat(self.messages(user_text)))
            if prompt + room <= context or not self.turns:
                break
            del self.turns[:2]
            dropped += 1
        if prompt >= context:
            raise MixtralOffloadError(f"the message is {prompt} tokens long with the system text, but the "
                                      f"context holds {context}: shorten it or raise --max-context")
        self.totals.dropped_turns += dropped
        return dropped

    def reply(self, user_text: str, **sampling) -> Iterator[GenerationRecord]:
        """Stream the assistant's reply; the user message and the (possibly partial) reply are kept.

        If the consumer stops early (Ctrl-C), whatever text arrived stays in the conversation; a reply
        interrupted before any text drops the user message too.
        """
        pieces: list[str] = []
        ids: list[int] = []
        last: GenerationRecord | None = None
        try:
            for last in self.runtime.chat(self.messages(user_text), **sampling):
                pieces.append(last.text)
                if last.finish_reason != "stop":
                    ids.append(last.token_id)
                yield last
        finally:
            text = "".join(pieces)  # the ids as generated are kept, so the next turn reuses the KV cache
            if text.strip():
                self.turns += [Message("user", user_text), Message("assistant", text, tuple(ids))]
            if last is not None:
                self.totals.replies += 1
                self.totals.tokens += last.index + 1
                self.totals.decode_seconds += max(last.elapsed_seconds - last.prompt_seconds, 0.0)

    def reset(self) -> None:
        self.turns = []
        self.runtime.reset()


def cache_hit_rate(runtime) -> float | None:
    """The expert cache's hit rate, or None without a cache or before its first lookup."""
    stats = runtime.cache_stats()
    if stats is None or not sum(stats.hits) + sum(stats.misses):
        return None
    return stats.hit_rate


def footer(record: GenerationRecord, runtime) -> str:
    """One line after a reply: tokens, speed, prompt time, hit rate."""
    parts = [f"{record.index + 1} tokens", f"{record.tokens_per_second:.1f} tok/s",
             f"prompt {record.prompt_tokens} tokens {record.prompt_seconds:.2f} s"]
    rate = cache_hit_rate(runtime)
    if rate is not None:
        parts.append(f"cache hit rate {rate:.0%}")
    if record.finish_reason == "context":
        parts.append("stopped: context full")
    return "[" + ", ".join(parts) + "]"


def stats_text(conversation: Conversation) -> str:
    runtime, totals = conversation.runtime, conversation.totals
    speed = totals.tokens / totals.decode_seconds if totals.decode_seconds > 0 else 0.0
    lines = [f"context: {len(runtime.cached_ids)} of {runtime.max_context} tokens cached, "
             f"{len(conversation.turns) // 2} turns kept, {totals.dropped_turns} dropped",
             f"replies: {totals.replies}, {totals.tokens} tokens generated, {speed:.1f} tok/s decode"]
    rate = cache_hit_rate(runtime)
    if rate is not None:
        lines.append(f"expert cache hit rate: {rate:.1%}")
    return "\n".join(lines)


def line_reader(prompt: str) -> Callable[[], str]:
    """A function returning the next input line: prompt_toolkit with history on a terminal, else input().

    Raises EOFError at end of input and KeyboardInterrupt on Ctrl-C, like input().
    """
    if sys.stdin.isatty() and sys.stdout.isatty():
        try:
            from prompt_toolkit import PromptSession
            from prompt_toolkit.history import FileHistory, InMemoryHistory
        except ImportError:
            pass
        else:
            history_file = Path(click.get_app_dir("mixtral-offload")) / "chat-history"
            try:
                history_file.parent.mkdir(parents=True, exist_ok=True)
                history = FileHistory(str(history_file))
            except OSError:
                history = InMemoryHistory()
            session = PromptSession(history=history)
            return lambda: session.prompt(prompt)

    def read() -> str:
        click.echo(prompt, nl=False)
        line = getattr(sys.stdin, "buffer", sys.stdin).readline()  # bytes: a bad byte is an error, not an exit
        if not line:
            raise EOFError
        return (decode_utf8(line, "input") if isinstance(line, bytes) else line).rstrip("\n")

    return read


def note(text: str) -> None:
    """A status line to stderr, dimmed on a terminal."""
    click.secho(text, err=True, dim=True)


def run_repl(conversation: Conversation, read_line: Callable[[], str], sampling: dict) -> None:
    """Read messages and commands until /quit, EOF or Ctrl-C at the prompt."""
    max_new_tokens = sampling["max_new_tokens"]
    interrupted = False  # the last reply was stopped with Ctrl-C: a second Ctrl-C may be a reflex
    while True:
        try:
            line = read_line()
        except EOFError:
            click.echo()
            return
        except KeyboardInterrupt:
            click.echo()
            if not (interrupted or conversation.turns) or confirm_leave(read_line):
                return
            continue
        except MixtralOffloadError as exc:
            note(f"error: {exc}")
            continue
        interrupted = False
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command = text.split()[0].lower()
            if command in ("/quit", "/exit"):
                return
            if command == "/help":
                click.echo(HELP)
            elif command == "/reset":
                conversation.reset()
                note("conversation reset")
            elif command == "/stats":
                click.echo(stats_text(conversation))
            else:
                note(f"unknown command {command}; /help lists them")
            continue
        try:
            dropped = conversation.fit(text, max_new_tokens)
        except MixtralOffloadError as exc:
            note(f"error: {exc}")
            continue
        if dropped:
            note(f"context full: dropped the oldest {dropped} turn{'s' if dropped > 1 else ''}")
        record = None
        try:
            for record in conversation.reply(text, **sampling):
                click.echo(record.text, nl=False)
                sys.stdout.flush()
        except KeyboardInterrupt:
            click.echo()
            note("[reply interrupted]")
            interrupted = True
            continue
        except MixtralOffloadError as exc:
            click.echo()
            note(f"error: {exc}")
            continue
        click.echo()
        if record is not None:
            note(footer(record, conversation.runtime))


def confirm_leave(read_line: Callable[[], str]) -> bool:
    """Ask before a Ctrl-C at the prompt ends a chat that holds a conversation; Ctrl-C or EOF again: yes."""
    note("Leave the chat and lose the conversation? [y/N]")
    try:
        answer = read_line()
    except (EOFError, KeyboardInterrupt):
        click.echo()
        return True
    except MixtralOffloadError:
        return False
    return answer.strip().lower() in ("y", "yes")


@click.command()
@MODEL
@click.option("--system", "-s", default=None, help="System text, put before the first user message.")
@sampling_options(max_new_tokens=512, temperature=0.7)
@profile_options
@load_options
def chat(model, system, max_new_tokens, temperature, top_p, top_k, seed, **load_kwargs):
    """Chat with an instruct model: type a message, the reply streams back.

    Earlier turns stay in the KV cache, so a new turn only reads the new message. Type /help for
    the commands (/reset, /stats, /quit). Ctrl-C stops a reply; at the prompt, Ctrl-C or Ctrl-D exits.

    \b
    Examples:
      mixtral-offload chat ./mixtral-int4
      mixtral-offload chat ./mixtral-int4 --system "Answer in one sentence." -t 0.3
      MIXTRAL_OFFLOAD_MODEL=./mixtral-int4 mixtral-offload chat --profile chat.json
    """
    from ..offload.loading import load

    note(f"Loading {model} (a first run also compiles the CPU kernels, 10-30 s; later runs reuse them) ...")
    runtime = load(model, **load_kwargs)
    conversation = Conversation(runtime, system)
    sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    start_profiling(runtime)
    note(f"Chatting with {model} (context {runtime.max_context} tokens). /help for commands, /quit to leave.")
    run_repl(conversation, line_reader("> "), sampling)
