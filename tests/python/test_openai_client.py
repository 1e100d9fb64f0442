"""The official `openai` client against a running gym-serve on the tiny model.

Run: GYM_SERVE_BIN=target/debug/gym-serve pytest tests/python
"""
import json
import os
import subprocess
import tempfile

import urllib.request

import openai
import pytest

BIN = os.environ.get("GYM_SERVE_BIN", "target/debug/gym-serve")
TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}]


@pytest.fixture(scope="module")
def client():
    work = tempfile.mkdtemp()
    model = os.path.join(work, "tiny")
    subprocess.run([BIN, "make-model", "--out", model, "--seed", "9"], check=True, capture_output=True)
    proc = subprocess.Popen(
        [BIN, "--model", model, "--port", "0", "--served-model-name", "tiny",
         "--api-key", "test-key", "--tool-call-parser", "hermes", "--reasoning-parser", "qwen3"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline().strip()
    assert line.startswith("gym-serve listening on "), line
    base = line.removeprefix("gym-serve listening on ")
    yield openai.OpenAI(base_url=f"{base}/v1", api_key="test-key")
    proc.terminate()
    proc.wait(timeout=30)


def test_models(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_chat_non_streaming_with_token_ids(client):
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hello!"}], max_tokens=8, seed=1,
        logprobs=True, top_logprobs=2,
        extra_body={"return_token_ids": True, "return_tokens_as_token_ids": True})
    c = r.choices[0]
    assert c.finish_reason in ("stop", "length")
    extra = c.message.model_extra
    assert extra["generation_token_ids"] == c.model_extra["token_ids"]
    assert len(extra["generation_log_probs"]) == len(extra["generation_token_ids"])
    assert [e.token for e in c.logprobs.content] == [f"token_id:{t}" for t in extra["generation_token_ids"]]
    assert all(len(e.top_logprobs) == 2 for e in c.logprobs.content)
    assert r.usage.completion_tokens == len(extra["generation_token_ids"])
    assert r.model_extra["weight_version"] == "0"


def test_chat_streaming(client):
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=10, seed=2,
        stream=True, stream_options={"include_usage": True})
    text, finish, usage = "", None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for ch in chunk.choices:
            text += ch.delta.content or ""
            finish = ch.finish_reason or finish
    assert finish in ("stop", "length")
    assert usage is not None and usage.completion_tokens > 0
    full = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=10, seed=2)
    assert full.choices[0].message.content == text


def test_chat_n_choices_differ(client):
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Pick a word"}], max_tokens=6, n=3, seed=4)
    assert [c.index for c in r.choices] == [0, 1, 2]
    ids = [tuple(c.message.model_extra["generation_token_ids"]) for c in r.choices]
    assert len(set(ids)) == 3


def test_tools_round_trip(client):
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21C and sunny"},
    ]
    r = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, tool_choice="auto",
                                       max_tokens=8, seed=5)
    c = r.choices[0]
    assert c.finish_reason in ("stop", "length", "tool_calls")
    prompt = c.message.model_extra["prompt_token_ids"]
    # /tokenize lives at the server root, not under /v1.
    root = str(client.base_url).rstrip("/").removesuffix("/v1")
    req = urllib.request.Request(
        f"{root}/tokenize", data=json.dumps({"messages": messages, "tools": TOOLS}).encode(),
        headers={"Authorization": "Bearer test-key", "Content-Type": "application/json"})
    with urllib.request.urlopen(req) as resp:
        tok = json.load(resp)
    assert tok["tokens"] == prompt


def test_completions(client):
    r = client.completions.create(model="tiny", prompt="The weather today", max_tokens=6, seed=3, logprobs=1)
    c = r.choices[0]
    assert len(c.logprobs.tokens) == len(c.model_extra["generation_token_ids"])
    batch = client.completions.create(model="tiny", prompt=["a", "b"], max_tokens=3, n=2, seed=3)
    assert sorted(ch.index for ch in batch.choices) == [0, 1, 2, 3]
    text = ""
    for chunk in client.completions.create(model="tiny", prompt="The weather today", max_tokens=6, seed=3, stream=True):
        text += chunk.choices[0].text if chunk.choices else ""
    assert text == c.text


def test_errors_raise_openai_exceptions(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x " * 5000}])
    assert "maximum context length" in str(e.value)
    bad = openai.OpenAI(base_url=client.base_url, api_key="wrong")
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
