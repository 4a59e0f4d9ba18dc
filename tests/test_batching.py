"""Continuous batching (worker/batch.py) and the prompt cache (worker/slots.py),
cache-aware routing.

In-process tests drive the engines directly on the real model; one end-to-end test
runs a real service with 4 slots per worker.  All of them are ``integration`` tests
(they need the model); the prefill rules and the routing are unit tests."""
from __future__ import annotations

import gc
import random
import threading
import uuid
from collections import defaultdict
from typing import Any

import msgspec
import psutil
import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmctl.common.prefix import matched, prefix_hashes, request_hashes
from llmctl.common.request import ChatMessage, GenRequest, as_request
from llmctl.dataplane.scheduler import Scheduler, WorkerState
from llmctl.dataplane.streams import Stream
from tests.fakes import Recorder
from tests.service import MODEL, wait_until
from llmctl.worker.engine import prefill_chunk, reusable_prefix

N_CTX = 1024
N_BATCH = 32          # small, so that prefill chunks mix with running sequences

SYSTEM = ("You are a careful assistant for a hardware shop. Answer in one short paragraph. "
          "Stock: hammers, saws, drills, ladders, paint, brushes, nails, screws and glue. "
          "Opening hours are nine to five on weekdays and ten to two on Saturdays.")
LONG = " ".join(f"Item {i} is a {c} box." for i, c in
                zip(range(40), ["red", "blue", "green", "white"] * 10))     # ~300 tokens

PROMPTS: list[dict[str, Any]] = [
    {"prompt": "Once upon a time"},
    {"prompt": "The capital of France is"},
    {"prompt": LONG + " The third box is"},
    {"messages": [{"role": "system", "content": SYSTEM},
                  {"role": "user", "content": "Do you sell glue?"}]},
    {"prompt": "def fib(n):"},
    {"messages": [{"role": "user", "content": "Name three colours."}]},
]


def greedy(p: dict[str, Any], max_tokens: int = 24, **kw: Any) -> dict[str, Any]:
    return {**p, "max_tokens": max_tokens, "temperature": 0.0, **kw}


def drive(engine, jobs, cancels=None, max_steps=20_000):
    """Run jobs [(rid, fields, join_step)] through an engine, starting each when its
    step has come and a slot is free; ``cancels`` {rid: step}.  Returns
    {rid: (text, done_stats)}."""
    cancels = dict(cancels or {})
    pending = sorted(jobs, key=lambda j: j[2])
    text: dict[int, str] = defaultdict(str)
    done: dict[int, dict] = {}
    step = 0

    def take(ev) -> None:
        assert ev.rid not in done, f"event after the end of {ev.rid}"
        assert ev.error is None, ev.error
        text[ev.rid] += ev.text
        if ev.done is not None:
            done[ev.rid] = msgspec.structs.asdict(ev.done)

    while pending or engine.active is not None:
        while pending and pending[0][2] <= step and engine.free_slots:
            rid, fields, _ = pending.pop(0)
            engine.start(engine.prepare(rid, as_request(fields)))
        for rid, at in list(cancels.items()):
            ev = engine.cancel(rid) if at <= step else None
            if ev is not None:
                take(ev)
                del cancels[rid]
        for ev in engine.step():
            take(ev)
        step += 1
        assert step < max_steps, "the engine does not make progress"
    return {rid: (text[rid], done.get(rid)) for rid in {j[0] for j in jobs}}


# ---- the prefill rules, pure ----------------------------------------------------------

@given(total=st.integers(0, 700), n_batch=st.integers(3, 300))
def test_prefill_chunks_cover_the_prompt_without_a_lone_token(total, n_batch):
    chunks, left = [], total
    while left:
        k = prefill_chunk(left, n_batch)
        assert 1 <= k <= n_batch
        chunks.append(k)
        left -= k
    assert sum(chunks) == total
    assert total < 2 or 1 not in chunks, chunks


@given(n=st.integers(0, 500), extra=st.integers(0, 500))
def test_a_reused_prefix_leaves_no_lone_token_to_prefill(n, extra):
    last = n + extra                                  # the index of the last prompt token
    r = reusable_prefix(n, last)
    assert 0 <= r <= n
    assert last - r != 1 or r == 0                    # 1 left only when nothing is reused
    assert r >= n - 1


# ---- fixtures: the single-slot reference and batching engines -------------------------

