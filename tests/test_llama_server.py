"""llama-server's API (its tools/server/README.md: "API Endpoints", "OpenAI-compatible API
Endpoints", "API errors") on the real model, against llmctl and, where it is built
(``tools/build_llama_server.sh``), against llama-server itself: every test runs on both
(the ``llama_server`` marker; skipped when the binary is absent), so the suite shows
where the two differ.  Both serve the default model with 2 slots of 2048 tokens, one
thread and an API key.  Where llmctl answers differently by design (docs/llama-server.md)
a test says so with ``LLMCTL``."""
from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest

from llmctl.common.procs import terminate_popen
from tests.service import MODEL, Service, free_port, wait_until

KEY = "sk-llama-test"
BIN = Path(os.environ.get("LLAMA_SERVER_BIN", Path.home() / ".cache/llmctl/llama-server/bin/llama-server"))
PROMPT = "Once upon a time"
HELLO = [{"role": "user", "content": "Write one sentence about the sea."}]
pytestmark = pytest.mark.integration


class Target:
    def __init__(self, name: str, base: str) -> None:
        self.name, self.base = name, base

    @property
    def llmctl(self) -> bool:
        return self.name == "llmctl"

    def call(self, method: str, path: str, body: Any = None, key: str | None = KEY,
             ) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if key:
            req.add_header("Authorization", f"Bearer {key}")
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as err:
            status, raw = err.code, err.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode()

    def post(self, path: str, body: Any) -> Any:
        status, out = self.call("POST", path, body)
        assert status == 200, (status, out)
        return out

    def get(self, path: str) -> Any:
        status, out = self.call("GET", path)
        assert status == 200, (status, out)
        return out

    def events(self, path: str, body: dict[str, Any]) -> list[Any]:
        """The ``data:`` events of a streamed answer, parsed."""
        req = urllib.request.Request(self.base + path, data=json.dumps(body).encode(),
                                     method="POST")
        req.add_header("Authorization", f"Bearer {KEY}")
        out = []
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            for line in resp.read().decode().splitlines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    out.append(json.loads(line[6:]))
        return out

    def complete(self, **body: Any) -> dict[str, Any]:
        return self.post("/completion", {"prompt": PROMPT, "temperature": 0.0, **body})


def _llmctl():
    saved = os.environ.pop("LLMCTL_API_KEY", None)
    s = Service(model={"n_ctx": 2048}, workers={"slots": 2, "probe_interval_s": 0.0},
                http={"enabled": True, "port": free_port(), "api_key": KEY})
    try:
        r = s.start()
        assert r.returncode == 0, r.stdout + r.stderr
        [addr] = s.status()["gateway"]["http_listening"]
        yield Target("llmctl", f"http://{addr}")
    finally:
        s.stop()
        if saved is not None:
            os.environ["LLMCTL_API_KEY"] = saved


def _up(t: Target) -> bool:
    try:
        return t.call("GET", "/health")[0] == 200
    except urllib.error.URLError:         # not listening yet
        return False


