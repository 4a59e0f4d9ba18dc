"""Anthropic's Messages API with the official ``anthropic`` SDK on the real model: a plain
and a streamed answer, a tool round trip, count_tokens, errors in Anthropic's shape,
``x-api-key``; the request conversion and the error mapping (pure)."""
from __future__ import annotations

import json
from collections.abc import Iterator

import anthropic
import jsonschema
import pytest
import requests
from llmctl.common.config import GenerationConfig
from llmctl.common.errors import BadRequest, ModelNotFound, NotReady, Overloaded, RateLimited
from llmctl.dataplane.http.anthropic import to_request
from llmctl.dataplane.http.anthropic_shapes import error_body, status

from tests.service import Service, free_port, running, wait_until

integration = pytest.mark.integration
KEY = "sk-test-anthropic"
WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 30},
    "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}
TOOLS = [{"name": "get_weather", "description": "Get the current weather in a city",
          "input_schema": WEATHER}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def svc():
    s = Service(model={"n_ctx": 2048}, workers={"slots": 2, "probe_interval_s": 0.0,
                         "liveness": 20},   # a prompt with tools: a long prefill on a busy host
                http={"enabled": True, "port": free_port(), "api_key": KEY})
    with running(s):
        yield s


@pytest.fixture
def client(svc) -> Iterator[anthropic.Anthropic]:
    c = anthropic.Anthropic(base_url=svc.base, api_key=KEY, max_retries=0, timeout=120)
    try:
        yield c
    finally:
        c.close()
    wait_until(svc.idle, 30, "every request ended")


@integration
def test_plain_answer(client):
    r = client.messages.create(model="m", max_tokens=16, temperature=0.0,
                               system=[{"type": "text", "text": "Be brief."}],
                               messages=[{"role": "user", "content": [
                                   {"type": "text", "text": "Say hello."}]}])
    assert r.type == "message" and r.role == "assistant" and r.id.startswith("msg_")
    assert r.stop_reason in ("end_turn", "max_tokens")
    [block] = r.content
    assert block.type == "text" and block.text
    assert r.usage.input_tokens > 5 and 0 < r.usage.output_tokens <= 16
    cut = client.messages.create(model="m", max_tokens=2, temperature=0.0, messages=ASK)
    assert cut.stop_reason == "max_tokens" and cut.usage.output_tokens == 2


@integration
def test_a_stop_sequence_ends_with_its_reason(client):
    full = client.messages.create(model="m", max_tokens=24, temperature=0.0, messages=ASK)
    text = full.content[0].text
    words = text.split()
    assert len(words) >= 3, text
    stop = " " + words[2]
    r = client.messages.create(model="m", max_tokens=24, temperature=0.0, messages=ASK,
                               stop_sequences=[stop])
    assert r.stop_reason == "stop_sequence" and r.stop_sequence == stop
    assert text.startswith(r.content[0].text) and stop not in r.content[0].text
    with client.messages.stream(model="m", max_tokens=24, temperature=0.0, messages=ASK,
                                stop_sequences=[stop]) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == stop


@integration
def test_streamed_answer(client):
    with client.messages.stream(model="m", max_tokens=24, temperature=0.0,
                                messages=ASK) as stream:
        events = list(stream)
        final = stream.get_final_message()
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "content_block_start" in kinds and "content_block_stop" in kinds
    text = "".join(e.delta.text for e in events if e.type == "content_block_delta")
    assert text and final.content[0].text == text
    plain = client.messages.create(model="m", max_tokens=24, temperature=0.0, messages=ASK)
    assert plain.content[0].text == text and final.stop_reason == plain.stop_reason
    assert final.usage.output_tokens == plain.usage.output_tokens


@integration
def test_tool_round_trip(client):
    first = client.messages.create(model="m", max_tokens=200, temperature=0.0, tools=TOOLS,
                                   tool_choice={"type": "tool", "name": "get_weather"},
                                   messages=ASK)
    assert first.stop_reason == "tool_use"
    uses = [b for b in first.content if b.type == "tool_use"]
    assert uses and all(u.id.startswith("toolu_") and u.name == "get_weather" for u in uses)
    for u in uses:
        jsonschema.validate(u.input, WEATHER)
    with client.messages.stream(model="m", max_tokens=200, temperature=0.0, tools=TOOLS,
                                tool_choice={"type": "any",
                                             "disable_parallel_tool_use": True},
                                messages=ASK) as stream:
        events = list(stream)
        streamed = stream.get_final_message()
    deltas = [e.delta.partial_json for e in events if e.type == "content_block_delta"]
    assert len(deltas) > 1                              # the input comes as it is written
    [use] = streamed.content
    assert use.type == "tool_use" and json.loads("".join(deltas)) == use.input
    result = {"temperature": 18, "sky": "cloudy"}
    convo = ASK + [{"role": "assistant", "content": [u.model_dump() for u in uses]},
                   {"role": "user", "content": [
                       {"type": "tool_result", "tool_use_id": u.id,
                        "content": json.dumps(result)} for u in uses]}]
    r = client.messages.create(model="m", max_tokens=30, temperature=0.0, tools=TOOLS,
                               tool_choice={"type": "none"}, messages=convo)
    assert r.stop_reason in ("end_turn", "max_tokens") and r.content[0].type == "text"
    n = client.messages.count_tokens(model="m", tools=TOOLS, messages=convo)
    bare = client.messages.count_tokens(model="m", messages=ASK)
    assert n.input_tokens > bare.input_tokens + 40 and bare.input_tokens > 5
    with pytest.raises(anthropic.BadRequestError) as e:       # an id no call had
        client.messages.create(model="m", max_tokens=4, tools=TOOLS, messages=convo[:2] + [
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_x",
                                          "content": "18"}]}])
    assert "tool_use_id" in e.value.body["error"]["message"]


