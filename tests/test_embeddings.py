"""POST /v1/embeddings on the real model (``[workers] embeddings = true``): the SDK's
``client.embeddings.create``, list inputs batched, float and base64, through the same
admission and credits as generation."""
from __future__ import annotations

import base64
import json
import struct
import urllib.error
import urllib.request
from collections.abc import Iterator

import numpy as np
import openai
import pytest

from tests.service import Service, free_port, openai_client, running, wait_until

integration = pytest.mark.integration
RELATED = [("The cat sat on the mat.", "A kitten was sitting on the rug."),
           ("Quarterly revenue rose by eight percent.", "The company's sales grew this year."),
           ("It is raining heavily in London.", "Wet weather hit the British capital.")]


@pytest.fixture(scope="module")
def svc():
    # one slot and no queue: a request holding the slot makes any other one overloaded
    s = Service(model={"n_ctx": 1024}, workers={"slots": 1, "probe_interval_s": 0.0,
                                                "embeddings": True},
                gateway={"max_queue": 0}, http={"enabled": True, "port": free_port()})
    with running(s):
        yield s


@pytest.fixture
def client(svc) -> Iterator[openai.OpenAI]:
    yield from openai_client(svc, 120)


def post(base: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(f"{base}/v1/embeddings", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@integration
def test_related_sentences_are_closer(client):
    texts = [t for pair in RELATED for t in pair]
    out = client.embeddings.create(model="m", input=texts)
    assert [d.index for d in out.data] == list(range(len(texts)))
    e = np.array([d.embedding for d in out.data])
    assert np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-4)
    sim = e @ e.T
    for i in range(0, len(texts), 2):
        unrelated = [sim[i, j] for j in range(len(texts)) if j not in (i, i + 1)]
        assert sim[i, i + 1] > max(unrelated), np.round(sim, 3)
    assert out.usage.prompt_tokens == out.usage.total_tokens > len(texts)


@integration
def test_list_batches_agree_with_single_inputs_and_formats(client, svc):
    texts = [f"Sentence number {i} is about {w}." for i, w in
             enumerate(["apples", "rivers", "engines", "music"] * 9)]      # 36 > one group
    batch = client.embeddings.create(model="m", input=texts)
    assert len(batch.data) == 36
    one = client.embeddings.create(model="m", input=texts[33])
    assert np.dot(one.data[0].embedding, batch.data[33].embedding) == pytest.approx(1.0,
                                                                                    abs=1e-3)
    status, body = post(svc.base, {"input": texts[:2], "encoding_format": "float"})
    assert status == 200 and isinstance(body["data"][0]["embedding"][0], float)
    status, b64 = post(svc.base, {"input": texts[:2], "encoding_format": "base64"})
    raw = base64.b64decode(b64["data"][1]["embedding"])
    assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == pytest.approx(
        body["data"][1]["embedding"])


@integration
def test_admission_and_credits(client, svc):
    """An embedding request needs a credit like a generation: with the one slot held and
    no queue it is overloaded; once the slot is free it is served."""
    stream = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Tell a long story."}],
        max_tokens=1500, temperature=0.0, stream=True)
    next(iter(stream))
    with pytest.raises(openai.RateLimitError) as e:
        client.embeddings.create(model="m", input="hello")
    assert e.value.body["code"] == "overloaded"
    stream.close()
    wait_until(svc.idle, 30, "the story was cancelled")
    assert len(client.embeddings.create(model="m", input="hello").data) == 1


@integration
@pytest.mark.parametrize("body,needle", [
    ({"input": []}, "input must be"), ({"input": [[1, 2, 3]]}, "token arrays"),
    ({"input": [""]}, "empty"), ({"input": "x", "encoding_format": "f16"}, "encoding_format"),
    ({"input": "x", "dimensions": 8}, "dimensions"),
    ({"input": "word " * 2000}, "at most 1024"),
])
def test_bad_embedding_requests(svc, body, needle):
    status, out = post(svc.base, body)
    assert status == 400 and needle in out["error"]["message"], out


@integration
def test_concurrent_requests_beside_generation(svc):
    """On a second service with 4 slots, concurrent embedding requests (packed into the
    same steps when they overlap) and a generation beside them: each vector is the one
    its input gets alone, up to rounding."""
    from concurrent.futures import ThreadPoolExecutor

    s = Service(model={"n_ctx": 512}, workers={"slots": 4, "probe_interval_s": 0.0,
                                               "embeddings": True},
                http={"enabled": True, "port": free_port()})
    try:
        assert s.start().returncode == 0
        [addr] = s.status()["gateway"]["http_listening"]
        c = openai.OpenAI(base_url=f"http://{addr}/v1", api_key="none", max_retries=0,
                          timeout=120)
        texts = [f"Text {i}: " + "the quick brown fox jumps over the lazy dog " * (1 + i % 4)
                 for i in range(12)]
        alone = [np.array(c.embeddings.create(model="m", input=t).data[0].embedding)
                 for t in texts]
        with ThreadPoolExecutor(4) as pool:
            futs = [pool.submit(c.embeddings.create, model="m", input=texts[i:i + 3])
                    for i in range(0, 12, 3)]
            chat = pool.submit(c.chat.completions.create, model="m", max_tokens=16,
                               messages=[{"role": "user", "content": "Hello"}])
            got = [np.array(d.embedding) for f in futs for d in f.result().data]
            assert chat.result().choices[0].message.content
        for a, b in zip(alone, got):
            assert float(a @ b) > 0.999     # kernels round differently by batch shape
        c.close()
    finally:
        s.stop()
