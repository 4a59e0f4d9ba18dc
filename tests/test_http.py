"""The OpenAI-compatible HTTP front, on the real service and model, with the official
``openai`` SDK as the client.  One worker with one slot and max_queue = 0: a request
holding the slot makes any other one (HTTP or TCP) overloaded."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pytest

from llmctl.common import protocol as p
from llmctl.common.protocol import FrameType
from tests.service import MODEL, Service, free_port, wait_until

KEY = "sk-test-llmctl"
NAME = MODEL.stem                      # the gateway's model name
HELLO = [{"role": "user", "content": "Write one sentence about the sea."}]
integration = pytest.mark.integration
LONG = dict(max_tokens=1500, temperature=0.0)          # runs until cancelled


@pytest.fixture(scope="module")
def svc():
    saved = os.environ.pop("LLMCTL_API_KEY", None)    # it would override [http] api_key
    s = Service(model={"n_ctx": 2048},
                workers={"probe_interval_s": 0.0},   # no deep probe takes the slot
                gateway={"max_queue": 0, "write_buffer_bytes": 1024,
                         "slow_client_timeout_s": 2.0, "token_window": 8},
                http={"enabled": True, "port": free_port(), "api_key": KEY})
    try:
        r = s.start()
        assert r.returncode == 0, r.stdout + r.stderr
        [addr] = s.status()["gateway"]["http_listening"]
        assert f"http://{addr}" in r.stdout
        s.base = f"http://{addr}"
        yield s
    finally:
        s.stop()
        if saved is not None:
            os.environ["LLMCTL_API_KEY"] = saved


@pytest.fixture
def client(svc) -> openai.OpenAI:
    c = openai.OpenAI(base_url=f"{svc.base}/v1", api_key=KEY, max_retries=0, timeout=60)
    yield c
    c.close()


@pytest.fixture(autouse=True)
def idle_after(request):
    """Every request of a test has ended (and freed its slot) before the next test."""
    yield
    if "svc" in request.fixturenames:
        svc = request.getfixturevalue("svc")
        wait_until(svc.idle, 20, "the service to be idle after the test")


def http(svc, method: str, path: str, body: Any = None, key: str | None = KEY,
         raw: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(svc.base + path, data=data, method=method)
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def assert_error_shape(body: bytes, code: str) -> dict:
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert err["code"] == code and err["message"]
    return err


def hold_the_slot(client: openai.OpenAI):
    """A streaming request that has its first token: it holds the only slot."""
    stream = client.completions.create(model=NAME, prompt="Once upon a time", stream=True,
                                       **LONG)
    next(iter(stream))
    return stream


# ---- basic routes ----------------------------------------------------------------------

@integration
def test_health_and_models(svc, client):
    status, _, body = http(svc, "GET", "/health", key=None)    # no key needed
    health = json.loads(body)
    assert status == 200 and health["status"] == "ok" and health["workers_ready"] == 1
    assert [m.id for m in client.models.list().data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    assert svc.status()["gateway"]["listening"] == [f"127.0.0.1:{svc.port}"]   # TCP first


@integration
def test_chat_non_streaming(client):
    r = client.chat.completions.create(model="anything", messages=HELLO, max_tokens=8,
                                       temperature=0.0)
    assert r.object == "chat.completion" and r.model == NAME
    [choice] = r.choices
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"
    u = r.usage
    assert u.completion_tokens == 8 and u.prompt_tokens > 0
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    # max_completion_tokens is the chat name of max_tokens
    r2 = client.chat.completions.create(model=NAME, messages=HELLO, max_completion_tokens=3,
                                        temperature=0.0)
    assert r2.usage.completion_tokens == 3 and r2.usage.prompt_tokens == u.prompt_tokens
    # llama-server's n_predict, as the MPI scheduler sends it, wins over max_tokens there
    r3 = client.chat.completions.create(model=NAME, messages=HELLO, max_tokens=8,
                                        temperature=0.2, extra_body={"n_predict": 5})
    assert r3.usage.completion_tokens == 5
    with pytest.raises(openai.BadRequestError, match="n_predict"):
        client.chat.completions.create(model=NAME, messages=HELLO, extra_body={"n_predict": 0})


@integration
def test_completions_non_streaming_and_stop(client):
    r = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=12,
                                  temperature=0.0, seed=7)
    assert r.object == "text_completion"
    [choice] = r.choices
    assert choice.finish_reason == "length" and r.usage.completion_tokens == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12
    text = choice.text
    word = text.split()[2]            # a word some way in: stop there
    cut = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=12,
                                    temperature=0.0, seed=7, stop=[word])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[:text.index(word)]


@integration
@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
def test_streaming_equals_non_streaming(client, chat):
    if chat:
        create, kw = client.chat.completions.create, {"messages": HELLO}
    else:
        create, kw = client.completions.create, {"prompt": "The capital of France is"}
    kw.update(model=NAME, max_tokens=24, temperature=0.0, seed=1)
    # Greedy output is reproducible only under the same KV-cache state: a cold prompt
    # is prefilled in one batch, a repeated one reuses its prefix and evaluates the
    # last token alone (float differences).  Warm it first, on either front.
    create(**kw)
    full = create(**kw)
    chunks = list(create(stream=True, stream_options={"include_usage": True}, **kw))
    *body, usage_chunk = chunks
    assert usage_chunk.choices == [] and usage_chunk.usage == full.usage
    if chat:
        assert chunks[0].object == "chat.completion.chunk"
        assert body[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in body)
        assert text == full.choices[0].message.content
    else:
        assert chunks[0].object == "text_completion"
        text = "".join(c.choices[0].text for c in body)
        assert text == full.choices[0].text
    assert [c.choices[0].finish_reason for c in body][-1] == full.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in body[:-1])
    assert all(c.id == chunks[0].id for c in chunks)


@integration
def test_sse_framing_ends_with_done(svc):
    status, headers, body = http(svc, "POST", "/v1/chat/completions", {
        "model": NAME, "messages": HELLO, "max_tokens": 4, "stream": True})
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = body.decode().split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events[:-1])
    last = json.loads(events[-3][len("data: "):])
    assert last["choices"][0]["finish_reason"] == "length"
    assert "usage" not in last                  # no include_usage: no usage chunk


# ---- errors ------------------------------------------------------------------------------

@integration
def test_wrong_or_missing_key_is_401(svc):
    bad = openai.OpenAI(base_url=f"{svc.base}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model=NAME, messages=HELLO, max_tokens=2)
    assert e.value.code == "unauthorized" and e.value.type == "authentication_error"
    status, headers, body = http(svc, "GET", "/v1/models", key=None)
    assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
    assert_error_shape(body, "unauthorized")


@integration
def test_bad_fields_are_400(svc, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=HELLO, temperature=-1)
    assert e.value.code == "bad_request" and "temperature" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="Hi", n=2)
    assert e.value.param == "n"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=NAME, messages=[], max_tokens=2)
    status, _, body = http(svc, "POST", "/v1/completions", raw=b"{not json")
    assert status == 400
    err = assert_error_shape(body, "bad_request")
    assert err["type"] == "invalid_request_error"


@integration
def test_queue_full_is_429_with_retry_after(svc, client):
    holder = hold_the_slot(client)
    try:
        def attempt(_: int) -> openai.RateLimitError | None:
            try:
                list(client.chat.completions.create(model=NAME, messages=HELLO, stream=True,
                                                    **LONG))
            except openai.RateLimitError as err:
                return err
            return None

        with ThreadPoolExecutor(4) as pool:
            errors = list(pool.map(attempt, range(4)))
        assert all(isinstance(e, openai.RateLimitError) for e in errors), errors
        for e in errors:
            assert e.code == "overloaded" and e.type == "rate_limit_error"
            assert int(e.response.headers["Retry-After"]) >= 1
    finally:
        holder.close()


@integration
def test_deadline_is_504_before_output_and_an_sse_error_after(svc, client):
    with pytest.raises(openai.InternalServerError) as e:
        client.completions.create(model=NAME, prompt="Once upon a time",
                                  extra_body={"deadline_ms": 500}, **LONG)
    assert e.value.status_code == 504 and e.value.code == "timeout"
    # The slot is free once the worker has acknowledged the cancel of the expired request.
    wait_until(svc.idle, 20, "the expired request to leave the worker")
    got = []
    with pytest.raises(openai.APIError) as e:
        for chunk in client.completions.create(model=NAME, prompt="Once upon a time",
                                               stream=True, extra_body={"deadline_ms": 1500},
                                               **LONG):
            got.append(chunk)
    assert got and not isinstance(e.value, openai.APIStatusError)   # streaming had begun
    assert e.value.body["code"] == "timeout"


# ---- cancellation, slow readers, the shared queue ------------------------------------------

@integration
def test_disconnect_mid_stream_frees_the_slot(svc, client):
    before = svc.counters()
    stream = client.chat.completions.create(model=NAME, messages=HELLO, stream=True, **LONG)
    first = next(iter(stream))
    assert first.choices[0].delta.role == "assistant"
    stream.close()
    wait_until(lambda: svc.status()["workers"][0]["inflight"] == 0, 20, "the slot to be freed")
    assert svc.counters()["cancelled"] == before["cancelled"] + 1
    r = client.completions.create(model=NAME, prompt="Hi", max_tokens=2)
    assert r.usage.completion_tokens == 2


@integration
def test_disconnect_while_waiting_for_a_non_streaming_answer(svc, client):
    before = svc.counters()
    body = json.dumps({"model": NAME, "prompt": "Once upon a time", **LONG}).encode()
    host, port = svc.base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + KEY.encode() + b"\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        wait_until(lambda: svc.status()["workers"][0]["inflight"] == 1, 20, "dispatch")
    wait_until(lambda: svc.status()["workers"][0]["inflight"] == 0, 20, "the slot to be freed")
    assert svc.counters()["cancelled"] == before["cancelled"] + 1
    assert client.completions.create(model=NAME, prompt="Hi", max_tokens=2).choices[0].text


@integration
def test_a_reader_that_stops_reading_is_dropped(svc, client):
    before = svc.counters()
    body = json.dumps({"model": NAME, "prompt": "Once upon a time", "stream": True,
                       **LONG}).encode()
    host, port = svc.base.removeprefix("http://").split(":")
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    slow.connect((host, int(port)))
    try:
        slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        # It never reads: the credits stay in the gateway, then the client is dropped.
        wait_until(lambda: svc.counters()["slow_clients"] == before["slow_clients"] + 1, 60,
                   "the stuck client to be dropped")
        wait_until(lambda: svc.status()["workers"][0]["inflight"] == 0, 20, "slot freed")
    finally:
        slow.close()
    assert client.completions.create(model=NAME, prompt="Hi", max_tokens=2).choices[0].text


@integration
def test_tcp_and_http_share_one_queue(svc, client):
    with svc.client() as tcp:
        tcp.generate(1, prompt="Once upon a time", **LONG)
        assert tcp.recv_frame().type is FrameType.TOKEN            # TCP holds the slot
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model=NAME, prompt="Hi", max_tokens=2)
        tcp.send(p.cancel(1))
        assert tcp.collect({1})[1].done["finish_reason"] == "cancelled"
        wait_until(lambda: svc.status()["workers"][0]["inflight"] == 0, 20, "slot freed")
        assert client.completions.create(model=NAME, prompt="Hi", max_tokens=2).choices

        holder = hold_the_slot(client)                              # HTTP holds it
        try:
            r = tcp.complete(2, prompt="Hi", max_tokens=2)
            assert r.error is not None and r.error["code"] == "overloaded"
        finally:
            holder.close()


# ---- without a worker: /health says why (no processes) ---------------------------------------

def test_health_is_503_when_not_ready_or_draining():
    from aiohttp.test_utils import TestClient, TestServer

    from llmctl.common.config import Config
    from llmctl.dataplane.gateway import Gateway
    from llmctl.dataplane.http.app import build_app

    async def main() -> list[tuple[int, dict]]:
        gw = Gateway(Config())         # the core alone: no worker link, no worker ever READY
        out = []
        async with TestClient(TestServer(build_app(gw))) as c:
            for draining in (False, True):
                gw.sched.draining = draining
                r = await c.get("/health")
                out.append((r.status, await r.json()))
            r = await c.post("/v1/completions", json={"prompt": "Hi"})
            out.append((r.status, await r.json()))
        return out

    (s1, b1), (s2, b2), (s3, b3) = asyncio.run(main())
    assert (s1, b1["status"]) == (503, "not_ready") and b1["reason"]
    assert (s2, b2["status"]) == (503, "shutting_down")
    assert s3 == 503 and b3["error"]["code"] == "shutting_down"
