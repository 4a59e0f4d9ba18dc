"""Logprobs on the real model: chat (``logprobs``, ``top_logprobs``) and completions
(``logprobs: N``), streaming and not, over the SDK and the wire protocol.

At temperature 0 the sampler takes the most likely token, so each chosen token must be
its own first alternative, with the same logprob; the tokens' bytes must spell the text.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import openai
import pytest

from tests.service import http_service, openai_client

integration = pytest.mark.integration
MSGS = [{"role": "user", "content": "Name three rivers."}]


@pytest.fixture(scope="module")
def svc():
    yield from http_service(1024)


@pytest.fixture
def client(svc) -> Iterator[openai.OpenAI]:
    yield from openai_client(svc, 120)


def check_greedy(entries, top: int) -> None:
    assert entries
    for e in entries:
        assert e.logprob <= 0.0 and math.isfinite(e.logprob)
        assert len(e.top_logprobs) == top
        lps = [a.logprob for a in e.top_logprobs]
        assert lps == sorted(lps, reverse=True)
        if top:
            assert e.top_logprobs[0].token == e.token
            assert e.top_logprobs[0].logprob == pytest.approx(e.logprob)
        assert sum(math.exp(x) for x in lps) <= 1.0 + 1e-6


@integration
def test_chat_logprobs_streaming_and_not(client):
    r = client.chat.completions.create(model="m", messages=MSGS, max_tokens=24,
                                       temperature=0.0, logprobs=True, top_logprobs=5)
    entries = r.choices[0].logprobs.content
    check_greedy(entries, 5)
    text = r.choices[0].message.content
    assert b"".join(bytes(e.bytes) for e in entries).decode() == text
    assert len(entries) == r.usage.completion_tokens

    chunks = list(client.chat.completions.create(model="m", messages=MSGS, max_tokens=24,
                                                 temperature=0.0, logprobs=True,
                                                 top_logprobs=5, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in entries]
    for c in chunks:      # each chunk's logprobs spell that chunk's text
        if c.choices and c.choices[0].delta.content and c.choices[0].logprobs:
            got = b"".join(bytes(e.bytes) for e in c.choices[0].logprobs.content)
            assert c.choices[0].delta.content.encode() == got


@integration
def test_logprobs_without_alternatives_and_off(client):
    r = client.chat.completions.create(model="m", messages=MSGS, max_tokens=8,
                                       temperature=0.0, logprobs=True)
    check_greedy(r.choices[0].logprobs.content, 0)
    r = client.chat.completions.create(model="m", messages=MSGS, max_tokens=8, temperature=0.0)
    assert r.choices[0].logprobs is None


@integration
def test_completions_logprobs(client):
    r = client.completions.create(model="m", prompt="The capital of France is", max_tokens=12,
                                  temperature=0.0, logprobs=3)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 12
    for tok, x, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and max(top.values()) == pytest.approx(x) and top[tok] == \
            pytest.approx(x)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(12)]


@integration
def test_sampled_tokens_and_grammar_keep_logprobs(client):
    """At temperature 1 the chosen token need not be the most likely one, and under a
    grammar it is one the grammar allows: its logprob is still the model's."""
    r = client.chat.completions.create(model="m", messages=MSGS, max_tokens=16, temperature=1.0,
                                       seed=3, logprobs=True, top_logprobs=20)
    entries = r.choices[0].logprobs.content
    assert all(len(e.top_logprobs) == 20 and e.logprob <= e.top_logprobs[0].logprob + 1e-9
               for e in entries)
    r = client.chat.completions.create(model="m", messages=MSGS, max_tokens=16, temperature=0.0,
                                       logprobs=True, extra_body={"grammar": 'root ::= "Nile"'})
    content = r.choices[0].logprobs.content
    assert r.choices[0].message.content == "Nile"
    assert b"".join(bytes(e.bytes) for e in content) == b"Nile"


@integration
def test_wire_protocol_logprobs(svc):
    with svc.client() as c:
        res = c.complete(1, prompt="Once upon a time", max_tokens=10, temperature=0.0,
                         logprobs=True, top_logprobs=2)
        plain = c.complete(1, prompt="Once upon a time", max_tokens=10, temperature=0.0)
    assert res.error is None and len(res.logprobs) == res.done["completion_tokens"] == 10
    assert "".join(e["token"] for e in res.logprobs) == res.text == plain.text
    assert plain.logprobs == []
    assert all(len(e["top_logprobs"]) == 2 for e in res.logprobs)


@integration
@pytest.mark.parametrize("extra", [{"logprobs": True, "top_logprobs": 21},
                                   {"top_logprobs": 2}, {"logprobs": "yes"}])
def test_bad_logprobs_requests(client, extra):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=MSGS, max_tokens=4,
                                       extra_body=extra)
    assert e.value.body["code"] == "bad_request" and "logprobs" in e.value.body["message"]


@integration
@pytest.mark.parametrize("extra", [{"typical_p": 0.5}, {"mirostat": 2},
                                   {"ignore_eos": True}, {"modalities": ["audio"]},
                                   {"best_of": 2}])
def test_fields_that_would_change_the_answer_are_refused(client, extra):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=MSGS, max_tokens=4,
                                       extra_body=extra)
    [key] = extra
    assert e.value.body["param"] == key and "not supported" in e.value.body["message"]
    # their no-op values are accepted
    r = client.chat.completions.create(model="m", messages=MSGS, max_tokens=2,
                                       frequency_penalty=0, presence_penalty=0.0,
                                       extra_body={"typical_p": 1.0, "mirostat": 0})
    assert r.choices[0].message.content is not None