def _llama_server():
    if not BIN.is_file():
        pytest.skip(f"llama-server is not built ({BIN}): bash tools/build_llama_server.sh")
    port = free_port()
    proc = subprocess.Popen([str(BIN), "-m", str(MODEL), "--port", str(port), "-np", "2",
                             "-c", "4096", "-t", "1", "--api-key", KEY, "--metrics"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t = Target("llama-server", f"http://127.0.0.1:{port}")
    try:
        wait_until(lambda: proc.poll() is not None or _up(t), 60, "llama-server to load the model")
        assert proc.poll() is None, "llama-server exited"
        yield t
    finally:
        terminate_popen(proc, 10)


@pytest.fixture(scope="module", params=["llmctl", pytest.param("llama-server",
                                                               marks=pytest.mark.llama_server)])
def target(request):
    yield from (_llmctl() if request.param == "llmctl" else _llama_server())


def sdk(t: Target, prefix: str = "/v1") -> openai.OpenAI:
    return openai.OpenAI(base_url=t.base + prefix, api_key=KEY, max_retries=0, timeout=60)


# ---- GET /health, paths ----------------------------------------------------------------

def test_health_is_public_and_ok(target):
    for path in ("/health", "/v1/health"):
        status, body = target.call("GET", path, key=None)
        assert status == 200 and body["status"] == "ok"


def test_the_openai_routes_answer_without_their_v1_prefix(target):
    with sdk(target, "") as c:
        r = c.chat.completions.create(model="any", messages=HELLO, max_tokens=4,
                                      temperature=0.0)
        assert r.choices[0].message.content and r.usage.completion_tokens == 4
        assert [m.id for m in c.models.list().data]
    with sdk(target) as c:
        v1 = c.chat.completions.create(model="any", messages=HELLO, max_tokens=4,
                                       temperature=0.0)
    assert v1.choices[0].message.content == r.choices[0].message.content
    # /completions without the prefix is llama-server's own completion, as /completion
    assert target.post("/completions", {"prompt": PROMPT, "n_predict": 3,
                                        "temperature": 0.0})["tokens_predicted"] == 3


def test_requests_need_the_api_key(target):
    status, body = target.call("POST", "/completion", {"prompt": PROMPT}, key=None)
    assert status == 401
    status, body = target.call("POST", "/tokenize", {"content": "x"}, key="wrong")
    assert status == 401


# ---- POST /completion ------------------------------------------------------------------

def test_completion_answer_shape(target):
    r = target.complete(n_predict=8)
    assert isinstance(r["content"], str) and r["content"]
    assert r["stop"] is True and r["stop_type"] == "limit" and r["stopping_word"] == ""
    assert r["tokens_predicted"] == 8 and r["tokens_evaluated"] > 0
    assert r["tokens"] == [] and isinstance(r["id_slot"], int) and r["truncated"] is False
    assert r["generation_settings"]["n_predict"] == 8 and isinstance(r["model"], str)
    assert r["has_new_line"] == ("\n" in r["content"])
    for key in ("cache_n", "prompt_n", "prompt_ms", "prompt_per_token_ms",
                "prompt_per_second", "predicted_n", "predicted_ms",
                "predicted_per_token_ms", "predicted_per_second"):
        assert isinstance(r["timings"][key], (int, float)), key
    assert r["timings"]["predicted_n"] == 8
    assert "completion_probabilities" not in r


def test_completion_prompt_as_tokens_or_mixed(target):
    text = target.complete(n_predict=6)["content"]
    ids = target.post("/tokenize", {"content": PROMPT, "add_special": True})["tokens"]
    assert target.complete(prompt=ids, n_predict=6)["content"] == text
    head = target.post("/tokenize", {"content": "Once upon"})["tokens"]
    mixed = target.complete(prompt=[*head, " a time"], n_predict=6)
    assert mixed["tokens_evaluated"] == len(head) + len(
        target.post("/tokenize", {"content": " a time"})["tokens"])


def test_completion_stream(target):
    whole = target.complete(n_predict=8)
    events = target.events("/completion", {"prompt": PROMPT, "temperature": 0.0,
                                           "n_predict": 8, "stream": True})
    *pieces, last = events
    assert all(e["stop"] is False and isinstance(e["tokens"], list) for e in pieces)
    assert "".join(e["content"] for e in pieces) == whole["content"]
    assert sum(len(e["tokens"]) for e in pieces) == 8
    assert last["stop"] is True and last["content"] == "" and last["stop_type"] == "limit"
    assert last["timings"]["predicted_n"] == 8


def test_completion_n_probs_and_return_tokens(target):
    r = target.complete(n_predict=5, n_probs=3, return_tokens=True)
    probs = r["completion_probabilities"]
    assert len(probs) == 5 == len(r["tokens"])
    for p, tok in zip(probs, r["tokens"]):
        assert p["id"] == tok and isinstance(p["token"], str) and p["logprob"] <= 0
        assert isinstance(p["bytes"], list)
        assert len(p["top_logprobs"]) == 3
        assert {"id", "token", "logprob", "bytes"} <= set(p["top_logprobs"][0])
    assert probs[0]["top_logprobs"][0]["id"] == probs[0]["id"]     # greedy: the most likely
    assert target.post("/detokenize", {"tokens": r["tokens"]})["content"] == r["content"]


def test_completion_stop_word(target):
    text = target.complete(n_predict=12)["content"]
    word = text.split()[2]
    r = target.complete(n_predict=12, stop=[word])
    assert r["stop_type"] == "word" and r["stopping_word"] == word
    assert r["content"] == text[:text.index(word)]


def test_completion_seed_gives_the_same_text_whatever_runs_beside(target):
    body = {"prompt": PROMPT, "n_predict": 16, "temperature": 1.0, "seed": 42}
    alone = target.post("/completion", body)["content"]
    other = {"prompt": "The weather today", "n_predict": 32, "temperature": 1.0}
    with ThreadPoolExecutor(2) as pool:
        busy = pool.submit(target.post, "/completion", other)
        beside = target.post("/completion", body)["content"]
        busy.result()
    assert alone == beside


def test_completion_logit_bias(target):
    first = target.complete(n_predict=1, return_tokens=True)["tokens"][0]
    banned = target.complete(n_predict=1, return_tokens=True, logit_bias=[[first, False]])
    assert banned["tokens"][0] != first
    piece = target.post("/detokenize", {"tokens": [first]})["content"]
    by_text = target.complete(n_predict=1, return_tokens=True, logit_bias=[[piece, False]])
    assert by_text["tokens"][0] != first
    boosted = target.complete(n_predict=1, return_tokens=True, logit_bias={"1000": 100.0})
    assert boosted["tokens"] == [1000]


def test_completion_samplers_order_and_min_p(target):
    greedy = target.complete(n_predict=8)["content"]
    r = target.complete(n_predict=8, temperature=1.0, seed=1, samplers=["top_k", "temperature"],
                        top_k=1)
    assert r["content"] == greedy
    r = target.complete(n_predict=8, temperature=1.0, seed=1, min_p=1.0,
                        samplers=["min_p", "temperature"])
    assert r["content"] == greedy


def test_completion_cache_prompt(target):
    prompt = "The history of the city begins in the year 1200, when"
    target.complete(prompt=prompt, n_predict=2, id_slot=0)
    again = target.complete(prompt=prompt, n_predict=2, id_slot=0)
    assert again["timings"]["cache_n"] > 0
    fresh = target.complete(prompt=prompt, n_predict=2, id_slot=0, cache_prompt=False)
    assert fresh["timings"]["cache_n"] == 0
    assert fresh["content"] == again["content"]


def test_completion_id_slot_and_slots(target):
    r = target.complete(prompt="A slot of its own", n_predict=3, id_slot=1)
    assert r["id_slot"] == 1
    slots = target.get("/slots")
    assert [s["id"] for s in slots] == [0, 1]
    for s in slots:
        assert s["n_ctx"] == 2048 and s["is_processing"] is False
    assert slots[1]["n_prompt_tokens"] >= r["tokens_evaluated"]


def test_completion_refuses_bad_fields(target):
    status, body = target.call("POST", "/completion", {"prompt": PROMPT, "n_probs": "x"})
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    assert body["error"]["code"] == 400


# ---- tokenize, detokenize, apply-template ----------------------------------------------

def test_tokenize_and_detokenize(target):
    plain = target.post("/tokenize", {"content": "Hello world"})["tokens"]
    assert plain and all(isinstance(t, int) for t in plain)
    pieces = target.post("/tokenize", {"content": "Hello world", "with_pieces": True})["tokens"]
    assert [p["id"] for p in pieces] == plain
    assert "".join(p["piece"] for p in pieces) == "Hello world"
    special = target.post("/tokenize", {"content": "<|im_start|>"})["tokens"]
    assert len(special) == 1                  # parse_special defaults to true
    assert len(target.post("/tokenize", {"content": "<|im_start|>",
                                         "parse_special": False})["tokens"]) > 1
    assert target.post("/detokenize", {"tokens": plain})["content"] == "Hello world"
    assert target.post("/tokenize", {"content": "é", "with_pieces": True})["tokens"]


def test_apply_template_and_input_tokens(target):
    messages = [{"role": "user", "content": "Hi there"}]
    prompt = target.post("/apply-template", {"messages": messages})["prompt"]
    assert "Hi there" in prompt and prompt.endswith("<|im_start|>assistant\n")
    n = len(target.post("/tokenize", {"content": prompt, "add_special": True})["tokens"])
    counted = target.post("/v1/chat/completions/input_tokens", {"messages": messages})
    assert counted == {"object": "response.input_tokens", "input_tokens": n}


# ---- the OpenAI routes' llama-server fields --------------------------------------------

def test_chat_n_predict_timings_and_logit_bias(target):
    with sdk(target) as c:
        r = c.chat.completions.create(model="any", messages=HELLO, temperature=0.0,
                                      extra_body={"n_predict": 3})
        assert r.usage.completion_tokens == 3
        assert r.model_extra["timings"]["predicted_n"] == 3
        first = c.completions.create(model="any", prompt=PROMPT, max_tokens=1,
                                     temperature=0.0).choices[0].text
        ids = target.post("/tokenize", {"content": first})["tokens"]
        other = c.completions.create(model="any", prompt=PROMPT, max_tokens=1, temperature=0.0,
                                     logit_bias={str(ids[0]): -100})
        assert other.choices[0].text != first


def test_chat_assistant_message_last_is_a_prefill(target):
    head = [{"role": "user", "content": "What is the capital of France?"}]
    prefill = "The capital of France is"
    rendered = target.post("/apply-template", {"messages": head})["prompt"] + prefill
    with sdk(target) as c:
        r = c.chat.completions.create(model="any", temperature=0.0, max_tokens=6,
                                      messages=[*head, {"role": "assistant",
                                                        "content": prefill}])
    ids = target.post("/tokenize", {"content": rendered, "add_special": True})["tokens"]
    # the answer is the whole assistant message: the prefill and what follows it
    assert r.choices[0].message.content == prefill + target.complete(prompt=ids,
                                                                     n_predict=6)["content"]


def test_chat_template_kwargs_reach_the_template(target):
    with sdk(target) as c:
        r = c.chat.completions.create(model="any", messages=HELLO, max_tokens=2, temperature=0,
                                      extra_body={"chat_template_kwargs": {"unused": True}})
    assert r.usage.completion_tokens == 2


def test_invalid_messages_is_a_400(target):
    for path in ("/chat/completions", "/v1/chat/completions"):
        status, body = target.call("POST", path, {"messages": "hello"})
        assert status == 400, (path, body)
        assert body["error"]["type"] == "invalid_request_error" and body["error"]["message"]
    status, body = target.call("POST", "/chat/completions", {"messages": "hello"})
    assert body["error"]["code"] == 400


# ---- GET /props, /models, /metrics -----------------------------------------------------

def test_props(target):
    p = target.get("/props")
    assert p["total_slots"] == 2
    assert p["default_generation_settings"]["n_ctx"] == 2048
    assert "<|im_start|>" in p["chat_template"]
    assert p["model_path"].endswith(MODEL.name) and p["modalities"]["vision"] is False
    assert isinstance(p["default_generation_settings"]["params"], dict)


def test_models_list(target):
    data = target.get("/models")["data"]
    assert data and all(m["object"] == "model" and isinstance(m["id"], str) for m in data)
    assert target.get("/v1/models")["data"][0]["id"] == data[0]["id"]


def test_metrics_has_llamacpp_families(target):
    target.complete(n_predict=2)
    status, text = target.call("GET", "/metrics")
    assert status == 200
    values = {}
    for line in text.splitlines():
        if line.startswith("llamacpp:"):
            name, value = line.split()[:2]
            values[name] = float(value)
    for name in ("llamacpp:prompt_tokens_total", "llamacpp:tokens_predicted_total",
                 "llamacpp:prompt_seconds_total", "llamacpp:tokens_predicted_seconds_total",
                 "llamacpp:n_decode_total", "llamacpp:requests_processing",
                 "llamacpp:requests_deferred"):
        assert name in values, name
    assert values["llamacpp:tokens_predicted_total"] >= 2
    assert values["llamacpp:requests_processing"] == 0


def test_chat_n_choices(target):
    with sdk(target) as c:
        r = c.chat.completions.create(model="any", messages=HELLO, max_tokens=4,
                                      temperature=0.0, n=2)
        one = c.chat.completions.create(model="any", messages=HELLO, max_tokens=4,
                                        temperature=0.0)
    assert [ch.index for ch in r.choices] == [0, 1]
    assert {ch.message.content for ch in r.choices} == {one.choices[0].message.content}


def test_chat_stream_timings_and_logprob_ids(target):
    events = target.events("/v1/chat/completions", {
        "messages": HELLO, "max_tokens": 3, "temperature": 0.0, "stream": True,
        "logprobs": True, "top_logprobs": 2})
    first, *middle, last = events
    assert first["choices"][0]["delta"]["role"] == "assistant"
    entries = [e for ev in middle for e in (ev["choices"][0].get("logprobs") or {}).get(
        "content", [])]
    assert len(entries) == 3 and all(isinstance(e["id"], int) for e in entries)
    assert last["choices"][0]["finish_reason"] == "length"
    assert last["timings"]["predicted_n"] == 3


# ---- the router endpoints on [[models]] (llmctl only: llama-server's router is a mode) --

def test_models_load_and_unload_map_onto_the_configured_models(make_service):
    from tests.service import MODEL_B, running
    common = {"n_ctx": 512, "threads": 1, "load": "on_demand"}
    svc = make_service(models=[{"name": "a", "path": str(MODEL), **common},
                               {"name": "b", "path": str(MODEL_B), **common}],
                       workers={"probe_interval_s": 0.0}, http={"enabled": True})
    with running(svc):
        t = Target("llmctl", svc.base)

        def state(name: str) -> str:
            models = t.call("GET", "/models", key=None)[1]["data"]
            return next(m["status"]["value"] for m in models if m["id"] == name)

        status, body = t.call("GET", "/health", key=None)        # nothing loaded yet
        assert status == 503 and body["error"] == {
            "code": 503, "message": "Loading model", "type": "unavailable_error"}
        assert state("a") == state("b") == "unloaded"
        assert t.call("POST", "/models/load", {"model": "b"}, key=None) == (
            200, {"success": True})
        wait_until(lambda: state("b") == "loaded", 60, "model b to load")
        status, r = t.call("POST", "/completion", {"prompt": PROMPT, "n_predict": 2,
                                                   "model": "b"}, key=None)
        assert status == 200 and r["tokens_predicted"] == 2 and r["model"] == "b"
        assert t.call("POST", "/models/unload", {"model": "b"}, key=None) == (
            200, {"success": True})
        wait_until(lambda: state("b") == "unloaded", 60, "model b to unload")
        status, body = t.call("POST", "/models/load", {"model": "nope"}, key=None)
        assert status == 404 and body["error"]["type"] == "not_found_error"


def test_completion_penalties(target):
    prompt = "one one one one one one one one"
    plain = target.complete(prompt=prompt, n_predict=8)["content"]
    body = {"prompt": prompt, "n_predict": 8, "temperature": 0.0, "repeat_penalty": 1.5,
            "presence_penalty": 1.0, "frequency_penalty": 1.0}
    pen = target.post("/completion", body)
    assert pen["content"] != plain
    assert pen["generation_settings"]["repeat_penalty"] == 1.5
    with sdk(target) as c:            # OpenAI's names reach the same sampler
        r = c.completions.create(model="any", prompt=prompt, max_tokens=8, temperature=0.0,
                                 presence_penalty=1.0, frequency_penalty=1.0,
                                 extra_body={"repeat_penalty": 1.5})
    assert r.choices[0].text == pen["content"]
