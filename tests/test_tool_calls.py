"""Tool calls with the official ``openai`` SDK on the real model: ``tools`` and every
``tool_choice``, streaming and not; a following turn with ``role: "tool"`` messages."""
from __future__ import annotations

import json
from collections.abc import Iterator

import jsonschema
import openai
import pytest
from llmctl.common.errors import BadRequest
from llmctl.dataplane.http.tool_calls import MAX_CALLS, render_messages, tool_mode
from llmctl.dataplane.http.tool_stream import Answer, Args, End, Start, Text, read_whole

from tests.service import http_service, openai_client

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
    yield from http_service(2048, liveness=20)   # a prompt with tools: a long prefill


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
    assert 1 <= len(c.message.tool_calls) <= MAX_CALLS
    for call in c.message.tool_calls:
        check_call(call, ("add",) if isinstance(choice, dict) else ("get_weather", "add"))
    assert len({call.id for call in c.message.tool_calls}) == len(c.message.tool_calls)
    one = client.chat.completions.create(model="m", messages=ASK, max_tokens=200,
                                         temperature=0.0, tools=TOOLS, tool_choice=choice,
                                         parallel_tool_calls=False)
    assert len(one.choices[0].message.tool_calls) == 1


@integration
def test_streamed_call(client):
    chunks = list(client.chat.completions.create(
        model="m", messages=ASK, max_tokens=200, temperature=0.0, tools=TOOLS,
        tool_choice="required", stream=True))
    deltas = [d for ch in chunks if ch.choices for d in (ch.choices[0].delta.tool_calls or [])]
    calls = sorted({d.index for d in deltas})
    assert calls == list(range(len(calls))) and len(calls) <= MAX_CALLS
    for i in calls:
        mine = [d for d in deltas if d.index == i]
        assert mine[0].id.startswith("call_") and all(d.id is None for d in mine[1:])
        name = "".join(d.function.name or "" for d in mine)
        args = [d.function.arguments for d in mine if d.function.arguments]
        assert name in PARAMS and len(args) > 1     # the arguments come as they are written
        jsonschema.validate(json.loads("".join(args)), PARAMS[name])
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
    call = msg.tool_calls[0]
    result = {"temperature": 18, "sky": "cloudy with light rain in the afternoon"}
    convo = ASK + [msg.model_dump(exclude_none=True)] + [
        {"role": "tool", "tool_call_id": c.id, "content": json.dumps(result)}
        for c in msg.tool_calls]
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

def _calls_schema(m):
    return json.loads(m.schema)["properties"]["tool_calls"]


def test_tool_mode_schemas():
    m = tool_mode({"tools": TOOLS})
    assert m.or_text and m.names == ("get_weather", "add") and m.parallel
    calls = _calls_schema(m)
    assert calls["minItems"] == 1 and calls["maxItems"] == MAX_CALLS
    assert [b["properties"]["name"]["const"] for b in calls["items"]["anyOf"]] == \
        ["get_weather", "add"]
    named = tool_mode({"tools": TOOLS, "parallel_tool_calls": False,
                       "tool_choice": {"type": "function", "function": {"name": "add"}}})
    assert not named.or_text and _calls_schema(named)["maxItems"] == 1
    assert _calls_schema(named)["items"]["properties"]["arguments"] == ADD
    assert tool_mode({"tools": TOOLS, "tool_choice": "none"}) is None
    with pytest.raises(BadRequest):
        tool_mode({"tools": TOOLS, "tool_choice": "sometimes"})


def test_render_and_ids():
    m = tool_mode({"tools": TOOLS, "tool_choice": "required"})
    call = {"id": "call_1", "type": "function",
            "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+2?"},
             {"role": "assistant", "content": None, "tool_calls": [call]},
             {"role": "tool", "tool_call_id": "call_1", "content": "3"}]
    out = render_messages(convo, m)
    assert out[0]["content"].startswith("Be brief.\n\nYou can call these tools")
    assert json.loads(out[2]["content"]) == {"tool_calls": [{"name": "add",
                                                             "arguments": {"a": 1, "b": 2}}]}
    assert out[3] == {"role": "tool", "tool_call_id": "call_1", "content": "3"}
    convo[3] = {**convo[3], "tool_call_id": "call_2"}     # no call has that id
    with pytest.raises(BadRequest, match="id of a tool call"):
        render_messages(convo, m)


