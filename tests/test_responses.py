"""OpenAI's Responses API with the official ``openai`` SDK (``client.responses``) on the
real model: a plain and a streamed answer, a function-call round trip, a chain of
``previous_response_id`` that survives a restart, GET/DELETE, input_tokens, text.format;
the input conversion and the store's bounds (pure)."""
from __future__ import annotations

import json
from collections.abc import Iterator

import jsonschema
import openai
import pytest
import requests
from llmctl.common.config import GenerationConfig
from llmctl.common.errors import BadRequest
from llmctl.dataplane.http.response_store import ResponseStore
from llmctl.dataplane.http.responses import to_request

from tests.service import http_service, openai_client

integration = pytest.mark.integration
WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 30},
    "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"],
    "additionalProperties": False}
TOOLS = [{"type": "function", "name": "get_weather", "parameters": WEATHER,
          "description": "Get the current weather in a city"}]


@pytest.fixture(scope="module")
def svc():
    yield from http_service(2048, liveness=20)   # a prompt with tools: a long prefill


@pytest.fixture
def client(svc) -> Iterator[openai.OpenAI]:
    yield from openai_client(svc, 120)


@integration
def test_plain_and_streamed(client):
    r = client.responses.create(model="m", input="Say hello.", instructions="Be brief.",
                                max_output_tokens=16, temperature=0.0)
    assert r.object == "response" and r.id.startswith("resp_") and r.output_text
    assert r.status in ("completed", "incomplete") and r.usage.output_tokens <= 16
    assert r.usage.input_tokens > 5
    events = list(client.responses.create(model="m", input="Say hello.",
                                          instructions="Be brief.", max_output_tokens=16,
                                          temperature=0.0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-1] == f"response.{r.status}" and "response.output_text.done" in kinds
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == r.output_text == events[-1].response.output_text
    cut = client.responses.create(model="m", input="Tell a story.", max_output_tokens=3)
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"


@integration
def test_function_call_round_trip(client):
    ask = "What is the weather in Paris?"
    first = client.responses.create(model="m", input=ask, tools=TOOLS, tool_choice="required",
                                    max_output_tokens=200, temperature=0.0)
    calls = [o for o in first.output if o.type == "function_call"]
    assert calls and all(c.name == "get_weather" and c.call_id.startswith("call_")
                         for c in calls)
    for c in calls:
        jsonschema.validate(json.loads(c.arguments), WEATHER)
    events = list(client.responses.create(model="m", input=ask, tools=TOOLS,
                                          tool_choice="required", parallel_tool_calls=False,
                                          max_output_tokens=200, temperature=0.0,
                                          stream=True))
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    [done] = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(deltas) > 1 and "".join(deltas) == done.arguments
    assert events[-1].response.output[0].arguments == done.arguments
    convo = [{"role": "user", "content": ask}] + [c.model_dump() for c in calls] + [
        {"type": "function_call_output", "call_id": c.call_id, "output": "18C, cloudy"}
        for c in calls]
    r = client.responses.create(model="m", input=convo, tools=TOOLS, tool_choice="none",
                                max_output_tokens=30, temperature=0.0)
    assert r.output_text and r.output[0].type == "message"
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="m", input=convo[:1] + [
            {"type": "function_call_output", "call_id": "call_x", "output": "1"}])
    assert "call_id" in e.value.body["message"]


