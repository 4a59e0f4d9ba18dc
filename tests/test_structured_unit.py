"""Pure checks of the structured-output and logprobs fields (no model)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from llmctl.common.errors import BadRequest
from llmctl.common import messages as m
from llmctl.common.config import GenerationConfig
from llmctl.common.request import validate
from llmctl.common.request import constraint, logprobs_fields
from llmctl.worker.constrain import grammar_text, strict_json_chars
from llmctl.worker.engine import token_logprobs


def test_constraint_shapes():
    assert constraint({}) == (None, None)
    assert constraint({"response_format": {"type": "text"}}) == (None, None)
    assert constraint({"grammar": 'root ::= "a"'}) == ('root ::= "a"', None)
    assert constraint({"response_format": {"type": "json_object"}}) == (None, '{"type":"object"}')
    g, s = constraint({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "integer"}}}})
    assert g is None and json.loads(s) == {"type": "integer"}


@pytest.mark.parametrize("obj", [
    {"grammar": ""}, {"grammar": 1}, {"grammar": "x" * 70000},
    {"response_format": "json"}, {"response_format": {"type": "yaml"}},
    {"response_format": {"type": "json_schema"}},
    {"response_format": {"type": "json_schema", "json_schema": {"schema": [1]}}},
    {"response_format": {"type": "json_object"}, "grammar": 'root ::= "a"'},
])
def test_constraint_refusals(obj):
    with pytest.raises(BadRequest):
        constraint(obj)


def test_logprobs_fields():
    assert logprobs_fields({}) == (False, 0)
    assert logprobs_fields({"logprobs": True, "top_logprobs": 20}) == (True, 20)
    for bad in ({"logprobs": 1}, {"logprobs": True, "top_logprobs": 21},
                {"top_logprobs": 2}, {"logprobs": True, "top_logprobs": True}):
        with pytest.raises(BadRequest):
            logprobs_fields(bad)


def test_generate_carries_the_fields_to_the_worker():
    req = validate({"prompt": "x", "grammar": 'root ::= "a"', "logprobs": True,
                    "top_logprobs": 3}, GenerationConfig())
    assert (req.grammar, req.json_schema, req.logprobs, req.top_logprobs) == \
        ('root ::= "a"', None, True, 3)
    # a plain request's GENERATE to the worker carries none of these keys
    plain = json.loads(m.body(validate({"prompt": "x"}, GenerationConfig())))
    assert not {"grammar", "json_schema", "logprobs", "top_logprobs"} & set(plain)


def test_converted_strings_exclude_control_characters():
    gbnf = grammar_text(None, json.dumps({"type": "object"}))
    [char] = [ln for ln in gbnf.splitlines() if ln.startswith("char ::=")]
    assert r"\x00-\x1F" in char
    assert strict_json_chars("root ::= x") == "root ::= x"


def test_unconvertible_schema_names_the_problem():
    with pytest.raises(BadRequest, match="cannot be converted.*Unrecognized schema"):
        grammar_text(None, json.dumps({"type": "nope"}))


def test_token_logprobs_is_a_log_softmax_with_sorted_alternatives():
    logits = np.array([1.0, 3.0, 2.0, -1.0], dtype=np.float32)
    e = token_logprobs(logits, 2, 3, lambda t: b"t%d" % t)
    ref = logits - np.log(np.exp(logits).sum())
    assert e["token"] == "t2" and e["bytes"] == list(b"t2")
    assert e["logprob"] == pytest.approx(ref[2])
    assert [a["token"] for a in e["top_logprobs"]] == ["t1", "t2", "t0"]
    assert e["top_logprobs"][0]["logprob"] == pytest.approx(ref[1])
    assert token_logprobs(logits, 0, 0, lambda t: b"")["top_logprobs"] == []


def test_text_that_cannot_travel_is_refused():
    """A lone surrogate in a schema (JSON allows the escape) could not be encoded for the
    worker: refused at the door, in a response_format and in a tool's parameters."""
    from llmctl.dataplane.http.tool_calls import tool_mode

    with pytest.raises(BadRequest, match="not valid Unicode"):
        constraint({"response_format": {"type": "json_schema", "json_schema": {
            "schema": {"enum": ["\ud800"]}}}})
    with pytest.raises(BadRequest, match="not valid Unicode"):
        constraint({"grammar": 'root ::= "\ud800"'})
    with pytest.raises(BadRequest, match="not valid Unicode"):
        tool_mode({"tools": [{"type": "function", "function": {
            "name": "f", "parameters": {"type": "object", "description": "\udfff"}}}]})