@pytest.fixture(scope="module")
def single():
    from tests.reference_engine import Engine
    return Engine(str(MODEL), N_CTX, 0, 1, N_BATCH)


def reference(single, fields: dict[str, Any]) -> tuple[str, dict]:
    """What the single-slot Engine produces for a request, run alone."""
    out = drive(single, [(1, fields, 0)])
    return out[1]


@pytest.fixture(scope="module")
def batch4():
    from llmctl.worker.batch import BatchEngine
    return BatchEngine(str(MODEL), N_CTX, 0, 1, N_BATCH, slots=4)


@pytest.fixture(scope="module")
def nocache4():
    from llmctl.worker.batch import BatchEngine
    return BatchEngine(str(MODEL), N_CTX, 0, 1, N_BATCH, slots=4, prompt_cache=False)


@pytest.fixture(scope="module")
def stored4():
    """Four slots and a host-memory store (the second cache level), as in production."""
    from llmctl.worker.batch import BatchEngine
    return BatchEngine(str(MODEL), N_CTX, 0, 1, N_BATCH, slots=4, prompt_cache_bytes=32 << 20)


def assert_kv_consistent(engine) -> None:
    """llama.cpp's KV holds exactly what the engine's bookkeeping says, per slot."""
    assert engine.cache.positions() == [len(s.tokens) - 1 for s in engine.cache.slots]


# ---- determinism against the single-slot path -----------------------------------------

@pytest.mark.integration
def test_greedy_batched_equals_single_slot(single, batch4):
    want = {i: reference(single, greedy(p)) for i, p in enumerate(PROMPTS)}
    # Six requests on four slots, joining while others decode; the long prompt is
    # prefilled in chunks of N_BATCH between the running sequences' tokens.
    jobs = [(i, greedy(p), [0, 0, 3, 5, 9, 9][i]) for i, p in enumerate(PROMPTS)]
    got = drive(batch4, jobs)
    for i in want:
        assert got[i][0] == want[i][0], f"prompt {i} differs from the single-slot path"
        assert got[i][1]["completion_tokens"] == want[i][1]["completion_tokens"]
        assert got[i][1]["finish_reason"] == want[i][1]["finish_reason"]
    assert batch4.free_slots == batch4.capacity == 4
    assert_kv_consistent(batch4)


@pytest.mark.integration
def test_seeded_sampling_batched_equals_single_slot(single, nocache4):
    sampled = [{**p, "max_tokens": 20, "temperature": 0.9, "top_k": 40, "top_p": 0.9,
                "seed": 1234 + i} for i, p in enumerate(PROMPTS[:4])]
    want = {i: reference(single, f)[0] for i, f in enumerate(sampled)}
    got = drive(nocache4, [(i, f, 0) for i, f in enumerate(sampled)])
    assert {i: got[i][0] for i in want} == want


@pytest.mark.integration
def test_prompts_of_one_to_three_tokens(single, batch4):
    """The shortest prompts leave no room for the usual prefill rules (the last token
    decoded apart, no 1-token chunk): each still runs, with and without a cached
    prefix, and gives the single-slot output.  "The cat" after "Hello world" is two
    tokens with nothing reusable."""
    texts = ["Hi", "Hi there", "Hi there you", "Hello world", "The cat"]
    lengths = [len(single.tokenize_request(GenRequest(prompt=t))) for t in texts]
    assert lengths == [1, 2, 3, 2, 2], lengths         # what the test is about
    for rnd in range(2):                               # round two: cache hits
        for i, t in enumerate(texts):
            want = reference(single, greedy({"prompt": t}, 8))
            got = drive(batch4, [(i, greedy({"prompt": t}, 8), 0)])[i]
            assert got[0] == want[0], (rnd, t)
            assert got[1]["completion_tokens"] == want[1]["completion_tokens"] > 0
    assert_kv_consistent(batch4)


# ---- prompt cache ---------------------------------------------------------------------

def chat(question: str) -> dict[str, Any]:
    return greedy({"messages": [{"role": "system", "content": SYSTEM + " " + LONG},
                                {"role": "user", "content": question}]}, max_tokens=16)


@pytest.mark.integration
def test_prefix_cache_hit_equals_miss(nocache4, batch4):
    q1, q2 = chat("Do you sell saws?"), chat("When do you open on Saturday?")
    miss = drive(nocache4, [(1, q2, 0)])[1]
    assert miss[1]["cached_tokens"] == 0
    drive(batch4, [(1, q1, 0)])                       # leaves the system prompt cached
    hit = drive(batch4, [(2, q2, 0)])[2]
    assert hit[1]["cached_tokens"] > 300, hit[1]      # the shared system prompt
    assert hit[0] == miss[0]
    assert_kv_consistent(batch4)


