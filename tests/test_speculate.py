"""Speculative decoding: the n-gram drafter (worker/speculate.py), pure, and the batching
engine's verification of drafts (worker/batch.py) against decoding one token a step, on
the real model (``integration``)."""
from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmctl.common.config import GenerationConfig
from llmctl.common.errors import BadRequest
from llmctl.common.request import GenRequest, as_request, validate
from llmctl.worker.speculate import (FIRST_PAUSE, N_MAX, N_MIN, PROBE, Drafter,
                                     draft_length, row_cost)
from tests.service import MODEL
from tests.test_batching import PROMPTS, assert_kv_consistent, drive


def drafter(tokens: list[int], max_draft: int) -> Drafter:
    """A drafter past its probe that drafts ``max_draft`` tokens (all were kept)."""
    d = Drafter(tokens, max_draft)
    d.probe, d.kept = False, 1000.0
    return d


def test_drafts_what_followed_the_latest_earlier_occurrence():
    d = drafter([1, 2, 3, 4, 5, 9, 2, 3, 7, 8], max_draft=3)
    d.push(2)
    d.push(3)                                   # "2 3" was last followed by 7 8
    assert d.draft(8) == [7, 8, 2]


def test_the_longest_ngram_wins():
    # "3 4" is followed by 5 at its latest occurrence, "2 3 4" by 6 at its only one
    d = drafter([2, 3, 4, 6, 6, 6, 0, 3, 4, 5, 0, 2, 3, 4], max_draft=1)
    assert d.draft(8) == [6]


def test_no_match_no_draft():
    assert drafter(list(range(50)), max_draft=8).draft(8) == []
    assert drafter([], max_draft=8).draft(8) == []
    assert drafter([5], max_draft=8).draft(8) == []


def test_a_draft_never_exceeds_the_limit():
    d = drafter([1, 2] * 20, max_draft=8)
    assert d.draft(8) == [1, 2] * 4             # the period goes on past the end
    assert d.draft(3) == [1, 2, 1]
    assert d.draft(0) == [] and d.draft(-1) == []


@given(toks=st.lists(st.integers(0, 5), max_size=80), limit=st.integers(0, 12),
       max_draft=st.integers(1, 10))
def test_a_draft_continues_an_earlier_occurrence_of_the_suffix(toks, limit, max_draft):
    d = drafter(toks, max_draft)
    draft = d.draft(limit)
    assert len(draft) <= min(limit, max_draft)
    if not draft:
        return
    # some n in N_MIN..N_MAX: the last n tokens occur earlier, followed by the draft
    ext = toks + draft                          # an overlapping occurrence repeats
    assert any(toks[at - n:at] == toks[len(toks) - n:] and ext[at:at + len(draft)] == draft
               for n in range(N_MIN, N_MAX + 1) for at in range(n, len(toks)))


def test_a_draft_has_the_tokens_that_pay_for_their_rows():
    assert draft_length(0.5, row_cost(1), 8) == 0
    assert draft_length(0.75, row_cost(1), 8) == 2          # 0.75 ** 2 > 0.54 > 0.75 ** 3
    assert draft_length(0.99, row_cost(1), 8) == 8
    assert draft_length(1.0, row_cost(8), 8) == 8
    assert draft_length(0.85, row_cost(8), 8) == 0          # under load: only near copies
    assert 0.5 < row_cost(1) < row_cost(2) < row_cost(8) < 1.0


def test_drafts_grow_while_kept_and_stop_when_they_do_not_pay():
    d = Drafter([1, 2] * 20, max_draft=8)
    lengths = []
    for _ in range(8):
        draft = d.draft(16)
        lengths.append(len(draft))
        d.verified(len(draft), len(draft))
    assert lengths[0] == PROBE and lengths == sorted(lengths) and lengths[-1] == 8
    assert (d.drafted, d.accepted) == (sum(lengths), sum(lengths))
    assert len(d.draft(16, decoding=8)) >= 2                 # a copy pays even under load
    rounds = 0
    while d.draft(16):
        d.verified(len(d.draft(16)), 0)
        rounds += 1
        assert rounds < 20, "it never stops drafting"
    assert d.paused == FIRST_PAUSE


