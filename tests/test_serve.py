"""`mixtral-offload serve` as a real subprocess on the demo model, driven by the official openai client.

The reference is the same model loaded in this process: the server must send the tokens that
Runtime.generate / Runtime.chat produce for the same prompt, seed and settings.
"""
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest

import mixtral_offload
from mixtral_offload.demo import DEMO_DIR
from mixtral_offload.offload.tokenizer import Message
from mixtral_offload.profile_report import read_profile

REPO = Path(__file__).resolve().parents[1]
LISTENING = re.compile(r"on http://127\.0\.0\.1:(\d+)/v1")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a dict?"}]
SAMPLED = dict(temperature=0.8, top_p=0.9, seed=3)
API_KEY = "sesame"


class ServerProcess:
    """`python -m mixtral_offload serve DEMO --port 0 ...` with its output in a file; the port read from it."""

    def __init__(self, directory: Path, *args: str):
        self.log_path = directory / "server.log"
        env = {**os.environ, "PYTHONPATH": str(REPO), "XDG_CONFIG_HOME": str(directory / "xdg")}
        for var in ("MIXTRAL_OFFLOAD_MODEL", "MIXTRAL_OFFLOAD_CONFIG", "MIXTRAL_OFFLOAD_MEMORY_BUDGET",
                    "MIXTRAL_OFFLOAD_API_KEY"):
            env.pop(var, None)
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "mixtral_offload", "serve", str(DEMO_DIR),
                                             "--port", "0", *args], stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 180
        while not (match := LISTENING.search(self.log())):
            assert self.process.poll() is None, self.log()
            assert time.monotonic() < deadline, self.log()
            time.sleep(0.1)
        self.base_url = f"http://127.0.0.1:{match.group(1)}/v1"

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_for_log(self, pattern: str) -> re.Match:
        deadline = time.monotonic() + 60
        while not (match := re.search(pattern, self.log())):
            assert time.monotonic() < deadline, self.log()
            time.sleep(0.05)
        return match

    def client(self, api_key: str = API_KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=api_key, max_retries=0, timeout=120)

    def stop(self) -> int:
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the module, with an API key and a profile (checked by the last test, which stops it)."""
    directory = tmp_path_factory.mktemp("serve")
    process = ServerProcess(directory, "--api-key", API_KEY, "--profile", str(directory / "serve.json"))
    yield process
    if process.process.poll() is None:
        process.stop()


@pytest.fixture(scope="module")
def runtime():
    return mixtral_offload.load(DEMO_DIR)


def as_messages(messages):
    return [Message(m["role"], m["content"]) for m in messages]


def texts(records):
    return [record.text for record in records]


def test_chat_equals_runtime_chat(server, runtime):
    expected = list(runtime.chat(as_messages(MESSAGES), max_new_tokens=12, **SAMPLED))
    client = server.client()
    reply = client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=12, **SAMPLED)
    assert reply.object == "chat.completion" and reply.model == "demo"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == "".join(texts(expected))
    assert reply.choices[0].finish_reason == {"stop": "stop"}.get(expected[-1].finish_reason, "length")
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (expected[0].prompt_tokens, len(expected))

    chunks = list(client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=12, stream=True,
                                                 stream_options={"include_usage": True}, **SAMPLED))
    assert chunks[0].choices[0].delta.role == "assistant" and not chunks[0].choices[0].delta.content
    pieces = [chunk.choices[0].delta.content for chunk in chunks[1:-2]]
    assert pieces == [text for text in texts(expected) if text]  # one chunk per token, as generated
    assert chunks[-2].choices[0].finish_reason == reply.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected)
    assert all(chunk.id == chunks[0].id for chunk in chunks)


def test_completions_equal_runtime_generate(server, runtime):
    prompt = "The list type"
    expected = "".join(texts(runtime.generate(prompt, max_new_tokens=10, temperature=0)))
    client = server.client()
    reply = client.completions.create(model="demo", prompt=prompt, max_tokens=10, temperature=0)
    assert reply.object == "text_completion" and reply.choices[0].text == expected
    assert reply.usage.completion_tokens == 10 and reply.choices[0].finish_reason == "length"
    streamed = list(client.completions.create(model="demo", prompt=prompt, max_tokens=10, temperature=0, stream=True))
    assert "".join(chunk.choices[0].text for chunk in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "length"
    ids = runtime.tokenizer.encode(prompt)
    by_ids = client.completions.create(model="demo", prompt=ids, max_tokens=10, temperature=0)
    assert by_ids.choices[0].text == expected and by_ids.usage.prompt_tokens == len(ids)


def test_default_completion_length_and_max_completion_tokens(server):
    client = server.client()
    assert client.completions.create(model="demo", prompt="A", temperature=0).usage.completion_tokens == 16
    reply = client.chat.completions.create(model="demo", messages=MESSAGES, max_completion_tokens=3, max_tokens=9,
                                           temperature=0)
    assert reply.usage.completion_tokens == 3 and reply.choices[0].finish_reason == "length"


def test_seed_reproduces_a_sample(server):
    client = server.client()

    def sample(seed):
        return client.completions.create(model="demo", prompt="Lists", max_tokens=24, temperature=1.0,
                                         seed=seed).choices[0].text

    first = sample(11)
    assert sample(11) == first
    assert len({first, sample(12), sample(13)}) > 1  # the seed decides the sample


def test_models_and_localhost_only(server):
    models = server.client().models.list()
    assert [model.id for model in models.data] == ["demo"] and models.data[0].object == "model"
    listening = [c for c in psutil.Process(server.process.pid).net_connections("inet") if c.status == "LISTEN"]
    assert listening and all(c.laddr.ip == "127.0.0.1" for c in listening)  # localhost only by default


def test_stop_string_across_token_boundaries(server, runtime):
    pieces = [text for text in texts(runtime.generate("The dict type", max_new_tokens=16, temperature=0)) if text]
    full = "".join(pieces)
    stop = pieces[3][-2:] + pieces[4][:2]  # starts inside one token's text, ends inside the next one's
    expected = full[:full.index(stop)]
    client = server.client()
    reply = client.completions.create(model="demo", prompt="The dict type", max_tokens=16, temperature=0,
                                      stop=["never appears", stop])
    assert reply.choices[0].text == expected and reply.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="demo", prompt="The dict type", max_tokens=16, temperature=0,
                                            stop=stop, stream=True))
    assert "".join(chunk.choices[0].text for chunk in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_bad_requests_are_400_with_openai_errors(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model="demo", messages=MESSAGES, n=2)
    assert error.value.status_code == 400 and error.value.param == "n"
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model="demo", messages=MESSAGES, temperature="hot")
    body = error.value.body
    assert set(body) == {"message", "type", "param", "code"}
    assert (body["type"], body["param"], body["code"]) == ("invalid_request_error", "temperature", "invalid_type")
    with pytest.raises(openai.BadRequestError, match="maximum context length is 1024 tokens"):
        client.completions.create(model="demo", prompt="word " * 1100)
    with pytest.raises(openai.BadRequestError, match="alternate user/assistant"):
        client.chat.completions.create(model="demo", messages=[{"role": "assistant", "content": "Hi"},
                                                               {"role": "user", "content": "Hi"}])
    reply = client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=2,
                                           extra_body={"frobnicate": [1, 2]})  # unknown fields are ignored
    assert reply.usage.completion_tokens == 2
    assert "POST /v1/chat/completions: 400 Only n=1 is supported" in server.log()


def test_second_turn_reuses_the_kv_prefix(server):
    client = server.client()
    first = client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=8, temperature=0)
    turns = MESSAGES + [{"role": "assistant", "content": first.choices[0].message.content},
                        {"role": "user", "content": "And a list?"}]
    second = client.chat.completions.create(model="demo", messages=turns, max_tokens=8, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens  # only the reply and the new message were read
    assert f"{second.usage.prompt_tokens} tokens in ({cached} cached)" in server.log()


def test_disconnect_mid_stream_then_a_normal_request(server):
    client = server.client()
    stream = client.completions.create(model="demo", prompt="The", max_tokens=1000, temperature=0, stream=True)
    for _, _ in zip(range(3), stream):
        pass
    stream.close()
    match = server.wait_for_log(r"POST /v1/completions (cmpl-\w+): \d+ tokens in \(\d+ cached\), (\d+) out, "
                                r"[^\n]*finish cancelled")
    assert int(match.group(2)) < 1000
    reply = client.completions.create(model="demo", prompt="The", max_tokens=6, temperature=0)
    assert reply.usage.completion_tokens == 6 and reply.choices[0].finish_reason == "length"


def test_two_clients_at_once_are_answered_in_arrival_order(server):
    chunks = {"a": [], "b": []}
    a_queued = threading.Event()

    def run(name):
        for chunk in server.client().chat.completions.create(
                model="demo", messages=MESSAGES, max_tokens=48, temperature=0, stream=True,
                stream_options={"include_usage": True}):
            chunks[name].append(chunk)
            a_queued.set()  # a's role chunk is sent once a is in the queue

    threads = [threading.Thread(target=run, args=(name,)) for name in "ab"]
    threads[0].start()
    assert a_queued.wait(60)
    threads[1].start()
    for thread in threads:
        thread.join(120)
    for name in "ab":
        assert chunks[name][-1].usage.completion_tokens == 48, chunks[name][-3:]
        assert chunks[name][-2].choices[0].finish_reason == "length"
    text = {name: "".join(chunk.choices[0].delta.content or "" for chunk in chunks[name] if chunk.choices)
            for name in "ab"}
    assert text["a"] == text["b"]
    log = server.log()  # the worker logs each generation as it ends, and runs one at a time
    assert 0 <= log.index(chunks["a"][0].id + ":") < log.index(chunks["b"][0].id + ":")
    assert float(re.search(chunks["b"][0].id + r":.* queued ([\d.]+) s", log).group(1)) > 0  # b waited for a


def test_api_key(server):
    with pytest.raises(openai.AuthenticationError) as error:
        server.client("wrong").models.list()
    assert error.value.status_code == 401 and error.value.code == "invalid_api_key"
    without_key = httpx.get(server.base_url + "/models")
    assert without_key.status_code == 401 and without_key.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.base_url.removesuffix("/v1") + "/health").json() == {"status": "ok"}
    with pytest.raises(openai.AuthenticationError):
        server.client("wrong").completions.create(model="demo", prompt="A", max_tokens=5)
    assert server.client().completions.create(model="demo", prompt="A", max_tokens=5).usage.completion_tokens == 5


def test_ctrl_c_cuts_a_stream_and_writes_the_profile(server):
    """Last: stops the module's server with a stream in flight; the profile has a sampling span per token out."""
    stream = server.client().completions.create(model="demo", prompt="The", max_tokens=1000, temperature=0,
                                                stream=True)
    next(iter(stream))
    assert server.stop() == 130, server.log()  # the CLI's exit code after Ctrl-C
    with pytest.raises(openai.APIError, match="the server is stopping"):
        list(stream)
    profile = read_profile(server.log_path.parent / "serve.json")
    assert profile["command"] == "serve"
    tokens_out = sum(int(count) for count in re.findall(r" (\d+) out, ", server.log()))
    assert tokens_out > 100 and profile["spans"]["sampling"]["count"] == tokens_out