@pytest.mark.integration
def test_prefix_copied_from_a_running_sequence(nocache4, batch4):
    """A new request whose prefix is only in a slot that is busy gets a copy of it."""
    q1 = {**chat("Describe every item in detail."), "max_tokens": 40}
    q2 = chat(f"Is the {uuid.uuid4().hex[:6]} box in stock?")
    miss = drive(nocache4, [(2, q2, 0)])[2]
    # Fill the cache with unrelated entries so that no free slot holds the prefix.
    drive(batch4, [(10 + i, greedy({"prompt": f"{i} {uuid.uuid4()}"}, 2), 0) for i in range(4)])
    got = drive(batch4, [(1, q1, 0), (2, q2, 20)])    # q1 has its prompt's KV by then
    assert got[2][1]["cached_tokens"] > 300, got[2][1]
    assert got[2][0] == miss[0]
    assert_kv_consistent(batch4)


@pytest.mark.integration
def test_more_prompts_than_slots_are_served_from_the_host_store(nocache4, stored4):
    """Six distinct prompts cycled through four slots.  With slots alone, LRU evicts
    each prompt just before it comes back; the store keeps the evicted KV, so round
    two evaluates only the last token of each prompt, with a miss's output."""
    prompts = [greedy({"prompt": f"{uuid.uuid4().hex} The {c} box number {i} holds"}, 8)
               for i, c in enumerate(["red", "blue", "green", "white", "black", "pink"])]
    miss = {i: drive(nocache4, [(i, f, 0)])[i] for i, f in enumerate(prompts)}
    hits_before = stored4.cache.store.hits
    for rnd in (0, 1):
        for i, f in enumerate(prompts):
            rid = 100 * rnd + i
            text, done = drive(stored4, [(rid, f, 0)])[rid]
            assert text == miss[i][0], f"round {rnd}, prompt {i}: output differs from a miss"
            if rnd == 1:
                assert done["cached_tokens"] == done["prompt_tokens"] - 1, (i, done)
    assert stored4.cache.store.hits - hits_before >= 2      # at least the two evicted ones
    assert 0 < stored4.cache.store.bytes <= stored4.cache.store.limit
    # The gateway learns about stored prefixes too (cache-aware routing).
    held = set(stored4.cache.prefixes())
    assert all(matched(request_hashes(as_request(f)), held) == len(request_hashes(as_request(f)))
               for f in prompts)
    assert_kv_consistent(stored4)


@pytest.mark.integration
def test_a_running_prefix_is_copied_through_the_sequence_state(nocache4, stored4):
    """Streams: a prefix held by a busy slot is copied as that sequence's state (its
    used cells), and the copy computes what a miss computes."""
    q1 = {**chat("List every item you stock."), "max_tokens": 30}
    q2 = chat(f"Is the {uuid.uuid4().hex[:6]} box in stock?")
    miss = drive(nocache4, [(2, q2, 0)])[2]
    drive(stored4, [(10 + i, greedy({"prompt": f"{i} {uuid.uuid4()}"}, 2), 0) for i in range(4)])
    restores = stored4.cache.store.hits
    got = drive(stored4, [(1, q1, 0), (2, q2, 20)])
    assert got[2][1]["cached_tokens"] > 300, got[2][1]
    assert stored4.cache.store.hits == restores             # from q1's slot, not the store
    assert got[2][0] == miss[0]
    assert_kv_consistent(stored4)


@pytest.mark.integration
def test_default_chunking_makes_a_cached_prompt_bit_identical(single):
    """With the default ``n_batch``, a ~300-token prompt evaluated from scratch and the
    same prompt evaluated after its first ~290 tokens came from the cache leave the
    same bytes in the KV.  (On the CPU a chunk of 64 or more rows goes through
    ggml's tiled flash-attention kernel, which rounds differently: with
    ``n_batch = 256`` this test fails.)"""
    from llmctl.common.config import ModelConfig
    from llmctl.worker.batch import BatchEngine
    n_batch = ModelConfig().n_batch
    shared = f"{uuid.uuid4().hex} {LONG}"
    prompt = greedy({"prompt": shared + " The last box is"}, 1)
    miss_e = BatchEngine(str(MODEL), N_CTX, 0, 1, n_batch, slots=1)    # empty: a miss
    drive(miss_e, [(1, prompt, 0)])
    hit_e = BatchEngine(str(MODEL), N_CTX, 0, 1, n_batch, slots=1)
    drive(hit_e, [(1, greedy({"prompt": shared + " Which box is green?"}, 1), 0)])
    done = drive(hit_e, [(2, prompt, 0)])[2][1]
    assert done["cached_tokens"] > 250, done
    assert hit_e.cache.slots[0].tokens == miss_e.cache.slots[0].tokens
    assert bytes(hit_e.cache.state_get(0)) == bytes(miss_e.cache.state_get(0))


