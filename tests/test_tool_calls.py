"""Tool calls with the official ``openai`` SDK on the real model: ``tools`` and every
``tool_choice``, streaming and not; a following turn with ``role: "tool"`` messages."""
from __future__ import annotations

import json
from collections.abc import Iterator

import jsonschema
import openai
import pytest
from llmctl.common.errors import BadRequest
from llmctl.dataplane.http.tool_calls import parse_call, render_messages, tool_mode

from tests.service import Service, free_port, openai_client, running

integration = pytest.mark.integration
WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 30},
    "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}
ADD = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
       "required": ["a", "b"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER,
                                      "description": "Get the current weather in a city"}},
    {"type": "function", "function": {"name": "add", "parameters": ADD,
                                      "description": "Add two integers"}},
]
PARAMS = {"get_weather": WEATHER, "add": ADD}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def svc():
    s = Service(model={"n_ctx": 2048}, workers={"slots": 2, "probe_interval_s": 0.0},
                http={"enabled": True, "port": free_port()})
    with running(s):
        yield s


@pytest.fixture
def client(svc) -> Iterator[openai.OpenAI]:
    yield from openai_client(svc, 120)


def check_call(call, names=("get_weather", "add")) -> dict:
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in names
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, PARAMS[call.function.name])
    return args


@integration
@pytest.mark.parametrize("choice", ["required", {"type": "function",
                                                 "function": {"name": "add"}}])
def test_forced_calls(client, choice):
    r = client.chat.completions.create(model="m", messages=ASK, max_tokens=200,
                                       temperature=0.0, tools=TOOLS, tool_choice=choice)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    [call] = c.message.tool_calls
    check_call(call, ("add",) if isinstance(choice, dict) else ("get_weather", "add"))


@integration
def test_streamed_call(client):
    chunks = list(client.chat.completions.create(
        model="m", messages=ASK, max_tokens=200, temperature=0.0, tools=TOOLS,
        tool_choice="required", stream=True))
    deltas = [d for ch in chunks if ch.choices for d in (ch.choices[0].delta.tool_calls or [])]
    assert deltas and all(d.index == 0 for d in deltas)
    name = "".join(d.function.name or "" for d in deltas)
    args = "".join(d.function.arguments or "" for d in deltas)
    assert name in PARAMS
    jsonschema.validate(json.loads(args), PARAMS[name])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not any(ch.choices[0].delta.content for ch in chunks if ch.choices)


@integration
def test_auto_and_none(client):
    for temperature, seed in ((0.0, None), (0.9, 1), (0.9, 2)):
        r = client.chat.completions.create(model="m", messages=ASK, max_tokens=120, seed=seed,
                                           temperature=temperature, tools=TOOLS)
        c = r.choices[0]
        if c.finish_reason == "tool_calls":
            check_call(c.message.tool_calls[0])
        else:             # an answer in words, never a broken call
            assert c.message.tool_calls is None and not c.message.content.startswith("{")
    r = client.chat.completions.create(model="m", messages=ASK, max_tokens=20, temperature=0.0,
                                       tools=TOOLS, tool_choice="none")
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content


@integration
def test_tool_result_turn(client):
    first = client.chat.completions.create(model="m", messages=ASK, max_tokens=200,
                                           temperature=0.0, tools=TOOLS,
                                           tool_choice={"type": "function",
                                                        "function": {"name": "get_weather"}})
    msg = first.choices[0].message
    [call] = msg.tool_calls
    result = {"temperature": 18, "sky": "cloudy with light rain in the afternoon"}
    convo = ASK + [msg.model_dump(exclude_none=True),
                   {"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)}]
    r = client.chat.completions.create(model="m", messages=convo, max_tokens=40,
                                       temperature=0.0, tools=TOOLS, tool_choice="none")
    assert r.choices[0].finish_reason in ("stop", "length") and r.choices[0].message.content
    # the call and the tool's result are in the rendered prompt
    short = client.chat.completions.create(model="m", messages=ASK, max_tokens=1,
                                           temperature=0.0)
    extra = len(json.dumps(result)) // 8 + len(call.function.arguments) // 8
    assert r.usage.prompt_tokens > short.usage.prompt_tokens + extra


@integration
@pytest.mark.parametrize("extra,needle", [
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "name must match"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "not among the tools"),
    ({"tool_choice": "required"}, "needs tools"),
    ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "cannot be combined"),
    ({"functions": [{"name": "f"}]}, "use tools"),
])
def test_bad_tool_requests(client, extra, needle):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=ASK, max_tokens=4, extra_body=extra)
    assert needle in e.value.body["message"]


# ---- pure ---------------------------------------------------------------------------------

def test_tool_mode_schemas():
    m = tool_mode({"tools": TOOLS})
    assert m.or_text and m.names == ("get_weather", "add")
    assert [b["properties"]["name"]["const"] for b in json.loads(m.schema)["anyOf"]] == \
        ["get_weather", "add"]
    named = tool_mode({"tools": TOOLS, "tool_choice": {"type": "function",
                                                        "function": {"name": "add"}}})
    assert not named.or_text and json.loads(named.schema)["properties"]["arguments"] == ADD
    assert tool_mode({"tools": TOOLS, "tool_choice": "none"}) is None
    with pytest.raises(BadRequest):
        tool_mode({"tools": TOOLS, "tool_choice": "sometimes"})


def test_render_and_parse():
    m = tool_mode({"tools": TOOLS, "tool_choice": "required"})
    call = {"id": "call_1", "type": "function",
            "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}
    out = render_messages([{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": "1+2?"},
                           {"role": "assistant", "content": None, "tool_calls": [call]},
                           {"role": "tool", "tool_call_id": "call_1", "content": "3"}], m)
    assert out[0]["content"].startswith("Be brief.\n\nYou can call these tools")
    assert json.loads(out[2]["content"]) == {"name": "add", "arguments": {"a": 1, "b": 2}}
    assert out[3] == {"role": "tool", "tool_call_id": "call_1", "content": "3"}
    got = parse_call('{"name": "add", "arguments": {"a": 1, "b": 2}}', m)
    assert got["function"] == {"name": "add", "arguments": '{"a": 1, "b": 2}'}
    assert parse_call('{"name": "add", "arguments": {"a": 1', m) is None   # cut by length
    assert parse_call("The answer is 3.", m) is None