def test_after_a_pause_a_probe():
    d = Drafter([1, 2] * 20, max_draft=8)
    d.verified(len(d.draft(16)), 0)
    assert d.draft(16) == [] and d.paused == FIRST_PAUSE
    for _ in range(FIRST_PAUSE - 1):
        d.push(1)
        assert d.draft(16) == []
    d.push(2)
    assert len(d.draft(16)) == PROBE, "it never drafts again"
    d.verified(PROBE, 0)
    assert d.draft(16) == [] and d.paused == 2 * FIRST_PAUSE   # the next pause is longer


def test_the_request_field():
    gen = GenerationConfig()
    assert validate({"prompt": "x"}, gen).speculative is True
    assert validate({"prompt": "x", "speculative": False}, gen).speculative is False
    with pytest.raises(BadRequest, match="speculative"):
        validate({"prompt": "x", "speculative": "no"}, gen)
    # on the wire only when off: a request without it encodes as before
    assert b"speculative" not in msgspec.json.encode(GenRequest(prompt="x"))



def test_speculation_is_set_per_model(tmp_path):
    from llmctl.common import config
    from llmctl.common.config import ConfigError

    path = tmp_path / "c.toml"
    path.write_text('[[models]]\nname = "a"\npath = "a.gguf"\nspeculative = "ngram"\n'
                    'spec_max_draft = 12\n[[models]]\nname = "b"\npath = "b.gguf"\n')
    cfg = config.load(path)
    a, b = cfg.served
    assert (a.speculative, a.spec_max_draft, b.speculative) == ("ngram", 12, "off")
    assert cfg.for_model(a).model.speculative == "ngram"          # what its worker runs
    assert cfg.for_model(a).model.spec_max_draft == 12
    assert cfg.for_model(b).model.speculative == "off"
    path.write_text('[model]\npath = "m.gguf"\nspeculative = "ngram"\n')
    assert config.load(path).served[0].speculative == "ngram"
    path.write_text('[model]\nspeculative = "eagle"\n')
    with pytest.raises(ConfigError, match="speculative"):
        config.load(path)

# ---- the engine: drafts verified in the batch, output unchanged -----------------------

N_CTX, N_BATCH = 1024, 32
PAR = ("The Great Barrier Reef is the world's largest coral reef system, composed of over "
       "2,900 individual reefs and 900 islands stretching for over 2,300 kilometres. The reef "
       "is located in the Coral Sea, off the coast of Queensland, Australia.")
NOTICE = ("Our office moves to 14 Harbour Street on 3 March. Staff should pack their desks by "
          "Friday 28 February, label every box with their name and floor, and hand keys to "
          "Maria in reception. Parking at the new office is limited to twelve spaces.")
CODE = ("def mean(xs):\n    total = 0\n    for x in xs:\n        total += x\n"
        "    return total / len(xs)\n")


def chat(text: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}]}


# Contexts stay under 256 cells: there every row, decoded alone or in a batch, goes
# through the same attention kernel (worker/batch.py, "Speculation").
GROUNDED = [chat("Repeat the following text exactly:\n\n" + PAR),
            chat("Rewrite this paragraph in simpler words:\n\n" + PAR),
            chat("Summarise:\n\n" + PAR),
            chat("List the dates in this text:\n\n" + NOTICE),
            chat("Rewrite this notice politely:\n\n" + NOTICE),
            chat("Add a docstring to this function:\n\n" + CODE),
            chat("Make this function return 0 for an empty list:\n\n" + CODE),
            {"prompt": "1, 2, 3, 4, 5, 6,"},
            {"prompt": "The quick brown fox jumps over the lazy dog. The quick brown fox"}]