# ---- churn: cancels, paused streams, no KV left behind ---------------------------------

def churn(engine, seed: int) -> dict[int, tuple[str, dict]]:
    rng = random.Random(seed)
    # One cancelled surely in prefill (a long unique prompt), one surely in decode.
    jobs = [(100, greedy({"prompt": f"{uuid.uuid4()} {LONG}"}, 4), 1),
            (101, greedy(PROMPTS[1], 200), 0)]
    cancels = {100: 2, 101: 40}
    for rid in range(1, 11):
        p = rng.choice(PROMPTS)
        fields = greedy(p, rng.randint(1, 24), window=rng.choice([0, 0, 2, 5]))
        if rng.random() < 0.3:
            fields["prompt" if "prompt" in p else "messages"] = (
                f"{uuid.uuid4()} {p['prompt']}" if "prompt" in p else
                [{"role": "user", "content": f"{uuid.uuid4()} {LONG}"}])
        jobs.append((rid, fields, rng.randint(0, 30)))
        if rng.random() < 0.4:
            cancels[rid] = jobs[-1][2] + rng.randint(0, 12)
    # Windowed streams pause; a grant every few steps keeps them going (the client
    # taking its tokens), interleaved with the others.
    class Granting:
        def __init__(self, e) -> None:
            self.e, self.n = e, 0

        def __getattr__(self, name):
            return getattr(self.e, name)

        def step(self):
            self.n += 1
            if self.n % 7 == 0:
                for rid in list(self.e.running):
                    self.e.grant(rid, 2)
            return self.e.step()

    return drive(Granting(engine), jobs, cancels)


@pytest.mark.integration
def test_churn_leaves_no_kv_behind(nocache4, batch4):
    proc = psutil.Process()
    for engine in (nocache4, batch4):
        out = churn(engine, 1)
        assert all(d is not None for _, d in out.values()), "every sequence ends once"
        assert out[100][1]["phase"] == "prefill" and out[100][1]["completion_tokens"] == 0
        assert out[101][1]["phase"] == "decode" and out[101][1]["finish_reason"] == "cancelled"
        phases = {d["phase"] for _, d in out.values() if d["finish_reason"] == "cancelled"}
        assert phases == {"prefill", "decode"}
        assert engine.free_slots == engine.capacity and not engine.running
        assert not engine.runnable
        assert_kv_consistent(engine)
    assert nocache4.cache.positions() == [-1] * 4                   # nothing kept
    assert all(s.seq is None for s in batch4.cache.slots)
    gc.collect()
    rss = proc.memory_info().rss
    churn(nocache4, 2)
    churn(batch4, 2)
    gc.collect()
    assert nocache4.cache.positions() == [-1] * 4
    assert_kv_consistent(batch4)
    growth = proc.memory_info().rss - rss
    assert growth < 16 * 1024 * 1024, f"RSS grew by {growth} bytes over a churn round"


@pytest.mark.integration
def test_a_paused_stream_does_not_hold_up_the_others(single, nocache4):
    a, b = greedy(PROMPTS[0], 12, window=3), greedy(PROMPTS[1], 12)
    e = nocache4
    e.start(e.prepare(1, as_request(a)))
    e.start(e.prepare(2, as_request(b)))
    text: dict[int, str] = defaultdict(str)
    ends: dict[int, dict] = {}
    sent = defaultdict(int)
    while 2 not in ends:
        for ev in e.step():
            text[ev.rid] += ev.text
            sent[ev.rid] += bool(ev.text)
            if ev.done:
                ends[ev.rid] = ev.done
    assert sent[1] == 3 and 1 not in ends                  # paused at its window
    assert e.runnable is False and e.free_slots == 3       # it keeps its slot
    e.grant(1, 100)
    while 1 not in ends:
        for ev in e.step():
            text[ev.rid] += ev.text
            if ev.done:
                ends[ev.rid] = ev.done
    assert text[1] == reference(single, greedy(PROMPTS[0], 12))[0]
    assert text[2] == reference(single, b)[0]