ANSWER = ('{"tool_calls": [{"name": "add", "arguments": {"a": 1, "b": {"x": "}\\""}}}, '
          '{"name":"get_weather","arguments":{"city":"Paris","unit":"celsius"}} ]}')


@pytest.mark.parametrize("step", [1, 3, 7, len(ANSWER)])
def test_answer_streams_calls(step):
    """Calls are read as the answer comes, in pieces of any size: each one's id and name
    once, then its arguments, whose deltas join to exactly the JSON text written."""
    a = Answer(tool_mode({"tools": TOOLS}), "toolu_")
    events = [e for i in range(0, len(ANSWER), step) for e in a.feed(ANSWER[i:i + step])]
    starts = [e for e in events if isinstance(e, Start)]
    assert [(s.index, s.name) for s in starts] == [(0, "add"), (1, "get_weather")]
    assert all(s.id.startswith("toolu_") for s in starts) and starts[0].id != starts[1].id
    for k, want in enumerate(['{"a": 1, "b": {"x": "}\\""}}',
                              '{"city":"Paris","unit":"celsius"}']):
        assert "".join(e.delta for e in events if isinstance(e, Args) and e.index == k) == want
    order = [type(e).__name__ + str(e.index) for e in events if not isinstance(e, Args)]
    assert order == ["Start0", "End0", "Start1", "End1"]
    assert a.whole and [c.name for c in a.calls] == ["add", "get_weather"]
    assert [c.id for c in read_whole(ANSWER, a.mode)] != [s.id for s in starts]  # fresh


def test_answer_words_and_cut_calls():
    a = Answer(tool_mode({"tools": TOOLS}))
    assert a.feed("The answer") == [Text("The answer")] and a.feed(" is 3.") == [Text(" is 3.")]
    assert read_whole("The answer is 3.", a.mode) is None
    cut = ANSWER[:40]                                     # max_tokens: not whole
    b = Answer(a.mode)
    b.feed(cut)
    assert not b.whole and read_whole(cut, a.mode) is None
    assert [c.done for c in b.calls] == [False]
    forced = Answer(tool_mode({"tools": TOOLS, "tool_choice": "required"}))
    assert forced.calling and not any(isinstance(e, (Text, End)) for e in forced.feed('{"t'))


def test_agent_sized_tools():
    """An agent's tools (dozens, pages of description, annotation-only and huge-bound
    schemas) are offered briefly and converted to a grammar of reasonable size."""
    from llmctl.dataplane.http.tool_calls import MAX_BOUND, PROMPT_BUDGET, make_mode, tool
    from llmctl.worker.constrain import grammar_text

    params = {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
              "properties": {"script": {"type": "string", "maxLength": 100_000,
                                        "description": "the script"},
                             "args": {"description": "any JSON value"},
                             "tags": {"type": "array", "items": {"type": "string"},
                                      "maxItems": 1000}},
              "required": ["script"]}
    tools = [tool(f"T{i}", "Runs things. " + "More words. " * 300, params, "t", "tools")
             for i in range(20)]
    m = make_mode(tools, "auto")
    schema = json.loads(m.schema)["properties"]["tool_calls"]["items"]["anyOf"][0]
    args = schema["properties"]["arguments"]
    assert "$schema" not in args and "maxLength" not in args["properties"]["script"]
    assert "maxItems" not in args["properties"]["tags"] and MAX_BOUND < 1000
    assert set(args["properties"]["args"]["type"]) >= {"string", "object", "null"}
    assert len(m.prompt) < PROMPT_BUDGET + 20 * 400 and "More words" not in m.prompt
    assert '"description":"Runs things"' in m.prompt
    assert len(grammar_text(None, m.schema, m.or_text)) < 100_000
    few = make_mode([tool("f", "Short.", params, "t", "tools")], "auto")
    assert '"description": "the script"' in few.prompt            # in full when it fits