FREE = [p for p in PROMPTS if len(json.dumps(p)) < 400] + [
    chat("Write a haiku about the sea."), chat("What is the boiling point of water?")]
SCHEMA = json.dumps({"type": "object", "properties": {
    "answer": {"type": "string"}, "items": {"type": "array", "items": {"type": "string"}}},
    "required": ["answer", "items"]})


def requests() -> list[dict[str, Any]]:
    """Greedy requests of every kind, some with stop strings, a JSON schema or logprobs."""
    out = []
    for i, p in enumerate(GROUNDED + FREE):
        f: dict[str, Any] = {**p, "max_tokens": 48, "temperature": 0.0}
        if i % 4 == 1:
            f["stop"] = ["reef", "\n\n", "box", "return"]
        elif i % 4 == 2:
            f.update(logprobs=True, top_logprobs=2)
        elif i % 4 == 3 and i < len(GROUNDED):
            f["json_schema"] = SCHEMA
        out.append(f)
    return out


@pytest.fixture(scope="module")
def plain4():
    from llmctl.worker.batch import BatchEngine
    return BatchEngine(str(MODEL), N_CTX, 0, 1, N_BATCH, slots=4, prompt_cache=False)


@pytest.fixture(scope="module")
def spec4():
    from llmctl.worker.batch import BatchEngine
    return BatchEngine(str(MODEL), N_CTX, 0, 1, N_BATCH, slots=4, prompt_cache=False,
                       spec_max_draft=8)


def drive_events(engine, jobs) -> dict[int, list]:
    """Like ``drive``, keeping every event (text pieces and their logprobs)."""
    from collections import defaultdict
    events: dict[int, list] = defaultdict(list)
    pending = list(jobs)
    while pending or engine.active is not None:
        while pending and engine.free_slots:
            rid, fields = pending.pop(0)
            engine.start(engine.prepare(rid, as_request(fields)))
        for ev in engine.step():
            assert ev.error is None, ev.error
            events[ev.rid].append(ev)
    return events


def summary(evs: list) -> tuple[str, list, dict]:
    done = msgspec.structs.asdict(evs[-1].done)
    lps = [e for ev in evs for e in ev.logprobs or ()]
    return "".join(ev.text for ev in evs), lps, done


def compare_opting_out(plain, spec, what: str) -> tuple[int, int]:
    """The prompt set on ``plain`` and on ``spec`` (every third request opting out with
    ``speculative: false``, batched with drafting ones): the same text, tokens, logprobs,
    lengths and ends; returns the draft tokens (verified, kept) over all requests."""
    reqs = requests()
    want = drive_events(plain, list(enumerate(reqs)))
    got = drive_events(spec, [(i, {**f, "speculative": False} if i % 3 == 2 else f)
                              for i, f in enumerate(reqs)])
    drafted = accepted = 0
    for i, f in enumerate(reqs):
        (text, lps, done), (text2, lps2, done2) = summary(want[i]), summary(got[i])
        assert text2 == text, f"request {i} ({f}) differs with {what}"
        assert [e["token"] for e in lps2] == [e["token"] for e in lps]
        assert [e["logprob"] for e in lps2] == pytest.approx([e["logprob"] for e in lps],
                                                             abs=1e-3)
        for key in ("completion_tokens", "finish_reason"):
            assert done2[key] == done[key], (i, key)
        assert done.get("drafted", 0) == 0
        if i % 3 == 2:
            assert done2.get("drafted", 0) == 0, "a request that opted out drafted"
        assert done2.get("accepted", 0) <= done2.get("drafted", 0)
        drafted += done2.get("drafted", 0)
        accepted += done2.get("accepted", 0)
    assert spec.free_slots == 4
    assert_kv_consistent(spec)
    return drafted, accepted