# ---- cache-aware routing --------------------------------------------------------------

def params(prompt=None, messages=None) -> GenRequest:
    return GenRequest(prompt=prompt, messages=tuple(ChatMessage(r, c) for r, c in messages)
                      if messages else None, max_tokens=1, deadline_ms=10_000)


def test_prefix_hashes_agree_between_gateway_and_worker():
    msgs = (("system", SYSTEM), ("user", "hi"))
    p = params(messages=msgs)
    assert prefix_hashes(p.prompt, msgs) == request_hashes(p)
    q = params(prompt=LONG)
    assert prefix_hashes(q.prompt) == request_hashes(q)
    other = prefix_hashes(None, (("system", SYSTEM), ("user", "something else entirely")))
    shared = matched(other, set(prefix_hashes(None, msgs)))
    assert 0 < shared < len(other)                       # the system prompt's blocks
    assert matched(prefix_hashes(SYSTEM), set(prefix_hashes(None, msgs))) == 0  # prompt != chat
    assert len(prefix_hashes("x" * 1_000_000)) == 64


def test_scheduler_routes_to_the_longest_cached_prefix():
    s = Scheduler(max_queue=10)
    for w in ("w0", "w1", "w2"):
        s.add_worker(WorkerState(w, slots=2))
    chat_a = (("system", SYSTEM), ("user", "first question"))
    chat_b = (("system", SYSTEM), ("user", "second question, a longer one than the first"))
    s.workers["w1"].prefixes = set(prefix_hashes(None, (("system", SYSTEM),)))  # system only
    s.workers["w2"].prefixes = set(prefix_hashes(None, chat_a))                 # whole chat a
    for p in (params(messages=chat_a), params(messages=chat_b), params(prompt="unrelated")):
        s.admit(Stream(request=p, out=Recorder()))
    order = [w.id for w, _ in s.take()]
    # chat a: w2 holds all of it; chat b: w1 and w2 hold the system prompt, w1 is
    # least recently used; unrelated: no match anywhere, LRU is w0.
    assert order == ["w2", "w1", "w0"]
    # Without credit, the cached worker is passed over.
    for _ in range(3):
        s.admit(Stream(request=params(messages=chat_a), out=Recorder()))
    assert [w.id for w, _ in s.take()] == ["w2", "w1", "w0"]


# ---- end to end -----------------------------------------------------------------------

@pytest.mark.integration
def test_end_to_end_four_slots(single, make_service):
    s = make_service(model={"n_ctx": N_CTX, "n_batch": N_BATCH},
                     workers={"count": 2, "slots": 4}, gateway={"max_streams": 16})
    r = s.start()
    assert r.returncode == 0, r.stdout + r.stderr
    st = s.status()
    assert [w["slots"] for w in st["workers"]] == [4, 4]
    fields = [greedy(p, 16) for p in PROMPTS] + [greedy({"prompt": "Water boils at"}, 16),
                                                 greedy({"prompt": "My favourite book"}, 16)]
    want = [reference(single, f)[0] for f in fields]
    results: dict[int, Any] = {}

    def one_client(k: int) -> None:
        with s.client() as c:      # 4 clients x 2 concurrent streams each
            for j in (0, 1):
                c.generate(j + 1, **fields[2 * k + j])
            got = c.collect({1, 2})
            for j in (0, 1):
                results[2 * k + j] = got[j + 1]

    threads = [threading.Thread(target=one_client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [results[i].text for i in range(8)] == want
    assert {results[i].done["worker"] for i in range(8)} == {"w0", "w1"}

    # Cache-aware routing: a second question with the same system prompt goes to the
    # worker that answered the first, and reuses its KV.
    with s.client() as c:
        first = c.complete(1, **chat("Do you sell paint?"))
        second = c.complete(2, **chat("Do you sell ladders?"))
    assert second.done["worker"] == first.done["worker"]
    assert second.done["cached_tokens"] > 300
    assert "prefix_hashes" not in second.done
    counters = s.counters()
    assert counters["cache_hit_tokens"] >= second.done["cached_tokens"]
    assert counters["prompt_tokens"] >= counters["cache_hit_tokens"]
    wait_until(s.idle, 10, "idle")
