"""Several models: per-model admission in the gateway's core, and the supervisor's model
plan (load when asked, evict the least recently used idle model, never exceed the budget).

Pure state: the Gateway core without sockets, the ModelManager without processes."""
from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmctl.common import admin, messages as m
from llmctl.common.config import Config, ModelEntry
from llmctl.common.errors import ModelNotFound, NotReady, Overloaded
from llmctl.common.config import GenerationConfig
from llmctl.common.protocol import parse_json
from llmctl.common.request import validate
from llmctl.control.models import ModelManager, check_plan, worker_names
from llmctl.dataplane.gateway import Gateway
from llmctl.dataplane import clock
from llmctl.dataplane.supervisor_link import models as model_view
from tests.fakes import Recorder as Sink, illegal_transitions


def entry(name: str, load: str = "on_demand", workers: int = 1, keep_alive_s: float = 0.0,
          slots: int = 1) -> ModelEntry:
    return ModelEntry(name=name, path=f"/m/{name}.gguf", load=load, workers=workers,
                      keep_alive_s=keep_alive_s, slots=slots)


def config(*entries: ModelEntry, max_queue: int = 2) -> Config:
    c = Config()
    return msgspec.structs.replace(c, models=tuple(entries), gateway=msgspec.structs.replace(
        c.gateway, max_queue=max_queue))


def params(model: str | None = None, prompt: str = "hi"):
    body = f'{{"prompt": "{prompt}", "max_tokens": 2' + (f', "model": "{model}"}}' if model else "}")
    return validate(parse_json(body.encode()), GenerationConfig())


def ready(gw: Gateway, wid: str, served: str, slots: int = 1) -> None:
    gw.on_worker(wid, m.Ready(m.ReadyInfo(worker=wid, pid=1, slots=slots, name=wid.split(".")[0],
                                          served=served)))


def events(gw: Gateway) -> list[Any]:
    out = []
    while not gw.events.empty():
        out.append(gw.events.get_nowait())
    return out


@pytest.fixture
def loop():
    lp = asyncio.new_event_loop()          # the Gateway's asyncio objects want one
    asyncio.set_event_loop(lp)
    yield lp
    asyncio.set_event_loop(None)
    lp.close()


# ---- the gateway's core ----------------------------------------------------------------------

def test_protocol_model_key_is_optional_text():
    assert params().model is None and params("b").model == "b"
    with pytest.raises(Exception, match="model must be a string"):
        validate({"prompt": "x", "model": 3}, GenerationConfig())


def test_unknown_model_is_bad_request_naming_it(loop):
    gw = Gateway(config(entry("a", "always"), entry("b")))
    with pytest.raises(ModelNotFound) as exc:
        gw.open(params("zz"), Sink())
    assert exc.value.code.value == "bad_request" and "'zz'" in exc.value.message
    assert exc.value.http_status == 404 and exc.value.openai_code == "model_not_found"


def test_one_model_config_is_lenient_on_http_only(loop):
    gw = Gateway(Config())
    assert gw.route("anything", lenient=True) is gw.sched.default       # HTTP: any name
    with pytest.raises(ModelNotFound):
        gw.route("anything")                                            # the wire: strict
    assert gw.route(None).model == gw.model_name == Config().default_model.name


def test_a_flood_on_one_model_does_not_delay_another(loop):
    """Each model has its own queue bound and credits: model a full answers overloaded for
    a, while a request for b is dispatched at once, ahead of a's queue."""
    gw = Gateway(config(entry("a", "always"), entry("b", "always"), max_queue=2))
    ready(gw, "w0.1", "a")
    ready(gw, "w1.2", "b")
    a_sinks = [Sink() for _ in range(3)]
    for s in a_sinks:                       # 1 runs (its credit), 2 queue: a is full
        gw.open(params("a"), s)
    with pytest.raises(Overloaded) as exc:
        gw.open(params("a"), Sink())
    assert "'a'" in exc.value.message and exc.value.retry_after_ms
    out = gw.outgoing()
    assert [w for w, _ in out] == ["w0.1"]         # one dispatch for a; two wait
    b = gw.open(params("b"), Sink())             # b is not behind a's queue
    out = gw.outgoing()
    assert [w for w, _ in out] == ["w1.2"] and b.worker == "w1.2"
    assert len(gw.sched.get("a").queue) == 2 and not gw.sched.get("b").queue
    with pytest.raises(Overloaded):
        gw.open(params("a"), Sink())             # still full for a
    gw.open(params("b"), Sink())                 # b queues behind its own running one
    assert model_view(gw)["a"]["queue"] == 2 and model_view(gw)["b"]["queue"] == 1