@pytest.mark.integration
def test_speculation_changes_no_greedy_output(plain4, spec4):
    """Grounded and free prompts on four slots, joining as slots free up; every third
    request opts out (``speculative: false``) and is batched with drafting ones."""
    drafted, accepted = compare_opting_out(plain4, spec4, "speculation")
    assert accepted >= 0.3 * drafted > 0, (accepted, drafted)


@pytest.mark.integration
def test_seeded_sampling_is_the_same_with_speculation(plain4, spec4):
    """A draft token is kept only when the sequence's own chain draws it: the chain
    draws exactly the numbers it draws without speculation."""
    reqs = [{**p, "max_tokens": 32, "temperature": 0.7, "top_k": 40, "top_p": 0.95,
             "seed": 7 + i} for i, p in enumerate(GROUNDED[:5] + FREE[:3])]
    want = drive(plain4, [(i, f, 0) for i, f in enumerate(reqs)])
    got = drive(spec4, [(i, f, 0) for i, f in enumerate(reqs)])
    assert {i: got[i][0] for i in want} == {i: want[i][0] for i in want}
    assert sum(got[i][1].get("drafted", 0) for i in got) > 0


@pytest.mark.integration
def test_a_draft_never_outruns_the_token_credit(spec4):
    """A sequence sends no more TOKENs than its window allows, however long its draft;
    paused without credit, it goes on when granted more."""
    fields = {**GROUNDED[0], "max_tokens": 40, "temperature": 0.0}
    ref = drive(spec4, [(1, fields, 0)])[1]
    seq = spec4.prepare(2, as_request({**fields, "window": 3}))
    spec4.start(seq)
    text, sent, done = "", 0, None
    for _ in range(2000):
        for ev in spec4.step():
            assert ev.error is None
            text += ev.text
            sent += bool(ev.text) and ev.done is None
            done = ev.done or done
        if done is not None:
            break
        if not spec4.runnable:
            assert sent == 3, "it sent more (or less) than its credit"
            spec4.grant(2, 3)
            sent = 0
    assert done is not None and text == ref[0]
    assert msgspec.structs.asdict(done)["accepted"] > 0


def on_and_off(s):
    """One grounded request drafting and one with ``speculative: false`` on service ``s``
    (started here): the same text, drafts in the first's DONE only; their DONEs."""
    assert s.start().returncode == 0
    fields = {**GROUNDED[0], "max_tokens": 24, "temperature": 0.0}
    with s.client() as c:
        on = c.complete(1, **fields)
        off = c.complete(2, **fields, speculative=False)
    assert on.text == off.text and on.done and off.done
    assert 0 < on.done["accepted"] <= on.done["drafted"]
    assert "drafted" not in off.done and "accepted" not in off.done
    return on, off


@pytest.mark.integration
def test_a_service_with_speculation_reports_it(make_service):
    """``speculative = "ngram"`` on the model: a request drafts and says so in its DONE,
    ``speculative: false`` on the request does not and answers the same; the gateway's
    counters reach /metrics and ``llmctl status``."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    s = make_service(model={"speculative": "ngram"})
    on, off = on_and_off(s)
    text = urllib.request.urlopen(f"http://127.0.0.1:{s.http_port}/metrics", timeout=10).read()
    fams = {f.name: f for f in text_string_to_metric_families(text.decode())}
    value = {name: fams[name].samples[0].value for name in (
        "llmctl_spec_drafted_tokens", "llmctl_spec_accepted_tokens",
        "llmctl_spec_acceptance_rate")}
    assert value["llmctl_spec_drafted_tokens"] == on.done["drafted"]
    assert value["llmctl_spec_accepted_tokens"] == on.done["accepted"]
    assert value["llmctl_spec_acceptance_rate"] == pytest.approx(
        on.done["accepted"] / on.done["drafted"])
    counters = s.counters()
    assert (counters["drafted_tokens"], counters["accepted_tokens"]) == \
        (on.done["drafted"], on.done["accepted"])
    assert "draft tokens accepted" in s.llmctl("status").stdout
