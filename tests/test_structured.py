"""Structured output on the real model: ``response_format`` (json_object, json_schema) and
``grammar`` (GBNF), over HTTP (the official SDK) and the wire protocol.  Every answer must
parse and validate against its schema (``jsonschema``), also when constrained requests run
batched beside unconstrained ones; bad schemas and grammars are ``bad_request`` naming
the problem, and the worker serves on.

Length: a constrained answer cut by ``max_tokens`` is not whole JSON.  The schemas here
bound what they allow (``maxLength``, ``maxItems``, enums) and ``max_tokens`` is far above
what they need, so every answer must end by itself (``finish_reason: stop``); a ``length``
is a failure, not skipped.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jsonschema
import openai
import pytest

from tests.service import Service, free_port, openai_client, running, wait_until

integration = pytest.mark.integration
MAX_TOKENS = 400

S = {"type": "string", "maxLength": 16}
INT = {"type": "integer"}


def obj(required: bool = True, **props: Any) -> dict[str, Any]:
    out = {"type": "object", "properties": props, "additionalProperties": False}
    if required:
        out["required"] = list(props)
    return out


# (what to ask for, its schema): 32 different schemas
SCHEMAS: list[tuple[str, dict[str, Any]]] = [
    ("a person", obj(name=S, age=INT)),
    ("a city", obj(city={"type": "string", "maxLength": 24}, population={"type": "integer",
                                                                       "minimum": 0})),
    ("whether the sky is blue", obj(answer={"enum": ["yes", "no"]})),
    ("three colours", obj(colors={"type": "array", "items": {"type": "string", "maxLength": 12},
                                  "minItems": 1, "maxItems": 3})),
    ("a point", obj(x={"type": "number"}, y={"type": "number"})),
    ("whether water is wet", obj(ok={"type": "boolean"})),
    ("a person's full name", obj(person=obj(first=S, last=S))),
    ("two labelled items", obj(items={"type": "array", "items": obj(id=INT, label=S),
                                      "maxItems": 2})),
    ("a book", obj(title={"type": "string", "maxLength": 40},
                   tags={"type": "array", "items": S, "maxItems": 3})),
    ("a score from 1 to 10", obj(score={"type": "integer", "minimum": 1, "maximum": 10})),
    ("a finished task", obj(status={"const": "done"})),
    ("a value", obj(value={"anyOf": [INT, {"type": "string", "maxLength": 10}]})),
    ("a note, or null", obj(note={"anyOf": [{"type": "string", "maxLength": 20},
                                            {"type": "null"}]})),
    ("a list of numbers", {"type": "array", "items": INT, "minItems": 1, "maxItems": 5}),
    ("a colour", {"type": "string", "enum": ["red", "green", "blue"]}),
    ("a number", INT),
    ("a date", obj(date={"type": "string", "format": "date"})),
    ("an identifier", obj(id={"type": "string", "format": "uuid"})),
    ("a lowercase word", obj(word={"type": "string", "pattern": "^[a-z]{1,12}$"})),
    ("a nested value", obj(a=obj(b=obj(c=INT)))),
    ("a pair of coordinates", obj(point={"type": "array", "prefixItems": [
        {"type": "number"}, {"type": "number"}], "items": False})),
    ("an optional description", {"type": "object", "properties": {"a": INT, "b": S},
                                 "required": ["a"], "additionalProperties": False}),
    ("a small matrix", obj(matrix={"type": "array", "maxItems": 2, "items": {
        "type": "array", "items": INT, "maxItems": 2}})),
    ("a product", obj(product=S, price={"type": "number"}, in_stock={"type": "boolean"})),
    ("a language and a level", obj(lang={"enum": ["en", "fr", "de"]},
                                   level={"type": "integer", "minimum": 1, "maximum": 5})),
    ("true or false", {"type": "boolean"}),
    ("a point by reference", {"$defs": {"pt": obj(x=INT)}, "type": "object",
                              "properties": {"a": {"$ref": "#/$defs/pt"}}, "required": ["a"],
                              "additionalProperties": False}),
    ("a cat or a dog", {"oneOf": [obj(cat=S), obj(dog=INT)]}),
    ("three words", obj(first=S, second=S, third=S)),
    ("a weight", obj(count={"type": "integer", "minimum": 0, "maximum": 100},
                     unit={"enum": ["kg", "g"]})),
    ("a quiz question", obj(question={"type": "string", "maxLength": 60},
                            options={"type": "array", "items": S, "minItems": 2,
                                     "maxItems": 4})),
    ("an empty object", {"type": "object", "properties": {}, "additionalProperties": False}),
]
assert len({json.dumps(s, sort_keys=True) for _, s in SCHEMAS}) == len(SCHEMAS) >= 32


@pytest.fixture(scope="module")
def svc():
    s = Service(model={"n_ctx": 2048}, workers={"slots": 4, "probe_interval_s": 0.0},
                gateway={"max_queue": 64}, http={"enabled": True, "port": free_port()})
    with running(s):
        yield s


@pytest.fixture
def client(svc) -> Iterator[openai.OpenAI]:
    yield from openai_client(svc, 240)


def ask(what: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Reply in JSON: {what}."}]


def json_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


def valid(text: str, schema: dict[str, Any]) -> Any:
    value = json.loads(text)
    jsonschema.validate(value, schema)
    return value


@integration
def test_every_answer_validates_batched_beside_free_requests(client):
    """32 schemas and 8 free requests at once on 4 slots: constrained and free sequences
    share decode steps; every constrained answer is whole, valid JSON of its schema."""
    def constrained(i: int) -> tuple[int, str, str]:
        what, schema = SCHEMAS[i]
        r = client.chat.completions.create(
            model="m", messages=ask(what), max_tokens=MAX_TOKENS,
            temperature=0.0 if i % 2 else 0.8, seed=i, response_format=json_format(schema))
        return i, r.choices[0].message.content, r.choices[0].finish_reason

    def free(i: int) -> tuple[int, str, str]:
        r = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "Tell me about the sea."}],
            max_tokens=48, temperature=0.7, seed=i)
        return -1, r.choices[0].message.content, r.choices[0].finish_reason

    with ThreadPoolExecutor(8) as pool:
        futs = [pool.submit(constrained, i) for i in range(len(SCHEMAS))]
        futs[4:4] = [pool.submit(free, i) for i in range(8)]
        results = [f.result() for f in futs]
    free_texts = [t for i, t, _ in results if i < 0]
    assert len(free_texts) == 8 and all(free_texts)
    bad = []
    for i, text, finish in results:
        if i < 0:
            continue
        try:
            assert finish == "stop", f"finish_reason {finish}"
            valid(text, SCHEMAS[i][1])
        except (AssertionError, ValueError, jsonschema.ValidationError) as exc:
            bad.append(f"{SCHEMAS[i][0]}: {text!r}: {str(exc)[:200]}")
    assert not bad, "\n".join(bad)
    # free requests are not constrained: at least one of them is not JSON
    assert any(not _is_json(t) for t in free_texts)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


@integration
def test_json_object_and_completions(client):
    r = client.chat.completions.create(model="m", messages=ask("a fruit and its colour"),
                                       max_tokens=MAX_TOKENS, temperature=0.0,
                                       response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    schema = obj(animal=S, legs=INT)
    r = client.completions.create(model="m", prompt="An animal as JSON:", max_tokens=MAX_TOKENS,
                                  temperature=0.0,
                                  extra_body={"response_format": json_format(schema)})
    assert r.choices[0].finish_reason == "stop"
    valid(r.choices[0].text, schema)


@integration
def test_grammar_extension_streaming(client):
    grammar = 'root ::= ("yes" | "no") " because " [a-z ]{1,40} "."'
    chunks = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Is the sea salty?"}],
        max_tokens=MAX_TOKENS, temperature=0.0, stream=True, extra_body={"grammar": grammar})
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    import re
    assert re.fullmatch(r"(yes|no) because [a-z ]{1,40}\.", text), text


@integration
def test_wire_protocol_keys_and_prompt_cache(svc):
    """GENERATE carries response_format and grammar; a repeated constrained prompt is
    served from the prompt cache with the same (greedy) answer."""
    schema = obj(name=S, age=INT)
    msgs = ask("a person, with a name and an age, for a form about club members")
    with svc.client(timeout=120) as c:
        first = c.complete(1, messages=msgs, max_tokens=MAX_TOKENS, temperature=0.0,
                          response_format=json_format(schema))
        again = c.complete(1, messages=msgs, max_tokens=MAX_TOKENS, temperature=0.0,
                          response_format=json_format(schema))
        gram = c.complete(1, prompt="The answer is", max_tokens=MAX_TOKENS, temperature=0.0,
                         grammar='root ::= " " [0-9]{1,3}')
    assert first.error is None and again.error is None, (first.error, again.error)
    valid(first.text, schema)
    assert again.text == first.text
    assert again.done["cached_tokens"] > 0
    assert gram.error is None and gram.text[1:].isdigit() and 2 <= len(gram.text) <= 4


@integration
def test_cancel_a_constrained_stream(client, svc):
    schema = obj(words={"type": "array", "items": S, "minItems": 60, "maxItems": 80})
    stream = client.chat.completions.create(model="m", messages=ask("many words"),
                                            max_tokens=MAX_TOKENS, temperature=0.0,
                                            stream=True, response_format=json_format(schema))
    for n, _ in enumerate(stream):
        if n == 5:
            break
    stream.close()
    wait_until(svc.idle, 30, "the cancelled request freed its slot")
    r = client.chat.completions.create(model="m", messages=ask("a person"),
                                       max_tokens=MAX_TOKENS, temperature=0.0,
                                       response_format=json_format(obj(name=S)))
    valid(r.choices[0].message.content, obj(name=S))


BAD = [
    ({"grammar": 'root ::= "unclosed'}, "grammar does not compile"),
    ({"grammar": 'start ::= "x"'}, "no rule named 'root'"),
    ({"grammar": "root ::= undefined-rule"}, "Undefined rule"),
    ({"response_format": json_format({"type": "no-such-type"})}, "cannot be converted"),
    ({"response_format": json_format({"$ref": "https://example.com/s.json"})},
     "cannot be converted"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "json_schema.schema is required"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_object"}, "grammar": 'root ::= "a"'}, "not both"),
    ({"grammar": 7}, "grammar must be"),
]


@integration
@pytest.mark.parametrize("extra,needle", BAD, ids=[n for _, n in BAD])
def test_bad_constraints_are_bad_request(client, svc, extra, needle):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=ask("x"), max_tokens=8,
                                       extra_body=extra)
    assert e.value.body["code"] == "bad_request"
    assert needle in e.value.body["message"], e.value.body
    with svc.client() as c:
        wire = c.complete(1, messages=ask("x"), max_tokens=8, **extra)
    assert wire.error["code"] == "bad_request" and needle in wire.error["message"]
    assert all(w["restarts"] == 0 for w in svc.status()["workers"])


@integration
def test_a_grammar_with_no_way_on_ends_alone(client, svc):
    """A grammar that compiles but allows no token (here: a NUL byte, which no token of
    the vocabulary spells) would make llama.cpp abort the worker if a token were accepted;
    the request ends with bad_request instead, and the worker serves on."""
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=ask("x"), max_tokens=8,
                                       extra_body={"grammar": 'root ::= "\\x00"'})
    assert "allows no token" in e.value.body["message"]
    with svc.client() as c:
        mid = c.complete(1, prompt="Say", max_tokens=8, grammar='root ::= " a" [\\x00]')
    assert mid.text == " a" and mid.error["code"] == "bad_request"
    assert all(w["restarts"] == 0 for w in svc.status()["workers"])
    r = client.chat.completions.create(model="m", messages=ask("a person"),
                                       max_tokens=MAX_TOKENS, temperature=0.0,
                                       response_format=json_format(obj(name=S)))
    valid(r.choices[0].message.content, obj(name=S))