@integration
def test_chain_survives_a_restart(svc, client):
    one = client.responses.create(model="m", input="My name is Ada. Say OK.",
                                  max_output_tokens=8, temperature=0.0)
    two = client.responses.create(model="m", input="What is my name?", max_output_tokens=8,
                                  temperature=0.0, previous_response_id=one.id)
    alone = client.responses.create(model="m", input="What is my name?", max_output_tokens=8,
                                    temperature=0.0, store=False)
    assert two.usage.input_tokens > alone.usage.input_tokens + 8   # the chain is in the prompt
    assert two.previous_response_id == one.id
    n = requests.post(f"{svc.base}/v1/responses/input_tokens", timeout=60,
                      json={"model": "m", "input": "What is my name?",
                            "previous_response_id": one.id}).json()
    assert n["object"] == "response.input_tokens" and n["input_tokens"] > 10
    for r in (svc.llmctl("stop"), svc.start()):        # the whole service, not a worker
        assert r.returncode == 0, r.stdout + r.stderr
    [addr] = svc.status()["gateway"]["http_listening"]
    svc.base = f"http://{addr}"
    again = openai.OpenAI(base_url=f"{svc.base}/v1", api_key="none", max_retries=0)
    assert again.responses.retrieve(two.id).output_text == two.output_text
    three = again.responses.create(model="m", input="And again?", max_output_tokens=4,
                                   previous_response_id=two.id)
    assert three.usage.input_tokens > two.usage.input_tokens
    again.responses.delete(two.id)
    with pytest.raises(openai.NotFoundError):
        again.responses.retrieve(two.id)
    with pytest.raises(openai.NotFoundError):
        again.responses.create(model="m", input="x", previous_response_id=two.id)
    with pytest.raises(openai.NotFoundError):
        again.responses.retrieve(alone.id)                       # store=False
    again.close()


@integration
def test_text_format_json_schema(client):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
              "required": ["city"], "additionalProperties": False}
    r = client.responses.create(model="m", input="Name a city in France as JSON.",
                                max_output_tokens=40, temperature=0.0,
                                text={"format": {"type": "json_schema", "name": "city",
                                                 "schema": schema, "strict": True}})
    jsonschema.validate(json.loads(r.output_text), schema)


# ---- pure ---------------------------------------------------------------------------------

def test_items_to_messages():
    chain = [{"type": "message", "role": "user", "content": "Weather in Paris?"},
             {"type": "function_call", "call_id": "call_1", "name": "get_weather",
              "arguments": '{"city": "Paris", "unit": "celsius"}'}]
    body = {"instructions": "Be brief.", "tools": TOOLS, "max_output_tokens": 9, "input": [
        {"type": "reasoning", "summary": []},
        {"type": "function_call_output", "call_id": "call_1", "output": "18C"},
        {"role": "developer", "content": [{"type": "input_text", "text": "Use celsius."}]}]}
    gen, stream, mode, items = to_request(body, GenerationConfig(), chain)
    assert [m.role for m in gen.messages] == ["system", "user", "assistant", "tool", "system"]
    assert gen.messages[0].content.startswith("Be brief.\n\nYou can call these tools")
    assert json.loads(gen.messages[2].content)["tool_calls"][0]["name"] == "get_weather"
    assert gen.max_tokens == 9 and items[:2] == chain and mode.or_text and not stream
    codex = [{"type": "web_search", "external_web_access": False},
             {"type": "namespace", "name": "multi_agent_v1", "tools": []}]
    assert to_request({"input": "x", "tools": codex, "reasoning": {"summary": "auto"},
                       "include": ["reasoning.encrypted_content"]},
                      GenerationConfig(), [])[2] is None              # not offered
    with pytest.raises(BadRequest, match="only function tools"):
        to_request({"input": "x", "tools": [{"type": "file_search"}]}, GenerationConfig(), [])
    with pytest.raises(BadRequest, match="call_id"):
        to_request({"input": [body["input"][1]]}, GenerationConfig(), [])


def test_store_bounds(tmp_path):
    now = [1000.0]
    store = ResponseStore(tmp_path / "r.sqlite3", max_bytes=300, ttl_s=3600,
                          clock=lambda: now[0])
    for i in range(5):
        now[0] += 1
        assert store.put(f"resp_{i}", {"id": f"resp_{i}", "pad": "x" * 60}, [{"n": i}])
    kept = [i for i in range(5) if store.response(f"resp_{i}") is not None]
    assert kept == [2, 3, 4] and store.items("resp_4") == [{"n": 4}]   # oldest evicted
    assert not store.put("big", {"pad": "x" * 400}, [])
    assert store.delete("resp_4") and not store.delete("resp_4")
    store.close()
    again = ResponseStore(tmp_path / "r.sqlite3", max_bytes=300, ttl_s=3600,
                          clock=lambda: now[0])
    assert again.response("resp_3") is not None                       # on disk
    now[0] += 3600
    assert again.response("resp_3") is None                           # expired
    again.close()
