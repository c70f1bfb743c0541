"""The server's pure parts: stop strings on streamed text, and request parsing into OpenAI errors."""
import pytest
from hypothesis import given, settings, strategies as st

from mixtral_offload.offload.tokenizer import Message
from mixtral_offload.serve.schemas import RequestError, parse_chat, parse_completion
from mixtral_offload.serve.stops import StopMatcher

PIECES = st.lists(st.text(alphabet="ab\n", max_size=4), max_size=8)
STOPS = st.lists(st.text(alphabet="ab\n", min_size=1, max_size=3), max_size=3)


def reference_cut(text: str, stops: list[str]) -> tuple[str, bool]:
    """Read char by char: the text before the first stop string to complete, and whether one did."""
    for end in range(1, len(text) + 1):
        ending = [stop for stop in stops if stop and text[:end].endswith(stop)]
        if ending:
            return text[:end - max(map(len, ending))], True
    return text, False


@settings(max_examples=400)
@given(PIECES, STOPS)
def test_stop_matcher_equals_cutting_the_whole_text(pieces, stops):
    matcher, released = StopMatcher(stops), []
    for piece in pieces:
        released.append(matcher.push(piece))
        if matcher.stopped:
            break
    else:
        released.append(matcher.flush())
    assert ("".join(released), matcher.stopped) == reference_cut("".join(pieces), stops)


@pytest.mark.parametrize("pieces, stops, released", [
    (["a\n", "a"], ["\n", "a\na"], "a"),     # "\n" completes before "a\na" could
    (["abcd"], ["bc", "abcd"], "a"),          # within one piece too: the first to complete
    (["abcd"], ["cd", "bcd"], "a"),           # two complete together: the longer one
])
def test_stop_matcher_cuts_at_the_first_stop_to_complete(pieces, stops, released):
    matcher = StopMatcher(stops)
    assert "".join(matcher.push(piece) for piece in pieces) == released and matcher.stopped


def test_stop_matcher_holds_back_a_possible_start_only():
    matcher = StopMatcher(["</end>"])
    assert matcher.push("value </") == "value "  # "</" may begin the stop string
    assert matcher.push("p> and") == "</p> and"
    assert matcher.push(" </en") == " " and matcher.push("d> rest") == "" and matcher.stopped


def test_stop_matcher_with_a_huge_stop_string():
    """Only prefixes as long as the held text are tried: a megabyte stop string costs what the text costs
    (it made the server's worker spin for hours; found by the HTTP fuzz surface)."""
    matcher = StopMatcher(["ab " * 400_000])
    assert matcher.push("Hi ") == "Hi " and matcher.push("ab a") == "" and matcher.push("x") == "ab ax"
    assert not matcher.stopped


def test_chat_request_fields():
    request = parse_chat({"model": "m", "messages": [{"role": "developer", "content": "Be brief."},
                                                     {"role": "user", "content": [{"type": "text", "text": "Hi"},
                                                                                  {"type": "text", "text": "!"}]}],
                          "max_tokens": 9, "max_completion_tokens": 5, "stop": "x", "seed": 3, "unknown": {}})
    assert request.messages == [Message("system", "Be brief."), Message("user", "Hi!")]
    options = request.options
    assert (options.max_tokens, options.stop, options.seed, options.temperature, options.stream) == (5, ("x",), 3, 1.0,
                                                                                                     False)


@pytest.mark.parametrize("body, param, code", [
    ({"messages": "Hi"}, "messages", "invalid_type"),
    ({"messages": []}, "messages", "invalid_value"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "invalid_value"),
    ({"messages": [{"role": "user", "content": None}]}, "messages[0].content", "invalid_type"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]", "invalid_value"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 3}, "n", "invalid_value"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens", "invalid_value"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": True}, "max_tokens", "invalid_type"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": 2.5}, "temperature", "invalid_value"),
    ({"messages": [{"role": "user", "content": "x"}], "top_p": 0}, "top_p", "invalid_value"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": ["a", 1]}, "stop", "invalid_type"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": list("abcde")}, "stop", "invalid_value"),
    ({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream", "invalid_type"),
    ({"messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": 1}},
     "stream_options.include_usage", "invalid_type"),
    # found by the HTTP fuzz surface (tests/fuzz_http.py): each was a 500 or an exception
    ({"messages": [{"role": ["user"], "content": "x"}]}, "messages[0].role", "invalid_value"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": float("nan")}, "temperature", "invalid_value"),
    ({"messages": [{"role": "user", "content": "x"}], "top_p": 10**400}, "top_p", "invalid_value"),
    ({"messages": [{"role": "user", "content": "x"}], "top_k": 2**64}, "top_k", "invalid_value"),
    ({"messages": [{"role": "user", "content": "x"}], "seed": 2**64}, "seed", "invalid_value"),
    ({"messages": [{"role": "user", "content": "x"}], "seed": -1}, "seed", "invalid_value"),
])
def test_bad_chat_requests(body, param, code):
    with pytest.raises(RequestError) as error:
        parse_chat(body)
    assert (error.value.param, error.value.code, error.value.status) == (param, code, 400)
    assert set(error.value.body()["error"]) == {"message", "type", "param", "code"}


def test_completion_prompts():
    assert parse_completion({"prompt": "Hi"}, 10).prompt == "Hi"
    assert parse_completion({"prompt": [[1, 5]]}, 10).prompt == [1, 5]
    assert parse_completion({"prompt": "Hi"}, 10).options.max_tokens == 16  # OpenAI's default
    for prompt in (None, [], ["a", "b"], [1, 10], [1, True], 3):
        with pytest.raises(RequestError) as error:
            parse_completion({"prompt": prompt}, 10)
        assert error.value.param == "prompt"
    with pytest.raises(RequestError):
        parse_completion([1, 2], 10)


def test_json_nested_too_deep_is_a_400():
    """A body nested deeper than Python's JSON parser recurses is refused like any unparsable body."""
    from starlette.testclient import TestClient

    from mixtral_offload.serve.app import Server

    with TestClient(Server(None, "m", lambda line: None).app()) as client:   # refused before the runtime is used
        reply = client.post("/v1/chat/completions", content=b'{"messages": ' + b"[" * 100000 + b"]" * 100000 + b"}")
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "invalid_json"
