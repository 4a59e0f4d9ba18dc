"""The one request type (common/request.py): a client's fields validated into a
GenRequest with the server's generation defaults, and the same struct at the worker."""
from __future__ import annotations

import json

import msgspec
import pytest

from llmctl.common import messages as m
from llmctl.common.config import GenerationConfig
from llmctl.common.errors import BadRequest
from llmctl.common.protocol import parse_json
from llmctl.common.request import ChatMessage, GenRequest, validate


D = GenerationConfig(max_tokens=16, temperature=0.5, top_p=0.9, top_k=10, deadline_ms=1000,
                     max_deadline_ms=5000)


def parse(raw: bytes):
    return validate(parse_json(raw, BadRequest), D)


def test_generate_defaults_and_fields():
    r = parse(b'{"prompt": "hi", "unknown_key": 1}')
    assert (r.prompt, r.max_tokens, r.temperature, r.top_p, r.top_k, r.deadline_ms, r.stop) == \
        ("hi", 16, 0.5, 0.9, 10, 1000, ())
    r = parse(json.dumps({"messages": [{"role": "user", "content": "x"}],
                                     "max_tokens": 3, "stop": "\n", "seed": 7}).encode())
    assert r.messages == (ChatMessage("user", "x"),) and r.stop == ("\n",) and r.seed == 7


def test_the_worker_receives_the_request_the_front_made():
    """One request type from the front to the worker: GENERATE carries it whole, with
    the defaults it was resolved with, and decodes into the same struct."""
    r = parse(b'{"messages": [{"role": "user", "content": "x"}], "stop": ["a"], "seed": 3}')
    frames = m.generate(7, msgspec.structs.replace(r, window=16))
    got = m.from_gateway(frames)
    assert isinstance(got, m.Generate) and got.rid == 7
    assert got.request == msgspec.structs.replace(r, window=16)
    assert (got.request.temperature, got.request.top_k) == (0.5, 10)   # the server's defaults


@pytest.mark.parametrize("body", [
    {}, {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, {"prompt": 5},
    {"messages": []}, {"messages": [{"role": "user"}]}, {"prompt": "a", "max_tokens": 0},
    {"prompt": "a", "max_tokens": True}, {"prompt": "a", "temperature": -1},
    {"prompt": "a", "top_p": 2}, {"prompt": "a", "stop": [""]}, {"prompt": "a", "seed": -1},
    {"prompt": "a", "deadline_ms": 5001}, {"prompt": "a", "stop": ["x"] * 17},
])
def test_generate_rejects(body):
    with pytest.raises(BadRequest):
        parse(json.dumps(body).encode())


def test_generate_rejects_non_json():
    for raw in (b"not json", b"[1]", b"\xc3\x28"):
        with pytest.raises(BadRequest):
            parse(raw)


@pytest.mark.integration
def test_tokenize_and_detokenize_are_answered_by_a_worker_without_a_slot():
    """The worker's utility requests (the HTTP fronts' token counting, /tokenize,
    /detokenize, /apply-template): the chat template applied, tokens, pieces, text."""
    from llmctl.worker.batch import BatchEngine
    from tests.service import MODEL

    eng = BatchEngine(str(MODEL), 512, 0, 1, 63, slots=1)
    chat = GenRequest(messages=(ChatMessage("user", "Hello there"),), tokenize=True,
                      with_pieces=True)
    st = eng.utility(chat)
    assert st.prompt_tokens == len(st.tokens) > 4 and "<|im_start|>user" in st.text
    assert "".join(p for p in st.pieces if isinstance(p, str)).endswith(st.text[-5:])
    plain = eng.utility(GenRequest(prompt="Hello", tokenize=True, add_special=False))
    assert eng.utility(GenRequest(detokenize=tuple(plain.tokens))).text == "Hello"
    assert eng.free_slots == 1
    with pytest.raises(BadRequest):
        eng.utility(GenRequest(detokenize=(10**9,)))