def test_on_demand_request_waits_and_asks_for_its_model(loop):
    gw = Gateway(config(entry("a", "always"), entry("b")))
    ready(gw, "w0.1", "a")
    with pytest.raises(NotReady):                       # an always model has no waiting
        Gateway(config(entry("a", "always"))).open(params("a"), Sink())
    sink = Sink()
    events(gw)
    req = gw.open(params("b"), sink)
    assert events(gw) == [admin.ModelWanted(model="b")]
    assert gw.outgoing() == [] and not sink.ends
    ready(gw, "w1.3", "b")                              # it loaded: the queue is served
    out = gw.outgoing()
    assert [w for w, _ in out] == ["w1.3"] and req.worker == "w1.3"


def test_model_unavailable_answers_its_queue_once(loop):
    gw = Gateway(config(entry("a", "always"), entry("b")))
    ready(gw, "w0.1", "a", slots=0)                      # a: ready, no credit free
    sinks = [Sink() for _ in range(2)]
    for s in sinks:
        gw.open(params("b"), s)
    a = Sink()
    gw.open(params("a"), a)                            # a's queue is not b's
    n = gw.model_unavailable("b", Overloaded("no room", retry_after_ms=1000))
    assert n == 2
    for s in sinks:
        assert len(s.ends) == 1 and s.ends[0][0] == "error"
        assert s.ends[0][1].code.value == "overloaded" and s.ends[0][1].retry_after_ms == 1000
    assert gw.model_unavailable("b", Overloaded("again")) == 0      # nothing answered twice
    assert not a.ends and len(gw.sched.get("a").queue) == 1


def test_deadline_counts_while_a_model_loads(loop):
    gw = Gateway(config(entry("a", "always"), entry("b")))
    sink = Sink()
    req = gw.open(params("b"), sink)
    clock.tick(gw, req.deadline + 0.01)
    assert sink.ends[0][0] == "error" and sink.ends[0][1].code.value == "timeout"
    assert "'b' was not loaded" in sink.ends[0][1].message


def test_worker_of_each_model_goes_to_its_own_scheduler(loop):
    gw = Gateway(config(entry("a", "always"), entry("b", "always")))
    ready(gw, "w0.1", "a")
    ready(gw, "w1.2", "b")
    assert set(gw.sched.get("a").workers) == {"w0.1"} and set(gw.sched.get("b").workers) == {"w1.2"}
    gw.open(params("b"), Sink())
    gw.outgoing()
    gw.worker_lost("w1.2", "test", tell=False)      # its request goes back to b's queue
    assert len(gw.sched.get("b").queue) == 1 and not gw.sched.get("a").queue
    assert set(gw.sched.workers) == {"w0.1"}


# ---- the supervisor's model plan ------------------------------------------------------------

def manager(budget: float = 200.0, **needs: float) -> ModelManager:
    entries = [entry(n) for n in needs]
    return ModelManager(config(*entries), needs, budget)


def tick(mm: ModelManager, now: float, usage: dict | None = None, fatal: dict | None = None):
    """Processes follow the plan at once: what is desired runs and is ready."""
    desired = mm.desired_workers()
    return mm.step(now, {n: True for n in desired}, {n: True for n in desired}, fatal or {},
                   usage if usage is not None else {})


def test_worker_names_are_numbered_across_models():
    cfg = config(entry("a", workers=2), entry("b"), entry("c", workers=2))
    assert worker_names(cfg) == {"a": ["w0", "w1"], "b": ["w2"], "c": ["w3", "w4"]}


def test_load_when_asked_then_evict_the_lru_idle_one():
    mm = manager(200.0, a=116.0, b=161.0)
    assert mm.desired_workers() == {}                   # on demand: nothing at start
    mm.want("a")
    tick(mm, 1.0)
    assert mm.models["a"].state == "loading"
    tick(mm, 1.1)
    assert mm.models["a"].state == "loaded" and set(mm.desired_workers()) == {"w0"}
    mm.want("b")                                        # does not fit beside a: a goes first
    tick(mm, 2.0, {"a": {"open": 0, "idle_s": 1.0}})
    assert mm.models["a"].state == "unloading" and mm.models["b"].state == "unloaded"
    assert mm.desired_workers() == {}                   # b does not start before a is gone
    mm.step(2.1, {}, {"w0": True}, {}, {})              # a's process still stops
    assert mm.models["b"].state == "unloaded" and mm.used_mib() == 116.0
    tick(mm, 2.2)                                       # gone: b loads
    assert mm.models["a"].state == "unloaded" and mm.models["b"].state == "loading"
    assert mm.models["a"].evictions == 1