@integration
def test_errors_and_keys(svc, client):
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model="m", max_tokens=4, messages=[
            {"role": "user", "content": [{"type": "image", "source": {}}]}])
    assert e.value.body == {"type": "error", "error": {
        "type": "invalid_request_error", "message": e.value.body["error"]["message"]}}
    with pytest.raises(anthropic.AuthenticationError) as e:
        anthropic.Anthropic(base_url=svc.base, api_key="wrong", max_retries=0).messages.create(
            model="m", max_tokens=4, messages=ASK)
    assert e.value.body["error"]["type"] == "authentication_error"
    r = requests.post(f"{svc.base}/v1/messages", timeout=60, headers={
        "x-api-key": KEY, "anthropic-version": "2023-06-01"},
        json={"model": "m", "max_tokens": 2, "messages": ASK})
    assert r.status_code == 200 and r.json()["type"] == "message"
    r = requests.post(f"{svc.base}/v1/messages", timeout=60, headers={"x-api-key": KEY},
                      json={"model": "m", "messages": ASK})
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]
    r = requests.get(f"{svc.base}/v1/messages", timeout=60, headers={"x-api-key": KEY})
    assert r.status_code == 405 and r.json()["type"] == "error"
    assert requests.head(f"{svc.base}/", timeout=60).status_code == 200   # Claude Code's probe


# ---- pure ---------------------------------------------------------------------------------

def test_conversation_to_messages():
    body = {"model": "m", "max_tokens": 10, "system": "Be brief.", "tools": TOOLS,
            "stop_sequences": ["\n\n"], "top_k": 5, "messages": ASK + [
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "hm", "signature": "x"},
                    {"type": "text", "text": "Let me look."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                     "input": {"city": "Paris", "unit": "celsius"}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1",
                     "content": [{"type": "text", "text": "18C"}]},
                    {"type": "text", "text": "And tomorrow?"}]}]}
    gen, stream, mode = to_request(body, GenerationConfig())
    roles = [m.role for m in gen.messages]
    assert roles == ["system", "user", "assistant", "tool", "user"] and not stream
    assert gen.messages[0].content.startswith("Be brief.\n\nYou can call these tools")
    assert gen.messages[2].content.startswith("Let me look.\n{\"tool_calls\"")
    assert gen.messages[3].content == "18C" and gen.stop == ("\n\n",) and gen.top_k == 5
    assert mode.or_text and mode.parallel and gen.json_schema == mode.schema
    with pytest.raises(BadRequest, match="max_tokens"):
        to_request({**body, "max_tokens": None}, GenerationConfig())
    with pytest.raises(BadRequest, match="server tools"):
        to_request({**body, "tools": [{"type": "web_search_20250305", "name": "w"}]},
                   GenerationConfig())
    forced = to_request({**body, "tool_choice": {"type": "tool", "name": "get_weather",
                                                 "disable_parallel_tool_use": True}},
                        GenerationConfig())[2]
    assert not forced.or_text and not forced.parallel
    # what Claude Code sends: a system message between turns, thinking settings
    agent = to_request({"max_tokens": 5, "thinking": {"type": "adaptive"},
                        "context_management": {"edits": []},
                        "output_config": {"effort": "high"},
                        "messages": ASK + [{"role": "system", "content": "Agents: none."}]},
                       GenerationConfig())[0]
    assert [m.role for m in agent.messages] == ["user", "system"]
    shaped = to_request({"max_tokens": 5, "messages": ASK, "output_config": {
        "format": {"type": "json_schema", "schema": WEATHER}}}, GenerationConfig())[0]
    assert json.loads(shaped.json_schema) == WEATHER


def test_error_mapping():
    assert (status(BadRequest("x")), error_body(BadRequest("x"))) == \
        (400, {"type": "error", "error": {"type": "invalid_request_error", "message": "x"}})
    assert status(ModelNotFound("m")) == 404
    assert error_body(ModelNotFound("m"))["error"]["type"] == "not_found_error"
    assert (status(Overloaded("q")), error_body(Overloaded("q"))["error"]["type"]) == \
        (529, "overloaded_error")
    assert status(NotReady("n")) == 529 and status(RateLimited("r")) == 429