def test_nothing_idle_to_evict_is_overloaded_with_retry_after():
    mm = manager(200.0, a=116.0, b=161.0)
    mm.want("a")
    tick(mm, 1.0)
    tick(mm, 1.1)
    mm.want("b")
    (r,) = tick(mm, 2.0, {"a": {"open": 3, "idle_s": 0.0}})       # a is busy
    assert (r.model, r.code) == ("b", "overloaded") and r.retry_after_ms
    assert "does not fit" in r.message and "a (116 MiB, loaded)" in r.message
    assert mm.models["a"].state == "loaded" and mm.models["b"].state == "unloaded"
    assert not mm.models["b"].wanted                    # asked again by the next request


def test_a_model_bigger_than_the_budget_is_not_ready():
    mm = manager(100.0, a=116.0)
    mm.want("a")
    (r,) = tick(mm, 1.0)
    assert r.code == "not_ready" and "more than the whole budget" in r.message
    assert check_plan(config(entry("a")), {"a": 116.0}, 100.0, "ram")


def test_always_models_are_never_evicted_and_must_fit_together():
    cfg = config(entry("a", "always"), entry("b", "always"), entry("c"))
    assert "always" in check_plan(cfg, {"a": 100.0, "b": 100.0, "c": 10.0}, 150.0, "ram")
    mm = ModelManager(cfg, {"a": 100.0, "b": 40.0, "c": 100.0}, 150.0)
    tick(mm, 1.0)
    mm.want("c")
    (r,) = tick(mm, 2.0, {"a": {"open": 0, "idle_s": 100.0}, "b": {"open": 0, "idle_s": 100.0}})
    assert r.code == "overloaded" and mm.models["a"].state == "loaded"


def test_keep_alive_unloads_an_idle_on_demand_model():
    cfg = config(entry("a", keep_alive_s=10.0))
    mm = ModelManager(cfg, {"a": 50.0}, 0.0)
    mm.want("a")
    tick(mm, 1.0)
    tick(mm, 1.1)
    tick(mm, 5.0, {"a": {"open": 0, "idle_s": 1.0}})
    assert mm.models["a"].state == "loaded"
    tick(mm, 9.0, {"a": {"open": 1, "idle_s": 10.0}})       # busy: stays
    assert mm.models["a"].state == "loaded"
    tick(mm, 20.0, {"a": {"open": 0, "idle_s": 11.0}})
    assert mm.models["a"].state == "unloading"


def test_a_model_that_cannot_load_is_refused_not_ready():
    mm = manager(0.0, a=10.0)
    mm.want("a")
    tick(mm, 1.0)
    (r,) = mm.step(2.0, {}, {"w0": True}, {"w0": "bad magic"}, {})
    assert r.code == "not_ready" and "bad magic" in r.message
    assert mm.models["a"].state == "unloading"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["want", "unload", "tick", "busy", "stop"]),
                          st.sampled_from("abc")), max_size=60))
def test_the_plan_is_never_exceeded(script):
    """Whatever is asked in whatever order, what the plan counts (every model not
    unloaded: loading, loaded, or still stopping) never exceeds the budget, and every
    state change is one its table allows."""
    with illegal_transitions() as illegal:
        plan_script(script)
    assert not illegal


def plan_script(script: list[tuple[str, str]]) -> None:
    mm = manager(200.0, a=116.0, b=161.0, c=60.0)
    now, busy, stopped = 0.0, set(), set()
    for op, name in script:
        now += 0.1
        if op == "want":
            mm.want(name)
        elif op == "unload":
            mm.unload(name)
        elif op == "busy":
            busy ^= {name}
        elif op == "stop":
            stopped.add(name)
        desired = mm.desired_workers()
        running = {n: True for mdl in mm.models.values() if mdl.state != "unloaded"
                   and mdl.name not in stopped for n in mdl.names}
        usage = {n: {"open": int(n in busy), "idle_s": 0.5} for n in "abc"}
        mm.step(now, {n: True for n in desired}, running, {}, usage)
        stopped &= {x.name for x in mm.models.values() if x.state == "unloading"}
        assert mm.used_mib() <= 200.0
        assert sum(mm.models[n].need_mib for n in "abc"
                   if any(w in running or w in desired for w in mm.models[n].names)) <= 200.0


def test_no_load_is_decided_under_a_budget_before_the_figures_are_known():
    mm = manager(200.0, a=116.0)
    mm.planned = False
    mm.want("a")
    assert tick(mm, 1.0) == [] and mm.models["a"].state == "unloaded" and mm.models["a"].wanted
    mm.planned = True
    tick(mm, 1.1)
    assert mm.models["a"].state == "loading"
